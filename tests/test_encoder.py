import pytest
import torch

from s2f.encoder import PRESETS, VoiceEncoder, same_padding


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_same_padding_follows_tensorflow():
    # TF "same", kernel 4: stride 1 pads 1 before, 2 after; stride 2 on odd sizes pads 1/2.
    assert same_padding(598, 1) == (1, 2)
    assert same_padding(38, 2) == (1, 1)
    assert same_padding(37, 2) == (1, 2)


def test_paper_preset_parameter_count():
    encoder = VoiceEncoder.from_preset("paper")
    assert 160e6 < count(encoder) < 170e6
    assert count(encoder) == 164_840_192
    assert encoder.fc1.in_features == 65 * 512  # the pooled 65 x 512 of SPEC section 3


@pytest.mark.parametrize("name, expected", [("small", 5_061_440), ("tiny", 349_872)])
def test_small_presets_parameter_counts(name, expected):
    assert count(VoiceEncoder.from_preset(name)) == expected


@pytest.mark.slow
def test_paper_preset_shapes_and_gradients():
    torch.manual_seed(0)
    encoder = VoiceEncoder.from_preset("paper")
    shapes = {}
    encoder.features[-1].register_forward_hook(lambda m, i, o: shapes.update(pre_pool=o.shape))
    with torch.no_grad():
        assert encoder.eval()(torch.randn(1, 2, 598, 257)).shape == (1, 4096)
    assert shapes["pre_pool"] == (1, 512, 10, 65)  # time x freq x channels = 10 x 65 x 512
    encoder.train()
    out = encoder(torch.randn(2, 2, 298, 257))  # 3 s
    assert out.shape == (2, 4096)
    out.square().mean().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("frames", [100, 298, 598])
def test_any_duration_works(frames):
    encoder = VoiceEncoder.from_preset("tiny").eval()
    with torch.no_grad():
        assert encoder(torch.randn(2, 2, frames, 257)).shape == (2, 128)


def test_overrides_and_errors():
    encoder = VoiceEncoder.from_preset("tiny", out_dim=7, freq_bins=64)
    assert encoder(torch.randn(2, 2, 64, 64)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown encoder preset"):
        VoiceEncoder.from_preset("huge")
    with pytest.raises(ValueError, match=r"\(B, 2, T, Q\)"):
        encoder(torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="T >= 16"):
        encoder(torch.randn(2, 2, 8, 64))
    assert set(PRESETS) == {"paper", "small", "tiny"}
