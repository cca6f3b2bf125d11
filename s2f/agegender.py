"""Age and gender from a face crop: face-api's AgeGenderNet (TinyXception) in plain PyTorch.

The evaluation reads age and gender from the original face and from the face decoded from the
predicted feature. The estimator is face-api 1.7.15's `AgeGenderNet`, rebuilt layer for layer
and loaded straight from its tfjs files (`age_gender_model-weights_manifest.json` + shard),
which `scripts/fetch-faceapi.sh` puts in `.cache/faceapi/model/`. The JavaScript package itself
(`s2f/faceapi/run_agegender.mjs`) is the reference the tests compare against.

Network (face-api `TinyXception(2)` + `AgeGenderNet.runNet`), NHWC there, NCHW here:
  112x112x3 -> conv_in 3x3/2 + relu                           -> 56x56x32
  reduction_block_0 (no input relu)                         -> 28x28x64
  reduction_block_1                                         -> 14x14x128
  main_block_0, main_block_1 (3 separable convs + identity) -> 14x14x128
  exit reduction_block                                      ->  7x7x256
  separable_conv + relu                                     ->  7x7x512
  avg pool 7x7 (valid)                                      ->  512
  fc/age (512 -> 1) = age in years; fc/gender (512 -> 2) -> softmax, index 0 = male

Preprocessing (face-api `NetInput.toBatchTensor(112, isCenterInputs=true)` on a tensor input):
pad the shorter side with zeros to a square, round(diff / 2) rows/columns after the image and
the rest before it, resize bilinearly to 112 the legacy TF way (no align corners, no half-pixel
centres), subtract the RGB mean and divide by 255.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from s2f.teacher import check_state_dict

INPUT_SIZE = 112  # pixels, square network input
RGB_MEAN = (122.782, 117.001, 104.298)  # face-api's per-channel mean (R, G, B), 0-255 scale
RGB_SCALE = 255.0  # face-api divides the mean-subtracted pixels by this
NUM_MAIN_BLOCKS = 2  # AgeGenderNet builds TinyXception(2)
POOL_SIZE = 7  # the 7x7 exit map is averaged to one vector
FEATURE_DIM = 512  # channels of the exit separable conv
GENDERS = ("male", "female")  # order of the gender logits (face-api reads index 0 as male)
MANIFEST_NAME = "age_gender_model-weights_manifest.json"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / ".cache" / "faceapi" / "model"
FETCH_HINT = "run scripts/fetch-faceapi.sh"
# (name, in channels, out channels) of the reduction blocks, in forward order.
REDUCTION_BLOCKS = (
    ("entry_flow/reduction_block_0", 32, 64),
    ("entry_flow/reduction_block_1", 64, 128),
    ("exit_flow/reduction_block", 128, 256),
)
MAIN_CHANNELS = 128
# numpy dtypes of the tfjs storage dtypes this loader reads (little-endian in the shards).
TFJS_DTYPES = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8, "uint16": np.uint16,
               "float16": np.float16}  # fmt: skip


class AgeGenderLoadError(ValueError):
    """The tfjs model files do not match AgeGenderNet; the message names the file and tensor."""


# ----------------------------------------------------------------------------- tfjs weights


def _dequantize(raw: np.ndarray, quant: dict) -> np.ndarray:
    """tfjs `decodeWeights`: q * scale + min in float64, then stored in a Float32Array."""
    if quant["dtype"] == "float16":
        return raw.astype(np.float32)
    return (raw.astype(np.float64) * quant["scale"] + quant["min"]).astype(np.float32)


def read_tfjs_weights(model_dir: str | Path, manifest_name: str = MANIFEST_NAME) -> dict:
    """Every tensor of a tfjs weights manifest, by name, as float32 (or int32) numpy arrays.

    The shards of each group are one byte stream; tensors follow each other in manifest order,
    each stored in its quantization dtype if it has one, else in its own dtype.
    """
    model_dir = Path(model_dir)
    manifest_path = model_dir / manifest_name
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no AgeGenderNet weights manifest; {FETCH_HINT}")
    weights = {}
    for group in json.loads(manifest_path.read_text()):
        weights.update(_read_group(model_dir, manifest_path, group))
    return weights


def _read_group(model_dir: Path, manifest_path: Path, group: dict) -> dict:
    shards = [model_dir / p for p in group["paths"]]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(
                f"{shard}: shard listed in {manifest_path} is missing; {FETCH_HINT}"
            )
    data = b"".join(s.read_bytes() for s in shards)
    out, offset = {}, 0
    for entry in group["weights"]:
        quant = entry.get("quantization")
        stored = (quant or entry)["dtype"]
        if stored not in TFJS_DTYPES:
            raise AgeGenderLoadError(
                f"{manifest_path}: tensor {entry['name']} is stored as {stored}, which this "
                f"loader does not read ({sorted(TFJS_DTYPES)}); {FETCH_HINT} (face-api 1.7.15)"
            )
        dtype = np.dtype(TFJS_DTYPES[stored]).newbyteorder("<")
        count = math.prod(entry["shape"])
        end = offset + count * dtype.itemsize
        if end > len(data):
            raise AgeGenderLoadError(
                f"{manifest_path}: tensor {entry['name']} runs past the end of its shards "
                f"({len(data)} bytes); the download is truncated, {FETCH_HINT}"
            )
        raw = np.frombuffer(data[offset:end], dtype)
        values = _dequantize(raw, quant) if quant else raw.astype(TFJS_DTYPES[entry["dtype"]])
        out[entry["name"]] = values.reshape(entry["shape"])
        offset = end
    if offset != len(data):
        raise AgeGenderLoadError(f"{manifest_path}: {len(data) - offset} bytes of shards unused")
    return out


def _torch_layout(tfjs_name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """tfjs tensor name and array -> this module's state-dict key and array.

    tfjs convolutions are HWIO (depthwise: H W C 1), torch's OIHW (depthwise: C 1 H W);
    tfjs dense weights are (in, out), torch's Linear (out, in).
    """
    *path, leaf = tfjs_name.split("/")
    prefix = ".".join(path)
    if leaf == "filters":  # (H, W, I, O) -> (O, I, H, W)
        return f"{prefix}.weight", value.transpose(3, 2, 0, 1)
    if leaf == "depthwise_filter":  # (H, W, C, 1) -> (C, 1, H, W)
        return f"{prefix}.depthwise.weight", value.transpose(2, 3, 0, 1)
    if leaf == "pointwise_filter":  # (1, 1, I, O) -> (O, I, 1, 1)
        return f"{prefix}.pointwise.weight", value.transpose(3, 2, 0, 1)
    if leaf == "weights":  # (I, O) -> (O, I)
        return f"{prefix}.weight", value.T
    if leaf == "bias" and path[-1].startswith("separable_conv"):
        # tfjs adds the separable conv's bias after the pointwise step; so does torch here.
        return f"{prefix}.pointwise.bias", value
    if leaf == "bias":
        return f"{prefix}.bias", value
    raise AgeGenderLoadError(f"tensor {tfjs_name}: unknown kind {leaf!r}")


def tfjs_to_state_dict(weights: dict) -> dict[str, torch.Tensor]:
    """tfjs tensors by name -> AgeGenderNet state dict (layouts converted, contiguous)."""
    state = {}
    for name, value in weights.items():
        key, array = _torch_layout(name, value)
        state[key] = torch.from_numpy(np.ascontiguousarray(array, np.float32))
    return state


# ----------------------------------------------------------------------------- layers


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'same' padding (before, after): the odd pixel goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_pad(x.shape[-2], kernel, stride)
    left, right = _same_pad(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom), value=value)


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'same' padding, which torch's padding='same' lacks for stride 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


class SeparableConv(nn.Module):
    """tf.separableConv2d 3x3 'same' stride 1: depthwise, then pointwise with the bias."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.depthwise = SameConv2d(in_channels, in_channels, 3, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class ReductionBlock(nn.Module):
    """Two separable convs, 3x3/2 max pool, plus a 1x1/2 conv shortcut: halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, activate_input: bool = True):
        super().__init__()
        self.activate_input = activate_input
        self.separable_conv0 = SeparableConv(in_channels, out_channels)
        self.separable_conv1 = SeparableConv(out_channels, out_channels)
        self.expansion_conv = SameConv2d(in_channels, out_channels, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x) if self.activate_input else x
        out = self.separable_conv0(out)
        out = self.separable_conv1(F.relu(out))
        # tf max pool 'same' ignores the padded cells, as -inf padding does.
        out = F.max_pool2d(_pad_same(out, 3, 2, value=-math.inf), 3, 2)
        return out + self.expansion_conv(x)  # the shortcut sees the un-activated input


class MainBlock(nn.Module):
    """Three relu + separable convs with an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.separable_conv0 = SeparableConv(channels, channels)
        self.separable_conv1 = SeparableConv(channels, channels)
        self.separable_conv2 = SeparableConv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.separable_conv0(F.relu(x))
        out = self.separable_conv1(F.relu(out))
        out = self.separable_conv2(F.relu(out))
        return out + x


# ----------------------------------------------------------------------------- preprocessing


def _pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """face-api padToSquare(isCenterImage=true) on (H, W, 3).

    Zeros (before normalisation, so they become -mean/255): round(diff / 2) rows or columns
    after the image, the rest before it.
    """
    height, width = image.shape[:2]
    diff = abs(height - width)
    after = math.floor(diff * 0.5 + 0.5)  # JavaScript Math.round: halves round up
    before = diff - after
    if height > width:  # pad W: F.pad pairs run from the last dim, (C, C, W, W[, H, H])
        return F.pad(image, (0, 0, before, after))
    return F.pad(image, (0, 0, 0, 0, before, after))


def _resize_bilinear(image: torch.Tensor, size: int) -> torch.Tensor:
    """tf.image.resizeBilinear(alignCorners=false, halfPixelCenters=false) of (S, S, 3) float32.

    Source coordinate = destination index * (in / out); torch's bilinear uses half-pixel
    centres, so the legacy TF sampling is written out.
    """
    src = image.shape[0]
    scale = torch.tensor(src / size, dtype=torch.float32)
    pos = torch.arange(size, dtype=torch.float32) * scale  # (size,)
    low = pos.floor().long().clamp(0, src - 1)
    high = pos.ceil().long().clamp(max=src - 1)
    frac = (pos - pos.floor())[:, None, None]  # (size, 1, 1)
    rows = image[low] + (image[high] - image[low]) * frac  # (size, S, 3)
    frac = frac.view(1, size, 1)
    return rows[:, low] + (rows[:, high] - rows[:, low]) * frac  # (size, size, 3)


def preprocess(face_images: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 face crops (H, W, 3), any size -> network input (B, 3, 112, 112) float32."""
    batch = []
    for i, image in enumerate(face_images):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"face_images[{i}]: shape {image.shape} dtype {image.dtype}; "
                "expected an RGB uint8 array (H, W, 3)"
            )
        x = _pad_to_square(torch.tensor(image, dtype=torch.float32))  # (S, S, 3)
        if x.shape[0] != INPUT_SIZE:
            x = _resize_bilinear(x, INPUT_SIZE)  # (112, 112, 3)
        batch.append(x)
    x = torch.stack(batch)  # (B, 112, 112, 3)
    x = (x - torch.tensor(RGB_MEAN, dtype=torch.float32)) / RGB_SCALE
    return x.permute(0, 3, 1, 2).contiguous()  # (B, 3, 112, 112)


# ----------------------------------------------------------------------------- network


@dataclass(frozen=True)
class AgeGender:
    """Per-face estimates: age in years (B,) and probability that the face is male (B,)."""

    age: np.ndarray
    prob_male: np.ndarray

    @property
    def gender(self) -> np.ndarray:
        """'male' / 'female' labels (B,), face-api's rule: male when prob_male > 0.5."""
        return np.where(self.prob_male > 0.5, GENDERS[0], GENDERS[1])


class AgeGenderNet(nn.Module):
    """face-api's AgeGenderNet; module names mirror the tfjs tensor names ('/' -> '.')."""

    def __init__(self, num_main_blocks: int = NUM_MAIN_BLOCKS):
        super().__init__()
        blocks = {name: ReductionBlock(i, o, activate_input=k > 0)
                  for k, (name, i, o) in enumerate(REDUCTION_BLOCKS)}  # fmt: skip
        self.entry_flow = nn.ModuleDict({
            "conv_in": SameConv2d(3, REDUCTION_BLOCKS[0][1], 3, stride=2),
            "reduction_block_0": blocks["entry_flow/reduction_block_0"],
            "reduction_block_1": blocks["entry_flow/reduction_block_1"],
        })  # fmt: skip
        self.middle_flow = nn.ModuleDict(
            {f"main_block_{k}": MainBlock(MAIN_CHANNELS) for k in range(num_main_blocks)}
        )
        self.exit_flow = nn.ModuleDict({
            "reduction_block": blocks["exit_flow/reduction_block"],
            "separable_conv": SeparableConv(REDUCTION_BLOCKS[-1][2], FEATURE_DIM),
        })  # fmt: skip
        self.fc = nn.ModuleDict(
            {"age": nn.Linear(FEATURE_DIM, 1), "gender": nn.Linear(FEATURE_DIM, len(GENDERS))}
        )

    @classmethod
    def load(cls, model_dir: str | Path = DEFAULT_MODEL_DIR) -> "AgeGenderNet":
        """Build and load from face-api's tfjs files in model_dir; frozen, eval mode, CPU."""
        manifest = Path(model_dir) / MANIFEST_NAME
        state = tfjs_to_state_dict(read_tfjs_weights(model_dir))
        model = cls()
        check_state_dict(manifest, state, model.state_dict(), "face-api's AgeGenderNet",
                         f"{FETCH_HINT} (face-api 1.7.15)", AgeGenderLoadError)
        model.load_state_dict(state)
        return model.requires_grad_(False).eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) preprocessed -> (B, 512) pooled TinyXception feature."""
        out = F.relu(self.entry_flow["conv_in"](x))  # (B, 32, 56, 56)
        out = self.entry_flow["reduction_block_0"](out)  # (B, 64, 28, 28)
        out = self.entry_flow["reduction_block_1"](out)  # (B, 128, 14, 14)
        for block in self.middle_flow.values():
            out = block(out)  # (B, 128, 14, 14)
        out = self.exit_flow["reduction_block"](out)  # (B, 256, 7, 7)
        out = F.relu(self.exit_flow["separable_conv"](out))  # (B, 512, 7, 7)
        return F.avg_pool2d(out, POOL_SIZE, 2).flatten(1)  # (B, 512)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 112, 112) preprocessed -> age in years (B,), probability of male (B,)."""
        pooled = self.features(images)
        age = self.fc["age"](pooled)[:, 0]  # (B,)
        prob = torch.softmax(self.fc["gender"](pooled), dim=1)  # (B, 2)
        return age, prob[:, GENDERS.index("male")]

    @torch.no_grad()
    def predict(self, face_images: list[np.ndarray]) -> AgeGender:
        """RGB uint8 face crops (H, W, 3), any size, with face-api's preprocessing."""
        device = next(self.parameters()).device
        age, prob_male = self(preprocess(face_images).to(device))
        return AgeGender(age=age.cpu().numpy(), prob_male=prob_male.cpu().numpy())
