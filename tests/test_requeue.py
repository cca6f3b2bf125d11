"""SlurmRequeue in one process: the signal only flags; the save and requeue happen at the next
step boundary. Two DDP ranks under a real Slurm: tests/test_slurm.py."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.requeue import REQUEUE_SIGNAL, SlurmRequeue, slurm_job_id

SIGNAL_AFTER_STEP = 3
MAX_STEPS = 8


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Preempt(pl.Callback):
    """Sends the requeue signal to this process `times` times after optimiser step `after`."""

    def __init__(self, after: int, times: int = 1):
        self.after, self.times = after, times

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.after:
            for _ in range(self.times):
                os.kill(os.getpid(), REQUEUE_SIGNAL)


@pytest.fixture
def scontrol(tmp_path: Path, monkeypatch) -> Path:
    """A fake `scontrol` first on PATH: records its arguments, exits with $FAKE_SCONTROL_EXIT."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit ${{FAKE_SCONTROL_EXIT:-0}}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    return calls


def fit(tmp_path: Path, times: int = 1) -> tuple[pl.Trainer, Path]:
    pl.seed_everything(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=4)
    checkpoints = tmp_path / "checkpoints"
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=MAX_STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[Preempt(SIGNAL_AFTER_STEP, times), SlurmRequeue(checkpoints)],
    )  # fmt: skip
    trainer.fit(Regression(), data)
    return trainer, checkpoints


def test_signal_saves_at_the_next_step_requeues_and_stops(tmp_path, scontrol, capsys):
    before = signal.getsignal(REQUEUE_SIGNAL)
    trainer, checkpoints = fit(tmp_path)
    saved = sorted(checkpoints.glob("*.ckpt"))
    assert [p.name for p in saved] == [f"requeue-step{SIGNAL_AFTER_STEP:07d}.ckpt"]
    assert torch.load(saved[0], weights_only=True)["global_step"] == SIGNAL_AFTER_STEP
    assert scontrol.read_text().split() == ["requeue", "4242"]
    assert trainer.global_step == SIGNAL_AFTER_STEP  # stopped: the job is requeued
    out = capsys.readouterr().out
    assert f"preempted at step {SIGNAL_AFTER_STEP}" in out and "job requeued, stopping" in out
    assert signal.getsignal(REQUEUE_SIGNAL) == before  # the handler is removed after fit


def test_a_signal_delivered_twice_saves_once(tmp_path, scontrol):
    _, checkpoints = fit(tmp_path, times=2)
    assert len(list(checkpoints.glob("*.ckpt"))) == 1
    assert scontrol.read_text().splitlines() == ["requeue 4242"]


def test_failed_requeue_keeps_training_and_says_why(tmp_path, scontrol, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_SCONTROL_EXIT", "1")
    with caplog.at_level(logging.WARNING, logger="callbacks.requeue"):
        trainer, checkpoints = fit(tmp_path)
    assert trainer.global_step == MAX_STEPS
    assert (checkpoints / f"requeue-step{SIGNAL_AFTER_STEP:07d}.ckpt").is_file()
    assert any("scontrol requeue 4242 failed (exit 1)" in r.getMessage() for r in caplog.records)


def test_array_tasks_are_requeued_by_their_own_id(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "900")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "899")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "899_3"
