"""Frozen face networks: the teacher feature v_f and the classifier f_VGG used in the loss.

`VGGFace` is VGG-16 with 2,622 identity classes (Parkhi et al. 2015) in plain PyTorch, laid out
as the common `vgg_face_dag.pth` release (keys `conv1_1.weight` ... `fc8.bias`): its forward
gives fc7 (4096-D, post-ReLU), and `fc8` (4096 -> 2622) is a separate layer for the loss.
`TeacherHead` is a frozen linear classifier fitted on teacher features + identity labels, the
fc8 stand-in for feature extractors that ship without a classifier (the dlib descriptor).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from s2f.dlib_resnet import DlibResNet

log = logging.getLogger(__name__)

VGGFACE_CLASSES = 2622
VGGFACE_FEATURE_DIM = 4096
VGGFACE_IMAGE_SIZE = 224  # pixels, square
# vgg_face_dag takes RGB in [0, 255] minus this per-channel mean (R, G, B); std is 1.
VGGFACE_RGB_MEAN = (129.186279296875, 104.76238250732422, 93.59396362304688)
# (name, out channels) of the 13 convolutions; "pool" ends each of the 5 blocks.
VGGFACE_CONVS = (
    ("conv1_1", 64), ("conv1_2", 64), "pool",
    ("conv2_1", 128), ("conv2_2", 128), "pool",
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "pool",
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), "pool",
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512), "pool",
)  # fmt: skip


class TeacherLoadError(ValueError):
    """A teacher weight file does not match the expected layout; the message names the key."""


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (the teachers have no dropout or batch norm to switch)."""
    module.requires_grad_(False)
    return module.eval()


def check_state_dict(
    source: Path, state: dict, expected: dict, layout: str, fix: str, error: type = TeacherLoadError
) -> None:
    """Strict key and shape check of a loaded state dict; `error` names the first problems."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise error(f"{source}: not {layout}: missing keys {missing[:5]}, unexpected keys {extra[:5]}; {fix}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise error(f"{source}: key {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")


class VGGFace(nn.Module):
    """VGG-Face: (B, 3, 224, 224) preprocessed images -> fc7 (B, 4096), post-ReLU.

    `preprocess` maps RGB uint8/float images in [0, 255] to the network's input.
    `fc8` maps fc7 features to the 2,622 identity logits.
    """

    def __init__(self):
        super().__init__()
        layers, in_channels = [], 3
        for entry in VGGFACE_CONVS:
            if entry == "pool":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            name, out_channels = entry
            conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            self.add_module(name, conv)
            layers += [conv, nn.ReLU()]
            in_channels = out_channels
        self._trunk = layers  # plain list: the convs are registered once, under their own names
        self.fc6 = nn.Linear(512 * 7 * 7, VGGFACE_FEATURE_DIM)
        self.fc7 = nn.Linear(VGGFACE_FEATURE_DIM, VGGFACE_FEATURE_DIM)
        self.fc8 = nn.Linear(VGGFACE_FEATURE_DIM, VGGFACE_CLASSES)
        self.register_buffer(
            "rgb_mean", torch.tensor(VGGFACE_RGB_MEAN).view(1, 3, 1, 1), persistent=False
        )

    @classmethod
    def load(cls, path: str | Path) -> "VGGFace":
        """Build and load a `vgg_face_dag.pth` state dict strictly, frozen."""
        path = Path(path)
        if not path.is_file():
            raise TeacherLoadError(f"{path}: no such VGG-Face weight file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = cls()
        check_state_dict(path, state, model.state_dict(), "a vgg_face_dag state dict",
                         "pass the vgg_face_dag.pth release")
        model.load_state_dict(state, strict=True)
        return freeze(model)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB (B, 3, 224, 224) in [0, 255] -> mean-subtracted float input."""
        if images.shape[-3:] != (3, VGGFACE_IMAGE_SIZE, VGGFACE_IMAGE_SIZE):
            raise ValueError(f"VGGFace expects (B, 3, 224, 224) RGB, got {tuple(images.shape)}")
        return images.float() - self.rgb_mean

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        for layer in self._trunk:
            x = layer(x)  # (B, 512, 7, 7) after the last pool
        x = torch.relu(self.fc6(x.flatten(1)))  # (B, 4096)
        return torch.relu(self.fc7(x))  # (B, 4096) fc7, post-ReLU


class TeacherHead(nn.Module):
    """A frozen linear identity classifier (B, D) -> (B, classes): fc8 for teachers without one.

    Fitted by multinomial logistic regression (full-batch L-BFGS, deterministic) on teacher
    features and identity labels. The L2 weight is small (1e-6): stronger decay leaves the
    logits nearly flat, and the distillation term then has almost no signal to pass on (on the
    demo world 1e-4 gave a softmax(z / 2) entropy of 5.41 nats for 228 classes, 1e-6 gave 4.4
    and the best held-out clip accuracy).
    """

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(feature_dim, num_classes)
        freeze(self)

    @property
    def feature_dim(self) -> int:
        return self.linear.in_features

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        iterations: int = 200,
        weight_decay: float = 1e-6,
    ) -> "TeacherHead":
        """Fit on features (N, D) and integer identity labels (N,) in [0, classes)."""
        if features.dim() != 2 or labels.shape != features.shape[:1]:
            raise ValueError(
                f"TeacherHead.fit needs features (N, D) and labels (N,), "
                f"got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        features, labels = features.double(), labels.long()
        num_classes = int(labels.max()) + 1
        weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], max_iter=iterations, line_search_fn="strong_wolfe"
        )

        def objective():
            optimizer.zero_grad()
            logits = features @ weight.T + bias  # (N, classes)
            loss = nn.functional.cross_entropy(logits, labels) + weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        head = cls(features.shape[1], num_classes)
        with torch.no_grad():
            head.linear.weight.copy_(weight)
            head.linear.bias.copy_(bias)
        accuracy = (head(features.float()).argmax(1) == labels).float().mean().item()
        log.info("TeacherHead fitted: %d classes, train accuracy %.3f", num_classes, accuracy)
        return head

    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary name, then rename."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"weight": self.linear.weight, "bias": self.linear.bias}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "TeacherHead":
        path = Path(path)
        if not path.is_file():
            raise TeacherLoadError(f"{path}: no such teacher head file; build the shards first")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if set(state) != {"weight", "bias"}:
            raise TeacherLoadError(f"{path}: expected keys weight, bias; got {sorted(state)}")
        head = cls(state["weight"].shape[1], state["weight"].shape[0])
        head.linear.load_state_dict(state, strict=True)
        return head


def load_classifier(path: str | Path) -> nn.Linear:
    """The frozen fc8 of the loss from either a vgg_face_dag.pth or a teacher_head.pt file."""
    path = Path(path)
    if not path.is_file():
        raise TeacherLoadError(f"{path}: no such teacher file (vgg_face_dag.pth or teacher_head.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "fc8.weight" in state:
        return VGGFace.load(path).fc8
    return TeacherHead.load(path).linear


@functools.cache
def dlib_resnet() -> DlibResNet:
    """dlib's descriptor network in PyTorch, loaded once per process, on the GPU if there is one.

    Channels-last weights: the chips arrive as (N, H, W, 3) arrays, so their (N, 3, H, W) view is
    already channels-last. On one CPU thread at batch 1 (the shard builder's case) that runs at
    ~20 ms a chip, against ~30 with NCHW weights (mixed layouts) and ~23 with NCHW throughout.
    """
    model = DlibResNet.load().to(memory_format=torch.channels_last)
    return model.cuda() if torch.cuda.is_available() else model


class DlibTeacher:
    """dlib's 128-D face descriptor (face_recognition_models' ResNet) as a frozen teacher.

    Input: the aligned crops of `s2f.faces.align_face`. They are cut by `dlib.get_face_chip`
    from the 5 landmarks, exactly as dlib cuts its descriptor chips, only with the crop's
    padding and size; so the descriptor's chip (150 x 150, padding 0.25) is a fixed window of
    the crop, taken and resized with no second landmark search: deterministic, and it never
    fails on a crop. Not differentiable: features are computed once, when shards are built.

    Two backends compute the descriptor from the same chips: "torch" (default), the PyTorch
    port `s2f.dlib_resnet.DlibResNet`, batched and on the GPU when there is one; and "dlib",
    dlib's own network (the dlib-bin wheel has no BLAS: ~200 ms a face on one CPU core). They
    agree to ~1e-6 (tests/test_dlib_resnet.py).
    `load` names the constructor that reads model files; `__init__` only stores them.
    """

    name = "dlib"
    feature_dim = 128
    differentiable = False
    CHIP_SIZE = 150  # pixels, the descriptor network's input
    CHIP_PADDING = 0.25  # template fractions around the face in the network's chips
    BACKENDS = ("torch", "dlib")
    BATCH = 32  # chips per torch forward: on one CPU thread ~12 ms a chip from 16 up, vs ~20 at 1

    def __init__(self, model: object, crop_padding: float):
        if crop_padding < self.CHIP_PADDING:
            raise ValueError(
                f"crops aligned with padding {crop_padding} are tighter than dlib's descriptor "
                f"chips ({self.CHIP_PADDING}); align with padding >= {self.CHIP_PADDING}"
            )
        self.model, self.crop_padding = model, crop_padding

    @classmethod
    def load(cls, crop_padding: float | None = None, backend: str = "torch") -> "DlibTeacher":
        """The cached descriptor network of `backend` ("torch" or "dlib"), for crops aligned
        with `crop_padding` (default: s2f.faces.ALIGN_PADDING)."""
        from s2f.faces import ALIGN_PADDING, dlib_model

        if backend not in cls.BACKENDS:
            raise ValueError(f"unknown DlibTeacher backend {backend!r}; use one of {cls.BACKENDS}")
        padding = ALIGN_PADDING if crop_padding is None else crop_padding
        return cls(dlib_resnet() if backend == "torch" else dlib_model("descriptor"), padding)

    def _chip_window(self, size: int) -> tuple[int, int]:
        """Pixel range of the descriptor chip inside a square crop of `size` pixels."""
        # template coordinate t in [-pad, 1 + pad] lies at (t + crop_pad) / (1 + 2 crop_pad)
        scale = size / (1 + 2 * self.crop_padding)
        lo = (self.crop_padding - self.CHIP_PADDING) * scale
        hi = (self.crop_padding + 1 + self.CHIP_PADDING) * scale
        return int(round(lo)), int(round(hi))

    def chips(self, crops: np.ndarray) -> np.ndarray:
        """Aligned RGB uint8 crops (N, S, S, 3) -> the network's chips (N, 150, 150, 3) uint8."""
        import dlib  # the faces extra; both backends see chips resized by dlib's own resampler

        if crops.ndim != 4 or crops.shape[3] != 3 or crops.shape[1] != crops.shape[2]:
            raise ValueError(
                f"DlibTeacher expects aligned square RGB crops (N, S, S, 3), got {crops.shape}"
            )
        lo, hi = self._chip_window(crops.shape[1])
        chips = np.empty((len(crops), self.CHIP_SIZE, self.CHIP_SIZE, 3), np.uint8)
        for chip, crop in zip(chips, crops.astype(np.uint8, copy=False)):
            window = np.ascontiguousarray(crop[lo:hi, lo:hi])
            chip[:] = dlib.resize_image(window, self.CHIP_SIZE, self.CHIP_SIZE)
        return chips

    def features(self, crops: np.ndarray) -> np.ndarray:
        """Aligned RGB uint8 crops (N, S, S, 3) -> descriptors (N, 128) float32."""
        chips = self.chips(crops)
        if isinstance(self.model, DlibResNet):
            return self._torch_descriptors(chips)
        vectors = self.model.compute_face_descriptor(list(chips))  # N x 128, float64
        return np.asarray([np.asarray(v) for v in vectors], dtype=np.float32).reshape(-1, 128)

    def _torch_descriptors(self, chips: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(chips).permute(0, 3, 1, 2)  # (N, 3, 150, 150) uint8
        device = self.model.rgb_mean.device
        with torch.inference_mode():
            out = [self.model(batch.to(device)).cpu() for batch in images.split(self.BATCH)]
        return torch.cat(out).numpy()


class VGGFaceTeacher:
    """VGG-Face fc7 as a shard-builder teacher: aligned RGB crops -> (N, 4096) float32."""

    name = "vggface"
    feature_dim = VGGFACE_FEATURE_DIM
    differentiable = True
    BATCH = 32  # crops per forward

    def __init__(self, model: VGGFace):
        self.model = model

    @classmethod
    def load(cls, path: str | Path) -> "VGGFaceTeacher":
        model = VGGFace.load(path)
        return cls(model.cuda() if torch.cuda.is_available() else model)

    def features(self, crops: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)  # (N, 3, H, W)
        if images.shape[-2:] != (VGGFACE_IMAGE_SIZE, VGGFACE_IMAGE_SIZE):
            images = nn.functional.interpolate(
                images.float(), size=(VGGFACE_IMAGE_SIZE,) * 2, mode="bilinear", antialias=True
            )
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = [self.model(b.to(device)).cpu() for b in images.split(self.BATCH)]
        return torch.cat(out).numpy().astype(np.float32)


def teacher_from_spec(spec: str):
    """`dlib` or `vggface:PATH` -> a loaded teacher with `name`, `feature_dim`, `features()`."""
    if spec == "dlib":
        return DlibTeacher.load()
    if spec.startswith("vggface:"):
        return VGGFaceTeacher.load(spec.split(":", 1)[1])
    raise ValueError(f"unknown teacher {spec!r}; use 'dlib' or 'vggface:/path/to/vgg_face_dag.pth'")
