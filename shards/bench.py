"""`s2f bench shards`: shard-building throughput on generated 640x480, 25 fps clips.

Prints clips/s, clips/s per worker process (= per core when workers <= cores) and each stage's
share of the workers' time (download, decode, face, teacher, encode).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from shards.build import BuildConfig, build_shards
from shards.cli import stage_text
from shards.sources import source_items

SECONDS = 6.0  # s per generated clip
FPS = 25
SIZE = (480, 640)  # (H, W)


def generate_clips(root: Path, clips: int, size: tuple[int, int] = SIZE, fps: int = FPS) -> float:
    """Write `clips` talking-head mp4s (one speaker each); returns the seconds it took."""
    from s2f.demo.render import ClipVariation, FaceAppearance, render_face
    from s2f.video import write_mp4

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    t = np.arange(int(SECONDS * 16_000)) / 16_000
    for clip in range(clips):
        look = FaceAppearance(face_width=rng.uniform(0.2, 0.8), skin_tone=rng.uniform(0, 1))
        frame = render_face(look, ClipVariation(background=clip, scale=0.45), size)
        audio = (0.2 * np.sin(2 * np.pi * (110 + 5 * clip) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        path = root / f"speaker{clip:04d}" / "clip.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(path, np.repeat(frame[None], int(SECONDS * fps), axis=0), fps, audio)
    return time.perf_counter() - started


def bench_shards(clips: int = 24, workers: int = 1, detector: str = "hog", teacher: str = "dlib",
                 keep: str | None = None) -> dict:
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="s2f-bench-shards-"))
    generation = generate_clips(root / "videos", clips)
    config = BuildConfig(out=str(root / "shards"), teacher=teacher, detector=detector, workers=workers)
    summary = build_shards(source_items("videos", str(root / "videos")), config)
    built = sum(summary.written.values())
    rate = built / summary.wall_seconds if summary.wall_seconds else 0.0
    return {
        "clips": clips, "built": built, "failed": len(summary.failures), "workers": workers,
        "generation_seconds": generation, "build_seconds": summary.wall_seconds,
        "clips_per_second": rate, "clips_per_second_per_worker": rate / workers,
        "stage_seconds": dict(summary.stage_seconds), "detector": detector, "teacher": teacher,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s2f bench shards", description=__doc__)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--detector", default="hog", choices=["hog", "cnn", "mtcnn"])
    parser.add_argument("--teacher", default="dlib")
    parser.add_argument("--keep", help="folder to keep the clips and shards in")
    args = parser.parse_args(argv)
    figures = bench_shards(args.clips, args.workers, args.detector, args.teacher, args.keep)
    print(f"{figures['built']}/{figures['clips']} clips of 640x480 at 25 fps, {SECONDS:.0f} s each, "
          f"{args.detector} + {args.teacher}, {args.workers} worker(s)")
    print(f"clips/s: {figures['clips_per_second']:.2f} ({figures['clips_per_second_per_worker']:.2f} per worker)")
    print(stage_text(figures["stage_seconds"], figures["build_seconds"], figures["built"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
