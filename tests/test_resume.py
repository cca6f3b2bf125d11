"""Real `s2f fit` runs in subprocesses: killed and restarted, DDP against single-process, W&B resume.

Runs are deterministic on CPU (seed_everything, deterministic=True, one thread), so an
interrupted run that resumes must end with the weights and the sample order of one that never
stopped.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.shard_factory import make_shards, round_robin_assignment
from tests.test_cli import FEATURE_DIM, REPO, teacher, tiny_config

pytestmark = pytest.mark.slow
STEPS = 12  # 3 epochs x 16 train samples / batch 4
TIMEOUT = 600  # s, per subprocess on 2 shared cores


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    make_shards(root, speakers=8, clips_per_speaker=4, feature_dim=FEATURE_DIM, samples_per_shard=4,
                assignment=round_robin_assignment(8))
    teacher(root / "teacher_head.pt")
    return root


def env(keys: Path | None = None) -> dict[str, str]:
    extra = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
             "PYTHONPATH": str(REPO)}
    return {k: v for k, v in os.environ.items() if k != "S2F_LOG_KEYS"} | extra | (
        {"S2F_LOG_KEYS": str(keys)} if keys else {})


def fit_command(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "s2f", "fit", "--config", str(config),
            "--trainer.default_root_dir", str(run_dir), *extra]


def run_ok(command: list[str], environ: dict[str, str]) -> str:
    done = subprocess.run(command, env=environ, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout + done.stderr


def key_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_run_resumes_exactly(shards, tmp_path):
    config = tiny_config(tmp_path, shards, shards / "teacher_head.pt", max_epochs=3,
                         logger={"class_path": "pytorch_lightning.loggers.CSVLogger"})
    reference_keys = tmp_path / "reference.keys"
    run_ok(fit_command(config, tmp_path / "reference"), env(reference_keys))
    reference = key_lines(reference_keys)
    assert [line["step"] for line in reference] == list(range(STEPS))

    seed = random.randrange(1_000_000)
    kill_at = random.Random(seed).randint(2, STEPS - 3)  # the batch whose start triggers the kill
    first_keys, second_keys, run_dir = tmp_path / "first.keys", tmp_path / "second.keys", tmp_path / "run"
    command = fit_command(config, run_dir)
    first = subprocess.Popen(command, env=env(first_keys), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while len(key_lines(first_keys)) <= kill_at and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # the trainer and its loader worker, without warning
    first.wait()
    assert first.returncode == -signal.SIGKILL, f"the first run ended by itself (seed {seed})"

    output = run_ok(command, env(second_keys))  # the same command: it must find its checkpoint
    resumed = key_lines(second_keys)
    start = resumed[0]["step"]
    assert 1 <= start <= kill_at + 1, (seed, start, output[-2000:])
    assert "Restoring states from the checkpoint" in output
    assert resumed == [line for line in reference if line["step"] >= start], f"seed {seed}"
    final = f"step{STEPS:07d}.ckpt"
    expected, got = weights(tmp_path / "reference" / "checkpoints" / final), weights(run_dir / "checkpoints" / final)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=f"{name} (seed {seed})")


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every val/ metric in a CSVLogger run directory."""
    values: dict[str, float] = {}
    for path in sorted(run_dir.glob("**/metrics.csv")):
        with open(path) as file:
            for row in csv.DictReader(file):
                values |= {k: float(v) for k, v in row.items() if k.startswith("val/") and v}
    return values


def test_ddp_validation_equals_single_process_validate(shards, tmp_path):
    csv_logger = {"class_path": "pytorch_lightning.loggers.CSVLogger"}
    config = tiny_config(tmp_path, shards, shards / "teacher_head.pt", max_epochs=1, logger=csv_logger)
    run_dir = tmp_path / "ddp"
    run_ok(fit_command(config, run_dir, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                       "--trainer.accelerator", "cpu"), env())
    during_fit = last_metrics(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 2  # 16 / (2 x 4)

    single = tmp_path / "single"
    run_ok([sys.executable, "-m", "s2f", "validate", "--config", str(config), "--ckpt_path", str(last),
            "--trainer.default_root_dir", str(single)], env())
    after = last_metrics(single)
    assert during_fit["val/samples"] == after["val/samples"] == 8  # the whole split, once
    for name in ("val/angle", "val/recall@1", "val/recall@5", "val/recall@10"):
        assert during_fit[name] == pytest.approx(after[name], rel=1e-5, abs=1e-6), name


def test_restart_continues_the_same_wandb_run(shards, tmp_path):
    config = tiny_config(tmp_path, shards, shards / "teacher_head.pt", max_epochs=1,
                         logger={"class_path": "pytorch_lightning.loggers.WandbLogger"})
    run_dir = tmp_path / "run"
    run_ok(fit_command(config, run_dir), env())
    run_id = (run_dir / "wandb_id").read_text().strip()
    output = run_ok(fit_command(config, run_dir, "--trainer.max_epochs", "2"), env())
    assert "epoch000-step0000004.ckpt" in output or "step0000004.ckpt" in output  # resumed at step 4
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    assert (run_dir / "checkpoints" / "epoch001-step0000008.ckpt").is_file()
