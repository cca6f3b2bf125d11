"""The shard schema: one sample = one clip; keys, dtypes, the split rule and `index.json`.

A sample in a WebDataset tar shard has the key `<source>/<speaker>/<clip>` and these members:

| member         | content                                                                |
|----------------|------------------------------------------------------------------------|
| `wav.flac`     | 16 kHz mono, exactly 6 s (96,000 samples) after looping (default)      |
| `spec.npy`     | float16 (2, 598, 257) compressed spectrogram (`--payload spectrogram`) |
| `fc7.npy`      | teacher feature (D,), float16 or float32                               |
| `face.jpg`     | the aligned 224 x 224 face crop the feature was computed from          |
| `portrait.jpg` | optional: the speaker's frontal, neutral face, aligned as `face.jpg`   |
|                | with a wider margin (padding 0.4: the whole outline shows), when the   |
|                | source has one (the demo world): the face decoder's target             |
| `json`         | source, speaker, video, segment times, face box, teacher, attributes   |

Per split folder: `shard-%06d.tar` (or `shard-<part>-%06d.tar` for array builds),
`index.json` (`SplitIndex`) and `failures.jsonl` (one `{"item", "stage", "reason"}` per line).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile

SAMPLE_RATE = 16_000  # Hz
SECONDS = 6.0  # s
NUM_SAMPLES = 96_000  # SAMPLE_RATE * SECONDS
SPEC_SHAPE = (2, 598, 257)  # (C, T, Q) for 6 s
SPEC_DTYPE = np.float16
FACE_SIZE = 224  # pixels
BUILDER_VERSION = 1

WAV, SPEC, FC7, FACE, META = "wav.flac", "spec.npy", "fc7.npy", "face.jpg", "json"
PORTRAIT = "portrait.jpg"
PAYLOADS = {"audio": WAV, "spectrogram": SPEC}
SPLITS = ("train", "val", "test")
INDEX, FAILURES, TEACHER_HEAD = "index.json", "failures.jsonl", "teacher_head.pt"
DEFAULT_RATIOS = (0.8, 0.1, 0.1)  # train, val, test


class BadSample(ValueError):
    """A sample failed to decode or validate; carries its key for the log."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"sample {key}: {reason}")
        self.key, self.reason = key, reason


def _clean(part: str) -> str:
    # WebDataset splits the key from the member name at the first dot of the basename.
    return str(part).replace(".", "_").replace("/", "_").strip() or "_"


def sample_key(source: str, speaker: str, clip: str) -> str:
    return "/".join(_clean(p) for p in (source, speaker, clip))


def speaker_of(key: str) -> str:
    return key.split("/")[1]


def split_of(speaker: str, ratios: tuple[float, float, float] = DEFAULT_RATIOS) -> str:
    """Stable speaker -> split assignment (SHA-1 of the id), so splits are speaker-disjoint."""
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be 3 non-negative numbers summing to 1, got {ratios}")
    digest = hashlib.sha1(str(speaker).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < ratios[0]:
        return "train"
    return "val" if u < ratios[0] + ratios[1] else "test"


def stable_part(key: str, parts: int) -> int:
    """Which of `parts` array tasks owns an item (stable hash of its key)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % parts


# --- encoding -------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def flac_bytes(wave: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(wave, np.float32), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def encode_sample(
    key: str, fc7: np.ndarray, meta: dict, face_jpg: bytes | None = None,
    wave: np.ndarray | None = None, spec: np.ndarray | None = None,
    portrait_jpg: bytes | None = None,
) -> dict:
    """The WebDataset dict of one sample (members as bytes)."""
    if wave is None and spec is None:
        raise ValueError(f"sample {key}: needs a waveform or a spectrogram")
    sample = {"__key__": key, FC7: npy_bytes(np.asarray(fc7)), META: json.dumps(meta).encode()}
    if wave is not None:
        sample[WAV] = flac_bytes(wave)
    if spec is not None:
        sample[SPEC] = npy_bytes(np.asarray(spec, SPEC_DTYPE))
    if face_jpg is not None:
        sample[FACE] = face_jpg
    if portrait_jpg is not None:
        sample[PORTRAIT] = portrait_jpg
    return sample


# --- decoding and validation ----------------------------------------------------------------


def _load_npy(key: str, member: str, data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:
        raise BadSample(key, f"{member} is not a readable .npy ({error})") from error


def _check_finite(key: str, member: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise BadSample(key, f"{member} contains NaN or Inf")


def decode_fc7(key: str, data: bytes, feature_dim: int | None = None) -> np.ndarray:
    fc7 = _load_npy(key, FC7, data)
    if fc7.ndim != 1 or fc7.dtype not in (np.float16, np.float32):
        raise BadSample(key, f"{FC7} must be float16/float32 (D,), got {fc7.dtype} {fc7.shape}")
    if feature_dim is not None and fc7.shape[0] != feature_dim:
        raise BadSample(key, f"{FC7} has D={fc7.shape[0]}, the split's index says {feature_dim}")
    _check_finite(key, FC7, fc7)
    return fc7.astype(np.float32)


def decode_wave(key: str, data: bytes) -> np.ndarray:
    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    except Exception as error:
        raise BadSample(key, f"{WAV} does not decode ({error})") from error
    if rate != SAMPLE_RATE or wave.shape != (NUM_SAMPLES,):
        raise BadSample(key, f"{WAV} must be {NUM_SAMPLES} mono samples at {SAMPLE_RATE} Hz, "
                             f"got {wave.shape} at {rate} Hz")
    _check_finite(key, WAV, wave)
    return wave


def decode_spec(key: str, data: bytes) -> np.ndarray:
    spec = _load_npy(key, SPEC, data)
    if spec.shape != SPEC_SHAPE or spec.dtype != SPEC_DTYPE:
        raise BadSample(key, f"{SPEC} must be float16 {SPEC_SHAPE}, got {spec.dtype} {spec.shape}")
    _check_finite(key, SPEC, spec)
    return spec.astype(np.float32)


def decode_meta(key: str, data: bytes | None) -> dict:
    if data is None:
        return {}
    try:
        return json.loads(data)
    except ValueError as error:
        raise BadSample(key, f"{META} is not valid JSON ({error})") from error


# --- per-split index ------------------------------------------------------------------------


@dataclass
class SplitIndex:
    """`index.json` of one split."""

    split: str
    num_samples: int
    shards: list[dict]  # [{"name": "shard-000000.tar", "samples": 123}, ...]
    teacher: str
    feature_dim: int
    payload: str  # "audio" or "spectrogram"
    builder_version: int = BUILDER_VERSION
    failures: str = FAILURES
    extra: dict = field(default_factory=dict)

    def write(self, folder: str | Path) -> Path:
        return write_json_atomic(Path(folder) / INDEX, asdict(self))

    @classmethod
    def read(cls, folder: str | Path) -> "SplitIndex":
        path = Path(folder) / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no split index; build shards with `s2f shards build`")
        return cls(**json.loads(path.read_text()))


def write_json_atomic(path: Path, obj) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
    return path
