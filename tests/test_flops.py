"""FLOP counts against hand-computed golden values."""

import pytest
import torch
from torch import nn

from s2f.encoder import SameConv2d, VoiceEncoder
from s2f.flops import count_flops, flop_counter, rule_of_three

SPEC_FORWARD = 0.2e12  # SPEC 3: ~0.2 TFLOP per 6-s sample


def conv_linear() -> nn.Sequential:
    # (B, 2, 5, 4) -> conv 3x3 "same" -> (B, 3, 5, 4) -> flatten (B, 60) -> (B, 7)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(60, 7))


def test_conv_and_linear_golden():
    count = count_flops(conv_linear(), torch.zeros(1, 2, 5, 4))
    conv = 2 * (3 * 5 * 4) * (2 * 3 * 3)  # 2 x output elements x (C_in x kernel taps) = 2,160
    linear = 2 * 60 * 7  # 840
    assert count.by_layer == {"0": conv, "2": linear}
    assert count.total == conv + linear == 3000
    # The input needs no gradient: the conv has only its weight gradient, the linear both.
    assert count.backward == conv + 2 * linear == 3840
    assert count.training == 6840
    assert rule_of_three(count.total) == 9000


def test_counts_scale_with_batch():
    assert count_flops(conv_linear(), torch.zeros(3, 2, 5, 4)).total == 3 * 3000


def test_same_conv_counts_the_padded_input():
    conv = SameConv2d(2, 3, stride=2)  # 4x4 kernel, TF "same": (7, 5) -> (4, 3)
    x = torch.zeros(1, 2, 7, 5)
    assert conv(x).shape == (1, 3, 4, 3)
    assert count_flops(conv, x).total == 2 * (3 * 4 * 3) * (2 * 4 * 4)  # 2,304


def test_transposed_conv_counts_input_scatter():
    layer = nn.ConvTranspose2d(3, 2, 2, stride=2)  # (1, 3, 4, 4) -> (1, 2, 8, 8)
    assert count_flops(layer, torch.zeros(1, 3, 4, 4)).total == 2 * (3 * 4 * 4) * (2 * 2 * 2)  # 768


def test_frozen_and_no_grad_calls_have_no_weight_gradient():
    frozen = nn.Linear(4, 5).requires_grad_(False)
    x = torch.zeros(2, 4, requires_grad=True)
    with flop_counter(frozen) as count:
        frozen(x)  # input gradient only
        with torch.no_grad():
            frozen(x)  # no backward at all
    assert count.total == 2 * (2 * 2 * 4 * 5)
    assert count.backward == 2 * 4 * 5 * 2


def paper_forward_by_hand() -> int:
    # (T, Q, C_in, C_out) at each conv's output, TF "same" padding; pools halve T only.
    convs = [(598, 257, 2, 64), (598, 257, 64, 64), (598, 257, 64, 128), (299, 257, 128, 128),
             (149, 257, 128, 128), (74, 257, 128, 256), (37, 257, 256, 512),
             (19, 129, 512, 512), (10, 65, 512, 512)]  # the last two have stride 2
    macs = sum(t * q * c_out * c_in * 16 for t, q, c_in, c_out in convs)
    macs += 65 * 512 * 4096 + 4096 * 4096  # fc1, fc2
    return 2 * macs


def test_paper_preset_near_spec():
    with torch.device("meta"):  # shapes only: no 0.2 TFLOP on the CPU
        encoder, spec = VoiceEncoder.from_preset("paper"), torch.empty(1, 2, 598, 257)
    count = count_flops(encoder, spec)
    assert count.total == paper_forward_by_hand() == 207_570_427_904
    assert count.total == pytest.approx(SPEC_FORWARD, rel=0.05)
    # Exact training cost: 3 x forward less the first conv's input gradient.
    assert count.training == 3 * count.total - count.by_layer["features.0.0"] == 622_081_785_856
