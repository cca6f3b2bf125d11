"""`python -m s2f ...` is the `s2f` command."""

from s2f.cli import main

raise SystemExit(main())
