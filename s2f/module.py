"""Speech2Face LightningModule: voice encoder trained against frozen teacher heads.

A batch is `{"spec": (B, 2, T, 257)}` or `{"wav": (B, N)}` (the spectrogram is then computed on
the batch's device), plus `"fc7": (B, D)`, the teacher feature v_f. The loss is `Speech2FaceLoss`
through the teacher's frozen fc8 (`teacher`: a `vgg_face_dag.pth` or a `teacher_head.pt`, loaded
in `setup`, so a checkpoint alone rebuilds the module from its state dict).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from s2f.audio import spectrogram
from s2f.encoder import VoiceEncoder
from s2f.loss import LAMBDA1, LAMBDA2, TEMPERATURE, Speech2FaceLoss
from s2f.metrics import feature_similarity, retrieval_recall
from s2f.teacher import load_classifier

LEARNING_RATE = 1e-3
BETAS = (0.5, 0.999)
EPS = 1e-4
LR_DECAY = 0.95  # multiply the learning rate by this ...
LR_DECAY_STEPS = 10_000  # ... every this many optimiser steps
VAL_KS = (1, 5, 10)


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
        freq_bins: override of the preset's frequency bins.
        lambda1, lambda2, temperature: loss weights and distillation temperature (SPEC 4).
        lr, betas, eps, lr_decay, lr_decay_steps: Adam and its step decay (SPEC 5).
    """

    def __init__(
        self,
        encoder: str = "small",
        feature_dim: int = 4096,
        num_classes: int = 2622,
        teacher: str | None = None,
        freq_bins: int | None = None,
        lambda1: float = LAMBDA1,
        lambda2: float = LAMBDA2,
        temperature: float = TEMPERATURE,
        lr: float = LEARNING_RATE,
        betas: tuple[float, float] = BETAS,
        eps: float = EPS,
        lr_decay: float = LR_DECAY,
        lr_decay_steps: int = LR_DECAY_STEPS,
    ):
        super().__init__()
        self.save_hyperparameters()
        overrides = {"out_dim": feature_dim} | ({"freq_bins": freq_bins} if freq_bins else {})
        self.encoder = VoiceEncoder.from_preset(encoder, **overrides)
        self.loss = Speech2FaceLoss(
            nn.Linear(feature_dim, num_classes), None, lambda1, lambda2, temperature
        )
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._load_teacher()

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
        return self.encoder(spec)

    @staticmethod
    def batch_spectrogram(batch: dict) -> torch.Tensor:
        return batch["spec"] if "spec" in batch else spectrogram(batch["wav"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        v_s = self(self.batch_spectrogram(batch))
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

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(
            self.encoder.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps
        )
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, hp.lr_decay_steps, hp.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
