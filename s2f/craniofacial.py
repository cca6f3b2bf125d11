"""Craniofacial stage: 68 landmarks of a face image -> anthropometric measurements -> correlations.

Speech2Face (SPEC section 7) finds landmarks on F2F = decoder(v_f) and S2F = decoder(v_s) and
reports, per measurement, Pearson r between the two over the test set, next to a random-pair
baseline. This module measures what dlib's 68 iBUG points support. Points (0-based iBUG order):
jaw contour 0-16 (8 = chin), nose bridge 27-30 (27 ~ nasion, 30 = tip), nose base 31-35
(31 / 35 ~ alare, 33 ~ subnasale), eyes 36-41 and 42-47 (36 / 45 exocanthion, 39 / 42
endocanthion), outer lips 48-59 (48 / 54 cheilion, 50 / 52 crista philtri, 51 labrale
superius, 57 labrale inferius), inner lips 60-67 (62 / 66 upper / lower inner midpoints).

Scale. Lengths are divided by the interocular distance IOD = |mean(36..41) - mean(42..47)|
(eye centres): the F2F / S2F images are eye-aligned crops, so this is nearly constant, and it
makes lengths comparable across image sizes and decoder presets. Columns: "IOD" = length in
IOD units; "ratio" = a unitless index (the paper's indices; Farkas' x100 factor dropped, r is
unchanged by it). sto (stomion) = midpoint of 62 and 66.

| name                      | definition                                         | unit  |
|---------------------------|----------------------------------------------------|-------|
| nose_width                | |31 - 35|                                          | IOD   |
| nose_height               | |27 - 33|                                          | IOD   |
| nasal_index               | nose_width / nose_height                           | ratio |
| nose_area                 | polygon 27, 31, 32, 33, 34, 35 (shoelace)          | IOD^2 |
| mouth_width               | |48 - 54|                                          | IOD   |
| upper_lip_height          | |33 - sto|                                         | IOD   |
| lateral_upper_lip_heights | (|31 - 50| + |35 - 52|) / 2                        | IOD   |
| vermilion_height_index    | |51 - sto| / |sto - 57|                            | ratio |
| lip_height                | |51 - 62| + |66 - 57| (upper + lower vermilion)    | IOD   |
| face_width                | |0 - 16|                                           | IOD   |
| jaw_width                 | |4 - 12|                                           | IOD   |
| mandibular_index          | |sto - 8| / jaw_width                              | ratio |
| intercanthal_index        | |39 - 42| / |36 - 45|                             | ratio |
| mouth_face_width_index    | mouth_width / face_width                           | ratio |

Approximations, and what could not be defined reliably:
- jaw_width uses contour points 4 / 12 (about mouth height), not the bony gonion, which a
  silhouette contour does not mark; 3 / 13 move with them on the demo's rendered faces.
- face_width uses contour points 0 / 16, at eye level, not the zygion; hair over the temples
  moves them. On the demo's rendered faces it follows the jaw more than the cheekbone width.
- Not defined: any measurement needing the hairline or vertex (face height from trichion,
  forehead height), the ears, or depth (nasal tip protrusion, nasofrontal and nasolabial
  angles, lip protrusion): 68 frontal 2-D points carry none of them. Nasion and subnasale are
  dlib's 27 and 33, a little below and above the anthropometric points.

`decode_faces` runs the decoder (images and the landmarks it drew); `find_landmarks` finds
dlib's landmarks (HOG detector, 68-point predictor, averaged over the image and its mirror
image: the outline points steady most) on an image, upsampled first by
`upsample_for_dlib` when it is a small decoded face, and returns them in the decoder's
normalised coordinates (s2f.decoder docstring), where a crop's pixel (x, y) is
((2x + 1) / W - 1, (2y + 1) / H - 1).
`s2f.decoded_faces` reads the faces decoded in `s2f evaluate --decoder` with these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from s2f.metrics import pearson_ci_over_groups, pearson_with_p, random_pair_baseline

NUM_LANDMARKS = 68
MIN_MEASURE_SIZE = 160  # pixels: dlib's HOG window is 80 px; smaller faces are missed or misfit
DETECT_UPSAMPLE = 1  # HOG doublings; the aligned face fills ~0.8 of the image, 1 is plenty
DECODE_BATCH = 64  # features decoded at once
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)
NOSE_POLYGON = (27, 31, 32, 33, 34, 35)
MEASUREMENTS = (
    "nose_width", "nose_height", "nasal_index", "nose_area", "mouth_width", "upper_lip_height",
    "lateral_upper_lip_heights", "vermilion_height_index", "lip_height", "face_width",
    "jaw_width", "mandibular_index", "intercanthal_index", "mouth_face_width_index",
)  # fmt: skip
# Demo-world ground truth (a s2f.demo.render.FaceAppearance field, or a width derived from
# them) -> the measurement it drives.
TRUE_GEOMETRY = {
    "nose_width": "nose_width",
    "nose_height": "nose_height",
    "mouth_width": "mouth_width",
    "lip_thickness": "lip_height",
    "face_width": "face_width",
    "jaw_width": "jaw_width",
    "eye_spacing": "intercanthal_index",
    # The same widths in IODs (s2f.demo.render.widths_in_iod), the unit the measurements use:
    # the field alone leaves out how eye spacing scales a measured width.
    "face_width/IOD": "face_width",
    "jaw_width/IOD": "jaw_width",
    "nose_width/IOD": "nose_width",
    "mouth_width/IOD": "mouth_width",
}


# -- landmarks on images ----------------------------------------------------------------------


def pixels_to_normalised(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., 2) pixel (x, y) -> the decoder's [-1, 1] convention (pixel centres)."""
    size = np.array([width, height], dtype=np.float64)
    return ((2 * np.asarray(points, np.float64) + 1) / size - 1).astype(np.float32)


def best_face(image: np.ndarray, upsample: int = DETECT_UPSAMPLE):
    """The best-scoring HOG face box (s2f.faces.Box) in an RGB uint8 image, or None."""
    from s2f.faces import detect_faces

    boxes = detect_faces(image, "hog", upsample)
    return boxes[0] if boxes else None


def landmarks_in_box(image: np.ndarray, box) -> np.ndarray:
    """(68, 2) normalised landmarks of the face in `box` (an s2f.faces.Box) of an RGB image,
    averaged with the mirror image's (s2f.faces.landmarks68_mirror_averaged)."""
    from s2f.faces import landmarks68_mirror_averaged

    return pixels_to_normalised(landmarks68_mirror_averaged(image, box), *image.shape[:2])


def find_landmarks(image: np.ndarray, upsample: int = DETECT_UPSAMPLE) -> np.ndarray | None:
    """(68, 2) normalised landmarks of the best-scoring face in an RGB uint8 image, or None."""
    box = best_face(image, upsample)
    return None if box is None else landmarks_in_box(image, box)


def upsample_for_dlib(image: np.ndarray, min_size: int = MIN_MEASURE_SIZE) -> np.ndarray:
    """RGB uint8 (S, S, 3) -> enlarged by the smallest integer factor reaching `min_size`."""
    from PIL import Image

    factor = math.ceil(min_size / min(image.shape[:2]))
    if factor <= 1:
        return image
    size = (image.shape[1] * factor, image.shape[0] * factor)
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) RGB in [0, 1] -> (B, H, W, 3) uint8."""
    scaled = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode_faces(
    decoder: torch.nn.Module, features: torch.Tensor | np.ndarray, batch_size: int = DECODE_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Canonical faces decoded from features (N, D), in batches: RGB uint8 images (N, S, S, 3)
    and the landmarks the decoder drew them with (N, 68, 2) float32, normalised coordinates."""
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    device = next(decoder.parameters()).device
    outputs = [decoder(chunk.to(device)) for chunk in features.split(batch_size)]
    images = np.concatenate([to_uint8(out["image"]) for out in outputs])  # (N, S, S, 3)
    drawn = torch.cat([out["landmarks"].float().cpu() for out in outputs]).numpy()  # (N, 68, 2)
    return images, drawn


# -- measurements -----------------------------------------------------------------------------


def _dist(p: np.ndarray, a, b) -> np.ndarray:
    """Distance between points a and b (indices or (..., 2) arrays) of p (..., 68, 2)."""
    pa = p[..., a, :] if isinstance(a, int) else a
    pb = p[..., b, :] if isinstance(b, int) else b
    return np.linalg.norm(pa - pb, axis=-1)


def polygon_area(points: np.ndarray) -> np.ndarray:
    """Shoelace area of polygons (..., V, 2), vertices in order (either direction)."""
    x, y = points[..., 0], points[..., 1]
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, axis=-1) - np.roll(x, -1, axis=-1) * y, axis=-1))


def measure(landmarks68: np.ndarray) -> dict[str, np.ndarray]:
    """Measurements of the module table for landmarks (68, 2) or (N, 68, 2), any units.

    Returns {name: value} with values of shape () or (N,), float64, in MEASUREMENTS order.
    """
    p = np.asarray(landmarks68, dtype=np.float64)
    if p.shape[-2:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"measure needs landmarks (68, 2) or (N, 68, 2), got {p.shape}")
    iod = _dist(p, p[..., LEFT_EYE, :].mean(-2), p[..., RIGHT_EYE, :].mean(-2))
    if np.any(iod <= 0):
        raise ValueError("measure: a landmark set has coinciding eye centres (IOD = 0)")
    sto = (p[..., 62, :] + p[..., 66, :]) / 2  # (..., 2) stomion
    m = {
        "nose_width": _dist(p, 31, 35) / iod,
        "nose_height": _dist(p, 27, 33) / iod,
        "nose_area": polygon_area(p[..., list(NOSE_POLYGON), :]) / iod**2,
        "mouth_width": _dist(p, 48, 54) / iod,
        "upper_lip_height": _dist(p, 33, sto) / iod,
        "lateral_upper_lip_heights": (_dist(p, 31, 50) + _dist(p, 35, 52)) / (2 * iod),
        "vermilion_height_index": _dist(p, 51, sto) / _dist(p, sto, 57),
        "lip_height": (_dist(p, 51, 62) + _dist(p, 66, 57)) / iod,
        "face_width": _dist(p, 0, 16) / iod,
        "jaw_width": _dist(p, 4, 12) / iod,
        "intercanthal_index": _dist(p, 39, 42) / _dist(p, 36, 45),
    }
    m["nasal_index"] = m["nose_width"] / m["nose_height"]
    m["mandibular_index"] = _dist(p, sto, 8) / iod / m["jaw_width"]
    m["mouth_face_width_index"] = m["mouth_width"] / m["face_width"]
    return {name: m[name] for name in MEASUREMENTS}


# -- correlation tables -----------------------------------------------------------------------


def _correlate(x: np.ndarray, y: np.ndarray, seed: int, groups: np.ndarray | None) -> dict:
    """{"r", "p", "n", "baseline": random-pair r mean/std/p}, and with groups (N,) (speakers)
    "ci": the 95 % interval of r resampling whole groups; a constant column gives r None."""
    keep = np.isfinite(x) & np.isfinite(y)
    row: dict = {"n": int(keep.sum())}
    try:
        r, p = pearson_with_p(x[keep], y[keep])
        row |= {"r": r, "p": p, "baseline": random_pair_baseline(x[keep], y[keep], seed)}
    except ValueError as error:  # fewer than 3 pairs, or a constant measurement
        return row | {"r": None, "p": None, "baseline": None, "error": str(error)}
    if groups is not None:
        try:
            row["ci"] = list(pearson_ci_over_groups(x[keep], y[keep], np.asarray(groups)[keep], seed=seed))
        except ValueError:  # every kept pair from one speaker: nothing to resample
            row["ci"] = None
    return row


def craniofacial_table(
    f2f_landmarks: np.ndarray, s2f_landmarks: np.ndarray, seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, dict]:
    """Per measurement: Pearson r (and p) between F2F and S2F faces of the same items, and the
    random-pair baseline (metrics.random_pair_baseline). Landmarks (N, 68, 2); rows with NaN
    (no face found on either image) are left out, and "n" says how many pairs remain. With
    `groups` (N,), each item's speaker, r also gets a speaker-bootstrap "ci" (_correlate)."""
    f2f, s2f = np.asarray(f2f_landmarks), np.asarray(s2f_landmarks)
    if f2f.shape != s2f.shape:
        raise ValueError(f"F2F landmarks {f2f.shape} and S2F landmarks {s2f.shape} must pair up")
    a, b = measure(f2f), measure(s2f)
    return {name: _correlate(a[name], b[name], seed, groups) for name in MEASUREMENTS}


def true_geometry_table(
    f2f_landmarks: np.ndarray, geometry: Mapping[str, np.ndarray], seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, dict]:
    """Pearson r between the demo world's true face geometry (FaceAppearance fields, arrays
    (N,)) and the measurement each drives (TRUE_GEOMETRY), on landmarks (N, 68, 2); with
    `groups` (N,), each item's speaker, a speaker-bootstrap "ci" of r too (_correlate).

    Keys are "<field> ~ <measurement>"; fields missing from `geometry` are skipped.
    """
    measured = measure(np.asarray(f2f_landmarks))
    return {
        f"{field} ~ {name}": _correlate(
            np.asarray(geometry[field], np.float64), measured[name], seed, groups)
        for field, name in TRUE_GEOMETRY.items()
        if field in geometry
    }
