"""The run directory: where a training run keeps what it needs to carry on after preemption.

```
<run_dir>/                      (= --trainer.default_root_dir)
  config_fingerprint.json       the resolved model + data config the run was started with
  wandb_id                      the W&B run id, so a requeued job continues the same W&B run
  config.yaml                   the full resolved config of the latest start (LightningCLI)
  checkpoints/                  step<N>.ckpt (every N steps), epoch<E>-step<N>.ckpt (epoch ends),
                                best-step<N>.ckpt (min val/angle), last.ckpt,
                                requeue-step<N>.ckpt (on Slurm's SIGUSR1: callbacks.requeue)
  hpc_ckpt_<n>.ckpt             Lightning's own requeue checkpoint, when its handler is in use
  wandb/                        W&B's local files (offline runs are synced from here)
```

A restart resumes from the checkpoint with the highest global step (the newest file on a tie),
whatever its name: after a requeue the requeue checkpoint is usually newer than `last.ckpt`,
and after a node failure a periodic checkpoint may be newer than an old requeue one.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from fsspec.implementations.local import LocalFileSystem
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINGERPRINT = "config_fingerprint.json"
WANDB_ID = "wandb_id"
HPC_GLOB = "hpc_ckpt_*.ckpt"  # Lightning's name; it writes them into default_root_dir
WANDB_HOST = "api.wandb.ai"
OFFLINE_MODES = ("offline", "dryrun", "disabled")


class RunDirError(ValueError):
    """The run directory cannot be used with this configuration."""


# --- configuration fingerprint -------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model.lr": 0.001, ...}; `init_args` levels are dropped from the names."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = prefix if key == "init_args" else f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            # JSON has no tuples: compare lists with lists after a round trip through the file.
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def fingerprint_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
    """{key: (stored, current)} for every key whose value differs or exists on one side only."""
    missing = "<unset>"
    keys = sorted(set(stored) | set(current))
    return {k: (stored.get(k, missing), current.get(k, missing))
            for k in keys if stored.get(k, missing) != current.get(k, missing)}


def check_fingerprint(run_dir: Path, current: Mapping[str, Any], write: bool) -> None:
    """Refuse a run directory made by a different model/data config; record it on first use."""
    path = run_dir / FINGERPRINT
    current = json.loads(json.dumps(dict(current), default=str))  # as it would read back
    if path.is_file():
        diff = fingerprint_diff(json.loads(path.read_text()), current)
        if diff:
            listed = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in diff.items())
            raise RunDirError(
                f"run directory {run_dir} belongs to a different configuration ({path}): {listed}. "
                "Resume with the run's values, or start a new run with another "
                "--trainer.default_root_dir")
    elif write:
        write_atomic(path, json.dumps(current, indent=2, sort_keys=True))


# --- W&B -----------------------------------------------------------------------------------


def wandb_offline(environ: Mapping[str, str] = os.environ) -> bool:
    """True when W&B must not touch the network: asked for, or no API key is configured.

    Without a key wandb.init would wait on the network (~100 s) before giving up.
    """
    if environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES:
        return True
    if environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc(environ.get("NETRC")).authenticators(WANDB_HOST) is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def wandb_id(run_dir: Path, create: bool) -> str | None:
    """The run directory's W&B id; made and stored on first use when `create` (global rank 0)."""
    path = run_dir / WANDB_ID
    if path.is_file():
        return path.read_text().strip()
    if not create:
        return None
    run_id = uuid.uuid4().hex[:8]  # W&B's own id format: 8 characters of [0-9a-z]
    write_atomic(path, run_id + "\n")
    return run_id


# --- checkpoints ---------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_step(path: Path) -> int | None:
    """The global step recorded in a checkpoint; None when the file does not load."""
    try:
        # mmap: only the few bytes of "global_step" are read, even from a multi-GB checkpoint.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["global_step"])
    except Exception as error:  # a foreign or damaged file must not stop a restart
        log.warning("ignoring checkpoint %s: it does not load (%s)", path, error)
        return None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the run with the highest global step, newest file on a tie."""
    candidates = [*(run_dir / CHECKPOINTS).glob("*.ckpt"), *run_dir.glob(HPC_GLOB)]
    ranked = [(step, p.stat().st_mtime_ns, p) for p in candidates if p.is_file()
              for step in [checkpoint_step(p)] if step is not None]
    return max(ranked)[2] if ranked else None


class CheckpointPolicy:
    """Which checkpoints a fit writes into `<run_dir>/checkpoints/`.

    Args:
        every_n_train_steps: save every this many optimiser steps (0: never mid-epoch).
        keep_steps: how many of the newest periodic checkpoints to keep (-1: all).
        keep_epochs: how many of the newest epoch-end checkpoints to keep (-1: all).
        monitor: validation metric of the kept best checkpoint.
        mode: "min" or "max" of `monitor`.
    """

    def __init__(self, every_n_train_steps: int = 1000, keep_steps: int = 2, keep_epochs: int = -1,
                 monitor: str = "val/angle", mode: str = "min"):
        if every_n_train_steps < 0:
            raise ValueError(f"checkpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.every_n_train_steps, self.keep_steps, self.keep_epochs = every_n_train_steps, keep_steps, keep_epochs
        self.monitor, self.mode = monitor, mode

    def callbacks(self, run_dir: Path) -> list[ModelCheckpoint]:
        folder = str(run_dir / CHECKPOINTS)
        # Monitoring "step" (max) keeps the newest k files; without a monitor Lightning keeps 1 or all.
        newest = {"dirpath": folder, "monitor": "step", "mode": "max", "auto_insert_metric_name": False}
        # One callback writes last.ckpt (two would race for the name): the most frequent one.
        periodic = self.every_n_train_steps > 0
        made = [
            ModelCheckpoint(**newest, filename="epoch{epoch:03d}-step{step:07d}", every_n_epochs=1,
                            save_top_k=self.keep_epochs, save_on_train_epoch_end=True, save_last=not periodic),
            ModelCheckpoint(dirpath=folder, filename="best-step{step:07d}", monitor=self.monitor,
                            mode=self.mode, save_top_k=1, auto_insert_metric_name=False),
        ]
        if periodic:
            made.append(ModelCheckpoint(**newest, filename="step{step:07d}", save_top_k=self.keep_steps,
                                        every_n_train_steps=self.every_n_train_steps, save_last=True))
        return made


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written under a temporary name in the same folder, then renamed.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the
    system temp folder; when that is another filesystem than the run directory (node-local /tmp,
    shared run directories: the usual cluster layout) the final move is a copy that a kill can
    cut short, leaving a truncated file under the checkpoint's name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not named after the checkpoint: Lightning numbers hpc checkpoints from the digits of
        # every file whose name holds "hpc_ckpt_", a temporary one included.
        tmp = path.with_name(f".checkpoint-{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # ... and the rename survives a crash of the node
        finally:
            os.close(directory)
