"""dlib's face recognition ResNet in PyTorch, loaded straight from dlib's model file.

The network is `anet_type` of dlib's examples/dnn_face_recognition_ex.cpp, shipped as
`dlib_face_recognition_resnet_model_v1.dat` by the face_recognition_models package: a 150 x 150
RGB face chip, minus dlib's per-channel means and divided by 256, goes through a 7x7 / 2
convolution, an affine (a batch norm frozen into a per-channel scale and shift), ReLU and a
3x3 / 2 max pool; then 14 residual blocks in five levels of 32, 64, 128, 256 and 256 channels;
then a global average pool and a 256 -> 128 linear map without bias. That output, not
normalised, is the descriptor dlib's `compute_face_descriptor` returns (the `loss_metric` layer
only copies it out). 5,614,592 parameters: 29 convolutions with bias, 29 affines, 256 x 128.

A residual block is relu(block(x) + shortcut(x)), block = conv 3x3, affine, relu, conv 3x3,
affine. The first block of every level but the first halves the size: its first convolution
has stride 2 and no padding (dlib's default for strided layers) and its shortcut is a 2x2 / 2
average pool. dlib adds tensors of different sizes by zero-padding both to the larger channel
count, height and width (at the end). That happens in three downsampling blocks, where the
shortcut has half the channels, and spatially in two: 8x8 -> block 3x3 vs shortcut 4x4, and
4x4 -> block 1x1 vs shortcut 2x2.

The file is dlib's own serialization (dlib/serialize.h, dnn/core.h, layers.h, input.h, tensor.h):
- integers: a control byte (bit 7: negative, bits 0-3: byte count), then the magnitude in that
  many little-endian bytes; bools: ASCII '0' / '1'; strings: an integer length, then the bytes;
- float / double: mantissa then exponent, both integers: value = mantissa * 2**exponent;
- tensors: version 2, the sizes (num_samples, k, nr, nc), then raw little-endian float32;
  alias tensors (views into a layer's flat parameter tensor): version 1 and the four sizes;
- the network: the loss layer (version 1, "loss_metric_2", margin, distance threshold); then one
  version integer per layer wrapper from the output down to the input (each wrapper serializes
  its subnetwork before its own fields), 130 of them; the input layer ("input_rgb_image_sized",
  the R, G, B means, 150, 150); then every computational layer from the input up: its details
  (a name such as "con_4" and its fields), three bools and its cached tensors (empty here; the
  innermost layer adds its sample expansion factor). Tag and skip layers write their version only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHIP_SIZE = 150  # pixels, square
DESCRIPTOR_DIM = 128
STEM_CHANNELS = 32
# (channels, residual blocks) per level, input to output: dlib's alevel4 ... alevel0. The first
# block of every level after the first downsamples.
LEVELS = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))
# pool geometry as dlib stores it: (rows, columns, stride y, stride x, padding y, padding x)
STEM_POOL = (3, 3, 2, 2, 0, 0)  # max pool
SHORTCUT_POOL = (2, 2, 2, 2, 0, 0)  # average pool
GLOBAL_POOL = (0, 0, 1, 1, 0, 0)  # average pool over the whole map (size 0: everything)

MAX_NAME = 64  # bytes: dlib's layer names are short ("input_rgb_image_sized" is the longest here)
FIX = ("expected dlib_face_recognition_resnet_model_v1.dat as face_recognition_models ships it "
       "(face_recognition_models.face_recognition_model_location()); reinstall that package "
       "if the file was damaged")


class DlibModelError(ValueError):
    """The file is not dlib's face recognition ResNet, or is damaged; the message names both."""


def default_model_path() -> Path:
    import face_recognition_models

    return Path(face_recognition_models.face_recognition_model_location())


# --- the network --------------------------------------------------------------------------------


class Affine(nn.Module):
    """dlib's affine_ layer in CONV_MODE: x * gamma[c] + beta[c] on (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


def zero_padded_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: (B, C, H, W) tensors zero-padded at the end of C, H and W to the larger
    size of each, then added."""
    if a.shape == b.shape:
        return a + b
    channels, height, width = (max(p, q) for p, q in zip(a.shape[1:], b.shape[1:]))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[3], 0, height - t.shape[2], 0, channels - t.shape[1]))

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    """relu(block(x) + shortcut(x)): dlib's `ares` (identity shortcut) or `ares_down`
    (stride-2 block, 2x2 average-pooled shortcut)."""

    def __init__(self, in_channels: int, channels: int, downsample: bool):
        super().__init__()
        if not downsample and in_channels != channels:
            raise ValueError(f"an identity shortcut keeps the channels, not {in_channels} -> {channels}")
        self.downsample = downsample
        stride, padding = (2, 0) if downsample else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.affine2 = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(torch.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, SHORTCUT_POOL[0], SHORTCUT_POOL[2]) if self.downsample else x
        return torch.relu(zero_padded_sum(y, shortcut))

    def dlib_layers(self) -> list[tuple[str, object]]:
        layers = [("tag", None), ("con", self.conv1), ("affine", self.affine1), ("relu", None),
                  ("con", self.conv2), ("affine", self.affine2)]  # fmt: skip
        if self.downsample:  # tag the block's output, skip back to the input, pool it
            layers += [("tag", None), ("skip", None), ("avg_pool", SHORTCUT_POOL)]
        return layers + [("add_prev", None), ("relu", None)]


class DlibResNet(nn.Module):
    """RGB face chips (B, 3, 150, 150) in [0, 255] -> dlib face descriptors (B, 128)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, STEM_CHANNELS, 7, 2, 0)
        self.affine = Affine(STEM_CHANNELS)
        blocks, channels = [], STEM_CHANNELS
        for level, (width, count) in enumerate(LEVELS):
            for index in range(count):
                blocks.append(ResidualBlock(channels, width, downsample=level > 0 and index == 0))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, DESCRIPTOR_DIM, bias=False)
        self.register_buffer("rgb_mean", torch.zeros(1, 3, 1, 1))  # dlib's means, from the file

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DlibResNet":
        """Read dlib's model file (default: face_recognition_models' copy) into a frozen network."""
        path = default_model_path() if path is None else Path(path)
        if not path.is_file():
            raise DlibModelError(f"{path}: no such file; {FIX}")
        model = cls()
        targets = model.dlib_layers()
        means, layers = read_dlib_network(path, [kind for kind, _ in targets])
        with torch.no_grad():
            model.rgb_mean.copy_(torch.tensor(means).view(1, 3, 1, 1))
            for (kind, target), fields in zip(targets, layers):
                _assign(path, kind, target, fields)
        return model.requires_grad_(False).eval()

    def dlib_layers(self) -> list[tuple[str, object]]:
        """The layers in dlib's order, input to output: (kind, module or pool geometry)."""
        layers = [("con", self.conv), ("affine", self.affine), ("relu", None),
                  ("max_pool", STEM_POOL)]  # fmt: skip
        for block in self.blocks:
            layers += block.dlib_layers()
        return layers + [("avg_pool", GLOBAL_POOL), ("fc", self.fc)]

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        if chips.shape[1:] != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"DlibResNet expects RGB chips (B, 3, 150, 150), not {tuple(chips.shape)}")
        x = (chips.float() - self.rgb_mean) / 256  # exactly dlib's input_rgb_image_sized
        x = torch.relu(self.affine(self.conv(x)))  # (B, 32, 72, 72)
        x = F.max_pool2d(x, STEM_POOL[0], STEM_POOL[2])  # (B, 32, 35, 35)
        x = self.blocks(x)  # 35 -> 17 -> 8 -> 4 -> 2: (B, 256, 2, 2)
        return self.fc(x.mean((2, 3)))  # (B, 256) -> (B, 128)


def _assign(path: Path, kind: str, target: object, fields: dict) -> None:
    """Copy one parsed dlib layer into its module, or check a pool's geometry."""
    if kind == "con":
        geometry = (tuple(target.weight.shape), target.stride, target.padding)
        found = (fields["weight"].shape, fields["stride"], fields["padding"])
        _check(path, found == geometry, f"a convolution {found}", f"{geometry}")
        target.weight.copy_(torch.from_numpy(fields["weight"]))
        target.bias.copy_(torch.from_numpy(fields["bias"]))
    elif kind == "affine":
        found, expected = fields["gamma"].shape, tuple(target.gamma.shape)
        _check(path, found == expected, f"an affine of {found}", f"{expected}")
        target.gamma.copy_(torch.from_numpy(fields["gamma"]))
        target.beta.copy_(torch.from_numpy(fields["beta"]))
    elif kind == "fc":
        found = fields["weight"].shape  # dlib: (inputs, outputs); torch: (outputs, inputs)
        expected = tuple(target.weight.shape[::-1])
        _check(path, found == expected, f"an fc of {found}", f"{expected}")
        target.weight.copy_(torch.from_numpy(fields["weight"]).T)
    elif kind in ("max_pool", "avg_pool"):
        _check(path, fields["geometry"] == target, f"a {kind} of {fields['geometry']}", f"{target}")


def _check(path: Path, ok: bool, found: str, expected: str) -> None:
    if not ok:
        raise DlibModelError(f"{path}: found {found} where the network has {expected}; {FIX}")


# --- dlib's serialization -----------------------------------------------------------------------


class DlibReader:
    """dlib's serialization primitives, read in order from a file's bytes."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def fail(self, problem: str) -> DlibModelError:
        return DlibModelError(f"{self.path}, byte {self.pos} of {len(self.data)}: {problem}; {FIX}")

    def take(self, count: int, what: str) -> bytes:
        left = len(self.data) - self.pos
        if count < 0:
            raise self.fail(f"{what}: a negative size ({count})")
        if count > left:
            raise self.fail(f"truncated: {what} needs {count} bytes, the file has {left} more")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def integer(self, what: str) -> int:
        control = self.take(1, what)[0]
        if control & 0x70 or (control & 0x0F) > 8:  # reserved bits set, or more than 8 bytes
            raise self.fail(f"{what}: bad integer control byte {control:#04x}")
        magnitude = int.from_bytes(self.take(control & 0x0F, what), "little")
        return -magnitude if control & 0x80 else magnitude

    def real(self, what: str) -> float:
        mantissa, exponent = self.integer(what), self.integer(what)
        return mantissa * 2.0**exponent

    def string(self, what: str) -> str:
        length = self.integer(what)
        if length > MAX_NAME:
            raise self.fail(f"{what}: a string of {length} bytes, too long for a dlib layer name")
        return self.take(length, what).decode("latin-1")

    def flag(self, what: str) -> bool:
        value = self.take(1, what)
        if value not in (b"0", b"1"):
            raise self.fail(f"{what}: expected a bool ('0' or '1'), found {value!r}")
        return value == b"1"

    def expect(self, found: object, expected: object, what: str) -> None:
        if found != expected:
            raise self.fail(f"{what}: expected {expected!r}, found {repr(found)[:MAX_NAME]}")

    def sizes(self, version: int, what: str) -> tuple[int, ...]:
        self.expect(self.integer(what), version, f"{what} version")
        return tuple(self.integer(what) for _ in range(4))  # (num_samples, k, nr, nc)

    def tensor(self, what: str) -> np.ndarray:
        """A resizable_tensor: (num_samples, k, nr, nc) float32."""
        shape = self.sizes(2, what)
        count = int(np.prod(shape))
        values = np.frombuffer(self.take(4 * count, what), dtype="<f4")
        return values.astype(np.float32).reshape(shape)

    def alias(self, what: str) -> tuple[int, ...]:
        """An alias_tensor's shape: (num_samples, k, nr, nc)."""
        return self.sizes(1, what)


def _split(reader: DlibReader, params: np.ndarray, what: str, *aliases: tuple) -> list[np.ndarray]:
    """Split a layer's flat parameter tensor into its aliases' shapes, in order."""
    flat, arrays = params.reshape(-1), []
    if flat.size != sum(int(np.prod(a)) for a in aliases):
        raise reader.fail(f"{what}: {flat.size} parameters do not fill {aliases}")
    for shape in aliases:
        arrays.append(flat[: int(np.prod(shape))].reshape(shape))
        flat = flat[arrays[-1].size :]
    return arrays


def _read_con(reader: DlibReader) -> dict:
    params = reader.tensor("con params")
    filters, rows, cols = (reader.integer("con size") for _ in range(3))
    stride = tuple(reader.integer("con stride") for _ in range(2))
    padding = tuple(reader.integer("con padding") for _ in range(2))
    filter_shape, bias_shape = reader.alias("con filters"), reader.alias("con biases")
    for _ in range(4):  # learning rate and weight decay multipliers
        reader.real("con multiplier")
    # (out, in, rows, cols), (1, out, 1, 1)
    weight, bias = _split(reader, params, "con", filter_shape, bias_shape)
    if weight.shape[0] != filters or weight.shape[2:] != (rows, cols):
        raise reader.fail(f"con: filters {weight.shape} disagree with {filters} x {rows} x {cols}")
    return {"weight": weight, "bias": bias.reshape(-1), "stride": stride, "padding": padding}


def _read_affine(reader: DlibReader) -> dict:
    params = reader.tensor("affine params")
    gamma_shape, beta_shape = reader.alias("affine gamma"), reader.alias("affine beta")
    reader.expect(reader.integer("affine mode"), 0, "affine mode (0: per channel)")
    gamma, beta = _split(reader, params, "affine", gamma_shape, beta_shape)  # (1, C, 1, 1) each
    return {"gamma": gamma.reshape(-1), "beta": beta.reshape(-1)}


def _read_pool(reader: DlibReader) -> dict:
    return {"geometry": tuple(reader.integer("pool geometry") for _ in range(6))}


def _read_fc(reader: DlibReader) -> dict:
    outputs, inputs = reader.integer("fc outputs"), reader.integer("fc inputs")
    params = reader.tensor("fc params")
    weight_shape = reader.alias("fc weights")
    reader.alias("fc biases")  # no bias: the parameters are the weights alone (checked below)
    reader.expect(reader.integer("fc bias mode"), 1, "fc bias mode (1: no bias)")
    for _ in range(4):
        reader.real("fc multiplier")
    (weight,) = _split(reader, params, "fc", weight_shape)  # (inputs, outputs, 1, 1)
    if weight.shape != (inputs, outputs, 1, 1):
        raise reader.fail(f"fc: weights {weight.shape} disagree with {inputs} -> {outputs}")
    return {"weight": weight.reshape(inputs, outputs)}


# kind -> (dlib's name for it, reader of its fields)
LAYER_FORMATS = {
    "con": ("con_4", _read_con),
    "affine": ("affine_", _read_affine),
    "relu": ("relu_", lambda reader: {}),
    "max_pool": ("max_pool_2", _read_pool),
    "avg_pool": ("avg_pool_2", _read_pool),
    "add_prev": ("add_prev_", lambda reader: {}),
    "fc": ("fc_2", _read_fc),
}
WRAPPER_ONLY = ("tag", "skip")  # layers with no fields of their own


def _read_wrappers(reader: DlibReader, kinds: list[str]) -> None:
    """The wrapper versions, output to input: add_layer 2 (3 on the input), tag and skip 1."""
    for depth, kind in enumerate(reversed(kinds)):
        expected = 1 if kind in WRAPPER_ONLY else 3 if depth == len(kinds) - 1 else 2
        what = f"version of layer {len(kinds) - depth} ({kind})"
        reader.expect(reader.integer("layer version"), expected, what)


def _read_input(reader: DlibReader) -> tuple[float, float, float]:
    reader.expect(reader.string("input layer"), "input_rgb_image_sized", "input layer")
    means = tuple(reader.real("input mean") for _ in range(3))  # R, G, B
    size = (reader.integer("input size"), reader.integer("input size"))
    reader.expect(size, (CHIP_SIZE, CHIP_SIZE), "input size")
    return means


def _read_layer(reader: DlibReader, kind: str, innermost: bool) -> dict:
    """One add_layer's own part: details, three bools, cached tensors."""
    name, read_fields = LAYER_FORMATS[kind]
    reader.expect(reader.string("layer name"), name, f"layer name ({kind})")
    fields = read_fields(reader)
    for _ in range(3):  # setup called, gradient stale, output disabled
        reader.flag("layer state")
    for _ in range(3):  # x_grad, cached output, params_grad (grad_final on the input layer)
        reader.tensor("cached tensor")
    if innermost:
        reader.integer("sample expansion factor")
    return fields


def read_dlib_network(path: Path, kinds: list[str]) -> tuple[tuple[float, ...], list[dict]]:
    """Parse a serialized loss_metric network whose layers, input to output, are `kinds`.

    Returns the input's R, G, B means and one dict of fields per entry of `kinds` (empty for
    fieldless layers).
    """
    reader = DlibReader(path, path.read_bytes())
    reader.expect(reader.integer("loss version"), 1, "loss layer version")
    reader.expect(reader.string("loss name"), "loss_metric_2", "loss layer")
    for field in ("margin", "distance threshold"):
        reader.real(f"loss {field}")
    _read_wrappers(reader, kinds)
    means = _read_input(reader)
    layers = [{} if kind in WRAPPER_ONLY else _read_layer(reader, kind, innermost=i == 0)
              for i, kind in enumerate(kinds)]  # fmt: skip
    if reader.pos != len(reader.data):
        raise reader.fail(f"{len(reader.data) - reader.pos} unexpected byte(s) after the network")
    return means, layers
