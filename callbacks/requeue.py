"""Slurm preemption: on the warning signal, checkpoint at a step boundary and requeue the job.

Slurm sends SIGUSR1 (`#SBATCH --signal=USR1@N`, or `scancel --signal=USR1`) some time before it
stops a job. Lightning's own handler saves and requeues inside the signal handler; under DDP that
can deadlock: the handler interrupts one rank between Python bytecodes and enters the save's
barrier, while another rank is blocked inside backward's all-reduce waiting for the first, so
neither returns and the job sits idle until Slurm kills it, with no requeue
(Lightning-AI/pytorch-lightning#21406).

Here the handler only sets a flag. At the end of every training batch the ranks take the maximum
of their flags (one scalar all-reduce), so all of them see the request at the same step, save one
checkpoint together (`checkpoints/requeue-step<N>.ckpt`, which `s2f fit` resumes from as the run's
newest), and global rank 0 runs `scontrol requeue <job>`. When the requeue succeeds every rank
stops training; when it fails, training goes on (the job may still finish in time) and the
failure is logged. A signal delivered twice (the step's and the batch shell's) saves once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1
CHECKPOINT_NAME = "requeue-step{step:07d}.ckpt"  # in <run_dir>/checkpoints/


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: the array task's `<job>_<task>`, else the job's."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(Callback):
    """Checkpoint and requeue on `REQUEUE_SIGNAL`, every rank at the same step (module docstring).

    Args:
        checkpoint_dir: where the preemption checkpoint goes (the run's `checkpoints/`).
    """

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.requested = False
        self._previous_handler = None

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True  # nothing else here: see the module docstring

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested = False
        self._previous_handler = signal.signal(REQUEUE_SIGNAL, self._on_signal)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._previous_handler is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if not self._any_rank_requested(trainer, pl_module):
            return
        self.requested = False
        step = trainer.global_step
        path = self.checkpoint_dir / CHECKPOINT_NAME.format(step=step)
        trainer.save_checkpoint(path)  # every rank: sharded strategies save collectively
        if trainer.is_global_zero:
            # Printed before the requeue: Slurm cancels the running job as soon as it is requeued.
            print(f"s2f fit: preempted at step {step}: saved {path}; requeueing", flush=True)
        requeued = trainer.strategy.broadcast(self._requeue() if trainer.is_global_zero else False, src=0)
        if trainer.is_global_zero:
            print("s2f fit: " + ("job requeued, stopping" if requeued else "requeue failed, training on"), flush=True)
        trainer.should_stop = trainer.should_stop or requeued

    def _any_rank_requested(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if trainer.world_size == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=pl_module.device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)

    @staticmethod
    def _requeue() -> bool:
        job = slurm_job_id()
        if job is None:
            log.warning("requeue signal outside a Slurm job (no SLURM_JOB_ID): checkpoint saved, not requeued")
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            log.warning("scontrol requeue %s failed: %s", job, error)
            return False
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed (exit %d): %s", job, result.returncode, result.stderr.strip())
        return result.returncode == 0
