"""The Speech2Face loss (SPEC section 4).

    L = || f_dec(v_f) - f_dec(v_s) ||_1
      + lambda1 * || v_f / ||v_f|| - v_s / ||v_s|| ||_2^2
      + lambda2 * L_distill(f_VGG(v_f), f_VGG(v_s))

Reductions, chosen because the paper's lambdas are stated for the formula as written: each
term is computed per sample exactly as written (the L1 term sums over the 1000 f_dec outputs,
the feature term sums over D), then averaged over the batch. `f_dec` is the decoder's first
layer taken pre-activation; `f_VGG` is the teacher's fc8 (or a fitted `TeacherHead`). Both
are frozen: gradients reach v_s only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

LAMBDA1 = 0.025  # weight of the normalised-feature term
LAMBDA2 = 200.0  # weight of the distillation term
TEMPERATURE = 2.0  # knowledge-distillation softmax temperature


def decoder_term(f_dec: nn.Module, v_s: torch.Tensor, v_f: torch.Tensor) -> torch.Tensor:
    """(B,) L1 norm of f_dec(v_f) - f_dec(v_s)."""
    return (f_dec(v_f) - f_dec(v_s)).abs().sum(dim=1)


def feature_term(v_s: torch.Tensor, v_f: torch.Tensor) -> torch.Tensor:
    """(B,) squared L2 distance between the unit-normalised vectors."""
    unit_s = nn.functional.normalize(v_s, dim=1)
    unit_f = nn.functional.normalize(v_f, dim=1)
    return (unit_f - unit_s).pow(2).sum(dim=1)


def distillation_term(
    logits_s: torch.Tensor, logits_f: torch.Tensor, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """(B,) cross-entropy - sum_i p_i(teacher) log p_i(student) at temperature T."""
    teacher = torch.softmax(logits_f / temperature, dim=1)
    log_student = torch.log_softmax(logits_s / temperature, dim=1)
    return -(teacher * log_student).sum(dim=1)


class Speech2FaceLoss(nn.Module):
    """forward(v_s (B, D), v_f (B, D)) -> {"total", "dec", "feat", "distill"} batch means.

    `fc8` maps D -> identity logits; `f_dec` maps D -> 1000 (None: the decoder term is 0).
    Both are frozen here, whatever their state on arrival.
    """

    def __init__(
        self,
        fc8: nn.Module,
        f_dec: nn.Module | None = None,
        lambda1: float = LAMBDA1,
        lambda2: float = LAMBDA2,
        temperature: float = TEMPERATURE,
    ):
        super().__init__()
        self.fc8 = fc8.requires_grad_(False).eval()
        self.f_dec = None if f_dec is None else f_dec.requires_grad_(False).eval()
        self.lambda1, self.lambda2, self.temperature = lambda1, lambda2, temperature
        self._told_no_decoder = False

    def forward(self, v_s: torch.Tensor, v_f: torch.Tensor) -> dict[str, torch.Tensor]:
        v_f = v_f.detach()
        with torch.no_grad():
            logits_f = self.fc8(v_f)  # (B, classes): the teacher's soft labels
        distill = distillation_term(self.fc8(v_s), logits_f, self.temperature).mean()
        feat = feature_term(v_s, v_f).mean()
        dec = self._decoder_term(v_s, v_f)
        total = dec + self.lambda1 * feat + self.lambda2 * distill
        return {"total": total, "dec": dec, "feat": feat, "distill": distill}

    def _decoder_term(self, v_s: torch.Tensor, v_f: torch.Tensor) -> torch.Tensor:
        if self.f_dec is None:
            if not self._told_no_decoder:
                log.info("Speech2FaceLoss: no face decoder given, the f_dec L1 term is 0")
                self._told_no_decoder = True
            return v_s.new_zeros(())
        return decoder_term(self.f_dec, v_s, v_f).mean()
