"""Face stage: detect faces in a frame, pick the speaker's face, find landmarks, align a crop.

Detectors: dlib's HOG detector, dlib's CNN (MMOD) detector (the paper's choice, SPEC section
2), and MTCNN. MTCNN runs as plain-PyTorch P/R/O-Nets on the weights that facenet-pytorch
ships in its package data; facenet-pytorch's own module needs torchvision, which does not
import with every torch build, so only its weight files are used.

Alignment (the crop margin is open in the paper): `dlib.get_face_chip` with the 5-point
landmarks maps dlib's mean-face template onto the crop and adds ALIGN_PADDING of the template
size on every side. 0.25 is the padding of dlib's own face descriptor chips: the crop shows the
whole face from forehead to chin with a small margin (like VGG-Face's detector-box crops), and
the dlib teacher sees exactly this crop, only resized.

Loaded models are cached per process in `_MODELS`; nothing is loaded at import time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FACE_SIZE = 224  # pixels, square aligned crop
ALIGN_PADDING = 0.25  # fraction of the template face size added on each side of the crop
DETECTORS = ("hog", "cnn", "mtcnn")
# Times the image is doubled before detection (dlib's upsample); MTCNN halves its minimum
# face size instead, which has the same effect. CNN default 0: it costs ~4x per doubling.
DEFAULT_UPSAMPLE = {"hog": 1, "cnn": 0, "mtcnn": 0}
MTCNN_MIN_FACE = 20.0  # pixels, smallest face searched at upsample 0
MTCNN_SCALE_FACTOR = 0.709  # image pyramid step
MTCNN_THRESHOLDS = (0.6, 0.7, 0.7)  # face probability to pass P-, R-, O-Net
MTCNN_NMS = (0.5, 0.7, 0.7, 0.7)  # IoU: per scale, P-Net all scales, R-Net, O-Net (min-IoU)
MTCNN_CELL = 12  # pixels, P-Net receptive field
MTCNN_STRIDE = 2  # pixels, P-Net output stride

# iBUG 68 index of each point's mirror image: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47,
# outer lips 48-59, inner lips 60-67.
IBUG68_MIRROR = (
    *range(16, -1, -1), *range(26, 16, -1), 27, 28, 29, 30, 35, 34, 33, 32, 31,
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
    *range(54, 47, -1), 59, 58, 57, 56, 55, *range(64, 59, -1), 67, 66, 65,
)  # fmt: skip

_MODELS: dict[str, object] = {}


class NoFaceError(ValueError):
    """No usable face in an image; the message says why."""


@dataclass(frozen=True)
class Box:
    """A face box in pixels (right and bottom exclusive) with the detector's score."""

    left: float
    top: float
    right: float
    bottom: float
    score: float = 0.0

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.left + self.right) / 2, (self.top + self.bottom) / 2


@dataclass(frozen=True)
class FaceCrop:
    """The aligned crop of the chosen face and how it was found."""

    crop: np.ndarray  # (224, 224, 3) uint8 RGB
    box: Box
    landmarks5: np.ndarray  # (5, 2) x, y in the source image
    num_faces: int


# -- model loading ----------------------------------------------------------------------------


def _import_dlib():
    try:
        import dlib
        import face_recognition_models
    except ImportError as error:
        raise ImportError(
            "face detection needs dlib and face_recognition_models: pip install 's2f[faces]'"
        ) from error
    return dlib, face_recognition_models


def _cached(name: str, build):
    if name not in _MODELS:
        _MODELS[name] = build()
    return _MODELS[name]


def dlib_model(name: str):
    """A cached dlib model: "hog", "cnn", "landmarks68", "landmarks5" or "descriptor"."""
    dlib, models = _import_dlib()
    builders = {
        "hog": dlib.get_frontal_face_detector,
        "cnn": lambda: dlib.cnn_face_detection_model_v1(models.cnn_face_detector_model_location()),
        "landmarks68": lambda: dlib.shape_predictor(models.pose_predictor_model_location()),
        "landmarks5": lambda: dlib.shape_predictor(
            models.pose_predictor_five_point_model_location()
        ),
        "descriptor": lambda: dlib.face_recognition_model_v1(
            models.face_recognition_model_location()
        ),
    }
    if name not in builders:
        raise ValueError(f"unknown dlib model {name!r}; choose one of {sorted(builders)}")
    return _cached(name, builders[name])


def mtcnn_weights_dir() -> Path:
    """facenet-pytorch's bundled weight folder, found without importing the package."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "MTCNN needs facenet-pytorch's weights: pip install --no-deps facenet-pytorch"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _mtcnn() -> "MTCNN":
    return _cached("mtcnn", lambda: MTCNN.load(mtcnn_weights_dir()))


# -- MTCNN box arithmetic --------------------------------------------------------------------
# Boxes are (K, 4) x1, y1, x2, y2 float tensors in the original MTCNN's convention (1-based,
# inclusive corners), which its weights were trained with; `detect` returns them unchanged.


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, by_min: bool = False):
    """Greedy non-maximum suppression; overlap is IoU, or intersection over the smaller box."""
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    order, keep = scores.argsort(descending=True), []
    while order.numel():
        best, rest = order[0], order[1:]
        keep.append(best)
        lo = torch.maximum(boxes[best, :2], boxes[rest, :2])  # (R, 2)
        hi = torch.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = (hi - lo).clamp(min=0).prod(1)
        union = torch.minimum(area[best], area[rest]) if by_min else area[best] + area[rest] - inter
        order = rest[inter / union.clamp(min=1e-9) <= threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


def _pyramid(height: int, width: int, min_face: float) -> list[float]:
    """Scales at which P-Net's 12-pixel cell covers faces from min_face up to the image size."""
    scale, side, scales = MTCNN_CELL / min_face, min(height, width) * MTCNN_CELL / min_face, []
    while side >= MTCNN_CELL:
        scales.append(scale)
        scale, side = scale * MTCNN_SCALE_FACTOR, side * MTCNN_SCALE_FACTOR
    return scales


def _regress(boxes: torch.Tensor, offsets: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """Apply the networks' box offsets, fractions of the box size (P-Net's size is exclusive,
    R- and O-Net's inclusive, as in the reference implementation)."""
    size = (boxes[:, 2:] - boxes[:, :2] + float(inclusive)).repeat(1, 2)  # (K, 4) w, h, w, h
    return boxes + offsets * size


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (the networks take square crops)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], 1)


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 3, H, W) normalised image -> (K, 3, size, size) box crops, area-resampled.

    Boxes are clipped to the image; an empty clip yields a zero crop.
    """
    h, w = image.shape[2:]
    out = torch.zeros(len(boxes), 3, size, size)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        x1, y1, x2, y2 = max(x1, 1) - 1, max(y1, 1) - 1, min(x2, w), min(y2, h)  # 1-based
        if x2 > x1 and y2 > y1:
            out[k] = F.interpolate(image[:, :, y1:y2, x1:x2], size=(size, size), mode="area")[0]
    return out


def _pnet_boxes(offsets: torch.Tensor, prob: torch.Tensor, scale: float) -> torch.Tensor:
    """P-Net maps (1, 4, h, w) offsets and (h, w) face probability at one pyramid scale ->
    (K, 9) candidates x1, y1, x2, y2, score, 4 offsets in image pixels."""
    ys, xs = torch.nonzero(prob >= MTCNN_THRESHOLDS[0], as_tuple=True)
    origin = torch.stack([xs, ys], 1).float() * MTCNN_STRIDE + 1  # (K, 2) 1-based, scaled image
    corners = torch.cat([origin, origin + MTCNN_CELL - 1], 1) / scale  # (K, 4) image pixels
    corners = corners.floor()
    cells = offsets[0, :, ys, xs].T  # (K, 4)
    return torch.cat([corners, prob[ys, xs, None], cells], 1)


# -- detection --------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {tuple(image.shape)}; "
            "convert with np.asarray(PIL.Image.open(path).convert('RGB'))"
        )
    return np.ascontiguousarray(image)


def _rect_box(rect, score: float) -> Box:
    return Box(float(rect.left()), float(rect.top()), float(rect.right() + 1),
               float(rect.bottom() + 1), float(score))  # fmt: skip


def detect_faces(
    image: np.ndarray, detector: str = "hog", upsample: int | None = None
) -> list[Box]:
    """All faces in an RGB uint8 image (H, W, 3), best score first.

    `upsample`: times the image is doubled before detection (finds smaller faces, slower);
    None uses DEFAULT_UPSAMPLE[detector].
    """
    image = _check_image(image)
    upsample = DEFAULT_UPSAMPLE.get(detector, 0) if upsample is None else upsample
    if detector == "hog":
        rects, scores, _ = dlib_model("hog").run(image, upsample, 0.0)
        boxes = [_rect_box(r, s) for r, s in zip(rects, scores)]
    elif detector == "cnn":
        boxes = [_rect_box(d.rect, d.confidence) for d in dlib_model("cnn")(image, upsample)]
    elif detector == "mtcnn":
        found = _mtcnn().detect(image, MTCNN_MIN_FACE / 2**upsample)  # (K, 5)
        boxes = [Box(*map(float, row)) for row in found]
    else:
        raise ValueError(f"unknown detector {detector!r}; choose one of {DETECTORS}")
    return sorted(boxes, key=lambda b: -b.score)


def pick_speaker_face(
    boxes: list[Box], image_size: tuple[int, int], center_xy: tuple[float, float] | None = None
) -> Box:
    """The speaker's face: nearest box centre to `center_xy` (normalised x, y; AVSpeech gives
    it), else the largest box. `image_size` is (H, W)."""
    if not boxes:
        raise NoFaceError("no face detected in the frame")
    if center_xy is None:
        return max(boxes, key=lambda b: b.area)
    h, w = image_size
    x, y = center_xy[0] * w, center_xy[1] * h
    return min(boxes, key=lambda b: (b.centre[0] - x) ** 2 + (b.centre[1] - y) ** 2)


# -- landmarks and alignment ------------------------------------------------------------------


def _shape(image: np.ndarray, box: Box, model: str):
    dlib, _ = _import_dlib()
    rect = dlib.rectangle(int(round(box.left)), int(round(box.top)),
                          int(round(box.right)) - 1, int(round(box.bottom)) - 1)  # fmt: skip
    return dlib_model(model)(_check_image(image), rect)


def _points(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)  # (K, 2)


def landmarks68(image: np.ndarray, box: Box) -> np.ndarray:
    """dlib's 68 landmarks (iBUG 300-W order) of the face in `box`: (68, 2) x, y pixels."""
    return _points(_shape(image, box, "landmarks68"))


def landmarks68_mirror_averaged(image: np.ndarray, box: Box) -> np.ndarray:
    """dlib's 68 landmarks averaged with those read on the mirror image: (68, 2) x, y pixels.

    The predictor's cascade is not mirror-symmetric, so its errors on the two readings are
    partly independent; the average is steadier, most on the outline (points 0-16), which
    dlib places from its shape prior more than from the image edge.
    """
    width = image.shape[1]
    mirrored = np.ascontiguousarray(image[:, ::-1])
    mirrored_box = Box(width - box.right, box.top, width - box.left, box.bottom, box.score)
    points = landmarks68(mirrored, mirrored_box)[list(IBUG68_MIRROR)]  # (68, 2)
    points[:, 0] = width - 1 - points[:, 0]
    return (landmarks68(image, box) + points) / 2


def landmarks5(image: np.ndarray, box: Box) -> np.ndarray:
    """dlib's 5 landmarks (eye corners, nose base) of the face in `box`: (5, 2) x, y pixels."""
    return _points(_shape(image, box, "landmarks5"))


def _chip(image: np.ndarray, shape, size: int, padding: float) -> np.ndarray:
    dlib, _ = _import_dlib()
    return dlib.get_face_chip(_check_image(image), shape, size=size, padding=padding)


def align_face(
    image: np.ndarray, box: Box, size: int = FACE_SIZE, padding: float = ALIGN_PADDING
) -> np.ndarray:
    """Similarity-aligned (size, size, 3) crop: eyes level, at fixed positions (module doc)."""
    return _chip(image, _shape(image, box, "landmarks5"), size, padding)


def extract_face(
    image: np.ndarray,
    detector: str = "hog",
    center_xy: tuple[float, float] | None = None,
    upsample: int | None = None,
    padding: float = ALIGN_PADDING,
) -> FaceCrop:
    """Detect, pick the speaker's face, align: the shard builder's one call per frame."""
    boxes = detect_faces(image, detector, upsample)
    if not boxes:
        raise NoFaceError(
            f"{detector} detector found no face in the {image.shape[1]}x{image.shape[0]} frame; "
            "try another frame, a larger upsample, or another detector"
        )
    box = pick_speaker_face(boxes, image.shape[:2], center_xy)
    shape = _shape(image, box, "landmarks5")
    crop = _chip(image, shape, FACE_SIZE, padding)
    return FaceCrop(crop=crop, box=box, landmarks5=_points(shape), num_faces=len(boxes))


# -- MTCNN networks (facenet-pytorch's layer names, so its weight files load strictly) -------


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), self.conv4_1(x).softmax(1)  # offsets, face probability


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))  # (K, 64, 3, 3)
        # the weights come from a channels-last framework: flatten as (W, H, C)
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))  # (K, 128)
        return self.dense5_2(x), self.dense5_1(x).softmax(1)


class ONet(nn.Module):
    """Output net on 48x48 crops; its 5-landmark head (dense6_3) is loaded but not evaluated."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))  # (K, 128, 3, 3)
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))  # (K, 256)
        return self.dense6_2(x), self.dense6_1(x).softmax(1)  # the landmark head is unused


class MTCNN(nn.Module):
    """The three-stage cascade (Zhang et al. 2016): proposals, refinement, output boxes."""

    def __init__(self):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()

    @classmethod
    def load(cls, weights_dir: str | Path) -> "MTCNN":
        """Build and strictly load {pnet,rnet,onet}.pt from `weights_dir`, frozen."""
        model = cls()
        for name in ("pnet", "rnet", "onet"):
            path = Path(weights_dir) / f"{name}.pt"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: MTCNN weight file missing; reinstall facenet-pytorch (--no-deps)"
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            getattr(model, name).load_state_dict(state, strict=True)
        return model.requires_grad_(False).eval()

    def _propose(self, image: torch.Tensor, min_face: float) -> torch.Tensor:
        h, w = image.shape[2:]
        found = []
        for scale in _pyramid(h, w, min_face):
            size = (int(h * scale + 1), int(w * scale + 1))
            scaled = F.interpolate(image, size=size, mode="area")
            offsets, prob = self.pnet(scaled)
            boxes = _pnet_boxes(offsets, prob[0, 1], scale)  # (K, 9)
            found.append(boxes[_nms(boxes[:, :4], boxes[:, 4], MTCNN_NMS[0])])
        boxes = torch.cat(found) if found else torch.zeros(0, 9)
        boxes = boxes[_nms(boxes[:, :4], boxes[:, 4], MTCNN_NMS[1])]
        regressed = _regress(boxes[:, :4], boxes[:, 5:], inclusive=False)
        return torch.cat([_square(regressed), boxes[:, 4:5]], 1)

    def _refine(self, net: nn.Module, image, boxes, size: int, stage: int) -> torch.Tensor:
        offsets, prob = net(_crops(image, boxes[:, :4], size))
        keep = prob[:, 1] > MTCNN_THRESHOLDS[stage]
        boxes, offsets, score = boxes[keep, :4], offsets[keep], prob[keep, 1:2]
        if stage == 2:  # the reference order: O-Net regresses, then suppresses; R-Net reverse
            boxes = _regress(boxes, offsets, inclusive=True)
        pick = _nms(boxes, score[:, 0], MTCNN_NMS[stage + 1], by_min=stage == 2)
        boxes, offsets, score = boxes[pick], offsets[pick], score[pick]
        if stage == 1:
            boxes = _regress(boxes, offsets, inclusive=True)
        return torch.cat([boxes, score], 1)

    @torch.no_grad()
    def detect(self, image: np.ndarray, min_face: float = MTCNN_MIN_FACE) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> (K, 5) boxes x1, y1, x2, y2, probability."""
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        x = (x - 127.5) / 128.0
        boxes = self._propose(x, min_face)
        if len(boxes):
            boxes = self._refine(self.rnet, x, boxes, 24, 1)
        if len(boxes):
            boxes = self._refine(self.onet, x, _square(boxes[:, :4]), 48, 2)
        return boxes.numpy()
