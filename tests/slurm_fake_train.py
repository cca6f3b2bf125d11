"""A stand-in for `s2f fit` in the Slurm tests: a real, tiny Lightning training run.

It takes the same command line as `s2f fit` (LightningCLI: --config, --trainer.*), so
slurm/train.sh drives it unchanged through S2F_CMD. Each step sleeps, so a run lasts long enough
to be preempted. Under srun, Lightning detects SLURMEnvironment with auto-requeue on SIGUSR1:
the signal saves hpc_ckpt_<n>.ckpt in default_root_dir and requeues the job. On every start the
script resumes from the newest checkpoint in default_root_dir and says so on stdout:

    fake_train: resumed from <path> at step <N>
    fake_train: started fresh
    fake_train: step <N>            (after each optimizer step, rank 0)
    fake_train: finished at step <N>
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pytorch_lightning import Callback, LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

PREFIX = "fake_train:"


def say(trainer: Trainer, message: str) -> None:
    """Print once per job (rank 0), flushed, so the test can follow the Slurm log as it grows."""
    if trainer.is_global_zero:
        print(f"{PREFIX} {message}", flush=True)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written checkpoint anywhere under run_dir.

    After a preemption that is Lightning's hpc checkpoint, newer than `last.ckpt`; resuming
    from `last` would silently lose the steps between the two.
    """
    candidates = [p for p in run_dir.rglob("*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


class TinyModel(LightningModule):
    """A linear regressor on random tensors; step_sleep_s makes each step slow on purpose."""

    def __init__(self, dim: int = 8, step_sleep_s: float = 0.5, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(dim, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, D), (B, 1)
        # A signal interrupts the sleep, runs Lightning's handler, then the sleep finishes.
        time.sleep(self.hparams["step_sleep_s"])
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


class RandomData(LightningDataModule):
    """Fixed random samples (seeded), split across ranks by Lightning's distributed sampler."""

    def __init__(self, num_samples: int = 256, dim: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.dim = dim
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(self.num_samples, self.dim, generator=generator)
        y = x.sum(dim=1, keepdim=True)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


class ProgressReport(Callback):
    """Reports where training (re)started, each step and the end, in lines the test parses."""

    def __init__(self, resumed_from: Path | None) -> None:
        self.resumed_from = resumed_from

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # global_step here is the step restored from the checkpoint, before any new step.
        if self.resumed_from is None:
            say(trainer, "started fresh")
        else:
            say(trainer, f"resumed from {self.resumed_from} at step {trainer.global_step}")

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        say(trainer, f"step {trainer.global_step}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        say(trainer, f"finished at step {trainer.global_step}")


def main() -> None:
    cli = LightningCLI(
        TinyModel,
        RandomData,
        run=False,
        # A requeued job re-runs the same command in the same folder: the saved config may exist.
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": False, "enable_progress_bar": False, "enable_model_summary": False},
    )
    trainer = cli.trainer
    run_dir = Path(trainer.default_root_dir)
    resume = newest_checkpoint(run_dir)
    trainer.callbacks.append(ProgressReport(resume))
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume)


if __name__ == "__main__":
    main()
