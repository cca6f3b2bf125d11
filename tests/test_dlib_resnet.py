"""The PyTorch port of dlib's face recognition ResNet against dlib itself.

Tolerance: float32 both ways, so the port may differ from dlib only by summation order inside
the convolutions; descriptors (norm ~1) must agree to max |diff| < 1e-4 and cosine > 0.99999
(measured: ~5e-7 and 1 - 1e-7).
"""

import numpy as np
import pytest
import torch

from s2f.demo.render import ClipVariation, FaceAppearance, render_canonical, render_face
from s2f.dlib_resnet import CHIP_SIZE, DlibModelError, DlibResNet, default_model_path
from s2f.teacher import DlibTeacher

dlib = pytest.importorskip("dlib")

MAX_ABS_DIFF = 1e-4
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return default_model_path().read_bytes()


@pytest.fixture(scope="module")
def port() -> DlibResNet:
    return DlibResNet.load()


@pytest.fixture(scope="module")
def reference():
    return dlib.face_recognition_model_v1(str(default_model_path()))


def face_chips() -> np.ndarray:
    """(5, 150, 150, 3) uint8: three rendered faces filling the chip, two of noise."""
    size = (CHIP_SIZE, CHIP_SIZE)
    turned = ClipVariation(yaw_deg=8, roll_deg=-5, scale=0.8)
    faces = [
        render_canonical(FaceAppearance(skin_tone=0.2, hair_style=0), size),
        render_canonical(FaceAppearance(face_width=0.8, skin_tone=0.8, hair_style=3, beard=0.6), size),
        render_face(FaceAppearance(nose_width=0.9), turned, size),
    ]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (*size, 3), dtype=np.uint8),
             rng.normal(128, 20, (*size, 3)).clip(0, 255).astype(np.uint8)]  # fmt: skip
    return np.stack(faces + noise)


def descriptors(port: DlibResNet, chips: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return port(torch.from_numpy(chips).permute(0, 3, 1, 2)).numpy()  # (N, 128)


def assert_same_descriptors(ours: np.ndarray, theirs: np.ndarray) -> None:
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert np.abs(ours - theirs).max() < MAX_ABS_DIFF, np.abs(ours - theirs).max()
    assert cosine.min() > MIN_COSINE, cosine


def test_port_matches_dlib(port, reference):
    chips = face_chips()
    theirs = np.array([np.asarray(v) for v in reference.compute_face_descriptor(list(chips))])
    ours = descriptors(port, chips)
    assert ours.shape == (5, 128) and ours.dtype == np.float32
    assert_same_descriptors(ours, theirs)
    assert not np.allclose(np.linalg.norm(theirs, axis=1), 1)  # dlib does not normalise them


def test_batch_equals_one_by_one(port):
    chips = face_chips()
    one_by_one = np.concatenate([descriptors(port, chips[i : i + 1]) for i in range(len(chips))])
    np.testing.assert_allclose(descriptors(port, chips), one_by_one, rtol=0, atol=1e-6)


def test_teacher_backends_agree():
    """Through DlibTeacher: aligned 224 x 224 crops, chips cut and resized by dlib for both."""
    crops = np.stack([render_canonical(FaceAppearance(jaw_width=t)) for t in (0.1, 0.9)])
    ours = DlibTeacher.load(backend="torch").features(crops)
    theirs = DlibTeacher.load(backend="dlib").features(crops)
    assert ours.shape == theirs.shape == (2, 128) and ours.dtype == np.float32
    assert_same_descriptors(ours, theirs)
    assert DlibTeacher.load().features(crops[:0]).shape == (0, 128)
    with pytest.raises(ValueError, match="backend"):
        DlibTeacher.load(backend="onnx")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) // 2], "truncated: con params"),
        (lambda data: data.replace(b"con_4", b"con_5", 1), "expected 'con_4', found 'con_5'"),
        (lambda data: data + b"\x00", "1 unexpected byte"),
        (lambda data: b"", "truncated: loss version"),
    ],
    ids=["truncated", "renamed-layer", "trailing-byte", "empty"],
)
def test_damaged_file_is_named_with_the_fix(tmp_path, model_bytes, damage, message):
    path = tmp_path / "damaged.dat"
    path.write_bytes(damage(model_bytes))
    with pytest.raises(DlibModelError, match=message) as caught:
        DlibResNet.load(path)
    assert isinstance(caught.value, ValueError)
    assert str(path) in str(caught.value) and "face_recognition_models" in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(DlibModelError, match="no such file"):
        DlibResNet.load(tmp_path / "nowhere.dat")
