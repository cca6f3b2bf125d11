"""Face detection, speaker choice, landmarks, alignment, MTCNN vs its reference, dlib teacher."""

import importlib.util
import sys
import time
import types

import numpy as np
import pytest
import torch

from s2f.demo.render import (
    ClipVariation,
    FaceAppearance,
    render_canonical,
    render_face,
    render_scene,
)
from s2f.faces import (
    FACE_SIZE,
    MTCNN,
    IBUG68_MIRROR,
    Box,
    NoFaceError,
    align_face,
    detect_faces,
    extract_face,
    landmarks68,
    landmarks68_mirror_averaged,
    mtcnn_weights_dir,
    pick_speaker_face,
)
from s2f.teacher import DlibTeacher

HAIR_COLOURS = [(0.08, 0.06, 0.05), (0.25, 0.16, 0.10), (0.55, 0.40, 0.22), (0.45, 0.18, 0.08)]
EYE_COLOURS = [(0.30, 0.18, 0.10), (0.25, 0.40, 0.55), (0.30, 0.40, 0.25)]


def random_appearance(rng: np.random.Generator) -> FaceAppearance:
    fields = dict(zip(
        ("face_width", "jaw_width", "nose_width", "nose_height", "mouth_width",
         "lip_thickness", "eye_spacing", "skin_tone"), rng.random(8).tolist(),
    ))  # fmt: skip
    return FaceAppearance(
        **fields,
        hair_style=int(rng.integers(0, 5)),
        hair_color=HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))],
        beard=float(rng.random()) if rng.random() < 0.3 else 0.0,
        eye_color=EYE_COLOURS[rng.integers(len(EYE_COLOURS))],
    )


def random_variation(rng: np.random.Generator, background: int) -> ClipVariation:
    yaw, pitch, roll = rng.uniform(-12, 12, 3).tolist()
    return ClipVariation(
        yaw_deg=yaw, pitch_deg=pitch, roll_deg=roll,
        light_azimuth_deg=float(rng.uniform(-60, 60)),
        light_elevation_deg=float(rng.uniform(-10, 50)),
        light_intensity=float(rng.uniform(0.6, 1.2)),
        smile=float(rng.random()), mouth_open=float(rng.uniform(0, 0.5)),
        background=background, scale=float(rng.uniform(0.45, 0.7)),
        center=tuple(rng.uniform(0.42, 0.58, 2).tolist()),
    )  # fmt: skip


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(2024)
    return [render_face(random_appearance(rng), random_variation(rng, i)) for i in range(40)]


def _detection_rate(frames: list[np.ndarray], detector: str) -> float:
    start = time.perf_counter()
    found = [len(detect_faces(frame, detector)) >= 1 for frame in frames]
    per_frame = (time.perf_counter() - start) / len(frames)
    rate = float(np.mean(found))
    print(f"{detector}: {rate:.3f} of {len(frames)} faces, {per_frame * 1e3:.0f} ms/frame")
    return rate


def test_hog_finds_rendered_faces(frames):
    assert _detection_rate(frames, "hog") >= 0.95


@pytest.mark.parametrize("detector", ["cnn", "mtcnn"])
def test_cnn_and_mtcnn_find_a_few_rendered_faces(frames, detector):
    assert _detection_rate(frames[:4], detector) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["cnn", "mtcnn"])
def test_cnn_and_mtcnn_find_rendered_faces(frames, detector):
    assert _detection_rate(frames, detector) >= 0.95


def test_detect_faces_rejects_bad_input():
    with pytest.raises(ValueError, match="RGB uint8"):
        detect_faces(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="unknown detector"):
        detect_faces(np.zeros((64, 64, 3), np.uint8), detector="haar")


def _reference_nms(boxes, scores, groups, threshold):
    """torchvision's batched_nms semantics in numpy: greedy, IoU without the +1 convention."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    b = boxes.double().numpy() + groups.numpy()[:, None] * (boxes.max().item() + 1)
    order, keep = np.argsort(-scores.numpy(), kind="stable"), []
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        lo = np.maximum(b[best, :2], b[rest, :2])  # (R, 2)
        hi = np.minimum(b[best, 2:], b[rest, 2:])
        inter = np.clip(hi - lo, 0, None).prod(1)
        order = rest[inter / (area[best] + area[rest] - inter) <= threshold]
    return torch.as_tensor(keep, dtype=torch.long)


@pytest.fixture
def facenet_detect_face(monkeypatch):
    """facenet-pytorch's own detect_face, with the two torchvision names it uses stubbed."""
    stubs = {name: types.ModuleType(name) for name in (
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional",
        "torchvision.ops", "torchvision.ops.boxes",
    )}  # fmt: skip
    stubs["torchvision.ops.boxes"].batched_nms = _reference_nms
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    stubs["torchvision.ops"].boxes = stubs["torchvision.ops.boxes"]
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    path = mtcnn_weights_dir().parent / "models" / "utils" / "detect_face.py"
    spec = importlib.util.spec_from_file_location("facenet_detect_face", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.detect_face


def test_mtcnn_matches_facenet_reference(facenet_detect_face):
    model = MTCNN.load(mtcnn_weights_dir())

    def onet_with_landmarks(x):  # the reference also reads O-Net's landmark output
        offsets, prob = model.onet(x)
        return offsets, torch.zeros(len(x), 10), prob

    rng = np.random.default_rng(7)
    for i in range(3):
        frame = render_face(random_appearance(rng), random_variation(rng, i))
        ours = model.detect(frame)
        reference, _ = facenet_detect_face(
            frame, 20.0, model.pnet, model.rnet, onet_with_landmarks, [0.6, 0.7, 0.7], 0.709, "cpu"
        )
        reference = np.asarray(reference[0], dtype=np.float64).reshape(-1, 5)
        assert ours.shape == reference.shape and len(ours) >= 1
        np.testing.assert_allclose(ours, reference, atol=1e-2)


@pytest.fixture(scope="module")
def two_faces() -> np.ndarray:
    big = (FaceAppearance(), ClipVariation(center=(0.27, 0.5), scale=0.55, background=3))
    small = (
        FaceAppearance(skin_tone=0.8, hair_style=3),
        ClipVariation(center=(0.75, 0.5), scale=0.40),
    )
    return render_scene([big, small], size=(240, 480))


def test_pick_speaker_face_in_a_two_face_frame(two_faces):
    boxes = detect_faces(two_faces, "hog")
    assert len(boxes) == 2
    near_small = pick_speaker_face(boxes, two_faces.shape[:2], center_xy=(0.7, 0.45))
    assert near_small.centre[0] > 240 and near_small.area == min(b.area for b in boxes)
    near_big = pick_speaker_face(boxes, two_faces.shape[:2], center_xy=(0.3, 0.55))
    assert near_big.centre[0] < 240
    assert pick_speaker_face(boxes, two_faces.shape[:2]) == near_big  # largest by default
    crop = extract_face(two_faces, center_xy=(0.75, 0.5))
    assert crop.num_faces == 2 and crop.box == near_small


def test_pick_speaker_face_rules_on_boxes():
    boxes = [Box(0, 0, 10, 10, 0.9), Box(50, 50, 90, 90, 0.1)]
    assert pick_speaker_face(boxes, (100, 100)) == boxes[1]
    assert pick_speaker_face(boxes, (100, 100), center_xy=(0.04, 0.06)) == boxes[0]
    with pytest.raises(NoFaceError):
        pick_speaker_face([], (100, 100))


def test_extract_face_reports_no_face():
    with pytest.raises(NoFaceError, match="found no face"):
        extract_face(np.full((200, 200, 3), 128, np.uint8))


def _eye_centres(crop: np.ndarray) -> np.ndarray:
    box = pick_speaker_face(detect_faces(crop, "hog"), crop.shape[:2])
    points = landmarks68(crop, box)
    return np.stack([points[36:42].mean(0), points[42:48].mean(0)])  # (2, 2) x, y


def test_align_face_puts_the_eyes_at_fixed_positions():
    rng = np.random.default_rng(11)
    eyes = []
    for i in range(5):
        variation = ClipVariation(
            roll_deg=float(rng.uniform(-12, 12)), scale=float(rng.uniform(0.45, 0.7)),
            center=tuple(rng.uniform(0.4, 0.6, 2).tolist()), background=i,
        )  # fmt: skip
        frame = render_face(FaceAppearance(eye_spacing=0.5), variation, size=(300, 400))
        box = pick_speaker_face(detect_faces(frame, "hog"), frame.shape[:2])
        crop = align_face(frame, box)
        assert crop.shape == (FACE_SIZE, FACE_SIZE, 3) and crop.dtype == np.uint8
        eyes.append(_eye_centres(crop))
    eyes = np.stack(eyes)  # (N, 2 eyes, 2 coordinates)
    assert np.abs(eyes[:, 0, 1] - eyes[:, 1, 1]).max() < 4  # level: roll removed
    assert eyes.std(0).max() < 3  # pixels: same place whatever the scale, position and roll
    # dlib's template at padding 0.25: eyes ~1/3 and ~2/3 across, ~0.31 down
    np.testing.assert_allclose(eyes.mean(0) / FACE_SIZE, [[0.33, 0.31], [0.66, 0.31]], atol=0.04)


def test_mirror_averaged_landmarks_read_a_mirrored_face_as_its_mirror_image():
    appearance = FaceAppearance(hair_style=4, face_width=0.7)  # curls: not mirror-symmetric
    frame = render_canonical(appearance, size=(320, 300))  # (H, W, 3)
    box = pick_speaker_face(detect_faces(frame, "hog", upsample=0), frame.shape[:2])
    points = landmarks68_mirror_averaged(frame, box)  # (68, 2)
    width = frame.shape[1]
    mirrored_box = Box(width - box.right, box.top, width - box.left, box.bottom)
    of_mirror = landmarks68_mirror_averaged(np.ascontiguousarray(frame[:, ::-1]), mirrored_box)
    back = of_mirror[list(IBUG68_MIRROR)]
    back[:, 0] = width - 1 - back[:, 0]
    np.testing.assert_allclose(points, back, atol=1e-3)  # the reading is mirror-symmetric
    assert np.abs(points - landmarks68(frame, box)).max() < 6  # pixels: the same face's points
    assert points[36:42, 0].mean() < points[42:48, 0].mean()  # image-left eye stays on the left


def test_measured_nose_width_follows_nose_width():
    widths = np.zeros((3, 5))  # (skin tones, nose widths)
    for i, skin in enumerate((0.2, 0.5, 0.8)):
        for j, t in enumerate(np.linspace(0, 1, 5)):
            appearance = FaceAppearance(nose_width=float(t), skin_tone=skin)
            frame = render_canonical(appearance, size=(400, 400))
            box = pick_speaker_face(detect_faces(frame, "hog", upsample=0), frame.shape[:2])
            points = landmarks68(frame, box)
            widths[i, j] = points[35, 0] - points[31, 0]  # outer nostril landmarks
    # Non-decreasing: dlib's landmark model tops out at the widest noses (the last two can tie).
    assert np.all(np.diff(widths.mean(0)) >= 0), widths
    assert np.all(widths[:, -1] - widths[:, 0] >= 8), widths  # pixels, for every skin tone


@pytest.fixture(scope="module")
def teacher() -> DlibTeacher:
    return DlibTeacher.load()


def test_dlib_teacher_descriptors(teacher):
    rng = np.random.default_rng(5)
    people = [random_appearance(rng) for _ in range(4)]
    crops, ids = [], []
    for person, appearance in enumerate(people):
        for clip in range(2):
            frame = render_face(appearance, random_variation(rng, 10 * person + clip))
            crops.append(extract_face(frame).crop)
            ids.append(person)
    features = teacher.features(np.stack(crops))
    assert features.shape == (8, teacher.feature_dim) and features.dtype == np.float32
    norms = np.linalg.norm(features, axis=1)
    assert np.all((norms > 0.5) & (norms < 2.0)), norms
    ids = np.array(ids)
    distance = np.linalg.norm(features[:, None] - features[None], axis=-1)  # (N, N)
    same = (ids[:, None] == ids[None]) & ~np.eye(len(ids), dtype=bool)
    assert distance[same].mean() < distance[ids[:, None] != ids[None]].mean()
    assert teacher.name == "dlib" and not teacher.differentiable


def test_dlib_teacher_rejects_bad_crops(teacher):
    with pytest.raises(ValueError, match="square RGB crops"):
        teacher.features(np.zeros((2, 224, 200, 3), np.uint8))
    with pytest.raises(ValueError, match="padding"):
        DlibTeacher(model=None, crop_padding=0.1)
