import math

import numpy as np
import pytest
import torch
from scipy.interpolate import RBFInterpolator
from torch.nn.functional import grid_sample

from s2f.decoder import (
    NUM_LANDMARKS,
    PRESETS,
    FaceDecoder,
    FLOW_STRIDE,
    border_pins,
    default_mean_landmarks,
    lattice,
    tps_apply,
    tps_fit,
    tps_flow,
    unwarp,
    warp,
)


def smooth_image(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """(B, 3, S, S) low-frequency colour pattern in [0, 1]: bilinear resampling is accurate."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bicubic").clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / (a - b).square().mean().item())


def pixel_centres(height: int, width: int) -> torch.Tensor:
    """(H, W, 2) pixel-centre coordinates (x, y): the lattice at stride 1."""
    grid_y, grid_x = torch.meshgrid(lattice(height, 1), lattice(width, 1), indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def realistic_landmarks(seed: int) -> torch.Tensor:
    """(1, K, 2) a face wider than the mean, mouth lower, eyes raised, plus 0.01 jitter per point
    (dlib's own scatter on a 64-px face is about a third of a pixel, 0.01 units)."""
    landmarks = default_mean_landmarks()
    landmarks[:, 0] *= 1.1
    landmarks[48:, 1] += 0.06
    landmarks[36:48, 1] -= 0.04
    gen = torch.Generator().manual_seed(seed)
    return (landmarks + 0.01 * torch.randn(NUM_LANDMARKS, 2, generator=gen)).unsqueeze(0)


def test_lattice_at_stride_one_is_the_pixel_centres():
    # grid_sample with align_corners=False reads each pixel exactly at these coordinates.
    image = torch.arange(12.0).view(1, 1, 3, 4)
    grid = pixel_centres(3, 4).unsqueeze(0)
    assert torch.allclose(grid_sample(image, grid, align_corners=False), image, atol=1e-5)
    assert torch.allclose(lattice(4, 1), torch.tensor([-0.75, -0.25, 0.25, 0.75]))


def test_lattice_spans_the_pixel_centres_at_most_stride_apart():
    points = lattice(64, 4)
    assert len(points) == 17  # 63 pixel steps in 16 spans of 3.94 pixels
    assert points[0] == -63 / 64 and points[-1] == 63 / 64
    assert (points.diff() * 64 / 2 <= 4 + 1e-5).all()
    assert len(lattice(5, 4)) == 2 and len(lattice(1, 4)) == 1


def test_border_pins_lie_on_the_border_evenly():
    pins = border_pins(16)
    assert pins.shape == (16, 2)
    assert torch.all(pins.abs().amax(dim=1) == 1)
    assert len({tuple(p) for p in pins.tolist()}) == 16
    corners = {(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)}
    assert corners <= {tuple(p) for p in pins.tolist()}
    with pytest.raises(ValueError, match="multiple of 4"):
        border_pins(10)


def test_zero_displacement_returns_the_texture():
    texture = torch.rand(2, 3, 24, 32)
    mean = default_mean_landmarks()
    image = warp(texture, mean.expand(2, -1, -1), mean)
    assert torch.allclose(image, texture, atol=1e-5)


def test_affine_displacement_matches_closed_form_field():
    # Landmarks l = A m + t with the pins off: the exact output -> texture map is the affine
    # p -> A^-1 (p - t), which the spline reproduces exactly whatever its regularisation.
    angle = math.radians(4)
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[cos, -sin], [sin, cos]])
    matrix, shift = 0.9 * rotation, torch.tensor([0.05, -0.03])
    mean = default_mean_landmarks()
    landmarks = (mean @ matrix.T + shift).unsqueeze(0)  # (1, K, 2)
    texture = smooth_image(1, 40)

    expected_grid = (pixel_centres(40, 40) - shift) @ torch.linalg.inv(matrix).T
    expected_grid = expected_grid.unsqueeze(0)  # (1, 40, 40, 2)
    for stride in (1, FLOW_STRIDE, 7):  # bilinear interpolation of an affine field is exact
        grid = tps_flow(landmarks, mean.unsqueeze(0), 40, 40, border_points=0, stride=stride)
        assert torch.allclose(grid, expected_grid, atol=1e-5)

    image = warp(texture, landmarks, mean, border_points=0)
    expected = grid_sample(texture, expected_grid, padding_mode="border", align_corners=False)
    assert torch.allclose(image, expected, atol=1e-5)


def test_flow_on_the_lattice_matches_the_flow_at_every_pixel():
    # Landmark displacements like dlib's on real faces: the interpolated grid is within a few
    # hundredths of a pixel of the spline almost everywhere, and the warped faces are the same
    # to well under one grey level (8-bit rounding alone is ~59 dB).
    mean = default_mean_landmarks().unsqueeze(0)
    texture = smooth_image(1, 64, seed=6)
    for seed in range(3):
        landmarks = realistic_landmarks(seed)
        exact = tps_flow(landmarks, mean, 64, 64, stride=1)
        coarse = tps_flow(landmarks, mean, 64, 64, stride=FLOW_STRIDE)
        pixels = (coarse - exact).norm(dim=-1) * 64 / 2  # (1, 64, 64) deviation in pixels
        assert pixels.median() < 0.05 and torch.quantile(pixels, 0.99) < 0.5
        warped = [warp(texture, landmarks, mean[0], stride=s) for s in (1, FLOW_STRIDE)]
        assert psnr(*warped) > 45


def test_tps_interpolates_control_points_and_pins():
    gen = torch.Generator().manual_seed(1)
    src = torch.rand(3, 20, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    dst = src + 0.1 * torch.randn(3, 20, 2, generator=gen, dtype=torch.float64)
    spline = tps_fit(src, dst, border_points=8, regularization=0.0)
    assert torch.allclose(tps_apply(spline, src), dst, atol=1e-10)
    pins = border_pins(8, dtype=torch.float64).expand(3, -1, -1)
    assert torch.allclose(tps_apply(spline, pins), pins, atol=1e-10)


def test_tps_matches_scipy_thin_plate_spline():
    # Independent reference: scipy's RBFInterpolator, kernel r^2 log r, degree-1 polynomial,
    # `smoothing` added to the kernel diagonal as our lambda is.
    gen = torch.Generator().manual_seed(2)
    src = torch.rand(1, 12, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    dst = src + 0.1 * torch.randn(1, 12, 2, generator=gen, dtype=torch.float64)
    queries = torch.rand(1, 50, 2, generator=gen, dtype=torch.float64) * 2 - 1
    pins = border_pins(8, dtype=torch.float64)
    centres = torch.cat([src[0], pins]).numpy()
    shifts = torch.cat([dst[0] - src[0], torch.zeros_like(pins)]).numpy()
    for smoothing in (0.0, 1e-3):
        reference = RBFInterpolator(
            centres, shifts, kernel="thin_plate_spline", degree=1, smoothing=smoothing
        )
        expected = queries[0].numpy() + reference(queries[0].numpy())
        spline = tps_fit(src, dst, border_points=8, regularization=smoothing)
        np.testing.assert_allclose(tps_apply(spline, queries)[0].numpy(), expected, atol=1e-9)


def test_tps_flow_is_differentiable_in_the_landmarks():
    gen = torch.Generator().manual_seed(3)
    src = (torch.rand(1, 5, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.6).requires_grad_()
    dst = (src + 0.05 * torch.randn(1, 5, 2, generator=gen, dtype=torch.float64)).detach()
    dst.requires_grad_()
    assert torch.autograd.gradcheck(lambda s, d: tps_flow(s, d, 4, 5, border_points=4), (src, dst))


def test_tps_survives_coincident_landmarks():
    mean = default_mean_landmarks()
    landmarks = mean.clone()
    landmarks[61] = landmarks[67]  # lips closed onto each other
    grid = tps_flow(landmarks.unsqueeze(0), mean.unsqueeze(0), 16, 16)
    assert torch.isfinite(grid).all() and grid.abs().max() < 2


def test_warp_unwarp_round_trip_for_mild_displacement():
    mean = default_mean_landmarks()
    landmarks = realistic_landmarks(seed=4)
    image = smooth_image(2, 64, seed=5)
    landmarks = landmarks.expand(2, -1, -1)
    texture = unwarp(image, landmarks, mean)
    recovered = warp(texture, landmarks, mean)
    interior = slice(8, -8)
    # The displacement is not negligible (~26 dB without the inverse), the round trip ~47 dB.
    assert psnr(texture[..., interior, interior], image[..., interior, interior]) < 30
    assert psnr(recovered[..., interior, interior], image[..., interior, interior]) > 25


@pytest.mark.parametrize("name, size", [("tiny", 32), ("small", 64), ("medium", 128), ("large", 224), ("paper", 224)])
def test_output_shapes_per_preset(name, size):
    decoder = FaceDecoder.from_preset(name)
    with torch.no_grad():
        out = decoder(torch.randn(2, decoder.config.in_dim))
    assert out["image"].shape == out["texture"].shape == (2, 3, size, size)
    assert out["landmarks"].shape == (2, NUM_LANDMARKS, 2)
    assert out["texture"].min() >= 0 and out["texture"].max() <= 1
    assert decoder.config.image_size == size


def test_paper_preset_parameter_count():
    def linear(n_in, n_out):
        return n_in * n_out + n_out

    widths = [(256, 128), (128, 64), (64, 32), (32, 32)]
    deconvs = sum(c_in * c_out * 25 + c_out for c_in, c_out in widths)
    expected = (
        linear(4096, 1000)  # f_dec
        + linear(1000, 1000) + linear(1000, 68 * 2)  # landmark MLP
        + linear(1000, 14 * 14 * 256)  # texture FC
        + deconvs
        + linear(32, 3)  # 1x1 conv to RGB
    )  # fmt: skip
    decoder = FaceDecoder.from_preset("paper")
    assert PRESETS["paper"].deconv_channels == (128, 64, 32, 32)
    assert expected == 56_561_467
    assert sum(p.numel() for p in decoder.parameters()) == expected


def test_gradients_reach_landmark_and_texture_branches():
    torch.manual_seed(0)
    decoder = FaceDecoder.from_preset("tiny")
    out = decoder(torch.randn(3, 128))
    target = smooth_image(3, 32, seed=6)
    (out["image"] - target).abs().mean().backward()
    for name, param in decoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_first_layer_is_pre_activation_f_dec():
    decoder = FaceDecoder.from_preset("tiny", in_dim=16, first_dim=8)
    features = torch.randn(4, 16)
    f_dec = decoder.first_layer(features)
    assert f_dec.shape == (4, 8)
    assert torch.allclose(f_dec, features @ decoder.first.weight.T + decoder.first.bias)
    assert (f_dec < 0).any()  # no ReLU applied
    with pytest.raises(ValueError, match="in_dim"):
        decoder.first_layer(torch.randn(4, 15))


def test_set_mean_landmarks_moves_the_output_shape():
    decoder = FaceDecoder.from_preset("tiny")
    features = torch.randn(2, 128)
    with torch.no_grad():
        before = decoder(features)["landmarks"]
        new_mean = 0.9 * default_mean_landmarks()
        decoder.set_mean_landmarks(new_mean)
        after = decoder(features)["landmarks"]
    assert torch.allclose(after - before, new_mean - default_mean_landmarks(), atol=1e-6)
    assert torch.equal(decoder.state_dict()["mean_landmarks"], new_mean)
    with pytest.raises(ValueError, match="68, 2"):
        decoder.set_mean_landmarks(torch.zeros(5, 2))


def test_default_mean_landmarks_are_a_plausible_frontal_face():
    mean = default_mean_landmarks()
    assert mean.shape == (NUM_LANDMARKS, 2) and mean.abs().max() < 1
    height = {  # mean y of each part (image y grows downwards)
        "brows": mean[17:27, 1].mean(), "eyes": mean[36:48, 1].mean(),
        "nose": mean[31:36, 1].mean(), "mouth": mean[48:68, 1].mean(), "chin": mean[8, 1],
    }  # fmt: skip
    assert height["brows"] < height["eyes"] < height["nose"] < height["mouth"] < height["chin"]
    assert mean[36:42, 0].mean() < 0 < mean[42:48, 0].mean()  # subject's right eye on image left
    # Mirror symmetry: the jaw reflects onto itself in reverse order.
    assert torch.allclose(mean[0:17, 0], -mean[0:17, 0].flip(0), atol=1e-6)


def test_presets_and_overrides():
    assert FaceDecoder.from_preset("small", in_dim=4096).first.in_features == 4096
    with pytest.raises(ValueError, match="unknown decoder preset"):
        FaceDecoder.from_preset("huge")
    with pytest.raises(ValueError, match="multiple of 4"):
        FaceDecoder.from_preset("tiny", border_points=6)
