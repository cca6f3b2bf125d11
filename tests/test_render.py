"""The procedural face renderer: determinism, shapes, geometry that follows the appearance."""

import time

import numpy as np
import pytest

from s2f.demo.render import (
    CANONICAL_VARIATION,
    ClipVariation,
    FaceAppearance,
    render_canonical,
    render_face,
    render_scene,
)

GREY_ROW_TOLERANCE = 12  # 8-bit levels: grain is ~2, skin differs from the grey backdrop by more


def _head_width(image: np.ndarray, row: int) -> int:
    """Pixels on `row` that differ from the flat canonical backdrop (its left edge colour)."""
    line = image[row].astype(int)
    return int((np.abs(line - line[:4].mean(0)).max(1) > GREY_ROW_TOLERANCE).sum())


def test_render_is_deterministic_and_input_dependent():
    appearance = FaceAppearance(nose_width=0.3, hair_style=3, beard=0.6)
    variation = ClipVariation(yaw_deg=8, roll_deg=-5, smile=0.5, mouth_open=0.4, background=7)
    first = render_face(appearance, variation)
    assert first.shape == (224, 224, 3) and first.dtype == np.uint8
    assert first.tobytes() == render_face(appearance, variation).tobytes()
    other_background = render_face(appearance, ClipVariation(background=8))
    assert np.abs(first.astype(int) - other_background).mean() > 5


def test_frame_sizes_and_two_face_scene():
    frame = render_face(FaceAppearance(), ClipVariation(scale=0.5), size=(480, 640))
    assert frame.shape == (480, 640, 3)
    left = (FaceAppearance(), ClipVariation(center=(0.3, 0.5), scale=0.5, background=1))
    right = (FaceAppearance(skin_tone=0.9), ClipVariation(center=(0.7, 0.5), scale=0.4))
    scene = render_scene([left, right], size=(240, 480))
    alone = render_scene([left], size=(240, 480))
    changed = np.abs(scene.astype(int) - alone).max(2) > 20  # (H, W)
    columns = np.nonzero(changed.any(0))[0]
    assert columns.min() > 240 * 0.6 and columns.max() < 480  # the second face, right half only


@pytest.mark.parametrize("field, row_v", [("face_width", -0.5), ("jaw_width", 0.74)])
def test_outline_widens_with_face_and_jaw_width(field, row_v):
    # canonical framing: head centre at 0.52 H, head height 0.62 H = 2.85 units
    size = 320
    row = int(size * 0.52 + (row_v + 0.125) * size * 0.62 / 2.85)
    widths = [
        _head_width(render_canonical(FaceAppearance(hair_style=0, **{field: t}), (size, size)), row)
        for t in (0.0, 0.5, 1.0)
    ]
    assert widths[0] < widths[1] < widths[2], widths
    assert widths[2] - widths[0] >= 8  # pixels: a visible change


def test_canonical_portrait_keeps_hair_off_the_face_outline():
    # v = -0.3 (between brows and eyes), canonical framing: long dark hair falls beside the
    # face as styled; on the portrait the row shows ears and cheeks, as on a shaved head
    size = 320
    row = int(size * 0.52 + (-0.3 + 0.125) * size * 0.62 / 2.85)
    long_dark = FaceAppearance(hair_style=3, hair_color=(0.05, 0.04, 0.04))
    portrait_width = _head_width(render_canonical(long_dark, (size, size)), row)
    shaved_width = _head_width(render_canonical(FaceAppearance(hair_style=0), (size, size)), row)
    hair_width = _head_width(render_scene([(long_dark, CANONICAL_VARIATION)], (size, size)), row)
    assert abs(portrait_width - shaved_width) <= 2, (portrait_width, shaved_width)
    assert hair_width - portrait_width >= 10, (hair_width, portrait_width)


def test_nose_width_changes_only_the_nose_region():
    narrow = render_canonical(FaceAppearance(nose_width=0.0)).astype(int)
    wide = render_canonical(FaceAppearance(nose_width=1.0)).astype(int)
    rows, cols = np.nonzero(np.abs(narrow - wide).max(2) > 25)
    assert len(rows) > 50
    # the nose lies in the middle of the face: rows 100..150, columns within 40 px of centre
    assert rows.min() > 90 and rows.max() < 150 and np.abs(cols - 112).max() < 40


def test_render_speed():
    appearance, variation = FaceAppearance(hair_style=2, beard=0.5), ClipVariation(background=3)
    render_face(appearance, variation)
    start = time.process_time()
    for _ in range(10):
        render_face(appearance, variation)
    per_frame = (time.process_time() - start) / 10
    assert per_frame < 0.1  # seconds of CPU; ~0.02 on one idle core


def _changed(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(H, W) pixels that differ by more than camera grain."""
    return np.abs(first.astype(int) - second.astype(int)).max(2) > GREY_ROW_TOLERANCE


def test_makeup_reddens_the_lips_and_darkens_the_lash_line():
    bare, made_up = (render_canonical(FaceAppearance(makeup=m), (320, 320)) for m in (0.0, 1.0))
    changed = _changed(bare, made_up)
    assert 0 < changed.sum() < 0.05 * changed.size  # lips and lash lines, nothing else
    eye_rows, mouth_rows = changed[int(0.4 * 320):int(0.55 * 320)], changed[int(0.6 * 320):]
    assert eye_rows.sum() > 50 and mouth_rows.sum() > 50  # both the eyes and the mouth
    mouth = changed.copy()
    mouth[: int(0.6 * 320)] = False
    redness = lambda image: (image[..., 0].astype(int) - image[..., 1])[mouth].mean()  # noqa: E731
    assert redness(made_up) > redness(bare) + 25  # 8-bit levels of red over green
    assert made_up[changed & ~mouth].mean() < bare[changed & ~mouth].mean() - 20  # eyeliner is dark


def test_thicker_brows_cover_more_of_the_brow_region():
    thin, thick = (render_canonical(FaceAppearance(brow_thickness=t, hair_color=(0.1, 0.08, 0.07)), (320, 320))
                   for t in (0.0, 1.0))
    dark = lambda image: (image.astype(int).sum(2) < 200).sum()  # noqa: E731
    assert dark(thick) > dark(thin) + 100
    assert _changed(thin, thick)[int(0.6 * 320):].sum() == 0  # brows only: nothing below the eyes


def test_rounder_eyes_open_wider_and_change_only_the_eyes():
    narrow, round_ = (render_canonical(FaceAppearance(eye_height=h), (320, 320)) for h in (0.0, 1.0))
    changed = _changed(narrow, round_)
    band = np.zeros_like(changed)
    band[int(0.4 * 320):int(0.55 * 320)] = True  # the eye rows
    assert changed[band].sum() > 200 and changed[~band].sum() < 5  # a few grain outliers at most
    # Where they differ, the round eyes show sclera and iris where the narrow ones show lid skin.
    assert round_[changed].mean() > narrow[changed].mean() + 10
