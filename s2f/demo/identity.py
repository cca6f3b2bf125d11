"""Demo-world identities: who speaks, how they sound, and what they look like.

A seeded generative model. The voice carries part of the face through plausible mechanisms
(sex, age, body size through vocal-tract length, origin through language); the rest of the face
is idiosyncratic, so no voice model can predict it. Appearance fields are normalised to [0, 1]
with 0.5 the average (s2f.demo.render.FaceAppearance takes them as keyword arguments).

sex = +1 for males, -1 for females; N(m, s) normal; U(a, b) uniform; clip to the field's range.

| variable            | distribution                                         | depends on         |
|---------------------|------------------------------------------------------|--------------------|
| gender              | female / male, 1/2 each                              | -                  |
| age (years)         | U{18..80}                                            | -                  |
| origin              | uniform over ORIGINS                                 | -                  |
| native_language     | the origin's espeak-ng voice                         | origin             |
| language (spoken)   | native with 1 - P_OTHER_LANGUAGE, else another       | origin             |
|                     | origin's language, uniform                           |                    |
| face_width          | N(0.5 + 0.10 sex, 0.12)                              | gender             |
| jaw_width           | N(0.5 + 0.6 (face_width - 0.5) + 0.06 sex, 0.08)     | face_width, gender |
| mouth_width         | N(0.5 + 0.3 (face_width - 0.5), 0.10)                | face_width         |
| nose_width          | N(origin mean + 0.04 sex, 0.08)                      | origin, gender     |
| nose_height         | N(origin mean + 0.05 sex, 0.10)                      | origin, gender     |
| skin_tone           | N(origin mean, 0.07)                                 | origin             |
| eye_height          | N(origin mean, 0.10): eye opening (lid-to-lid)       | origin             |
| hair_color (RGB)    | origin palette, jitter 0.03, greys with age          | origin, age        |
| beard               | males: U(0.3, 1) with P_BEARD, else 0; females 0     | gender             |
| hair_style          | HAIR_STYLES[gender]: females mostly long or medium,  | gender             |
|                     | males mostly shaved or short                         |                    |
| makeup              | females: U(0.4, 1) with P_MAKEUP, else 0; males 0    | gender             |
| brow_thickness      | N(0.5 + 0.15 sex, 0.10)                              | gender             |
| lip_thickness       | N(0.5, 0.15)                                         | idiosyncratic      |
| eye_spacing         | N(0.5, 0.10)                                         | idiosyncratic      |
| eye_color (RGB)     | ORIGIN_EYES[origin] over EYE_COLORS, jitter 0.03     | origin             |
| vocal_tract_length  | VTL_CM[gender] + 1.8 cm (face_width + jaw_width - 1) | gender, face, age  |
| (cm)                | + 0.008 cm/yr (age - 18) + N(0, 0.35)                |                    |
| f0_hz               | F0_HZ[gender] - F0_SLOPE[gender] (age - 18), times   | gender, age        |
|                     | lognormal(0, 0.07); female slope 0.55 Hz/yr, male 0.1 |                    |
| speaking_rate (wpm) | N(170, 18) - 0.5 wpm/yr past 40                      | age                |
| breathiness         | N(0.2 female, 0.1 male; + 0.004/yr (age - 18), 0.1)  | gender, age        |
| pitch_range         | lognormal(0, 0.2): intonation expressiveness factor  | idiosyncratic      |
| timbre              | U{0..len(TIMBRES)-1}: espeak-ng voice variant        | idiosyncratic      |

Floats are rounded (FLOAT_DIGITS) when drawn, so JSON manifests are byte-identical per seed.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ORIGINS = ("north_european", "south_european", "south_asian", "east_asian", "east_african")
ORIGIN_LANGUAGE = {  # espeak-ng voice names shipped with espeakng-loader
    "north_european": "en",
    "south_european": "es",
    "south_asian": "hi",
    "east_asian": "cmn",
    "east_african": "sw",
}
ORIGIN_SKIN_TONE = {  # mean of skin_tone, 0 light .. 1 dark
    "north_european": 0.12,
    "south_european": 0.30,
    "south_asian": 0.60,
    "east_asian": 0.30,
    "east_african": 0.85,
}
ORIGIN_NOSE_WIDTH = {
    "north_european": 0.35,
    "south_european": 0.45,
    "south_asian": 0.55,
    "east_asian": 0.60,
    "east_african": 0.75,
}
ORIGIN_NOSE_HEIGHT = {  # mean of nose_height: a longer nose sits lower
    "north_european": 0.62,
    "south_european": 0.55,
    "south_asian": 0.50,
    "east_asian": 0.35,
    "east_african": 0.45,
}
BLACK, DARK_BROWN, BROWN = (0.08, 0.07, 0.07), (0.20, 0.13, 0.08), (0.35, 0.22, 0.12)
LIGHT_BROWN, BLOND, RED = (0.55, 0.38, 0.22), (0.85, 0.72, 0.45), (0.65, 0.28, 0.12)
ORIGIN_EYE_HEIGHT = {  # mean of eye_height (how open the eyes are), 0 narrow .. 1 round
    "north_european": 0.60,
    "south_european": 0.60,
    "south_asian": 0.55,
    "east_asian": 0.20,
    "east_african": 0.55,
}
ORIGIN_HAIR = {  # (palette, probabilities)
    "north_european": ((BLOND, LIGHT_BROWN, BROWN, RED), (0.3, 0.3, 0.3, 0.1)),
    "south_european": ((BLACK, DARK_BROWN, BROWN, LIGHT_BROWN), (0.3, 0.4, 0.25, 0.05)),
    "south_asian": ((BLACK, DARK_BROWN), (0.7, 0.3)),
    "east_asian": ((BLACK, DARK_BROWN), (0.85, 0.15)),
    "east_african": ((BLACK, DARK_BROWN), (0.9, 0.1)),
}
GREY = (0.72, 0.72, 0.72)
GREYING_START = 35.0  # years; hair greys from here ...
GREYING_SPAN = 40.0  # ... fully (at most) this many years later
EYE_COLORS = (
    (0.25, 0.15, 0.08),  # dark brown
    (0.40, 0.26, 0.13),  # brown
    (0.45, 0.38, 0.18),  # hazel
    (0.30, 0.45, 0.25),  # green
    (0.30, 0.45, 0.65),  # blue
    (0.45, 0.50, 0.55),  # grey
)
ORIGIN_EYES = {  # probabilities over EYE_COLORS: light eyes are mostly north European
    "north_european": (0.05, 0.10, 0.15, 0.15, 0.40, 0.15),
    "south_european": (0.35, 0.35, 0.15, 0.08, 0.05, 0.02),
    "south_asian": (0.75, 0.20, 0.05, 0.0, 0.0, 0.0),
    "east_asian": (0.85, 0.15, 0.0, 0.0, 0.0, 0.0),
    "east_african": (0.90, 0.10, 0.0, 0.0, 0.0, 0.0),
}
COLOR_JITTER = 0.03  # std of per-channel colour noise
N_HAIR_STYLES = 5  # render.FaceAppearance.hair_style 0..4
HAIR_STYLES = {  # per gender: probabilities of styles 0 shaved, 1 short, 2 medium, 3 long, 4 curly
    "female": (0.0, 0.05, 0.15, 0.70, 0.10),
    "male": (0.25, 0.55, 0.10, 0.0, 0.10),
}
P_OTHER_LANGUAGE = 0.15  # speakers of another origin's language: origin != language ID
P_BEARD = 0.6  # fraction of males with a beard
P_MAKEUP = 0.9  # fraction of females wearing lipstick and eyeliner

AGE_RANGE = (18, 80)  # years, inclusive
VTL_CM = {"female": 14.6, "male": 17.0}  # mean vocal-tract length at age 18, average face
VTL_FACE_CM = 1.8  # cm per unit of (face_width + jaw_width - 1): bigger face, longer tract
VTL_AGE_CM = 0.008  # cm per year: the larynx descends slowly through adulthood
VTL_NOISE_CM = 0.35
VTL_RANGE_CM = (12.5, 19.5)
F0_HZ = {"female": 215.0, "male": 122.0}  # mean pitch at age 18
F0_SLOPE = {"female": 0.55, "male": 0.10}  # Hz per year: female F0 falls more with age
F0_NOISE = 0.07  # std of log F0 between speakers
RATE_WPM = 170.0
RATE_NOISE_WPM = 18.0
RATE_AGE_WPM = 0.5  # wpm slower per year past RATE_AGE_START
RATE_AGE_START = 40.0
RATE_RANGE_WPM = (120.0, 230.0)
BREATHINESS = {"female": 0.2, "male": 0.1}
BREATHINESS_AGE = 0.004  # per year
PITCH_RANGE_NOISE = 0.2  # std of log pitch-range factor
PITCH_RANGE_LIMITS = (0.5, 1.6)
# espeak-ng variants with flutter 0 and roughness 0 (those two keep state across calls, which
# would break determinism) and identical formant frequencies (so only the vocal-tract length
# moves formants); they differ in spectral tilt ("tone") and base pitch.
TIMBRES = ("Diogo", "Henrique", "Hugo", "miguel", "michel")
FLOAT_DIGITS = 4

# Per-clip variation (render.ClipVariation fields).
YAW_STD_DEG, YAW_MAX_DEG = 12.0, 30.0
PITCH_STD_DEG, PITCH_MAX_DEG = 7.0, 20.0
ROLL_STD_DEG, ROLL_MAX_DEG = 4.0, 12.0
# Key light within 40 deg of the camera, from above, as in most talking-head videos; with side
# light up to 60 deg the clip, not the person, made more of the face descriptor's variance.
LIGHT_AZIMUTH_DEG = (-40.0, 40.0)
LIGHT_ELEVATION_DEG = (5.0, 45.0)
LIGHT_INTENSITY = (0.7, 1.2)
P_TEXTURED_BACKGROUND = 0.5  # else a flat colour
SCALE_RANGE = (0.45, 0.65)  # head height / frame height
CENTER_STD = 0.04  # of the head centre, in frame fractions


def _round(x: float) -> float:
    return round(float(x), FLOAT_DIGITS)


def _unit(x: float) -> float:
    """Clip to [0, 1] and round: an appearance field."""
    return _round(np.clip(x, 0.0, 1.0))


def _color(rgb: np.ndarray) -> tuple[float, float, float]:
    return tuple(_unit(c) for c in rgb)


def _stable_int(text: str) -> int:
    """A process-independent integer for seeding (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode())


def _hair_color(rng: np.random.Generator, origin: str, age: int) -> tuple[float, float, float]:
    palette, probs = ORIGIN_HAIR[origin]
    base = np.array(palette[rng.choice(len(palette), p=probs)])
    base = base + rng.normal(0.0, COLOR_JITTER, 3)
    greying = np.clip((age - GREYING_START) / GREYING_SPAN, 0.0, 1.0) ** 1.5 * rng.uniform(0.5, 1.0)
    return _color((1.0 - greying) * base + greying * np.array(GREY))


def sample_appearance(
    rng: np.random.Generator, gender: str, age: int, origin: str
) -> dict[str, float | int | tuple[float, float, float]]:
    """Draw a face given the voice-linked variables (see the module table)."""
    sex = 1.0 if gender == "male" else -1.0
    face_width = _unit(rng.normal(0.5 + 0.10 * sex, 0.12))
    has_beard = gender == "male" and rng.random() < P_BEARD
    wears_makeup = gender == "female" and rng.random() < P_MAKEUP
    return {
        "face_width": face_width,
        "jaw_width": _unit(rng.normal(0.5 + 0.6 * (face_width - 0.5) + 0.06 * sex, 0.08)),
        "mouth_width": _unit(rng.normal(0.5 + 0.3 * (face_width - 0.5), 0.10)),
        "nose_width": _unit(rng.normal(ORIGIN_NOSE_WIDTH[origin] + 0.04 * sex, 0.08)),
        "nose_height": _unit(rng.normal(ORIGIN_NOSE_HEIGHT[origin] + 0.05 * sex, 0.10)),
        "skin_tone": _unit(rng.normal(ORIGIN_SKIN_TONE[origin], 0.07)),
        "hair_color": _hair_color(rng, origin, age),
        "beard": _unit(rng.uniform(0.3, 1.0)) if has_beard else 0.0,
        "lip_thickness": _unit(rng.normal(0.5, 0.15)),
        "eye_spacing": _unit(rng.normal(0.5, 0.10)),
        "hair_style": int(rng.choice(N_HAIR_STYLES, p=HAIR_STYLES[gender])),
        "eye_color": _color(np.array(EYE_COLORS[rng.choice(len(EYE_COLORS), p=ORIGIN_EYES[origin])])
                            + rng.normal(0.0, COLOR_JITTER, 3)),
        "makeup": _unit(rng.uniform(0.4, 1.0)) if wears_makeup else 0.0,
        "brow_thickness": _unit(rng.normal(0.5 + 0.15 * sex, 0.10)),
        "eye_height": _unit(rng.normal(ORIGIN_EYE_HEIGHT[origin], 0.10)),
    }


def vocal_tract_length(
    gender: str, age: int, face_width: float, jaw_width: float, noise_cm: float = 0.0
) -> float:
    """Vocal-tract length (cm) from sex, age and face size, plus a per-person residual."""
    face = VTL_FACE_CM * (face_width + jaw_width - 1.0)
    length = VTL_CM[gender] + face + VTL_AGE_CM * (age - AGE_RANGE[0]) + noise_cm
    return _round(np.clip(length, *VTL_RANGE_CM))


def mean_f0(gender: str, age: int, log_noise: float = 0.0) -> float:
    """Mean speaking pitch (Hz): set by sex, falling with age (more for females)."""
    return _round((F0_HZ[gender] - F0_SLOPE[gender] * (age - AGE_RANGE[0])) * np.exp(log_noise))


def _spoken_language(rng: np.random.Generator, origin: str) -> str:
    if rng.random() >= P_OTHER_LANGUAGE:
        return ORIGIN_LANGUAGE[origin]
    others = [ORIGIN_LANGUAGE[o] for o in ORIGINS if o != origin]
    return others[rng.integers(len(others))]


def _voice_quality(rng: np.random.Generator, gender: str, age: int) -> dict[str, float | str]:
    breathiness = BREATHINESS[gender] + BREATHINESS_AGE * (age - AGE_RANGE[0])
    return {
        "breathiness": _unit(rng.normal(breathiness, 0.1)),
        "pitch_range": _round(np.clip(np.exp(rng.normal(0.0, PITCH_RANGE_NOISE)),
                                      *PITCH_RANGE_LIMITS)),
        "timbre": TIMBRES[rng.integers(len(TIMBRES))],
    }


@dataclass(frozen=True)
class Identity:
    """One speaker of the demo world with its ground truth (see the module table)."""

    id: str
    gender: str
    age: int
    origin: str
    native_language: str
    language: str
    vocal_tract_length: float  # cm
    f0_hz: float  # mean speaking pitch
    speaking_rate: float  # words per minute
    voice_quality: dict = field(default_factory=dict)  # breathiness, pitch_range, timbre
    appearance: dict = field(default_factory=dict)  # render.FaceAppearance fields

    @property
    def age_decade(self) -> int:
        """Decade of life as its first year: 18 -> 10, 42 -> 40."""
        return self.age // 10 * 10

    @property
    def speaks_other_language(self) -> bool:
        """True when the spoken language is another origin's (mixing breaks origin == LID)."""
        return self.language != self.native_language

    def to_dict(self) -> dict:
        """Plain JSON-ready dict, including the derived `age_decade`."""
        return {**asdict(self), "age_decade": self.age_decade}

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no spaces; identical bytes for identical identities."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> Identity:
        """Inverse of `to_dict` (JSON lists become the RGB tuples render expects)."""
        appearance = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in data["appearance"].items()
        }
        fields = {k: v for k, v in data.items() if k not in ("age_decade", "appearance")}
        return cls(**fields, appearance=appearance)


def sample_identity(rng: np.random.Generator, index: int) -> Identity:
    """Draw identity number `index` from `rng` (see the module table)."""
    gender = "female" if rng.random() < 0.5 else "male"
    age = int(rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1))
    origin = ORIGINS[rng.integers(len(ORIGINS))]
    appearance = sample_appearance(rng, gender, age, origin)
    vtl = vocal_tract_length(gender, age, appearance["face_width"], appearance["jaw_width"],
                             rng.normal(0.0, VTL_NOISE_CM))
    rate = rng.normal(RATE_WPM, RATE_NOISE_WPM) - RATE_AGE_WPM * max(0.0, age - RATE_AGE_START)
    return Identity(
        id=f"id{index:05d}",
        gender=gender,
        age=age,
        origin=origin,
        native_language=ORIGIN_LANGUAGE[origin],
        language=_spoken_language(rng, origin),
        vocal_tract_length=vtl,
        f0_hz=mean_f0(gender, age, rng.normal(0.0, F0_NOISE)),
        speaking_rate=_round(np.clip(rate, *RATE_RANGE_WPM)),
        voice_quality=_voice_quality(rng, gender, age),
        appearance=appearance,
    )


def generate_identities(n: int, seed: int) -> list[Identity]:
    """`n` identities id00000 .. ; the same (n, seed) gives the same list, and a prefix of a
    longer list equals the shorter one (each identity has its own random stream)."""
    if n < 0:
        raise ValueError(f"n={n}: the number of identities must be >= 0")
    return [sample_identity(np.random.default_rng([seed, index]), index) for index in range(n)]


def manifest_text(identities: list[Identity]) -> str:
    """JSON Lines, one canonical identity per line, in the given order."""
    return "".join(identity.to_json() + "\n" for identity in identities)


def write_manifest(identities: list[Identity], path: str | Path) -> Path:
    """Write `manifest_text` to `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest_text(identities), encoding="utf-8")
    return path


def read_manifest(path: str | Path) -> list[Identity]:
    """Identities from a JSON Lines manifest written by `write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no identity manifest; write one with write_manifest")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Identity.from_dict(json.loads(line)) for line in lines if line.strip()]


def clip_variation(identity: Identity, clip_index: int, seed: int) -> dict:
    """Pose, light, expression, framing and background of one clip (render.ClipVariation
    fields); a pure function of (identity id, clip_index, seed)."""
    rng = np.random.default_rng([seed, _stable_int(identity.id), clip_index])
    textured = rng.random() < P_TEXTURED_BACKGROUND
    background = int(rng.integers(2**31)) if textured else _color(rng.uniform(0.1, 0.9, 3))
    center = np.clip(0.5 + rng.normal(0.0, CENTER_STD, 2), 0.35, 0.65)
    return {
        "yaw_deg": _round(np.clip(rng.normal(0.0, YAW_STD_DEG), -YAW_MAX_DEG, YAW_MAX_DEG)),
        "pitch_deg": _round(np.clip(rng.normal(0.0, PITCH_STD_DEG), -PITCH_MAX_DEG, PITCH_MAX_DEG)),
        "roll_deg": _round(np.clip(rng.normal(0.0, ROLL_STD_DEG), -ROLL_MAX_DEG, ROLL_MAX_DEG)),
        "light_azimuth_deg": _round(rng.uniform(*LIGHT_AZIMUTH_DEG)),
        "light_elevation_deg": _round(rng.uniform(*LIGHT_ELEVATION_DEG)),
        "light_intensity": _round(rng.uniform(*LIGHT_INTENSITY)),
        "smile": _unit(rng.random() ** 2),
        "mouth_open": _unit(rng.uniform(0.0, 0.6)),
        "background": background,
        "scale": _round(rng.uniform(*SCALE_RANGE)),
        "center": (_round(center[0]), _round(center[1])),
    }
