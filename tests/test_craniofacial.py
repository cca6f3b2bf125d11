"""Craniofacial measurements: known answers, correlation tables, rendered faces."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from s2f import craniofacial as cf
from s2f import metrics as m
from s2f.decoder import default_mean_landmarks
from s2f.demo.render import FaceAppearance, render_canonical, widths_in_iod
from s2f.faces import align_face, detect_faces


def hand_made() -> np.ndarray:
    """A (68, 2) face with eye centres at (-1, 0) and (1, 0) (IOD = 2) and chosen features."""
    p = default_mean_landmarks().numpy().astype(np.float64)
    p[36:42] = [(-1.2, 0), (-1.1, -0.1), (-0.9, -0.1), (-0.8, 0), (-0.9, 0.1), (-1.1, 0.1)]
    p[42:48] = p[[39, 38, 37, 36, 41, 40]] * [-1, 1]  # mirrored (iBUG: 42 inner, 45 outer)
    p[27], p[33] = (0, 0), (0, 1.2)  # nose height 1.2
    p[31:36] = [(-0.3, 1.0), (-0.15, 1.1), (0, 1.2), (0.15, 1.1), (0.3, 1.0)]  # width 0.6
    p[48], p[54] = (-0.8, 1.8), (0.8, 1.8)  # mouth width 1.6
    p[50], p[51], p[52] = (-0.2, 1.6), (0, 1.6), (0.2, 1.6)
    p[62], p[66], p[57] = (0, 1.75), (0, 1.85), (0, 2.1)  # stomion (0, 1.8)
    p[0], p[16], p[4], p[12], p[8] = (-3, 0), (3, 0), (-2, 2), (2, 2), (0, 3.0)
    return p


def test_measurements_of_a_hand_made_face():
    m = cf.measure(hand_made())
    expected = {
        "nose_width": 0.3, "nose_height": 0.6, "nasal_index": 0.5, "mouth_width": 0.8,
        "upper_lip_height": 0.3, "vermilion_height_index": 0.2 / 0.3,
        "lip_height": (0.15 + 0.25) / 2, "face_width": 3.0, "jaw_width": 2.0,
        "mandibular_index": (1.2 / 2) / 2.0, "intercanthal_index": 1.6 / 2.4,
        "mouth_face_width_index": 0.8 / 3.0,
        "lateral_upper_lip_heights": np.hypot(0.1, 0.6) / 2,
        # polygon 27, 31..35: triangle (0, 0), (-0.3, 1), (0.3, 1) of area 0.3, plus the nose
        # base below y = 1 (two trapezoids of 0.0075 + 0.0225 per side), over IOD^2 = 4
        "nose_area": (0.3 + 2 * (0.0075 + 0.0225)) / 4,
    }  # fmt: skip
    assert list(m) == list(cf.MEASUREMENTS)
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, rel=1e-9), name


def test_nose_area_is_a_shoelace_area_and_measure_is_scale_free():
    square = np.array([(0, 0), (2, 0), (2, 1), (0, 1)], dtype=float)
    assert cf.polygon_area(square) == pytest.approx(2.0)
    assert cf.polygon_area(square[::-1]) == pytest.approx(2.0)
    face = hand_made()
    batch = np.stack([face, 3.0 * face + 5.0])  # (2, 68, 2): scaled and shifted
    for name, values in cf.measure(batch).items():
        assert values.shape == (2,) and values[0] == pytest.approx(values[1]), name
    with pytest.raises(ValueError, match="68, 2"):
        cf.measure(np.zeros((5, 2)))


def test_tables_match_scipy_and_skip_missing_faces():
    rng = np.random.default_rng(0)
    base = hand_made()
    f2f = base + rng.normal(0, 0.03, (40, 68, 2))
    s2f = f2f + rng.normal(0, 0.03, (40, 68, 2))
    s2f[3] = np.nan  # no face found on one S2F image
    table = cf.craniofacial_table(f2f, s2f, seed=1)
    a, b = cf.measure(np.delete(f2f, 3, 0)), cf.measure(np.delete(s2f, 3, 0))
    for name, row in table.items():
        r, p = scipy.stats.pearsonr(a[name], b[name])
        assert row["n"] == 39
        assert row["r"] == pytest.approx(r, abs=1e-9) and row["p"] == pytest.approx(p, rel=1e-6)
        assert abs(row["baseline"]["mean"]) < 0.1
    geometry = {"nose_width": a["nose_width"] * 2 + 1, "face_width": rng.random(39)}
    truth = cf.true_geometry_table(np.delete(f2f, 3, 0), geometry)
    assert set(truth) == {"nose_width ~ nose_width", "face_width ~ face_width"}
    assert truth["nose_width ~ nose_width"]["r"] == pytest.approx(1.0)
    assert all("ci" not in row for row in (*table.values(), *truth.values()))  # no speakers given


def test_tables_give_an_interval_over_speakers_when_told_them():
    rng = np.random.default_rng(2)
    f2f = hand_made() + rng.normal(0, 0.03, (40, 68, 2))
    s2f = f2f + rng.normal(0, 0.03, (40, 68, 2))
    s2f[3] = np.nan  # left out of the interval as of r
    speakers = np.repeat(np.arange(10), 4)
    table = cf.craniofacial_table(f2f, s2f, seed=1, groups=speakers)
    a, b = cf.measure(np.delete(f2f, 3, 0)), cf.measure(np.delete(s2f, 3, 0))
    for name, row in table.items():
        expected = m.pearson_ci_over_groups(a[name], b[name], np.delete(speakers, 3), seed=1)
        assert row["ci"] == pytest.approx(list(expected)) and row["ci"][0] < row["r"] < row["ci"][1]
    geometry = {"nose_width": rng.random(40)}
    truth = cf.true_geometry_table(f2f, geometry, groups=np.zeros(40))  # one speaker: no interval
    row = truth["nose_width ~ nose_width"]
    assert row["ci"] is None and row["r"] is not None


def _rendered(**fields) -> dict:
    image = render_canonical(FaceAppearance(**fields))
    landmarks = cf.find_landmarks(align_face(image, detect_faces(image)[0]), upsample=0)
    return cf.measure(landmarks)


def test_rendered_faces_measure_wider_noses_and_faces_wider():
    noses = [_rendered(nose_width=w)["nose_width"] for w in (0.0, 0.5, 1.0)]
    assert noses[0] < noses[1] < noses[2]
    # the renderer's face width varies the cheekbones by +-20 %; dlib's contour follows the
    # jaw, so a wider face here is wider at both (as the demo world correlates them)
    faces = [_rendered(face_width=w, jaw_width=w)["face_width"] for w in (0.0, 0.5, 1.0)]
    assert faces[0] < faces[1] < faces[2]


def test_widths_in_iod_divide_the_rendered_half_widths_by_the_eye_centre():
    # average face: cheekbone half-width 1.0, eye centres at +-0.44 (EYE_CENTRE_U at 0.5)
    widths = widths_in_iod({"face_width": 0.5, "nose_width": 0.0, "eye_spacing": 0.5, "age": 30})
    assert widths == pytest.approx({"face_width/IOD": 1.0 / 0.44, "nose_width/IOD": 0.13 / 0.44})
    assert widths_in_iod({"face_width": 1.0, "eye_spacing": 1.0}) == pytest.approx({"face_width/IOD": 1.2 / 0.5})
    assert widths_in_iod({"face_width": 0.5}) == {}  # no eye spacing, no IOD


def test_wider_set_eyes_make_the_same_face_measure_narrower():
    # why true_geometry also compares against widths in IODs: with the face_width field fixed,
    # the measured face width still falls as the eyes move apart
    measured = [_rendered(eye_spacing=e)["face_width"] for e in (0.0, 0.5, 1.0)]
    assert measured[0] > measured[1] > measured[2]
