"""The generic `videos` source (a folder of videos, one speaker per file) and the demo world.

Speaker id: the parent folder's name when the file sits in a subfolder of the source, else the
file stem. Clip id: the path relative to the source, without suffix, so it is unique. A
`portrait.jpg` (or .jpeg, .png) beside a speaker's videos is that speaker's frontal, neutral
photo: the builder stores it aligned as `portrait.jpg`, the face decoder's target.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from shards.schema import sample_key
from shards.sources import SourceItem

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv"}
DEMO_MANIFEST = "manifest.jsonl"
PORTRAIT_NAMES = ("portrait.jpg", "portrait.jpeg", "portrait.png")


def _video_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such source folder of videos")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def _item(root: Path, path: Path, kind: str, meta: dict | None = None) -> SourceItem:
    relative = path.relative_to(root)
    speaker = relative.parent.name if relative.parent != Path(".") else path.stem
    clip = relative.with_suffix("").as_posix().replace("/", "_")
    return SourceItem(
        key=sample_key(kind, speaker, clip), speaker=speaker, path=path,
        meta={"video": relative.as_posix(), **(meta or {})},
    )


def _speaker_portrait(folder: Path) -> Path | None:
    return next((folder / name for name in PORTRAIT_NAMES if (folder / name).is_file()), None)


def video_folder_items(source: str) -> Iterator[SourceItem]:
    root = Path(source)
    for path in _video_files(root):
        item = _item(root, path, "videos")
        portrait = None if path.parent == root else _speaker_portrait(path.parent)
        yield item if portrait is None else replace(item, portrait=portrait)


def demo_world_items(source: str) -> Iterator[SourceItem]:
    """The demo world's videos with their ground truth (`manifest.jsonl`) as attributes, and
    each speaker's portrait (worlds made before portraits existed have none)."""
    root = Path(source)
    manifest = root / DEMO_MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: not a demo world; generate one with `s2f demo`")
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        path = root / record.pop("path")
        portrait = record.pop("portrait", None)
        item = _item(root, path, "demo", {"attributes": record})
        yield item if portrait is None else replace(item, portrait=root / portrait)
