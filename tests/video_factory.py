"""Small test videos: rendered faces with synthetic voiced audio, written as real mp4."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s2f.demo.render import ClipVariation, FaceAppearance, render_face, render_scene
from s2f.video import write_mp4 as _write_mp4

FPS = 5
SIZE = (160, 160)  # (H, W)


def write_mp4(path: Path, frames, fps, audio, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_mp4(path, frames, fps, audio, **options)


def voice(seconds: float, f0: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding F0 under a syllable envelope: (N,) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t))) / rate
    envelope = 0.4 + 0.6 * np.sin(2 * np.pi * 3 * t) ** 2
    wave = 0.15 * envelope * sum(np.sin(k * phase) / k for k in range(1, 12))
    return (wave + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def appearance(seed: int) -> FaceAppearance:
    rng = np.random.default_rng(seed)
    return FaceAppearance(
        face_width=rng.uniform(0.2, 0.8), jaw_width=rng.uniform(0.2, 0.8),
        nose_width=rng.uniform(0.2, 0.8), skin_tone=rng.uniform(0, 1), hair_style=int(rng.integers(0, 5)),
    )  # fmt: skip


def face_frame(speaker_seed: int, clip: int = 0, size: tuple[int, int] = SIZE) -> np.ndarray:
    return render_face(appearance(speaker_seed), ClipVariation(yaw_deg=3 * clip, background=clip), size)


def face_video(
    path: Path, speaker_seed: int, clip: int, seconds: float = 2.0, audio=True, rate: int = 16_000,
    channels: int = 1, size: tuple[int, int] = SIZE, fps: float = FPS, **options,
) -> Path:
    frames = np.repeat(face_frame(speaker_seed, clip, size)[None], int(seconds * fps), axis=0)  # (T, H, W, 3)
    wave = None
    if audio:
        mono = voice(seconds, 100 + 10 * speaker_seed, rate, seed=clip)
        wave = np.stack([mono, 0.5 * mono]) if channels == 2 else mono  # (C, N) or (N,)
    return write_mp4(path, frames, fps, wave, sample_rate=rate, **options)


def two_face_frame() -> np.ndarray:
    left = (appearance(101), ClipVariation(scale=0.4, center=(0.27, 0.5), background=1))
    right = (appearance(102), ClipVariation(scale=0.4, center=(0.73, 0.5)))
    return render_scene([left, right], (160, 320))


def two_face_video(path: Path, seconds: float = 2.0) -> Path:
    frames = np.repeat(two_face_frame()[None], int(seconds * FPS), axis=0)
    return write_mp4(path, frames, FPS, voice(seconds, 150))


def faceless_video(path: Path, seconds: float = 2.0) -> Path:
    rng = np.random.default_rng(0)
    frame = (rng.uniform(0, 255, (8, 8, 3)).repeat(20, 0).repeat(20, 1)).astype(np.uint8)
    frames = np.repeat(frame[None], int(seconds * FPS), axis=0)
    return write_mp4(path, frames, FPS, voice(seconds, 120))


def video_folder(root: Path, speakers: int = 6, clips: int = 2) -> Path:
    """root/<speaker>/<clip>.mp4 for good clips, plus the four kinds of bad file."""
    for s in range(speakers):
        for c in range(clips):
            face_video(root / f"spk{s:02d}" / f"clip{c}.mp4", s, c)
    (root / "broken").mkdir(parents=True, exist_ok=True)
    (root / "broken" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    face_video(root / "silent" / "no_audio.mp4", 50, 0, audio=False)
    faceless_video(root / "noface" / "wall.mp4")
    two_face_video(root / "pair" / "two.mp4")
    return root
