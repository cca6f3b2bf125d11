"""Training speed in the logs, and (for debugging resumes) the sample keys of every batch.

`Throughput` logs per optimiser step:
- `perf/samples_per_s`: samples of all ranks per second of wall time between consecutive
  batch ends (data loading included: what the run really achieves);
- `perf/step_s`: seconds from batch start to batch end on this rank (forward, backward, step);
and global rank 0 prints a plain `s2f fit: step N` line every `log_every_n_steps` steps, for
batch logs (Slurm's output files) where no progress bar is drawn.

`KeyLog` appends one JSON line per training batch to the file named by the environment variable
`S2F_LOG_KEYS` (global rank > 0 appends to `<file>.rank<r>`): `{"step", "epoch", "keys"}`.
Comparing these files shows whether a resumed run consumed exactly the samples an uninterrupted
run would have.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

KEYS_ENV = "S2F_LOG_KEYS"


def batch_size_of(batch: object) -> int:
    """Samples in a batch: the length of its "key" list, else the first dim of its first tensor."""
    if isinstance(batch, dict):
        if "key" in batch:
            return len(batch["key"])
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return int(batch.shape[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}; give batches a 'key' list")


class Throughput(Callback):
    """Samples per second (all ranks) and step time, logged every training step."""

    def __init__(self) -> None:
        self._start = 0.0
        self._last_end: float | None = None  # None after a pause (validation), so it is not counted

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: object, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        now = time.perf_counter()
        size = batch_size_of(batch)
        pl_module.log("perf/step_s", now - self._start, on_step=True, on_epoch=False, batch_size=size)
        if self._last_end is not None:
            # DDP ranks get equal batches, so the run's rate is this rank's times the world size.
            rate = size * trainer.world_size / max(now - self._last_end, 1e-9)
            pl_module.log("perf/samples_per_s", rate, on_step=True, on_epoch=False, batch_size=size)
        self._last_end = now
        if trainer.is_global_zero and trainer.global_step % trainer.log_every_n_steps == 0:
            print(f"s2f fit: step {trainer.global_step}", flush=True)


class KeyLog(Callback):
    """Appends each training batch's sample keys to a file (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def from_env(cls) -> "KeyLog | None":
        path = os.environ.get(KEYS_ENV)
        return cls(path) if path else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: dict, batch_idx: int) -> None:
        rank = trainer.global_rank
        path = self.path if rank == 0 else self.path.with_name(f"{self.path.name}.rank{rank}")
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": list(batch["key"])}
        with open(path, "a") as file:  # opened per batch so a killed run leaves complete lines
            file.write(json.dumps(line) + "\n")
