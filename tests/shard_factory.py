"""Small synthetic shard folders for tests: root/{train,val,test}/shard-%06d.tar + index.json."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from datamodules.bench import speechlike_wave, write_split
from s2f.audio import spectrogram
from shards import schema

SOURCE = "synth"


def round_robin_assignment(speakers: int) -> dict[str, str]:
    """Speaker i -> train, train, val, test, train, train, val, test, ... (no split left empty)."""
    cycle = ("train", "train", "val", "test")
    return {speaker_name(i): cycle[i % len(cycle)] for i in range(speakers)}


def speaker_name(i: int) -> str:
    return f"spk{i:04d}"


def make_shards(
    root: str | Path, speakers: int = 8, clips_per_speaker: int = 4, feature_dim: int = 16,
    payload: str = "audio", samples_per_shard: int = 4, seed: int = 0,
    assignment: Mapping[str, str] | None = None,
) -> Path:
    """Write seeded speech-like clips with random fc7 features, speaker-disjoint splits.

    `assignment` maps speaker names (`spk0000`, ...) to splits; None uses `schema.split_of`.
    Clips of a split are written speaker by speaker, in order.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    by_split: dict[str, list[dict]] = {split: [] for split in schema.SPLITS}
    for i in range(speakers):
        speaker = speaker_name(i)
        split = assignment[speaker] if assignment is not None else schema.split_of(speaker)
        for clip in range(clips_per_speaker):
            by_split[split].append(_sample(rng, speaker, f"c{clip:03d}", feature_dim, payload))
    for split, samples in by_split.items():
        write_split(root / split, split, samples, payload, feature_dim, samples_per_shard)
    return root


def _sample(rng: np.random.Generator, speaker: str, clip: str, feature_dim: int, payload: str) -> dict:
    wave = speechlike_wave(rng)
    fc7 = np.maximum(rng.standard_normal(feature_dim), 0).astype(np.float32)
    meta = {"source": SOURCE, "speaker": speaker, "clip": clip}
    media = {"wave": wave} if payload == "audio" else {"spec": spectrogram(torch.from_numpy(wave)).numpy()}
    return {"key": schema.sample_key(SOURCE, speaker, clip), "fc7": fc7, "meta": meta, **media}
