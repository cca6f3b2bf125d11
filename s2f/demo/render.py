"""Procedural shaded faces for the demo world: appearance + per-clip variation -> RGB frame.

A face lives in head-local units: u right, v down, 1 unit = half the cheekbone width of an
average face; the head spans v = HEAD_TOP .. CHIN. Each pixel is mapped back into these units
(inverse similarity: centre, scale, roll), small yaw and pitch shift the interior features by
their depth, and layers are composited back to front: background, shoulders and neck, back
hair, ears, skin, beard, eyes, brows, nostrils, lips, front hair. Skin and hair are shaded with
analytic normals (an ellipsoid head plus Gaussian bumps for nose, brow ridge, cheeks, chin,
eye sockets), wrap-around Lambert, a soft specular and ambient occlusion in the cavities, so
that real face detectors (dlib HOG, dlib CNN, MTCNN) find the faces. All randomness (hair
strands, background, grain) is seeded from the inputs, so a render is a pure function.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

# Head-local layout (units of average half cheekbone width; v grows downwards).
HEAD_TOP = -1.55
HAIRLINE = -1.12
BROW_V = -0.42
EYE_V = -0.20
NOSE_TIP_V = 0.40  # nose base at average nose_height
MOUTH_V = 0.74
CHIN = 1.30
EAR_V = 0.05
HEAD_HEIGHT = CHIN - HEAD_TOP  # 2.85 units: top of head to chin
HEAD_CENTRE_V = (HEAD_TOP + CHIN) / 2  # placed at ClipVariation.center

# Appearance ranges: a normalised field 0..1 maps linearly onto (low, high) in units.
# Face width spread as in adults (bizygomatic breadth: SD ~4.5%, men ~7% wider than women):
# field SD 0.12 -> 4.8% of the width; the sex term of identity.py (+-0.10) -> 8%.
FACE_HALF_WIDTH = (0.80, 1.20)
JAW_HALF_WIDTH = (0.62, 0.92)  # at mouth height, before the chin rounds off
NOSE_HALF_WIDTH = (0.13, 0.33)  # alar half-width
NOSE_TIP_SHIFT = (-0.10, 0.10)  # added to NOSE_TIP_V: longer nose = lower base
MOUTH_HALF_WIDTH = (0.27, 0.43)
LIP_HEIGHT = (0.045, 0.11)  # lower-lip height; the upper lip is 0.8 of it
EYE_CENTRE_U = (0.38, 0.50)
HAIR_GROWTH = (1.04, 1.07, 1.13, 1.13, 1.30)  # per hair_style: cap size over the skull
HAIR_SIDES = (-0.05, 0.0, 0.15, 0.25, 0.1)  # per hair_style: v where the side hair ends
HAIR_SIDES_OFF_FACE = BROW_V - 0.05  # hair off the face: side hair ends above the brows
EYE_HALF_WIDTH = 0.19
EYE_HALF_HEIGHT = (0.045, 0.105)  # lid-to-lid opening, narrow .. round
IRIS_RADIUS = 0.085
PUPIL_RADIUS = 0.036

SKIN_LIGHT = (0.97, 0.80, 0.68)  # linear-ish RGB albedo, skin_tone = 0
SKIN_DARK = (0.33, 0.20, 0.13)  # skin_tone = 1
SCLERA = (0.92, 0.90, 0.87)
NOSTRIL = (0.18, 0.07, 0.06)
MOUTH_INSIDE = (0.22, 0.05, 0.06)
TEETH = (0.93, 0.91, 0.85)
LASH = (0.08, 0.05, 0.04)
LIP_TINT = (0.85, 0.55, 0.55)  # lips: skin times this, plus LIP_RED
LIP_RED = (0.08, 0.0, 0.0)
LIPSTICK = (0.62, 0.07, 0.13)  # the lip colour at makeup = 1
BROW_HALF_THICKNESS = (0.025, 0.075)
LASH_HALF_THICKNESS = (0.018, 0.036)  # upper lash line, bare .. full eyeliner
BLUSH = (0.06, -0.03, -0.03)  # added to the skin at the cheeks' centre
CANONICAL_BACKGROUND = (0.82, 0.82, 0.82)

AMBIENT = 0.42  # fraction of light that is ambient
WRAP = 0.35  # wrap-around lighting softens the terminator like subsurface scattering
SPECULAR = 0.10
SHININESS = 18.0
GRAIN = 2.0  # std of per-pixel camera noise, in 8-bit levels


@dataclass(frozen=True)
class FaceAppearance:
    """A speaker's face; floats are normalised to [0, 1] with 0.5 the average."""

    face_width: float = 0.5
    jaw_width: float = 0.5
    nose_width: float = 0.5
    nose_height: float = 0.5
    mouth_width: float = 0.5
    lip_thickness: float = 0.5
    eye_spacing: float = 0.5
    skin_tone: float = 0.5  # 0 light .. 1 dark
    hair_style: int = 1  # 0 shaved, 1 short, 2 medium, 3 long, 4 curly volume
    hair_color: tuple[float, float, float] = (0.25, 0.16, 0.10)
    beard: float = 0.0  # density
    eye_color: tuple[float, float, float] = (0.35, 0.22, 0.12)
    makeup: float = 0.0  # lipstick and eyeliner strength
    brow_thickness: float = 0.5
    eye_height: float = 0.5


@dataclass(frozen=True)
class ClipVariation:
    """How one clip shows the face: pose, light, expression, framing, background."""

    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    roll_deg: float = 0.0
    light_azimuth_deg: float = 0.0  # 0 = from the camera, positive = from the image's right
    light_elevation_deg: float = 20.0  # positive = from above
    light_intensity: float = 1.0
    smile: float = 0.0
    mouth_open: float = 0.0
    background: int | tuple[float, float, float] = 0  # texture seed, or a flat RGB 0..1
    scale: float = 0.55  # head height (top to chin) as a fraction of the frame height
    center: tuple[float, float] = (0.5, 0.5)  # head centre, normalised (x, y) in the frame


CANONICAL_VARIATION = ClipVariation(
    light_elevation_deg=0.0, background=CANONICAL_BACKGROUND, scale=0.62, center=(0.5, 0.52)
)


def _span(bounds: tuple[float, float], t: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * float(np.clip(t, 0.0, 1.0))


# The renderer's half-width range of each width field, for widths_in_iod.
HALF_WIDTHS = {
    "face_width": FACE_HALF_WIDTH,
    "jaw_width": JAW_HALF_WIDTH,
    "nose_width": NOSE_HALF_WIDTH,
    "mouth_width": MOUTH_HALF_WIDTH,
}


def widths_in_iod(fields: dict[str, float]) -> dict[str, float]:
    """The face's widths in interocular distances, the unit s2f.craniofacial measures them in.

    `fields` holds FaceAppearance fields; returns {"<field>/IOD": width / IOD} for each width
    field present, given eye_spacing (else {}). The IOD is the distance between the eye
    centres, 2 * eye_u, so a measured width follows both its own field and eye_spacing.
    """
    if "eye_spacing" not in fields:
        return {}
    eye_u = _span(EYE_CENTRE_U, fields["eye_spacing"])
    return {
        f"{name}/IOD": _span(bounds, fields[name]) / eye_u
        for name, bounds in HALF_WIDTHS.items()
        if name in fields
    }


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _soft(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Coverage of a signed distance (negative inside), anti-aliased over one pixel."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _ellipse_distance(u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float):
    """Approximate signed distance to an axis-aligned ellipse (exact on circles)."""
    return (np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2) - 1.0) * np.minimum(a, b)


def _bump(u, v, cu, cv, su, sv, height):
    """A Gaussian height bump and its gradient (d/du, d/dv)."""
    du, dv = u - cu, v - cv
    g = height * np.exp(-0.5 * ((du / su) ** 2 + (dv / sv) ** 2))
    return g, -g * du / su**2, -g * dv / sv**2


def _value_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: a random (cells x cells) grid upsampled bilinearly to (H, W)."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    y = np.linspace(0, cells, shape[0], dtype=np.float32)  # (H,) grid coordinates
    x = np.linspace(0, cells, shape[1], dtype=np.float32)  # (W,)
    y0, x0 = np.minimum(y.astype(int), cells - 1), np.minimum(x.astype(int), cells - 1)
    fy, fx = (y - y0)[:, None], x - x0
    rows = grid[y0] * (1 - fy) + grid[y0 + 1] * fy  # (H, cells + 1)
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx  # (H, W)


def _background(variation: ClipVariation, size: tuple[int, int]) -> np.ndarray:
    """A room-like textured backdrop (seed) or a flat colour with a soft vertical gradient."""
    h, w = size
    ramp = np.linspace(1.05, 0.92, h, dtype=np.float32)[:, None]  # (H, 1)
    if not isinstance(variation.background, (int, np.integer)):
        colour = np.asarray(variation.background, np.float32)
        return np.broadcast_to(colour * ramp[..., None], (h, w, 3)).copy()
    rng = np.random.default_rng(int(variation.background))
    base = rng.uniform(0.25, 0.85, 3).astype(np.float32)
    accent = rng.uniform(0.15, 0.9, 3).astype(np.float32)
    shade = (0.75 + 0.5 * _value_noise(size, 4, rng)) * ramp  # (H, W)
    blots = (_value_noise(size, 24, rng) > 0.62) * (0.35 * ramp)  # (H, W)
    return base * shade[..., None] + (accent - base) * blots[..., None]


def _head_half_width(v: np.ndarray, face: float, jaw: float) -> np.ndarray:
    """Half-width of the face outline at height v: an oval skull above, a jaw below."""
    top = np.clip(np.abs(np.minimum(v, 0.0) / -HEAD_TOP), 0, 1)
    upper = face * (1.0 - top**2.4) ** (1 / 2.4)
    t = np.clip(v / CHIN, 0.0, 1.0)
    side = face + (jaw - face) * np.minimum(t / 0.58, 1.0) ** 1.3
    lower = side * np.sqrt(np.clip(1.0 - t**5, 0.0, 1.0))
    return np.where(v < 0, upper, lower)


def _light(variation: ClipVariation) -> np.ndarray:
    az, el = math.radians(variation.light_azimuth_deg), math.radians(variation.light_elevation_deg)
    x, y, z = math.cos(el) * math.sin(az), -math.sin(el), math.cos(el) * math.cos(az)
    return np.array([x, y, z], np.float32)


def _dot(field: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """(..., 3) . (3,) elementwise: tiny matmuls stall on a busy multi-threaded BLAS."""
    return field[..., 0] * vector[0] + field[..., 1] * vector[1] + field[..., 2] * vector[2]


def _shade(normal: np.ndarray, light: np.ndarray, intensity: float, occlusion: np.ndarray):
    """Diffuse and specular terms for unit normals (..., 3) under one directional light."""
    lambert = np.clip((_dot(normal, light) + WRAP) / (1 + WRAP), 0.0, 1.0)
    half = light + np.array([0.0, 0.0, 1.0], np.float32)
    half /= np.linalg.norm(half)
    spec = SPECULAR * intensity * np.clip(_dot(normal, half), 0.0, 1.0) ** SHININESS
    diffuse = occlusion * (AMBIENT + (1 - AMBIENT) * intensity * lambert)
    return diffuse[..., None], spec[..., None]


def _normalise(nx, ny, nz) -> np.ndarray:
    n = np.stack([nx, ny, nz], axis=-1)  # (H, W, 3)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _over(image: np.ndarray, colour, alpha: np.ndarray) -> None:
    """Composite `colour` (broadcastable to image) over `image` in place with coverage alpha."""
    image += (np.asarray(colour, np.float32) - image) * alpha[..., None]


def _rotate_light(light: np.ndarray, yaw: float, pitch: float) -> np.ndarray:
    """Express the camera-space light in head space (the head turned by yaw, pitch)."""
    x, y, z = light
    x, z = x * math.cos(yaw) - z * math.sin(yaw), x * math.sin(yaw) + z * math.cos(yaw)
    y, z = y * math.cos(pitch) - z * math.sin(pitch), y * math.sin(pitch) + z * math.cos(pitch)
    return np.array([x, y, z], np.float32)


@dataclass
class _Patch:
    """A window of the frame with its head coordinates (silhouette u, v; features fu, fv)."""

    image: np.ndarray  # (H', W', 3) view into the frame
    u: np.ndarray  # (H', W')
    v: np.ndarray
    fu: np.ndarray
    fv: np.ndarray


class _Face:
    """One face placed in a frame: paints its layers back to front, each over its own window.

    Windows keep the cost proportional to the feature's area, not the frame's.
    """

    def __init__(
        self, appearance: FaceAppearance, variation: ClipVariation, image: np.ndarray,
        hair_off_face: bool,
    ):  # fmt: skip
        a = appearance
        self.a, self.var, self.frame = a, variation, image
        self.hair_off_face = hair_off_face
        h, w = image.shape[:2]
        self.unit = variation.scale * h / HEAD_HEIGHT  # pixels per head unit
        self.pixel = 1.0 / self.unit  # head units per pixel
        self.centre = (variation.center[0] * w, variation.center[1] * h)
        self.roll = math.radians(variation.roll_deg)
        self.face_hw = _span(FACE_HALF_WIDTH, a.face_width)
        self.jaw_hw = _span(JAW_HALF_WIDTH, a.jaw_width)
        self.nose_hw = _span(NOSE_HALF_WIDTH, a.nose_width)
        self.nose_v = NOSE_TIP_V + _span(NOSE_TIP_SHIFT, a.nose_height)
        self.mouth_hw = _span(MOUTH_HALF_WIDTH, a.mouth_width)
        self.lip = _span(LIP_HEIGHT, a.lip_thickness)
        self.eye_u = _span(EYE_CENTRE_U, a.eye_spacing)
        self.eye_hh = _span(EYE_HALF_HEIGHT, a.eye_height)
        light, dark = np.array(SKIN_LIGHT, np.float32), np.array(SKIN_DARK, np.float32)
        self.skin = light + (dark - light) * np.float32(a.skin_tone)
        self.hair = np.asarray(a.hair_color, np.float32)
        yaw, pitch = math.radians(variation.yaw_deg), math.radians(variation.pitch_deg)
        # interior features sit ~1 unit in front of the silhouette plane: they slide with pose
        self.shift = (math.sin(yaw), math.sin(pitch))
        self.light = _rotate_light(_light(variation), yaw, pitch)
        # texture seeds from colours only, so geometry fields change geometry alone
        self.texture_seed = _seed(a.hair_style, a.hair_color, a.eye_color, a.skin_tone)
        self.strands = np.random.default_rng(self.texture_seed).uniform(0, 2 * np.pi, 3)

    def _patch(self, u0: float, u1: float, v0: float, v1: float, features: bool = False):
        """The frame window covering the head-space box [u0, u1] x [v0, v1], or None."""
        if features:  # box given in feature coordinates: move it to where the pose puts it
            du, dv = self.shift
            u0, u1, v0, v1 = u0 - du, u1 - du, v0 - dv, v1 - dv
        cos, sin = math.cos(self.roll), math.sin(self.roll)
        corners = np.array([(u0, v0), (u1, v0), (u0, v1), (u1, v1)]) - (0, HEAD_CENTRE_V)
        xs = self.centre[0] + self.unit * (cos * corners[:, 0] - sin * corners[:, 1])
        ys = self.centre[1] + self.unit * (sin * corners[:, 0] + cos * corners[:, 1])
        h, w = self.frame.shape[:2]
        x0, x1 = max(0, int(xs.min()) - 1), min(w, int(xs.max()) + 2)
        y0, y1 = max(0, int(ys.min()) - 1), min(h, int(ys.max()) + 2)
        if x0 >= x1 or y0 >= y1:
            return None
        y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)  # (H', W') pixel rows, columns
        dx = (x + 0.5 - self.centre[0]) * self.pixel
        dy = (y + 0.5 - self.centre[1]) * self.pixel
        u = cos * dx + sin * dy
        v = -sin * dx + cos * dy + HEAD_CENTRE_V
        image = self.frame[y0:y1, x0:x1]
        return _Patch(image, u, v, u + self.shift[0], v + self.shift[1])

    def paint(self) -> None:
        self._body()
        self._hair(front=False)
        self._ears()
        self._skin()
        self._beard()
        for side in (-1.0, 1.0):
            self._eye(side)
            self._brow(side)
            self._nostril(side)
        self._mouth()
        self._hair(front=True)

    def _body(self) -> None:
        px = self.pixel
        shirt = 0.25 + 0.6 * np.random.default_rng((self.texture_seed, 1)).random(3)
        p = self._patch(-3.0, 3.0, CHIN + 0.4, CHIN + 10)
        if p is not None:
            shoulders = _soft(_ellipse_distance(p.u, p.v, 0, CHIN + 1.75, 2.8, 1.3), px)
            shade = 0.7 + 0.3 * np.clip(1 - (p.u / 2.7) ** 2, 0, 1)
            _over(p.image, shirt.astype(np.float32) * shade[..., None], shoulders)
        neck_hw = 0.62 * self.face_hw
        p = self._patch(-neck_hw, neck_hw, 0.3, CHIN + 1.3)
        if p is not None:
            neck = _soft(np.abs(p.u) - neck_hw, px) * _soft(p.v - (CHIN + 1.25), px)
            round_ = np.sqrt(np.clip(1 - (p.u / neck_hw) ** 2, 0.05, 1))
            chin_shadow = 1.0 - 0.45 * np.exp(-np.maximum(p.v - CHIN, 0) / 0.25)
            _over(p.image, self.skin * (0.55 + 0.35 * round_ * chin_shadow)[..., None], neck)

    def _hair_shape(self, p: _Patch, front: bool) -> np.ndarray:
        """Coverage of the hair layer; front hair stops at the hairline, back hair does not."""
        u, v, px, style = p.u, p.v, self.pixel, self.a.hair_style
        grow = HAIR_GROWTH[style]
        wobble = 0.05 * np.sin(9 * np.arctan2(v - EYE_V, u) + self.strands[0]) * (style == 4)
        cap = _ellipse_distance(
            u, v, 0, EYE_V, self.face_hw * grow + wobble, (EYE_V - HEAD_TOP) * grow
        )
        if not front:
            long_ = np.maximum(np.abs(u) - self.face_hw * 1.22, v - (CHIN + 0.7))
            return _soft(np.minimum(cap, np.maximum(long_, EYE_V - v)), px)
        hairline = HAIRLINE + 0.30 * (u / self.face_hw) ** 2 + (0.2 if style == 0 else 0.0)
        sides = HAIR_SIDES_OFF_FACE if self.hair_off_face else HAIR_SIDES[style]
        above = np.where(np.abs(u) > 0.78 * self.face_hw, sides - v, hairline - v)
        return _soft(np.maximum(cap, -above), px)

    def _hair(self, front: bool) -> None:
        style = self.a.hair_style
        if not front and (style != 3 or self.hair_off_face):
            return
        reach = self.face_hw * HAIR_GROWTH[style] + 0.1
        top = EYE_V + (HEAD_TOP - EYE_V) * HAIR_GROWTH[style] - 0.1
        p = self._patch(-reach, reach, top, 0.5 if front else CHIN + 0.8)
        if p is None:
            return
        u, v = p.u, p.v
        frequency = 70.0 if style != 4 else 40.0
        wave = 6 * np.sin(3 * v + self.strands[1]) + self.strands[2]
        strands = 0.5 + 0.5 * np.sin(frequency * u + wave)
        nx, ny = u / (self.face_hw * 1.3), (v - EYE_V) / 2.2
        normal = _normalise(nx, ny, np.sqrt(np.clip(1 - nx**2 - ny**2, 0.05, 1)))
        diffuse, spec = _shade(normal, self.light, self.var.light_intensity, np.ones_like(u))
        colour = self.hair * (0.8 + 0.35 * strands)[..., None] * diffuse + 2 * spec
        _over(p.image, colour, self._hair_shape(p, front) * (0.35 if style == 0 else 1.0))

    def _ears(self) -> None:
        for side in (-1.0, 1.0):
            cu = side * (self.face_hw + 0.02) + 0.3 * self.shift[0]
            p = self._patch(cu - 0.17, cu + 0.17, EAR_V - 0.32, EAR_V + 0.32)
            if p is None:
                continue
            outer = _soft(_ellipse_distance(p.u, p.v, cu, EAR_V, 0.15, 0.30), self.pixel)
            inner = _ellipse_distance(p.u, p.v, cu + side * 0.02, EAR_V + 0.03, 0.07, 0.17)
            _over(p.image, self.skin * 0.78, outer)
            _over(p.image, self.skin * 0.48, _soft(inner, self.pixel) * 0.8)

    def _bumps(self) -> list[tuple[float, float, float, float, float]]:
        """Feature relief: (u, v, sigma_u, sigma_v, height) Gaussians; negative = cavity."""
        nose_v, nose_hw, eye_u = self.nose_v, self.nose_hw, self.eye_u
        return [
            (0, (EYE_V + nose_v) / 2 - 0.03, 0.07, 0.28, 0.22),  # bridge
            (0, nose_v - 0.08, nose_hw * 0.55, 0.10, 0.30),  # tip
            (-nose_hw * 0.75, nose_v - 0.04, 0.07, 0.07, 0.12),  # alae
            (nose_hw * 0.75, nose_v - 0.04, 0.07, 0.07, 0.12),
            (-eye_u, BROW_V - 0.03, 0.22, 0.07, 0.10),  # brow ridge
            (eye_u, BROW_V - 0.03, 0.22, 0.07, 0.10),
            (-0.55, 0.15, 0.22, 0.2, 0.12),  # cheeks
            (0.55, 0.15, 0.22, 0.2, 0.12),
            (0, CHIN - 0.18, 0.25, 0.12, 0.15),  # chin
            (0, MOUTH_V, self.mouth_hw * 0.8, 0.09, 0.10),  # lips
            (-eye_u, EYE_V, 0.22, 0.12, -0.15),  # eye sockets
            (eye_u, EYE_V, 0.22, 0.12, -0.15),
            (0, MOUTH_V + self.lip + 0.08, 0.18, 0.05, -0.06),  # groove under the lower lip
        ]

    def _skin_normal(self, p: _Patch, hw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit normals of head + feature bumps, and the ambient occlusion of the cavities."""
        nx = np.clip(p.u / np.maximum(hw, 1e-3), -1, 1)
        ny = np.clip((p.v - 0.15) / 2.0, -1, 1) ** 3 * 1.6
        gx, gy = np.zeros_like(nx), np.zeros_like(nx)
        occlusion = np.ones_like(nx)
        for cu, cv, su, sv, height in self._bumps():
            g, du, dv = _bump(p.fu, p.fv, cu, cv, su, sv, height)
            gx -= du
            gy -= dv
            if height < 0:
                occlusion += 2.2 * g
        under_nose = _bump(p.fu, p.fv, 0, self.nose_v + 0.05, self.nose_hw * 0.9, 0.05, 1.0)[0]
        occlusion -= 0.35 * under_nose * (self.light[1] < 0.3)
        occlusion -= 0.30 * nx**4  # the rim turns away from the ambient sky
        nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0.02, 1))
        return _normalise(nx + gx * nz, ny + gy * nz, nz), np.clip(occlusion, 0.2, 1)

    def _skin(self) -> None:
        p = self._patch(-self.face_hw - 0.05, self.face_hw + 0.05, HEAD_TOP, CHIN + 0.05)
        if p is None:
            return
        hw = _head_half_width(p.v, self.face_hw, self.jaw_hw)
        inside = _soft(np.abs(p.u) - hw, self.pixel) * (p.v > HEAD_TOP) * (p.v < CHIN)
        normal, occlusion = self._skin_normal(p, hw)
        diffuse, spec = _shade(normal, self.light, self.var.light_intensity, occlusion)
        flush = _bump(p.fu, p.fv, 0, 0.2, 0.9, 0.5, 1.0)[0][..., None] * np.float32(BLUSH)
        _over(p.image, (self.skin + flush) * diffuse + spec, inside)

    def _beard(self) -> None:
        if self.a.beard <= 0:
            return
        p = self._patch(-self.face_hw - 0.05, self.face_hw + 0.05, 0.0, CHIN + 0.05)
        if p is None:
            return
        top = 0.50 - 0.45 * np.abs(p.fu / self.face_hw) ** 2.5
        hw = _head_half_width(p.v, self.face_hw, self.jaw_hw)
        inside = _soft(np.abs(p.u) - hw, self.pixel) * (p.v < CHIN + 0.05)
        weave = np.sin(140 * p.fu + 40 * p.fv) * np.sin(90 * p.fv - 30 * p.fu)
        texture = 0.55 + 0.45 * (weave > -0.2)
        density = float(np.clip(self.a.beard, 0, 1)) * 0.9
        _over(p.image, self.hair * 0.7, _soft(top - p.fv, 0.06) * inside * texture * density)

    def _eye(self, side: float) -> None:
        cu, px = side * self.eye_u, self.pixel
        p = self._patch(cu - 0.22, cu + 0.22, EYE_V - 0.17, EYE_V + 0.1, features=True)
        if p is None:
            return
        fu, fv, look = p.fu, p.fv, 0.03 * self.shift[0]
        du = (fu - cu) / EYE_HALF_WIDTH
        # almond: lids are two arcs; the upper one rises more towards the inner corner
        upper = EYE_V - self.eye_hh * (1 - du**2) * (1 + 0.15 * side * du)
        lower = EYE_V + self.eye_hh * 0.75 * (1 - du**2)
        opening = _soft(np.maximum(upper - fv, fv - lower), px) * (np.abs(du) < 1)
        _over(p.image, np.float32(SCLERA) * (0.75 + 0.25 * (1 - du**2))[..., None], opening)
        ring = _ellipse_distance(fu, fv, cu + look, EYE_V, IRIS_RADIUS, IRIS_RADIUS)
        radial = np.clip((ring + IRIS_RADIUS) / IRIS_RADIUS, 0, 1)
        iris = np.asarray(self.a.eye_color, np.float32) * (0.55 + 0.6 * radial)[..., None]
        _over(p.image, iris, _soft(ring, px) * opening)
        _over(p.image, LASH, _soft(np.abs(ring) - 0.008, px) * opening * 0.6)
        pupil = _ellipse_distance(fu, fv, cu + look, EYE_V, PUPIL_RADIUS, PUPIL_RADIUS)
        _over(p.image, (0.02, 0.02, 0.02), _soft(pupil, px) * opening)
        glint = _ellipse_distance(fu, fv, cu + look + 0.03, EYE_V - 0.03, 0.016, 0.016)
        _over(p.image, (1.0, 1.0, 1.0), _soft(glint, px) * opening * 0.9)
        lash = np.abs(fv - upper) - _span(LASH_HALF_THICKNESS, self.a.makeup) * (1 - 0.5 * du**2)
        _over(p.image, LASH, _soft(lash, px) * (np.abs(du) < 1.05) * 0.9)
        crease = np.abs(fv - (upper - 0.06 * (1 - du**2) - 0.01)) - 0.008
        _over(p.image, self.skin * 0.55, _soft(crease, px) * (np.abs(du) < 0.9) * 0.5)
        lid = np.abs(fv - lower) - 0.008
        _over(p.image, self.skin * 0.6, _soft(lid, px) * (np.abs(du) < 0.95) * 0.5)

    def _brow(self, side: float) -> None:
        cu, px = side * self.eye_u, self.pixel
        p = self._patch(cu - 0.3, cu + 0.3, BROW_V - 0.16, BROW_V + 0.08, features=True)
        if p is None:
            return
        du = side * (p.fu - cu) / 0.25  # -1 inner end .. +1 outer end
        centre = BROW_V - 0.06 * (1 - (du - 0.1) ** 2)
        thick = _span(BROW_HALF_THICKNESS, self.a.brow_thickness) * (1 - 0.45 * np.clip(du, 0, 1))
        ends = _soft(np.abs(du - 0.05) - 1.05, px * 4)
        _over(p.image, self.hair * 0.75, _soft(np.abs(p.fv - centre) - thick, px) * ends * 0.9)

    def _nostril(self, side: float) -> None:
        px, nose_v, cu = self.pixel, self.nose_v, side * self.nose_hw
        p = self._patch(cu - 0.2, cu + 0.2, nose_v - 0.15, nose_v + 0.1, features=True)
        if p is None:
            return
        width = 0.04 + 0.12 * self.nose_hw
        hole = _ellipse_distance(p.fu, p.fv, cu * 0.65, nose_v + 0.01, width, 0.03)
        _over(p.image, NOSTRIL, _soft(hole, px) * 0.85)
        # the alar crease outlines the nose wing: the strongest cue to nose width
        wing = _ellipse_distance(p.fu, p.fv, cu * 0.78, nose_v - 0.03, 0.09, 0.08)
        outer = (p.fv > nose_v - 0.1) * (side * p.fu > side * cu * 0.8)
        crease = _soft(np.abs(wing) - 0.012, px) * outer
        _over(p.image, self.skin * 0.45, crease * 0.8)

    def _mouth(self) -> None:
        px, hw = self.pixel, self.mouth_hw
        p = self._patch(-hw - 0.05, hw + 0.05, MOUTH_V - 0.25, MOUTH_V + 0.25, features=True)
        if p is None:
            return
        fu, fv = p.fu, p.fv
        mu = fu / hw
        across = np.clip(1 - mu**2, 0, 1)
        line = MOUTH_V - self.var.smile * 0.09 * mu**2
        gap = 0.12 * self.var.mouth_open * across**0.5
        bow = 0.015 * np.exp(-((fu / 0.05) ** 2))  # Cupid's bow notch
        top = line - gap / 2 - 0.8 * self.lip * across**0.6 + bow
        bottom = line + gap / 2 + self.lip * across**0.5
        inside_x = _soft(np.abs(mu) - 1, px / hw)
        lips = _soft(np.maximum(top - fv, fv - bottom), px) * inside_x
        shade = np.where(fv < line, 0.78, 1.0)[..., None]  # the upper lip faces down
        bare = self.skin * np.float32(LIP_TINT) + np.float32(LIP_RED)
        lip_colour = bare + np.float32(self.a.makeup) * (np.float32(LIPSTICK) - bare)
        _over(p.image, lip_colour * shade, lips)
        opening = _soft(np.abs(fv - line) - gap / 2, px) * inside_x
        _over(p.image, MOUTH_INSIDE, opening)
        _over(p.image, TEETH, opening * (fv < line - gap * 0.1) * (np.abs(mu) < 0.7) * 0.85)
        seam = _soft(np.abs(fv - line) - gap / 2 - 0.01, px) * inside_x
        _over(p.image, self.skin * 0.3, seam * 0.8)


def _finish(image: np.ndarray, seed: int) -> np.ndarray:
    """Camera grain and quantisation to uint8."""
    grain = np.random.default_rng(seed).standard_normal(image.shape[:2], np.float32) * GRAIN
    image *= 255.0
    image += grain[..., None] + 0.5
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def render_scene(
    faces: list[tuple[FaceAppearance, ClipVariation]],
    size: tuple[int, int] = (224, 224),
    hair_off_face: bool = False,
) -> np.ndarray:
    """Several faces in one frame (the first face's variation sets the background).

    Returns RGB uint8 (H, W, 3); faces are painted in list order (later ones in front).
    `hair_off_face`: the ID-photo rule, hair kept off the face so that its outline and the ears
    show (side hair ends above the brows, long hair is tied back behind the head).
    """
    if not faces:
        raise ValueError("render_scene needs at least one (FaceAppearance, ClipVariation) pair")
    image = _background(faces[0][1], size)
    for appearance, variation in faces:
        _Face(appearance, variation, image, hair_off_face).paint()
    return _finish(image, _seed(faces))


def render_face(
    appearance: FaceAppearance, variation: ClipVariation, size: tuple[int, int] = (224, 224)
) -> np.ndarray:
    """One face as a clip frame: RGB uint8 (H, W, 3)."""
    return render_scene([(appearance, variation)], size)


def render_canonical(appearance: FaceAppearance, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """The face frontal, neutral and evenly lit on a flat grey background, hair off the face
    (an ID photo): RGB uint8 (H, W, 3)."""
    return render_scene([(appearance, CANONICAL_VARIATION)], size, hair_off_face=True)
