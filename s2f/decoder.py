"""Face decoder (Cole et al. 2017, SPEC section 6): face feature -> landmarks + texture -> face.

Coordinate convention (the one place it is defined). Points and sampling grids are (x, y) in
normalised image coordinates: x runs left to right, y top to bottom, and -1 / +1 are the outer
edges of the image (not the centres of the border pixels), i.e. `grid_sample` with
align_corners=False. Pixel (row i, column j) of an H x W image has its centre at
x = (2j + 1) / W - 1, y = (2i + 1) / H - 1.

The decoder draws a texture in the mean-face geometry and predicts where the K = 68 landmarks
(iBUG / dlib order) of this face lie. A thin-plate spline through the landmark displacements,
with zero displacement pinned on the image border, turns them into a dense sampling grid
(evaluated every FLOW_STRIDE pixels, bilinear in between), and the texture is resampled
bilinearly: the output pixel at landmark l_k shows the texture at the mean position m_k.
Everything is differentiable w.r.t. both landmarks and texture.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

NUM_LANDMARKS = 68  # K, iBUG / dlib 68-point order
TPS_REGULARIZATION = 1e-4  # added to the spline kernel's diagonal; coordinates are in [-1, 1]
BORDER_POINTS = 16  # zero-displacement pins, evenly spaced on the image border (4 per side)
LANDMARK_INIT_GAIN = 0.01  # scales the landmark head's initial weights: start near the mean
KERNEL_FLOOR = 1e-20  # squared distance below which log(r^2) is clamped (r^2 log r^2 -> 0 there)
DECONV_KERNEL = 5  # transposed-conv kernel; stride 2, padding 2, output_padding 1 doubles H, W
# The spline is evaluated every FLOW_STRIDE pixels and interpolated bilinearly in between: it is
# smooth at that scale (tests bound the difference), and evaluating it at every pixel was most of
# the cost of a warp (`s2f bench warp` prints both).
FLOW_STRIDE = 4


@dataclass(frozen=True)
class DecoderConfig:
    """Layer sizes of the decoder.

    in_dim: face-feature dimension D (VGG-Face fc7 4096, dlib descriptor 128).
    first_dim: width of the first layer (f_dec of the Speech2Face loss).
    landmark_hidden: hidden widths of the landmark MLP (first_dim -> ... -> K * 2); the paper
        does not state them: one hidden layer as wide as the first layer.
    base_size, base_channels: the texture FC's output grid (base_size^2 x base_channels).
    upsamples: number of stride-2 transposed convs; image side = base_size * 2^upsamples.
    min_channels: transposed conv i (1-based) has max(base_channels / 2^i, min_channels) channels.
    border_points: spline pins on the image border (a multiple of 4; 0 switches them off).
    tps_regularization: spline smoothing lambda (see `tps_fit`).
    flow_stride: pixels between the points where the spline is evaluated (see `tps_flow`).
    """

    in_dim: int = 4096
    first_dim: int = 1000
    landmark_hidden: tuple[int, ...] = (1000,)
    base_size: int = 14
    base_channels: int = 256
    upsamples: int = 4
    min_channels: int = 32
    border_points: int = BORDER_POINTS
    tps_regularization: float = TPS_REGULARIZATION
    flow_stride: int = FLOW_STRIDE

    def __post_init__(self):
        if self.border_points % 4:
            raise ValueError(
                f"DecoderConfig.border_points must be a multiple of 4, got {self.border_points}"
            )
        sizes = (self.in_dim, self.first_dim, self.base_size, self.base_channels, self.upsamples)
        if min(*sizes, self.flow_stride) < 1:
            raise ValueError(f"DecoderConfig sizes must be positive, got {self}")

    @property
    def image_size(self) -> int:
        return self.base_size * 2**self.upsamples

    @property
    def deconv_channels(self) -> tuple[int, ...]:
        return tuple(
            max(self.base_channels // 2**i, self.min_channels) for i in range(1, self.upsamples + 1)
        )


PRESETS: dict[str, DecoderConfig] = {
    # SPEC section 6: 4096 -> 1000, FC -> 14 x 14 x 256, transposed convs 128, 64, 32, 32 to
    # 224 x 224 x 32, 1x1 conv to RGB. 56,561,467 parameters (50.2 M in the texture FC).
    "paper": DecoderConfig(),
    # CPU: 128 -> 256, FC -> 8 x 8 x 128, transposed convs 64, 32, 16 to 64 x 64.
    # 2,508,075 parameters with in_dim 128.
    "small": DecoderConfig(
        in_dim=128, first_dim=256, landmark_hidden=(256,), base_size=8, base_channels=128,
        upsamples=3, min_channels=16,
    ),
    # CPU, sharper outlines: the small preset with a fourth transposed conv (16) to 128 x 128.
    # 2,514,491 parameters with in_dim 128.
    "medium": DecoderConfig(
        in_dim=128, first_dim=256, landmark_hidden=(256,), base_size=8, base_channels=128,
        upsamples=4, min_channels=16,
    ),
    # CPU, the portraits' own size: the medium preset with five transposed convs (64, 32, 16,
    # 16, 16) from 7 x 7 to 224 x 224. 2,027,467 parameters with in_dim 128.
    "large": DecoderConfig(
        in_dim=128, first_dim=256, landmark_hidden=(256,), base_size=7, base_channels=128,
        upsamples=5, min_channels=16,
    ),
    # Tests: 128 -> 128, FC -> 4 x 4 x 64, transposed convs 32, 16, 8 to 32 x 32.
    # 249,947 parameters with in_dim 128.
    "tiny": DecoderConfig(
        in_dim=128, first_dim=128, landmark_hidden=(128,), base_size=4, base_channels=64,
        upsamples=3, min_channels=8,
    ),
}  # fmt: skip


def _ellipse(cx: float, cy: float, rx: float, ry: float, count: int) -> list[tuple[float, float]]:
    """`count` points on a closed contour, starting at its left end, upper half first (iBUG)."""
    angles = [math.pi - 2 * math.pi * k / count for k in range(count)]
    return [(cx + rx * math.cos(a), cy - ry * math.sin(a)) for a in angles]


def _brow(x_left: float, x_right: float, y: float, arch: float) -> list[tuple[float, float]]:
    """Five eyebrow points, left to right, arching up by `arch` in the middle."""
    steps = [k / 4 for k in range(5)]
    return [(x_left + (x_right - x_left) * s, y - arch * math.sin(math.pi * s)) for s in steps]


def default_mean_landmarks() -> torch.Tensor:
    """A generic frontal 68-point face (K, 2) in normalised coordinates, iBUG order.

    Hand-built to resemble an aligned face crop: jaw (0-16) a half ellipse from ear level
    (y = -0.1, x = +-0.62) to the chin (y = 0.75); brows (17-26) at y ~ -0.4; nose bridge (27-30)
    on x = 0 from y = -0.28 to 0.08; nostrils (31-35) at y ~ 0.17; eyes (36-47) centred at
    (+-0.3, -0.2), 0.22 wide; outer lips (48-59) and inner lips (60-67) centred at (0, 0.42).
    The training stage replaces it with the data's mean via `set_mean_landmarks`.
    """
    jaw = [
        (-0.62 * math.cos(t), -0.1 + 0.85 * math.sin(t))
        for t in (math.pi * k / 16 for k in range(17))
    ]
    brows = _brow(-0.52, -0.12, -0.38, 0.06) + _brow(0.12, 0.52, -0.38, 0.06)
    bridge = [(0.0, -0.28 + 0.12 * k) for k in range(4)]
    nostrils = [(0.07 * s, 0.15 + 0.04 * (1 - abs(s) / 2)) for s in (-2, -1, 0, 1, 2)]
    eyes = _ellipse(-0.3, -0.2, 0.11, 0.04, 6) + _ellipse(0.3, -0.2, 0.11, 0.04, 6)
    lips = _ellipse(0.0, 0.42, 0.25, 0.1, 12) + _ellipse(0.0, 0.42, 0.17, 0.03, 8)
    points = jaw + brows + bridge + nostrils + eyes + lips
    return torch.tensor(points, dtype=torch.float32)  # (K, 2)


def border_pins(
    count: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(count, 2) points evenly spaced around the border of [-1, 1]^2, corners included."""
    if count % 4:
        raise ValueError(f"border_pins: count must be a multiple of 4, got {count}")
    side = count // 4
    steps = torch.linspace(-1, 1, side + 1, device=device, dtype=dtype)[:-1]  # (side,)
    ones = torch.ones_like(steps)
    edges = [(steps, -ones), (ones, steps), (-steps, ones), (-ones, -steps)]  # clockwise
    return torch.cat([torch.stack(edge, dim=-1) for edge in edges])  # (count, 2)


def tps_kernel(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Thin-plate radial basis U = r^2 log r between points (B, P, 2) and centres (B, N, 2).

    Returns (B, P, N). Written as r^2 log(r^2) / 2 with r^2 = |p|^2 + |c|^2 - 2 p.c: no
    (B, P, N, 2) difference tensor, and a finite gradient at r = 0.
    """
    r2 = (
        points.square().sum(-1, keepdim=True)
        + centres.square().sum(-1).unsqueeze(1)
        - 2 * points @ centres.transpose(1, 2)
    ).clamp_min(0)  # (B, P, N)
    return 0.5 * r2 * torch.log(r2.clamp_min(KERNEL_FLOOR))


class ThinPlateSpline(NamedTuple):
    """A fitted spline: f(p) = p + sum_n weights_n U(|p - centres_n|) + [1, p] @ affine."""

    centres: torch.Tensor  # (B, N, 2)
    weights: torch.Tensor  # (B, N, 2)
    affine: torch.Tensor  # (B, 3, 2)


def _affine_basis(points: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones_like(points[..., :1]), points], dim=-1)  # (B, P, 3)


def tps_fit(
    src: torch.Tensor,
    dst: torch.Tensor,
    border_points: int = BORDER_POINTS,
    regularization: float = TPS_REGULARIZATION,
) -> ThinPlateSpline:
    """Fit the spline f with f(src_k) ~= dst_k for src, dst (B, K, 2); border pins f(p) = p.

    Solves the (N + 3) x (N + 3) system [[U + lambda I, P], [P^T, 0]] [w; a] = [dst - src; 0]
    (N = K + border_points) in float64, batched, differentiable through torch.linalg.solve.
    lambda = `regularization` turns interpolation into smoothing: the residual at control point
    n is lambda * w_n, and near-coincident landmarks no longer make the system singular.
    Affine maps are reproduced exactly for any lambda (they have no bending energy).
    """
    if src.shape != dst.shape or src.dim() != 3 or src.shape[-1] != 2:
        raise ValueError(
            f"tps_fit needs src and dst of the same shape (B, K, 2), "
            f"got {tuple(src.shape)} and {tuple(dst.shape)}"
        )
    batch = src.shape[0]
    src, dst = src.double(), dst.double()
    pins = border_pins(border_points, device=src.device, dtype=src.dtype).expand(batch, -1, -1)
    centres = torch.cat([src, pins], dim=1)  # (B, N, 2)
    shifts = torch.cat([dst - src, torch.zeros_like(pins)], dim=1)  # (B, N, 2)
    count = centres.shape[1]
    eye = torch.eye(count, device=src.device, dtype=src.dtype)
    basis = _affine_basis(centres)  # (B, N, 3)
    top = torch.cat([tps_kernel(centres, centres) + regularization * eye, basis], dim=2)
    bottom = torch.cat([basis.transpose(1, 2), basis.new_zeros(batch, 3, 3)], dim=2)
    system = torch.cat([top, bottom], dim=1)  # (B, N + 3, N + 3)
    rhs = torch.cat([shifts, shifts.new_zeros(batch, 3, 2)], dim=1)  # (B, N + 3, 2)
    solution = torch.linalg.solve(system, rhs)  # (B, N + 3, 2)
    return ThinPlateSpline(centres, solution[:, :count], solution[:, count:])


def tps_apply(spline: ThinPlateSpline, points: torch.Tensor) -> torch.Tensor:
    """Evaluate the spline at points (B, P, 2) in their dtype -> (B, P, 2)."""
    centres, weights, affine = (t.to(points.dtype) for t in spline)
    shift = tps_kernel(points, centres) @ weights + _affine_basis(points) @ affine  # (B, P, 2)
    return points + shift


def lattice(
    size: int, stride: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(n,) evenly spaced coordinates from the first to the last pixel centre of a side of `size`
    pixels, at most `stride` pixels apart (n = size for stride 1: the pixel centres)."""
    count = min(size, math.ceil((size - 1) / stride) + 1)
    edge = 1 - 1 / size
    return torch.linspace(-edge, edge, count, device=device, dtype=dtype)


def tps_flow(
    src_points: torch.Tensor,
    dst_points: torch.Tensor,
    height: int,
    width: int,
    border_points: int = BORDER_POINTS,
    regularization: float = TPS_REGULARIZATION,
    stride: int = FLOW_STRIDE,
) -> torch.Tensor:
    """Dense sampling grid (B, H, W, 2) of the spline mapping src_points -> dst_points (B, K, 2).

    Entry [b, i, j] is f(centre of output pixel (i, j)): where `grid_sample` reads the source
    image for that pixel, so src lives in the output image and dst in the sampled image.
    f is evaluated on a lattice spanning the pixel centres, `stride` pixels apart, and
    interpolated bilinearly to every pixel (align_corners=True: the lattice's ends are the first
    and last pixel centres), which reproduces affine maps exactly; stride 1 evaluates every pixel.
    """
    spline = tps_fit(src_points, dst_points, border_points, regularization)
    options = {"device": src_points.device, "dtype": src_points.dtype}
    ys, xs = lattice(height, stride, **options), lattice(width, stride, **options)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    points = torch.stack([grid_x, grid_y], dim=-1).reshape(1, -1, 2)  # (1, h * w, 2)
    coarse = tps_apply(spline, points.expand(src_points.shape[0], -1, -1))  # (B, h * w, 2)
    coarse = coarse.reshape(-1, len(ys), len(xs), 2).permute(0, 3, 1, 2)  # (B, 2, h, w)
    if coarse.shape[-2:] != (height, width):
        coarse = nn.functional.interpolate(
            coarse, size=(height, width), mode="bilinear", align_corners=True
        )
    return coarse.permute(0, 2, 3, 1)  # (B, H, W, 2)


def _resample(
    image: torch.Tensor,
    src_points: torch.Tensor,
    dst_points: torch.Tensor,
    border_points: int,
    regularization: float,
    stride: int,
) -> torch.Tensor:
    """Output pixel at src_points[k] shows `image` at dst_points[k]; (K, 2) dst is shared."""
    if image.dim() != 4 or src_points.shape[-2:] != dst_points.shape[-2:]:
        raise ValueError(
            f"warp/unwarp need image (B, C, H, W) and landmarks (B, K, 2) / (K, 2) with equal K, "
            f"got {tuple(image.shape)}, {tuple(src_points.shape)}, {tuple(dst_points.shape)}"
        )
    batch, _, height, width = image.shape
    src_points = src_points.expand(batch, -1, -1)  # (B, K, 2)
    dst_points = dst_points.expand(batch, -1, -1)  # (B, K, 2)
    grid = tps_flow(src_points, dst_points, height, width, border_points, regularization, stride)
    # "border" padding: a landmark pushed past the edge repeats the edge colour instead of black.
    return nn.functional.grid_sample(
        image, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )


def warp(
    texture: torch.Tensor,
    landmarks: torch.Tensor,
    mean_landmarks: torch.Tensor,
    border_points: int = BORDER_POINTS,
    regularization: float = TPS_REGULARIZATION,
    stride: int = FLOW_STRIDE,
) -> torch.Tensor:
    """Texture (B, C, H, W) in mean geometry -> face (B, C, H, W) with landmarks (B, K, 2)."""
    return _resample(texture, landmarks, mean_landmarks, border_points, regularization, stride)


def unwarp(
    image: torch.Tensor,
    landmarks: torch.Tensor,
    mean_landmarks: torch.Tensor,
    border_points: int = BORDER_POINTS,
    regularization: float = TPS_REGULARIZATION,
    stride: int = FLOW_STRIDE,
) -> torch.Tensor:
    """Face (B, C, H, W) with landmarks (B, K, 2) -> its texture in mean geometry (the target
    of the texture loss); the approximate inverse of `warp`."""
    return _resample(image, mean_landmarks, landmarks, border_points, regularization, stride)


def _mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers through `widths` with ReLU between (none after the last)."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _upsampler(channels: list[int]) -> nn.Sequential:
    """Transposed convs (kernel 5, stride 2) through `channels`, each doubling H and W, ReLU after
    each: the 1x1 RGB conv that follows sees rectified features."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(channels[:-1], channels[1:]):
        layers += [
            nn.ConvTranspose2d(n_in, n_out, DECONV_KERNEL, stride=2, padding=2, output_padding=1),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


class FaceDecoder(nn.Module):
    """(B, D) face feature -> dict(image, texture (B, 3, S, S) RGB in [0, 1], landmarks (B, K, 2)).

    first: D -> first_dim, then ReLU (its pre-activation output is f_dec, `first_layer`).
    landmarks: MLP first_dim -> landmark_hidden -> K * 2 offsets added to `mean_landmarks`
    (unbounded: the landmark loss keeps them in the image; the warp clamps reads at the edge).
    texture: FC first_dim -> base_size^2 x base_channels, ReLU, transposed convs to S x S, 1x1
    conv to RGB, sigmoid (colours in [0, 1]). image = warp(texture, landmarks, mean_landmarks).
    Parameter counts per preset are listed at PRESETS.
    """

    def __init__(self, config: DecoderConfig = DecoderConfig()):
        super().__init__()
        self.config = config
        c = config
        self.first = nn.Linear(c.in_dim, c.first_dim)
        self.landmark_mlp = _mlp([c.first_dim, *c.landmark_hidden, NUM_LANDMARKS * 2])
        with torch.no_grad():
            self.landmark_mlp[-1].weight.mul_(LANDMARK_INIT_GAIN)
            self.landmark_mlp[-1].bias.zero_()
        self.texture_fc = nn.Linear(c.first_dim, c.base_size**2 * c.base_channels)
        self.upsample = _upsampler([c.base_channels, *c.deconv_channels])
        self.to_rgb = nn.Conv2d(c.deconv_channels[-1], 3, 1)
        self.register_buffer("mean_landmarks", default_mean_landmarks())

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FaceDecoder":
        """Build a preset (`PRESETS`); keyword overrides replace its fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown decoder preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(replace(PRESETS[name], **overrides))

    def hparams(self) -> dict:
        return asdict(self.config)

    def set_mean_landmarks(self, landmarks: torch.Tensor) -> None:
        """Replace the mean face shape (K, 2), normalised coordinates (computed from data)."""
        if landmarks.shape != (NUM_LANDMARKS, 2) or not torch.isfinite(landmarks).all():
            raise ValueError(
                f"set_mean_landmarks needs finite ({NUM_LANDMARKS}, 2) normalised (x, y) points, "
                f"got shape {tuple(landmarks.shape)}"
            )
        with torch.no_grad():
            self.mean_landmarks.copy_(landmarks)

    def first_layer(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, first_dim) pre-activation output of the first layer: f_dec."""
        if features.dim() != 2 or features.shape[1] != self.config.in_dim:
            raise ValueError(
                f"FaceDecoder expects features (B, {self.config.in_dim}), got "
                f"{tuple(features.shape)}; set in_dim to the teacher's feature dimension"
            )
        return self.first(features)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        hidden = torch.relu(self.first_layer(features))  # (B, first_dim)
        offsets = self.landmark_mlp(hidden).view(-1, NUM_LANDMARKS, 2)  # (B, K, 2)
        landmarks = self.mean_landmarks + offsets  # (B, K, 2)
        x = torch.relu(self.texture_fc(hidden))  # (B, base_size^2 * C)
        x = x.view(-1, c.base_channels, c.base_size, c.base_size)  # (B, C, base, base)
        texture = torch.sigmoid(self.to_rgb(self.upsample(x)))  # (B, 3, S, S)
        image = warp(
            texture, landmarks, self.mean_landmarks, c.border_points, c.tps_regularization,
            c.flow_stride,
        )
        return {"image": image, "texture": texture, "landmarks": landmarks}
