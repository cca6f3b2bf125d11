"""`s2f demo`: the whole system on the synthetic world, offline, on a CPU.

Stages, each the same code a real dataset goes through: generate the world (`s2f.demo.world`),
build shards with the dlib teacher and fit its head (`shards.build`), train `configs/demo.yaml`
(`s2f fit`, W&B offline), evaluate the test speakers (`s2f.evaluate`). Writes
`OUT/metrics.json`, `OUT/report.html` and `OUT/timings.json` (seconds per stage). Every stage
resumes: run the command again after an interruption and finished work is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from s2f.demo.world import WorldConfig

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


class StageTimer:
    """Wall seconds per named stage, printed as it goes."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, work, *args, **kwargs):
        print(f"== s2f demo: {name}", flush=True)
        started = time.perf_counter()
        result = work(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        print(f"== s2f demo: {name} took {self.seconds[name]:.0f} s", flush=True)
        return result


DEMO_SAMPLES_PER_SHARD = 100  # ~9 train shards: each pass over them is freshly permuted


def build_demo_shards(world: Path, out: Path, workers: int) -> Path:
    from shards.build import BuildConfig, build_shards
    from shards.sources import source_items

    # The builder writes clips in speaker order. The default 1000-sample shards would leave one
    # train shard, whose stream the shuffle buffer only mixes locally: batches then sweep
    # through the speakers in order, and training on them was measurably worse.
    config = BuildConfig(out=str(out), teacher="dlib", workers=workers, samples_per_shard=DEMO_SAMPLES_PER_SHARD)
    build_shards(source_items("demo", str(world)), config)
    return out


def train(shards: Path, run_dir: Path, steps: int | None) -> Path:
    """`s2f fit --config configs/demo.yaml` on the shards; returns the checkpoint to evaluate."""
    from s2f.cli import main as s2f_main
    from s2f.run import newest_checkpoint
    from s2f.teacher import TeacherHead
    from shards.schema import TEACHER_HEAD

    head = shards / TEACHER_HEAD
    argv = ["fit", "--config", str(DEMO_CONFIG), "--data.root", str(shards),
            "--model.teacher", str(head), "--model.num_classes", str(TeacherHead.load(head).num_classes),
            "--trainer.default_root_dir", str(run_dir)]  # fmt: skip
    if steps is not None:
        argv += ["--trainer.max_steps", str(steps)]
    os.environ.setdefault("WANDB_MODE", "offline")
    code = s2f_main(argv)
    checkpoint = newest_checkpoint(run_dir)
    if code or checkpoint is None:
        raise RuntimeError(f"s2f fit failed (exit {code}); see the log above and {run_dir}")
    return checkpoint


def summary_lines(metrics: dict) -> list[str]:
    """The demo's headline numbers, from metrics.json."""
    six = max(metrics["retrieval"], key=lambda d: float(d.rstrip("s")))
    retrieval, lines = metrics["retrieval"][six], []
    for k in ("recall@1", "recall@5", "recall@10"):
        value, chance = retrieval["cosine"][k]["value"], retrieval["chance"][k]
        oracle = metrics.get("oracle", {}).get("recall", {}).get(k, {}).get("value")
        extra = f", oracle {oracle:.3f}, model/oracle {value / oracle:.2f}" if oracle else ""
        lines.append(f"{k} ({six}): {value:.3f} (chance {chance:.3f}, {value / chance:.1f}x{extra})")
    lines.append(f"mean angle ({six}): {metrics['similarity'][six]['angle_mean']:.1f} deg")
    for attribute, found in metrics.get("attributes", {}).get("linear_probe", {}).items():
        if "durations" in found:
            agreement = found["durations"][six]
            truth = agreement.get("truth_vs_prediction", {}).get("accuracy")
            lines.append(f"{attribute} agreement, probe(v_s) vs probe(v_f): "
                         f"{agreement['reference_vs_prediction']['accuracy']:.3f}"
                         + (f"; vs truth: {truth:.3f}" if truth is not None else ""))
    return lines


def run_demo(out: str | Path = "runs/demo", identities: int = 300, clips_per_identity: int = 4,
             seed: int = 0, workers: int = 2, steps: int | None = None) -> dict:  # fmt: skip
    from s2f.demo.world import generate_world
    from s2f.evaluate import evaluate

    out = Path(out)
    timer = StageTimer()
    config = WorldConfig(identities=identities, clips_per_identity=clips_per_identity, seed=seed, workers=workers)
    world = timer.run("world", generate_world, config, out / "world")
    shards = timer.run("shards", build_demo_shards, Path(world), out / "shards", workers)
    checkpoint = timer.run("train", train, shards, out / "train", steps)
    metrics = timer.run("evaluate", evaluate, checkpoint, shards / "test", out, train_shards=shards / "train")
    (out / "timings.json").write_text(json.dumps(timer.seconds, indent=2))
    print("\n".join(["", *summary_lines(metrics), f"report: {out / 'report.html'}",
                     f"seconds per stage: {timer.seconds}"]))  # fmt: skip
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s2f demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--identities", type=int, default=WorldConfig.identities)
    parser.add_argument("--clips-per-identity", type=int, default=WorldConfig.clips_per_identity)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, help="training steps (default: configs/demo.yaml's)")
    args = parser.parse_args(argv)
    run_demo(args.out, args.identities, args.clips_per_identity, args.seed, args.workers, args.steps)
    return 0
