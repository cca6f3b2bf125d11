"""Voice encoder: compressed complex spectrogram -> face-feature prediction v_s (SPEC Table 1).

Blocks are Conv(4x4) -> ReLU -> BatchNorm. Padding is TensorFlow-style "same" (for an even
kernel: one more zero after than before; for stride 2 the output is ceil(input / 2)), the
choice under which a 6-s input reaches the temporal pool as 10 x 65 x 512 as SPEC derives.
Max-pools are 2x1 and pool time only. The temporal average pool makes the encoder accept any
number of frames T >= 16 (3 s and 6 s alike); the frequency axis is fixed by the preset.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

KERNEL = 4  # conv kernel size, time and frequency
MIN_FRAMES = 16  # four 2x1 pools and two stride-2 convs need at least this many frames


@dataclass(frozen=True)
class EncoderConfig:
    """Widths of the nine convolutions (Table 1 rows 1, 2, 3, 5, 7, 9, 11, 12, 13), the FC
    width, the output dimension (the teacher feature's D) and the frequency bins used (the
    lowest `freq_bins` of the 257)."""

    channels: tuple[int, ...] = (64, 64, 128, 128, 128, 256, 512, 512, 512)
    fc_dim: int = 4096
    out_dim: int = 4096
    freq_bins: int = 257

    def __post_init__(self):
        if len(self.channels) != 9:
            raise ValueError(f"EncoderConfig.channels needs 9 widths, got {len(self.channels)}")
        if not 8 <= self.freq_bins <= 257:
            raise ValueError(f"EncoderConfig.freq_bins must be in [8, 257], got {self.freq_bins}")


PRESETS: dict[str, EncoderConfig] = {
    # SPEC Table 1: 164,840,192 parameters (136.3 M in FC1); ~0.2 TFLOP per 6-s sample.
    "paper": EncoderConfig(),
    # Quarter width, 0-8 kHz: 5,061,440 parameters with out_dim 128.
    "small": EncoderConfig(
        channels=(16, 16, 32, 32, 32, 64, 128, 128, 128), fc_dim=512, out_dim=128, freq_bins=257
    ),
    # CPU demo and tests: 0-4 kHz (129 bins), ~0.2 GMAC per 6-s sample, 349,872 parameters
    # with out_dim 128.
    "tiny": EncoderConfig(
        channels=(4, 4, 8, 8, 8, 16, 32, 32, 32), fc_dim=256, out_dim=128, freq_bins=129
    ),
}


def same_padding(size: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) of one axis for kernel KERNEL."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + KERNEL - size, 0)
    return total // 2, total - total // 2


def same_size(size: int, stride: int) -> int:
    return math.ceil(size / stride)


class SameConv2d(nn.Conv2d):
    """4x4 convolution with TensorFlow "same" padding computed from the input's shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(in_channels, out_channels, KERNEL, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time_pad = same_padding(x.shape[-2], self.stride[0])
        freq_pad = same_padding(x.shape[-1], self.stride[1])
        x = nn.functional.pad(x, (*freq_pad, *time_pad))
        return super().forward(x)


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        SameConv2d(in_channels, out_channels, stride), nn.ReLU(), nn.BatchNorm2d(out_channels)
    )


def pool_time() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=(2, 1), stride=(2, 1))


class VoiceEncoder(nn.Module):
    """(B, 2, T, Q) compressed spectrogram -> (B, out_dim) predicted face feature v_s.

    Q must be at least `config.freq_bins`; the lowest `freq_bins` bins are used.
    """

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.config = config
        c = config.channels
        self.features = nn.Sequential(
            conv_block(2, c[0]),  # 1
            conv_block(c[0], c[1]),  # 2
            conv_block(c[1], c[2]),  # 3
            pool_time(),  # 4
            conv_block(c[2], c[3]),  # 5
            pool_time(),  # 6
            conv_block(c[3], c[4]),  # 7
            pool_time(),  # 8
            conv_block(c[4], c[5]),  # 9
            pool_time(),  # 10
            conv_block(c[5], c[6]),  # 11
            conv_block(c[6], c[7], stride=2),  # 12
            SameConv2d(c[7], c[8], stride=2),  # 13: no ReLU, no BN
        )
        self.pooled_norm = nn.BatchNorm1d(c[8])  # 14: after the temporal average pool
        self.pooled_freq = same_size(same_size(config.freq_bins, 2), 2)
        self.fc1 = nn.Linear(c[8] * self.pooled_freq, config.fc_dim)  # 15
        self.fc2 = nn.Linear(config.fc_dim, config.out_dim)  # 16

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VoiceEncoder":
        """Build a preset ("paper", "small", "tiny"); keyword overrides replace its fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown encoder preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(replace(PRESETS[name], **overrides))

    def hparams(self) -> dict:
        return asdict(self.config)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        if spec.dim() != 4 or spec.shape[1] != 2:
            raise ValueError(f"VoiceEncoder expects (B, 2, T, Q), got {tuple(spec.shape)}")
        if spec.shape[2] < MIN_FRAMES or spec.shape[3] < self.config.freq_bins:
            raise ValueError(
                f"VoiceEncoder needs T >= {MIN_FRAMES} and Q >= {self.config.freq_bins}, "
                f"got {tuple(spec.shape)}"
            )
        x = spec[..., : self.config.freq_bins]  # (B, 2, T, Q')
        x = self.features(x)  # (B, C, T', Q'')
        x = x.mean(dim=2)  # (B, C, Q''): average over all time
        x = self.pooled_norm(torch.relu(x))
        x = self.fc1(x.flatten(1))  # (B, fc_dim)
        return self.fc2(torch.relu(x))  # (B, out_dim)
