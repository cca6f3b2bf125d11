"""Demo world stage: identities -> talking-head clips (mp4: H.264 + FLAC or AAC), ground truth.

Layout of a world folder:

    videos/<identity id>/clipNN.mp4   one speaker per clip; the folder name is the speaker id
    portraits/<identity id>.png       each speaker frontal, neutral, evenly lit, hair off the
                                      face (an ID photo): the photos the face decoder learns to
                                      draw (SPEC section 6)
    manifest.jsonl                    one line per clip: path, identity, clip, ground truth,
                                      the clip's variation (pose, light, framing)
    identities.jsonl                  all identities, as s2f.demo.identity.write_manifest
    world.json                        the WorldConfig that made the clips (workers aside)

A clip's audio is the whole utterance s2f.demo.voices makes (4.5-9.5 s), FLAC in mp4 by
default: lossless, so the shards get the synthesised samples to 16 bits, and a sixth of AAC's
encoding time (`audio_codec="aac"` makes clips like web uploads). Its video is one rendered
frame held for the audio's duration at one frame per second, since shard building uses a
single frame per clip and H.264 cost grows with the frame count.

Determinism: espeak-ng carries synthesis state from one utterance to the next, so a clip's
samples depend on what the same process synthesised before it. The work unit is therefore one
identity, all its clips in order, in a process of its own forked from a fork server that never
synthesises anything: every identity starts from the same pristine state whatever the worker
count, the scheduling, or what the calling process did before. Resuming an identity re-makes
the audio of its earlier clips (not their video) to reach the same state for the missing ones.
mp4 bytes are identical too (the encoders are deterministic and the muxer writes no dates).
Files appear under their final names only once complete (temporary name, then rename), so an
interrupted run resumes by skipping the clips present; the manifests are written after the clips.

Like any multiprocessing code that does not fork the caller, a script calling `generate_world`
needs the `if __name__ == "__main__":` guard: each worker re-imports the main module.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from tqdm import tqdm

from s2f.audio import SAMPLE_RATE
from s2f.demo.identity import Identity, clip_variation, generate_identities, manifest_text
from s2f.demo.render import ClipVariation, FaceAppearance, render_canonical, render_face
from s2f.demo.voices import make_voice_clip
from s2f.video import INSTALL_HINT, write_mp4

VIDEOS_DIR = "videos"
PORTRAITS_DIR = "portraits"
MANIFEST = "manifest.jsonl"
IDENTITIES = "identities.jsonl"
CONFIG = "world.json"
CLIP_SECONDS = 6.0  # s of speech asked of the voice per clip (the model's input length)
# Pixels: dlib HOG (upsample 1) finds the face in 99.5% of rendered frames at this size, whose
# detector box spans 28-49% of the frame height (head scale 0.45-0.65 of the frame).
FRAME_SIZE = (224, 224)  # (H, W)
FPS = 1.0  # frames per second of the held frame: ~20 ms CPU of H.264 per 6 s clip (2 fps: 40)
AUDIO_CODEC = "flac"  # ~11 ms CPU per 6 s clip, exact; "aac" ~66 ms, lossy
# Imported once by the fork server so each identity's process starts warm (import-only: none of
# them touches espeak-ng's synthesis state). See also `_main_script_modules`.
PRELOAD = ("s2f.demo.world", "parselmouth", "scipy.signal", "av")


@dataclass(frozen=True)
class WorldConfig:
    """What world to make; `workers` changes the speed, never the files."""

    identities: int = 300
    clips_per_identity: int = 4
    seed: int = 0
    frame_size: tuple[int, int] = FRAME_SIZE  # (H, W) pixels, even for H.264
    fps: float = FPS
    audio_codec: str = AUDIO_CODEC  # any audio codec PyAV muxes into mp4
    clip_seconds: float = CLIP_SECONDS
    workers: int = 2

    def content(self) -> dict:
        """The fields that decide the files (all but `workers`), JSON-ready."""
        fields = asdict(self)
        del fields["workers"]
        fields["frame_size"] = list(self.frame_size)
        return fields


def clip_path(identity_id: str, clip_index: int) -> str:
    """Path of a clip relative to the world folder."""
    return f"{VIDEOS_DIR}/{identity_id}/clip{clip_index:02d}.mp4"


def portrait_path(identity_id: str) -> str:
    """Path of an identity's portrait relative to the world folder."""
    return f"{PORTRAITS_DIR}/{identity_id}.png"


def clip_record(identity: Identity, clip_index: int, seed: int) -> dict:
    """One manifest line: where the clip is, whose it is, the identity's ground truth (flat,
    `age_decade` and `speaks_other_language` included) and the clip's variation."""
    truth = identity.to_dict()
    del truth["id"]
    return {
        **truth,
        "path": clip_path(identity.id, clip_index),
        "portrait": portrait_path(identity.id),
        "identity": identity.id,
        "clip": clip_index,
        "speaks_other_language": identity.speaks_other_language,
        "variation": clip_variation(identity, clip_index, seed),
    }


def manifest_lines(identities: list[Identity], config: WorldConfig) -> str:
    """The world manifest as canonical JSON Lines (sorted keys, no spaces), identity order."""
    records = (
        clip_record(identity, clip, config.seed)
        for identity in identities
        for clip in range(config.clips_per_identity)
    )
    return "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records)


def read_world_manifest(out_dir: str | Path) -> list[dict]:
    """The clip records of a world made by `generate_world`."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no world manifest; make the world with generate_world")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def hold_frames(frame: np.ndarray, seconds: float, fps: float) -> np.ndarray:
    """`frame` (H, W, 3) repeated to cover `seconds` at `fps`: (T, H, W, 3), a view."""
    count = max(1, math.ceil(seconds * fps))
    return np.broadcast_to(frame, (count, *frame.shape))


def render_clip_frame(identity: Identity, clip_index: int, config: WorldConfig) -> np.ndarray:
    """The clip's face frame: (H, W, 3) uint8 RGB."""
    variation = ClipVariation(**clip_variation(identity, clip_index, config.seed))
    return render_face(FaceAppearance(**identity.appearance), variation, config.frame_size)


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary name, and not at all when the content is already there (a
    finished world keeps its files' times)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _check_config(out_dir: Path, config: WorldConfig) -> None:
    """Record the config; refuse to mix clips of another world into this folder."""
    path = out_dir / CONFIG
    wanted = json.dumps(config.content(), sort_keys=True, indent=1) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") != wanted:
        raise ValueError(
            f"{out_dir} holds a world made with {path.read_text(encoding='utf-8').strip()}, not "
            f"{wanted.strip()}; give another out_dir or delete the folder"
        )
    _write_text(path, wanted)


def _check_audio_codec(name: str) -> None:
    try:
        import av
    except ImportError as error:
        raise ImportError(f"the demo world writes mp4 with PyAV; {INSTALL_HINT}") from error
    try:
        av.Codec(name, "w")
    except ValueError as error:
        raise ValueError(
            f"audio_codec {name!r}: this FFmpeg has no such encoder ({error}); use 'flac' or 'aac'"
        ) from error


def _missing_clips(out_dir: Path, identity: Identity, clips: int) -> tuple[int, ...]:
    return tuple(c for c in range(clips) if not (out_dir / clip_path(identity.id, c)).is_file())


@dataclass(frozen=True)
class _Job:
    """One work unit: an identity and the clips of it still to write."""

    identity: Identity
    missing: tuple[int, ...]
    config: WorldConfig
    out_dir: Path
    portrait_missing: bool


def _jobs(identities: list[Identity], config: WorldConfig, out_dir: Path) -> list[_Job]:
    """A job per identity with a clip or its portrait still to write."""
    jobs = []
    for identity in identities:
        missing = _missing_clips(out_dir, identity, config.clips_per_identity)
        portrait_missing = not (out_dir / portrait_path(identity.id)).is_file()
        if missing or portrait_missing:
            jobs.append(_Job(identity, missing, config, out_dir, portrait_missing))
    return jobs


def _run_job(job: _Job) -> int:
    """Write the identity's portrait if missing; make its clips in order (see the module note on
    espeak's state), writing the missing ones. Runs in a fresh process; returns the number of
    clips written."""
    identity, config = job.identity, job.config
    if job.portrait_missing:
        _write_portrait(identity, config, job.out_dir)
    for clip in range(max(job.missing, default=-1) + 1):
        try:
            audio = make_voice_clip(identity, clip, config.seed, config.clip_seconds)  # (N,)
            if clip not in job.missing:
                continue
            frames = hold_frames(render_clip_frame(identity, clip, config),
                                 len(audio) / SAMPLE_RATE, config.fps)  # (T, H, W, 3)
            path = job.out_dir / clip_path(identity.id, clip)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_mp4(path, frames, config.fps, audio, SAMPLE_RATE, audio_codec=config.audio_codec)
        except Exception as error:
            raise RuntimeError(f"demo world: {identity.id} clip {clip} failed: {error}") from error
    return len(job.missing)


def _write_portrait(identity: Identity, config: WorldConfig, out_dir: Path) -> None:
    from PIL import Image

    image = render_canonical(FaceAppearance(**identity.appearance), config.frame_size)  # (H, W, 3)
    path = out_dir / portrait_path(identity.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(temporary, format="PNG")
    os.replace(temporary, path)


def _main_script_modules() -> list[str]:
    """Modules the caller's main script imports from, when it was started by path.

    Every child re-runs such a script (multiprocessing's fix-up of __main__; Python 3.11's fork
    server never preloads it), so each identity's process paid for the script's imports: ~2 s
    for the `s2f` console script, which imports Lightning, 7x the identity's own work. Imported
    once by the fork server instead (Python 3.11's server searches the working directory and
    site-packages, not the script's folder). A script run with -m is imported by name, not re-run.
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:
        return []
    names = {
        value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
        for key, value in vars(main).items()
        if not key.startswith("__")  # the script's own dunders (__loader__, __builtins__)
    }
    return sorted(name for name in names if isinstance(name, str) and name != "builtins")


def _fork_server() -> multiprocessing.context.BaseContext:
    """A fork-server context: children fork from a process that never synthesised speech."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        raise RuntimeError(
            "the demo world needs the 'forkserver' start method for reproducible audio "
            "(POSIX systems have it); run it on Linux or macOS"
        )
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, *_main_script_modules()])
    return context


def _run_jobs(jobs: list[_Job], workers: int) -> None:
    """Each job in its own fresh process, `workers` at a time, with a clips/s progress bar."""
    total = sum(len(job.missing) for job in jobs)
    with tqdm(total=total, unit="clip", desc="demo world") as progress:
        if not jobs:
            return
        with _fork_server().Pool(workers, maxtasksperchild=1) as pool:
            for written in pool.imap_unordered(_run_job, jobs, chunksize=1):
                progress.update(written)


def generate_world(config: WorldConfig, out_dir: str | Path) -> Path:
    """Make (or finish) the world `config` describes in `out_dir`; returns `out_dir`.

    Clips already present are kept; identities.jsonl and manifest.jsonl are written after all
    clips exist.
    """
    if config.identities < 1 or config.clips_per_identity < 1 or config.workers < 1:
        raise ValueError(f"{config}: identities, clips_per_identity and workers must be >= 1")
    if any(side % 2 for side in config.frame_size):
        raise ValueError(f"frame_size {config.frame_size}: H.264 needs even sides; use e.g. 224")
    _check_audio_codec(config.audio_codec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_config(out_dir, config)
    identities = generate_identities(config.identities, config.seed)
    _run_jobs(_jobs(identities, config, out_dir), config.workers)
    _write_text(out_dir / IDENTITIES, manifest_text(identities))
    _write_text(out_dir / MANIFEST, manifest_lines(identities, config))
    return out_dir
