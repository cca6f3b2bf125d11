"""`s2f shards build|merge|inspect`: the command-line shell over shards.build."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from collections import Counter
from pathlib import Path

from shards.build import BuildConfig, build_shards, complete_shards, merge
from shards.schema import DEFAULT_RATIOS, FAILURES, SPLITS, SplitIndex
from shards.sources import SOURCES, source_items


def _ratios(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"--ratios needs train,val,test (3 numbers), got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2f shards", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build train/val/test shards from a source")
    build.add_argument("--kind", required=True, choices=sorted(SOURCES))
    build.add_argument("--source", required=True, help="the source's folder or file")
    build.add_argument("--out", required=True)
    build.add_argument("--teacher", default="dlib", help="dlib | vggface:PATH")
    build.add_argument("--payload", default="audio", choices=["audio", "spectrogram"])
    build.add_argument("--detector", default="hog", choices=["hog", "cnn", "mtcnn"])
    build.add_argument("--workers", type=int, default=1)
    build.add_argument("--ratios", type=_ratios, default=DEFAULT_RATIOS)
    build.add_argument("--samples-per-shard", type=int, default=1000)
    build.add_argument("--min-audio-seconds", type=float, default=1.0)
    build.add_argument("--max-center-distance", type=float, default=0.25,
                       help="reject a face farther than this (frame diagonals) from the source's (x, y)")
    build.add_argument("--part", type=int, default=0, help="this array task's part")
    build.add_argument("--parts", type=int, default=1, help="number of array tasks")
    build.add_argument("--cache-dir", help="avspeech: where downloads are cached")
    build.add_argument("--download-command",
                       help="avspeech: replaces yt-dlp; a command with {url} {id} {out} [{start} {end}]")
    build.add_argument("--no-official-test", action="store_true",
                       help="voxceleb: hash VoxCeleb1's official test identities like the others")
    merge_cmd = commands.add_parser("merge", help="write split indexes from an array build's parts")
    merge_cmd.add_argument("out")
    inspect = commands.add_parser("inspect", help="per-split counts, sizes, teacher, failures")
    inspect.add_argument("out")
    return parser


def _source_options(args: argparse.Namespace) -> dict:
    if args.kind == "avspeech":
        command = tuple(shlex.split(args.download_command)) if args.download_command else None
        return {"cache_dir": args.cache_dir, "command": command}
    if args.kind == "voxceleb":
        return {"official_test": not args.no_official_test}
    return {}


def _build(args: argparse.Namespace) -> None:
    config = BuildConfig(
        out=args.out, teacher=args.teacher, payload=args.payload, detector=args.detector,
        ratios=args.ratios, samples_per_shard=args.samples_per_shard,
        min_audio_seconds=args.min_audio_seconds, max_center_distance=args.max_center_distance,
        workers=args.workers, part=args.part, parts=args.parts,
    )  # fmt: skip
    summary = build_shards(source_items(args.kind, args.source, **_source_options(args)), config)
    written = ", ".join(f"{s} {summary.written[s]}" for s in SPLITS)
    print(f"wrote {written}; skipped {summary.skipped} already built; failed {len(summary.failures)}")
    print(stage_text(summary.stage_seconds, summary.wall_seconds, sum(summary.written.values())))
    if args.parts == 1:
        print(inspect_text(Path(args.out)))


def stage_text(stage_seconds: dict, wall_seconds: float, clips: int) -> str:
    """Clips/s and each stage's share of the workers' time."""
    total = sum(stage_seconds.values()) or 1.0
    shares = ", ".join(f"{s} {100 * t / total:.0f}%" for s, t in sorted(stage_seconds.items(), key=lambda x: -x[1]))
    rate = clips / wall_seconds if wall_seconds else 0.0
    return f"{rate:.2f} clips/s over {wall_seconds:.1f} s; worker time by stage: {shares}"


def inspect_text(out: Path) -> str:
    """A per-split table: samples, shards, bytes per sample, teacher, failures by stage."""
    lines = [f"{'split':6} {'samples':>8} {'shards':>6} {'bytes/sample':>12} {'failed':>6}  teacher"]
    stages: Counter = Counter()
    examples: dict[str, str] = {}
    for split in SPLITS:
        index = SplitIndex.read(out / split)
        size = sum(p.stat().st_size for p in complete_shards(out / split))
        failures = [json.loads(l) for l in (out / split / FAILURES).read_text().splitlines() if l]
        stages.update(f["stage"] for f in failures)
        examples.update({f["stage"]: f"{f['item']}: {f['reason']}" for f in failures})
        per_sample = size / index.num_samples if index.num_samples else 0
        lines.append(f"{split:6} {index.num_samples:8d} {len(index.shards):6d} {per_sample:12.0f} "
                     f"{len(failures):6d}  {index.teacher} (D={index.feature_dim}, {index.payload})")
    lines.append("failures by stage (count, one example):")
    lines += [f"  {n:5d}  {stage:10} {examples[stage]}" for stage, n in stages.most_common()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "build":
        _build(args)
    elif args.command == "merge":
        merge(args.out)
        print(inspect_text(Path(args.out)))
    else:
        print(inspect_text(Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
