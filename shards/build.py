"""Build WebDataset shards from source items: decode -> audio + frame -> face -> teacher -> tar.

Per item (in a worker process): decode the segment's audio and one frame with PyAV, fit the
audio to 6 s at 16 kHz (loop a short clip; reject one under `min_audio_seconds`), detect the
speaker's face, align it to 224 x 224, compute the teacher feature, align the speaker's
portrait when the source gives one (`portrait.jpg`, the face decoder's target, with a wider
margin: PORTRAIT_PADDING) and encode the sample.
The main process writes samples in item order into per-split shards.

Safety: a shard is written under a hidden temporary name and renamed when complete, so only
complete shards are ever visible; a re-run skips items found in complete shards, deletes stale
temporary files and retries everything else, so a killed build resumes where it stopped. An item
that fails at any stage is recorded in `failures.jsonl` with its stage and reason and the build
goes on. `OUT/build.json` records the build settings; a re-run with other settings is refused.
"""

from __future__ import annotations

import fcntl
import functools
import io
import json
import logging
import multiprocessing
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from s2f.audio import SAMPLE_RATE, SECONDS, fit_duration, resample, spectrogram
from shards.schema import (
    DEFAULT_RATIOS,
    FC7,
    FAILURES,
    SPLITS,
    TEACHER_HEAD,
    SplitIndex,
    encode_sample,
    speaker_of,
    split_of,
    stable_part,
    write_json_atomic,
)
from shards.sources import SourceItem

log = logging.getLogger(__name__)

SAMPLES_PER_SHARD = 1000
MIN_AUDIO_SECONDS = 1.0  # shorter clips are rejected: too short to loop honestly
SILENCE_RMS = 1e-4  # ~ -80 dBFS: below this the clip carries no voice
MAX_CENTER_DISTANCE = 0.25  # fraction of the frame diagonal between (x, y) and the chosen face
FRAME_OFFSET = 0.0  # s after the segment start: AVSpeech's face centre is given there
JPEG_QUALITY = 90
# The portrait's crop margin (face.jpg's is s2f.faces.ALIGN_PADDING = 0.25). The decoder draws
# what it is shown: at 0.25 a wide face meets the crop's edges at eye level, so the decoded face
# has no outline there for the craniofacial face width (dlib's contour points 0 / 16) to follow.
PORTRAIT_PADDING = 0.4
BUILD_SETTINGS = "build.json"
PAYLOADS = ("audio", "spectrogram")


class ItemFailed(Exception):
    """An item could not become a sample: `stage` says where, `reason` why."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


@dataclass(frozen=True)
class BuildConfig:
    """What `s2f shards build` takes; the fields that shape samples are fixed per output."""

    out: str
    teacher: str = "dlib"  # "dlib" or "vggface:PATH"
    payload: str = "audio"  # "audio" (wav.flac) or "spectrogram" (spec.npy)
    detector: str = "hog"  # "hog", "cnn" or "mtcnn"
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    samples_per_shard: int = SAMPLES_PER_SHARD
    min_audio_seconds: float = MIN_AUDIO_SECONDS
    max_center_distance: float = MAX_CENTER_DISTANCE
    workers: int = 1
    part: int = 0  # this task's part of an array build ...
    parts: int = 1  # ... out of this many

    def __post_init__(self):
        if self.payload not in PAYLOADS:
            raise ValueError(f"--payload must be one of {PAYLOADS}, got {self.payload!r}")
        if not 0 <= self.part < self.parts:
            raise ValueError(f"--part must be in [0, {self.parts}), got {self.part}")

    def settings(self) -> dict:
        """The fields every part of one output must share."""
        fields = asdict(self)
        for private in ("out", "workers", "part", "parts"):
            fields.pop(private)
        fields["ratios"] = list(self.ratios)
        return fields

    @property
    def shard_prefix(self) -> str:
        return "shard-" if self.parts == 1 else f"shard-p{self.part:04d}-"

    @property
    def failures_name(self) -> str:
        return FAILURES if self.parts == 1 else f"failures-p{self.part:04d}.jsonl"


@dataclass
class BuildSummary:
    written: Counter = field(default_factory=Counter)  # split -> samples written this run
    skipped: int = 0  # items already in complete shards
    failures: list[dict] = field(default_factory=list)
    stage_seconds: Counter = field(default_factory=Counter)  # stage -> worker seconds spent
    wall_seconds: float = 0.0


# --- the per-item pipeline (worker processes) ------------------------------------------------

_TEACHER: dict[str, object] = {}  # per process: the teacher is loaded once


def _teacher(spec: str):
    if spec not in _TEACHER:
        from s2f.teacher import teacher_from_spec

        _TEACHER[spec] = teacher_from_spec(spec)
    return _TEACHER[spec]


def _read_video(path: Path, item: SourceItem) -> tuple[np.ndarray, int, np.ndarray]:
    """-> (audio (C, N), rate, RGB frame) of the item's segment, at most 6 s of audio."""
    from s2f.video import VideoDecodeError, read_segment

    end = item.start + SECONDS if item.end is None else min(item.end, item.start + SECONDS)
    try:
        segment = read_segment(path, item.start, end, frame_times=(FRAME_OFFSET,))
    except VideoDecodeError as error:
        raise ItemFailed(error.stage, error.reason) from error
    if segment.audio is None or segment.audio.size == 0:
        raise ItemFailed("audio", "no audio samples in the segment")
    return segment.audio, segment.sample_rate, segment.frames[0]


def _read_audio_and_image(path: Path, image: Path) -> tuple[np.ndarray, int, np.ndarray]:
    """An audio file plus a face frame image (sources without video, e.g. VoxCeleb crops)."""
    from PIL import Image

    from s2f.audio import AudioLoadError, load_audio

    try:
        wave = load_audio(path)[: int(SECONDS * SAMPLE_RATE)]
    except AudioLoadError as error:
        raise ItemFailed("audio", str(error)) from error
    try:
        frame = np.asarray(Image.open(image).convert("RGB"))
    except Exception as error:
        raise ItemFailed("video", f"{image}: unreadable face image ({error})") from error
    return wave.numpy()[None], SAMPLE_RATE, frame


def _decode(path: Path, item: SourceItem, config: BuildConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """-> (96,000 samples at 16 kHz, RGB frame (H, W, 3), seconds of real audio)."""
    if item.image is None:
        audio, rate, frame = _read_video(path, item)
    else:
        audio, rate, frame = _read_audio_and_image(path, item.image)
    mono = torch.from_numpy(audio).float().mean(dim=0)  # (N,)
    wave = resample(mono, rate, SAMPLE_RATE)
    seconds = wave.shape[0] / SAMPLE_RATE
    if seconds < config.min_audio_seconds:
        raise ItemFailed("audio", f"{seconds:.2f} s of audio, under the {config.min_audio_seconds} s minimum")
    if wave.pow(2).mean().sqrt() < SILENCE_RMS:
        raise ItemFailed("audio", "silent audio (RMS under -80 dBFS)")
    return fit_duration(wave).numpy(), frame, seconds


def _detect(
    frame: np.ndarray,
    center_xy: tuple[float, float] | None,
    detector: str,
    padding: float | None = None,
):
    """Detect at the frame's own scale first; only a miss pays for the 2x upsampled search.
    `padding`: the crop's margin (default s2f.faces.ALIGN_PADDING)."""
    from s2f.faces import ALIGN_PADDING, NoFaceError, extract_face

    padding = ALIGN_PADDING if padding is None else padding
    try:
        return extract_face(frame, detector, center_xy, upsample=0, padding=padding)
    except NoFaceError as error:
        if detector == "mtcnn":  # its pyramid already reaches small faces
            raise ItemFailed("face", str(error)) from error
    try:
        return extract_face(frame, detector, center_xy, upsample=1, padding=padding)
    except NoFaceError as error:
        raise ItemFailed("face", str(error)) from error


def _face(frame: np.ndarray, item: SourceItem, config: BuildConfig):
    face = _detect(frame, item.center_xy, config.detector)
    if item.center_xy is not None:
        h, w = frame.shape[:2]
        dx, dy = face.box.centre[0] - item.center_xy[0] * w, face.box.centre[1] - item.center_xy[1] * h
        distance = (dx**2 + dy**2) ** 0.5 / (h**2 + w**2) ** 0.5
        if distance > config.max_center_distance:
            raise ItemFailed("face", f"nearest face is {distance:.2f} frame diagonals from the "
                                     f"speaker's (x, y) {item.center_xy}; the speaker is not in view")
    return face


@functools.lru_cache(maxsize=4)
def _portrait_jpg(path: Path, detector: str) -> bytes:
    """The aligned crop of a speaker's portrait, cut as face.jpg but with PORTRAIT_PADDING;
    cached: a speaker's clips come one after another and share it."""
    from PIL import Image

    try:
        image = np.asarray(Image.open(path).convert("RGB"))
    except Exception as error:
        raise ItemFailed("portrait", f"{path}: unreadable portrait ({error})") from error
    try:
        return _jpeg(_detect(image, None, detector, PORTRAIT_PADDING).crop)
    except ItemFailed as error:
        raise ItemFailed("portrait", f"{path}: {error.reason}") from error


def _jpeg(crop: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class StageClock:
    """Seconds spent per stage of one item."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


def _teacher_feature(crop: np.ndarray, spec: str) -> tuple[np.ndarray, str]:
    try:
        teacher = _teacher(spec)
        return teacher.features(crop[None])[0], teacher.name  # (D,)
    except Exception as error:
        raise ItemFailed("teacher", f"{type(error).__name__}: {error}") from error


def make_sample(item: SourceItem, config: BuildConfig, clock: StageClock) -> dict:
    """The encoded WebDataset sample of one item; raises ItemFailed."""
    if item.fetcher is not None:
        path, offset = item.fetcher.fetch(item)
        end = None if item.end is None else item.end - offset
        item = replace(item, path=path, start=item.start - offset, end=end)
    clock.lap("download")
    wave, frame, seconds = _decode(item.path, item, config)
    clock.lap("decode")
    face = _face(frame, item, config)
    clock.lap("face")
    fc7, teacher_name = _teacher_feature(face.crop, config.teacher)
    clock.lap("teacher")
    portrait = None
    if item.portrait is not None:
        portrait = _portrait_jpg(item.portrait, config.detector)
        clock.lap("portrait")
    meta = {
        **item.meta, "key": item.key, "speaker": item.speaker, "start": item.start, "end": item.end,
        "audio_seconds": round(seconds, 3), "face_box": [round(v, 1) for v in
        (face.box.left, face.box.top, face.box.right, face.box.bottom)],
        "faces_found": face.num_faces, "teacher": teacher_name, "detector": config.detector,
    }  # fmt: skip
    payload = {"wave": wave} if config.payload == "audio" else {
        "spec": spectrogram(torch.from_numpy(wave)).numpy()}  # fmt: skip
    sample = encode_sample(item.key, fc7, meta, face_jpg=_jpeg(face.crop), portrait_jpg=portrait,
                           **payload)
    clock.lap("encode")
    return sample


def process_item(job: tuple[SourceItem, BuildConfig]) -> tuple[str, str, dict, dict]:
    """-> (status "ok" | "failed", split, sample or failure record, stage seconds). Never raises."""
    item, config = job
    split = item.split or split_of(item.speaker, config.ratios)
    clock = StageClock()
    try:
        return "ok", split, make_sample(item, config, clock), clock.seconds
    except ItemFailed as error:
        record = {"item": item.key, "stage": error.stage, "reason": error.reason}
    except Exception as error:  # a bug or an unforeseen input must not stop the build
        record = {"item": item.key, "stage": "unexpected", "reason": f"{type(error).__name__}: {error}"}
    return "failed", split, record, clock.seconds


# --- shard bookkeeping -----------------------------------------------------------------------


def member_key(name: str) -> str:
    """WebDataset key of a tar member `<source>/<speaker>/<clip>.<ext>`."""
    head, _, tail = name.rpartition("/")
    stem = tail.split(".", 1)[0]
    return f"{head}/{stem}" if head else stem


def shard_keys(path: Path) -> list[str]:
    """Sample keys of a complete shard, in order, without decoding any member."""
    keys: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key = member_key(member.name)
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def complete_shards(folder: Path, prefix: str = "shard-") -> list[Path]:
    return sorted(folder.glob(f"{prefix}*.tar"))


class SplitWriter:
    """Shards of one split: `<prefix>%06d.tar`, each written as `.<name>.tmp` then renamed."""

    def __init__(self, folder: Path, prefix: str, samples_per_shard: int):
        self.folder, self.prefix, self.samples_per_shard = folder, prefix, samples_per_shard
        self.writer = None
        self.count = 0

    def _next_number(self) -> int:
        numbers = [int(p.stem.rsplit("-", 1)[1]) for p in complete_shards(self.folder, self.prefix)]
        return max(numbers, default=-1) + 1

    def _finish(self, tmp_name: str) -> None:
        tmp = Path(tmp_name)
        if self.writer is not None and self.writer.count == 0:
            tmp.unlink()  # ShardWriter opens a stream before the first sample arrives
        else:
            tmp.replace(tmp.with_name(tmp.name[1:].removesuffix(".tmp")))

    def write(self, sample: dict) -> None:
        if self.writer is None:
            import webdataset

            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = webdataset.ShardWriter(
                str(self.folder / f".{self.prefix}%06d.tar.tmp"), maxcount=self.samples_per_shard,
                post=self._finish, start_shard=self._next_number(), verbose=0,
            )
        self.writer.write(sample)
        self.count += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _check_settings(out: Path, config: BuildConfig) -> None:
    path = out / BUILD_SETTINGS
    if path.is_file():
        previous = json.loads(path.read_text())
        differing = sorted(k for k in config.settings() if previous.get(k) != config.settings()[k])
        if differing:
            raise ValueError(
                f"{out} was built with other settings ({', '.join(differing)}: "
                f"{[previous.get(k) for k in differing]}); build into a new folder"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, config.settings())


def _prepare(out: Path, config: BuildConfig) -> set[str]:
    """Delete this part's stale temporary shards; return the keys already in complete shards."""
    done: set[str] = set()
    for split in SPLITS:
        folder = out / split
        for stale in folder.glob(f".{config.shard_prefix}*.tar.tmp"):
            stale.unlink()
        for shard in complete_shards(folder, config.shard_prefix):
            done.update(shard_keys(shard))
    return done


def _results(todo: list[SourceItem], config: BuildConfig) -> Iterator[tuple[str, str, dict, dict]]:
    """Processed items in order. One worker per core, each on one torch thread: torch's default
    of a thread per core in every worker oversubscribes the cores, and its threads then wait on
    each other (a descriptor forward went from ~25 ms to ~460 ms on a busy 2-core machine)."""
    jobs = ((item, config) for item in todo)
    if config.workers <= 1:
        with _torch_threads(1):
            yield from map(process_item, jobs)
        return
    # spawn: workers must not inherit the parent's torch/OpenMP threads; imap keeps item order.
    with multiprocessing.get_context("spawn").Pool(config.workers, torch.set_num_threads, (1,)) as pool:
        yield from pool.imap(process_item, jobs, chunksize=1)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_failures(out: Path, config: BuildConfig, failures: list[dict]) -> None:
    by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for failure in failures:
        by_split[failure.pop("split")].append(failure)
    for split, records in by_split.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{config.failures_name}.tmp"
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        tmp.replace(folder / config.failures_name)


class BuildLocked(RuntimeError):
    """Another builder is writing the same part of the same output."""


@contextmanager
def _part_lock(out: Path, config: BuildConfig) -> Iterator[None]:
    """Hold this part's lock file: a second builder would delete the first's temporary shards.

    An flock is released by the kernel when its process dies, so a killed build never leaves
    a stale lock behind and a re-run resumes at once.
    """
    path = out / f".{config.shard_prefix}build.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildLocked(
                f"{out}: another `s2f shards build` is writing this part ({path.name} is locked); "
                "wait for it to finish, or build into another --out") from None
        yield


def build_shards(items: Iterable[SourceItem], config: BuildConfig) -> BuildSummary:
    """Write this part's shards under `config.out`; with one part, also the split indexes."""
    out = Path(config.out)
    _check_settings(out, config)
    with _part_lock(out, config):
        return _build_part(items, config, out)


def _build_part(items: Iterable[SourceItem], config: BuildConfig, out: Path) -> BuildSummary:
    from tqdm import tqdm

    mine = [i for i in items if config.parts == 1 or stable_part(i.key, config.parts) == config.part]
    done = _prepare(out, config)
    todo = [item for item in mine if item.key not in done]
    summary = BuildSummary(skipped=len(mine) - len(todo))
    writers = {s: SplitWriter(out / s, config.shard_prefix, config.samples_per_shard) for s in SPLITS}
    progress = tqdm(total=len(todo), unit="clip", desc=f"shards {out.name}", dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for status, split, record, seconds in _results(todo, config):
            summary.stage_seconds.update(seconds)
            if status == "ok":
                writers[split].write(record)
                summary.written[split] += 1
            else:
                summary.failures.append({**record, "split": split})
                log.warning("skipped %s at %s: %s", record["item"], record["stage"], record["reason"])
            progress.update()
            progress.set_postfix(failed=len(summary.failures), refresh=False)
    finally:
        progress.close()
        for writer in writers.values():
            writer.close()
    summary.wall_seconds = time.perf_counter() - started
    _write_failures(out, config, [dict(f) for f in summary.failures])
    if config.parts == 1:
        merge(out)
    return summary


# --- indexes and the teacher head ------------------------------------------------------------


def _read_failures(folder: Path) -> list[str]:
    """An array build's per-part failure files, else the single build's own."""
    sources = sorted(folder.glob("failures-p*.jsonl")) or [folder / FAILURES]
    return [line for p in sources if p.is_file() for line in p.read_text().splitlines() if line.strip()]


def _feature_dim(folder: Path) -> int:
    for shard in complete_shards(folder):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith("." + FC7):
                    return int(np.load(io.BytesIO(tar.extractfile(member).read())).shape[0])
    return 0


def merge(out: str | Path) -> dict[str, SplitIndex]:
    """Write each split's `index.json` (and merged `failures.jsonl`) from its complete shards;
    fit and save the teacher head when the teacher has no classifier."""
    out = Path(out)
    settings = json.loads((out / BUILD_SETTINGS).read_text())
    indexes = {}
    for split in SPLITS:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        failures = _read_failures(folder)
        tmp = folder / f".{FAILURES}.tmp"
        tmp.write_text("".join(line + "\n" for line in failures))
        tmp.replace(folder / FAILURES)
        shards = [{"name": p.name, "samples": len(shard_keys(p))} for p in complete_shards(folder)]
        indexes[split] = SplitIndex(
            split=split, num_samples=sum(s["samples"] for s in shards), shards=shards,
            teacher=settings["teacher"], feature_dim=_feature_dim(folder),
            payload=settings["payload"], extra={"failed_items": len(failures)},
        )  # fmt: skip
        indexes[split].write(folder)
    if not settings["teacher"].startswith("vggface"):
        fit_teacher_head(out)
    return indexes


def _train_features(folder: Path) -> tuple[np.ndarray, list[str]]:
    features, speakers = [], []
    for shard in complete_shards(folder):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith("." + FC7):
                    features.append(np.load(io.BytesIO(tar.extractfile(member).read())))
                    speakers.append(speaker_of(member_key(member.name)))
    return np.stack(features).astype(np.float32), speakers  # (N, D), N


def fit_teacher_head(out: Path) -> Path:
    """The frozen fc8 stand-in: logistic regression on train features -> speaker identity."""
    from s2f.teacher import TeacherHead

    features, speakers = _train_features(out / "train")
    classes = sorted(set(speakers))
    if len(classes) < 2:
        raise ValueError(f"{out}/train has {len(classes)} speaker(s); a teacher head needs >= 2")
    labels = torch.tensor([classes.index(s) for s in speakers])
    head = TeacherHead.fit(torch.from_numpy(features), labels)
    path = out / TEACHER_HEAD
    head.save(path)
    write_json_atomic(out / "teacher_head_classes.json", classes)
    log.info("teacher head: %d speakers, %d train samples -> %s", len(classes), len(speakers), path)
    return path
