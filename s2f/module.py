"""Speech2Face LightningModule: voice encoder trained against frozen teacher heads.

A batch is `{"spec": (B, 2, T, 257)}` or `{"wav": (B, N)}` (the spectrogram is then computed on
the batch's device), plus `"fc7": (B, D)`, the teacher feature v_f. The loss is `Speech2FaceLoss`
through the teacher's frozen fc8 (`teacher`: a `vgg_face_dag.pth` or a `teacher_head.pt`) and,
with `decoder_ckpt`, the face decoder's first layer taken pre-activation as the frozen f_dec.
Both are loaded in `setup` and live in the state dict, so a checkpoint alone rebuilds the module.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn

from s2f.audio import SAMPLE_RATE, num_frames, spectrogram
from s2f.encoder import VoiceEncoder
from s2f.loss import LAMBDA1, LAMBDA2, TEMPERATURE, Speech2FaceLoss
from s2f.metrics import feature_similarity, retrieval_recall
from s2f.teacher import load_classifier

LEARNING_RATE = 1e-3
BETAS = (0.5, 0.999)
EPS = 1e-4
LR_DECAY = 0.95  # multiply the learning rate by this ...
LR_DECAY_STEPS = 10_000  # ... every this many optimiser steps
PAPER_BATCH = 8  # samples per optimiser step the paper's schedule was set for
SCHEDULES = ("step", "linear")
VAL_KS = (1, 5, 10)


def scaled_lr_schedule(
    batch_size: int, base_batch: int = PAPER_BATCH, base_lr: float = LEARNING_RATE,
    base_decay_steps: int = LR_DECAY_STEPS,
) -> tuple[float, int]:  # fmt: skip
    """(lr, decay_steps) for a global batch of `batch_size` samples per optimiser step.

    Square-root rule for Adam: a k-times larger batch cuts the gradient-noise variance by k, and
    Adam's step size does not grow with the gradient, so lr x sqrt(k) keeps the update noise
    (lr^2 x variance / k) the same (Malladi et al. 2022, the SDE scaling rule for adaptive
    methods; the linear rule of Goyal et al. 2017 is SGD's). Decay steps shrink by k so the
    schedule follows samples seen, not steps taken. `batch_size` is global: per-GPU batch x
    GPUs x accumulation.
    """
    if batch_size < 1 or base_batch < 1:
        raise ValueError(f"scaled_lr_schedule: batch sizes must be >= 1, got batch_size={batch_size}, "
                         f"base_batch={base_batch}")
    k = batch_size / base_batch
    return base_lr * math.sqrt(k), max(1, round(base_decay_steps / k))


def gather_rows(module: pl.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """All ranks' (N_r, D) rows concatenated in rank order, for any per-rank N_r."""
    if module.trainer is None or module.trainer.world_size == 1:
        return rows
    counts = module.all_gather(torch.tensor(rows.shape[0], device=rows.device))  # (W,)
    padded = rows.new_zeros(int(counts.max()), *rows.shape[1:])
    padded[: rows.shape[0]] = rows
    gathered = module.all_gather(padded)  # (W, max N_r, D)
    return torch.cat([gathered[r, : int(n)] for r, n in enumerate(counts)])


class Speech2Face(pl.LightningModule):
    """The voice encoder plus the full Speech2Face loss.

    Args:
        encoder: VoiceEncoder preset ("paper", "small", "tiny").
        feature_dim: D of the teacher feature (4096 for VGG-Face fc7, 128 for dlib).
        num_classes: outputs of the teacher's classifier (2622 for VGG-Face).
        teacher: path of the frozen classifier for the distillation term.
        decoder_ckpt: a FaceDecoderModule checkpoint whose first layer (D -> decoder_dim,
            pre-activation) becomes the frozen f_dec of the L1 term; None: that term is 0.
        decoder_dim: output width of that layer (1000 for the paper's decoder).
        freq_bins: override of the preset's frequency bins.
        lambda1, lambda2, temperature: loss weights and distillation temperature (SPEC 4).
        lr, betas, eps, lr_decay, lr_decay_steps: Adam and its step decay (SPEC 5), set for
            the paper's batch of 8.
        scale_lr_with_batch: adapt lr and decay steps to the actual global batch with
            `scaled_lr_schedule` (square-root rule); off: the values are used as given.
        schedule: "step" (x lr_decay every lr_decay_steps, the paper's) or "linear" (decay to 0
            over the run's steps: for fixed-budget runs, where a constant tail makes scores swing).
        train_seconds: train on a random window of this many seconds of each batch (the
            encoder's temporal pool takes any length; 3 s costs a third of 6 s on a CPU);
            None: the whole input. Validation always sees the whole input.
        channels_last: NHWC memory format for the encoder and its input (faster convolutions
            on GPUs with tensor cores and with oneDNN on CPUs).
        compile: compile the encoder with torch.compile (in place: checkpoints keep their keys).
    """

    def __init__(
        self,
        encoder: str = "small",
        feature_dim: int = 4096,
        num_classes: int = 2622,
        teacher: str | None = None,
        decoder_ckpt: str | None = None,
        decoder_dim: int = 1000,
        freq_bins: int | None = None,
        lambda1: float = LAMBDA1,
        lambda2: float = LAMBDA2,
        temperature: float = TEMPERATURE,
        lr: float = LEARNING_RATE,
        betas: tuple[float, float] = BETAS,
        eps: float = EPS,
        lr_decay: float = LR_DECAY,
        lr_decay_steps: int = LR_DECAY_STEPS,
        scale_lr_with_batch: bool = False,
        schedule: str = "step",
        train_seconds: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"model.schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.save_hyperparameters()
        overrides = {"out_dim": feature_dim} | ({"freq_bins": freq_bins} if freq_bins else {})
        self.encoder = VoiceEncoder.from_preset(encoder, **overrides)
        f_dec = nn.Linear(feature_dim, decoder_dim) if decoder_ckpt else None
        self.loss = Speech2FaceLoss(
            nn.Linear(feature_dim, num_classes), f_dec, lambda1, lambda2, temperature
        )
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.encoder.compile()
        if stage == "fit":
            self._load_teacher()
            if self.hparams.decoder_ckpt:
                self._load_decoder_layer()

    def _load_decoder_layer(self) -> None:
        from s2f.decoder_training import load_decoder

        first = load_decoder(self.hparams.decoder_ckpt).first  # D -> decoder_dim, before its ReLU
        expected = (self.hparams.decoder_dim, self.hparams.feature_dim)
        if tuple(first.weight.shape) != expected:
            raise ValueError(
                f"{self.hparams.decoder_ckpt}: the decoder's first layer maps {first.in_features} -> "
                f"{first.out_features}, but model.feature_dim={expected[1]} and "
                f"model.decoder_dim={expected[0]}; set them to match the decoder"
            )
        self.loss.f_dec.load_state_dict(first.state_dict())

    def _load_teacher(self) -> None:
        if self.hparams.teacher is None:
            raise ValueError(
                "model.teacher is required for training: the path of vgg_face_dag.pth or of the "
                "shards' teacher_head.pt (the frozen classifier of the distillation term)"
            )
        fc8 = load_classifier(self.hparams.teacher)
        expected = (self.hparams.num_classes, self.hparams.feature_dim)
        if tuple(fc8.weight.shape) != expected:
            raise ValueError(
                f"{self.hparams.teacher}: classifier maps {fc8.in_features} -> {fc8.out_features}, "
                f"but model.feature_dim={expected[1]} and model.num_classes={expected[0]}; "
                "set them to match the teacher"
            )
        self.loss.fc8.load_state_dict(fc8.state_dict())

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, 2, T, Q) -> v_s (B, D)."""
        if self.hparams.channels_last:
            spec = spec.contiguous(memory_format=torch.channels_last)
        return self.encoder(spec)

    def training_window(self, spec: torch.Tensor) -> torch.Tensor:
        """A random `train_seconds` window of (B, 2, T, Q), the same for the whole batch."""
        if self.hparams.train_seconds is None:
            return spec
        frames = num_frames(round(self.hparams.train_seconds * SAMPLE_RATE))
        if frames >= spec.shape[2]:
            return spec
        start = int(torch.randint(spec.shape[2] - frames + 1, ()))
        return spec[:, :, start : start + frames]  # (B, 2, frames, Q)

    @staticmethod
    def batch_spectrogram(batch: dict) -> torch.Tensor:
        return batch["spec"] if "spec" in batch else spectrogram(batch["wav"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        v_s = self(self.training_window(self.batch_spectrogram(batch)))
        terms = self.loss(v_s, batch["fc7"])
        batch_size = v_s.shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "total", batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return terms["total"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        v_s = self(self.batch_spectrogram(batch))
        terms = self.loss(v_s, batch["fc7"])
        for name, value in terms.items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=v_s.shape[0])
        self._val_outputs.append((v_s.detach().float(), batch["fc7"].detach().float()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        v_s = gather_rows(self, torch.cat([s for s, _ in self._val_outputs]))  # (N, D)
        v_f = gather_rows(self, torch.cat([f for _, f in self._val_outputs]))  # (N, D)
        self._val_outputs.clear()
        similarity = feature_similarity(v_s, v_f)
        recall = retrieval_recall(v_s, v_f, torch.arange(len(v_f)), ks=VAL_KS)
        # Every rank holds the same gathered rows, so the values agree without a further sync.
        self.log("val/angle", similarity["angle_mean"])
        for k in VAL_KS:
            self.log(f"val/recall@{k}", recall[f"recall@{k}"])
        self.log("val/samples", float(len(v_s)))

    def _global_batch(self) -> int | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "batch_size"):
            return None
        return datamodule.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _lr_and_decay_steps(self) -> tuple[float, int]:
        hp = self.hparams
        batch = self._global_batch() if hp.scale_lr_with_batch else None
        if batch is None:
            return hp.lr, hp.lr_decay_steps
        return scaled_lr_schedule(batch, PAPER_BATCH, hp.lr, hp.lr_decay_steps)

    def _scheduler(self, optimizer: torch.optim.Optimizer, decay_steps: int):
        if self.hparams.schedule == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, decay_steps, self.hparams.lr_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))

    def configure_optimizers(self):
        hp = self.hparams
        lr, decay_steps = self._lr_and_decay_steps()
        fused = next(self.encoder.parameters()).is_cuda  # one kernel for all parameters
        optimizer = torch.optim.Adam(
            self.encoder.parameters(), lr=lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused
        )
        schedule = self._scheduler(optimizer, decay_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
