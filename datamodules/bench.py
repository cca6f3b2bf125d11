"""Data benchmark: bytes per sample and DataModule throughput, audio vs spectrogram payload.

`python -m datamodules.bench` writes the same synthetic samples as audio-payload shards (FLAC)
and spectrogram-payload shards (float16 .npy), then reads each through `ShardDataModule` with
its workers. The audio payload is measured three ways: the loader alone, with the spectrogram
that `on_after_batch_transfer` computes (here on the CPU, in this process), and with the
workers computing it (`spectrogram_in_workers`); one core's cost per clip of FLAC decoding and
of the spectrogram is printed beside them, with the samples/s they allow. Random noise is the worst case for FLAC, so the clips are speech-like: a
harmonic voice whose pitch glides around a speaker's f0, shaped by three formant resonances,
switched on and off in syllables at ~4 Hz with pauses, plus background noise 40 dB down.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from shards import schema

SAMPLE_RATE = schema.SAMPLE_RATE  # Hz
NUM_SAMPLES = schema.NUM_SAMPLES  # 6 s
F0_RANGE = (90.0, 250.0)  # Hz, speakers' mean pitch
PITCH_GLIDE = 0.15  # relative pitch excursion of the intonation contour
HARMONICS = 30  # partials of the voice
PERIOD_TABLE = 4096  # points per pitch period in the wavetable
FORMANTS = ((700.0, 130.0), (1220.0, 150.0), (2600.0, 250.0))  # (centre, bandwidth) Hz
SYLLABLE_RATE = 4.0  # Hz
PAUSE_FRACTION = 0.25  # of syllables silent
VOICE_LEVEL = 0.3  # peak amplitude of the voice, full scale 1
NOISE_LEVEL = 0.003  # RMS of background noise (~40 dB below the voice)
GOAL_SIZE_RATIO = 3.0  # audio payload at least this many times smaller per sample
GOAL_AUDIO_RATE = 1000.0  # samples/s through the audio DataModule with 2 workers
TEACHER = "synthetic"
BENCH_SHARDS = 8  # train shards per payload, enough for 2 workers to read disjoint shards


def speechlike_wave(rng: np.random.Generator, num_samples: int = NUM_SAMPLES) -> np.ndarray:
    """A (N,) float32 clip with speech's spectral and temporal structure (see module docstring)."""
    t = np.arange(num_samples) / SAMPLE_RATE  # (N,) seconds
    f0 = rng.uniform(*F0_RANGE)
    contour = 1 + PITCH_GLIDE * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0 * contour) / SAMPLE_RATE  # (N,)
    # One period of the formant-shaped harmonic sum, read at the gliding phase (O(N), not O(N * H)).
    k = np.arange(1, HARMONICS + 1)[:, None]  # (H, 1)
    gain = sum(1 / (1 + ((k * f0 - c) / bw) ** 2) for c, bw in FORMANTS) / k  # (H, 1)
    cycle = np.linspace(0, 2 * np.pi, PERIOD_TABLE, endpoint=False)  # (P,)
    table = (gain * np.sin(k * cycle)).sum(axis=0)  # (P,)
    voice = table[(phase / (2 * np.pi) * PERIOD_TABLE).astype(np.int64) % PERIOD_TABLE]  # (N,)
    syllables = np.floor(t * SYLLABLE_RATE).astype(int)
    voiced = rng.random(syllables.max() + 1) > PAUSE_FRACTION
    envelope = voiced[syllables] * np.sin(np.pi * (t * SYLLABLE_RATE % 1)) ** 2  # (N,)
    wave = VOICE_LEVEL * envelope * voice / np.abs(voice).max()
    return (wave + NOISE_LEVEL * rng.standard_normal(num_samples)).astype(np.float32)


def write_split(folder: str | Path, split: str, samples: Iterable[dict], payload: str,
                feature_dim: int, samples_per_shard: int = 100) -> schema.SplitIndex:
    """Write `encode_sample` keyword dicts as `shard-%06d.tar` plus `index.json` in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_shard: list[int] = []
    pattern = str(folder / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, maxsize=float("inf"), verbose=0) as sink:
        for i, sample in enumerate(samples):
            if i % samples_per_shard == 0:  # the writer starts its next shard here
                per_shard.append(0)
            sink.write(schema.encode_sample(**sample))
            per_shard[-1] += 1
    index = schema.SplitIndex(
        split=split, num_samples=sum(per_shard), teacher=TEACHER, feature_dim=feature_dim,
        payload=payload, shards=[{"name": f"shard-{i:06d}.tar", "samples": n} for i, n in enumerate(per_shard)])
    index.write(folder)
    return index


def synthetic_samples(count: int, payload: str, feature_dim: int, seed: int = 0) -> Iterable[dict]:
    """`count` speech-like samples of 8 clips per speaker, with random features."""
    from s2f.audio import spectrogram

    rng = np.random.default_rng(seed)
    for i in range(count):
        wave = speechlike_wave(rng)
        key = schema.sample_key("bench", f"spk{i // 8:05d}", f"clip{i % 8}")
        fc7 = np.maximum(rng.standard_normal(feature_dim), 0).astype(np.float16)
        extra = ({"wave": wave} if payload == "audio"
                 else {"spec": spectrogram(torch.from_numpy(wave)).numpy()})
        yield {"key": key, "fc7": fc7, "meta": {"source": "bench", "speaker": f"spk{i // 8:05d}"}, **extra}


def bytes_per_sample(folder: Path) -> float:
    index = schema.SplitIndex.read(folder)
    return sum((folder / s["name"]).stat().st_size for s in index.shards) / index.num_samples


def samples_per_second(root: Path, workers: int, batch_size: int, spectrogram: str | None = "device") -> float:
    """Train samples/s through `ShardDataModule`, after the first batch (worker start-up).

    `spectrogram` (audio payload): None leaves it out; "device" runs `on_after_batch_transfer`
    in this process (on the CPU here); "workers" has the DataLoader workers compute it.
    """
    from datamodules.shards import ShardDataModule

    module = ShardDataModule(str(root), batch_size=batch_size, num_workers=workers, shuffle_buffer=batch_size,
                             spectrogram_in_workers=spectrogram == "workers")
    batches = iter(module.train_dataloader())
    next(batches)
    start, done = time.perf_counter(), 0
    for batch in batches:
        if spectrogram == "device":
            batch = module.on_after_batch_transfer(batch, 0)
        done += len(batch["key"])
    return done / max(time.perf_counter() - start, 1e-9)


def stage_costs(folder: Path, clips: int = 32) -> dict:
    """Single-core ms per clip of the audio payload's two CPU stages: FLAC decode, spectrogram."""
    from s2f.audio import spectrogram

    index = schema.SplitIndex.read(folder)
    raws = itertools.islice(wds.WebDataset(str(folder / index.shards[0]["name"]), shardshuffle=False), clips)
    flacs = [raw[schema.WAV] for raw in raws]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        start = time.perf_counter()
        waves = torch.from_numpy(np.stack([schema.decode_wave("bench", flac) for flac in flacs]))  # (C, N)
        decode = time.perf_counter() - start
        start = time.perf_counter()
        spectrogram(waves)
        transform = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"decode_ms": 1e3 * decode / len(flacs), "spectrogram_ms": 1e3 * transform / len(flacs)}


def _write_payload(root: Path, payload: str, samples: int, feature_dim: int, seed: int) -> None:
    for split in schema.SPLITS:
        # val/test get one sample each: the benchmark reads only train, the module wants all three.
        count = samples if split == "train" else 1
        write_split(root / split, split, synthetic_samples(count, payload, feature_dim, seed), payload,
                    feature_dim, samples_per_shard=-(-samples // BENCH_SHARDS))


def bench_data(root: str | None = None, samples: int = 512, workers: int = 2, batch_size: int = 32,
               feature_dim: int = 4096, seed: int = 0) -> dict:
    """Build both payloads of the same samples (under `root`, or a temp dir) and measure them."""
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(root) if root is not None else Path(scratch)
        figures = {}
        for payload in schema.PAYLOADS:
            folder = base / payload
            if not (folder / "train" / schema.INDEX).is_file():
                _write_payload(folder, payload, samples, feature_dim, seed)
            figures[payload] = {
                "bytes_per_sample": bytes_per_sample(folder / "train"),
                "loader_samples_per_s": samples_per_second(folder, workers, batch_size, spectrogram=None),
                "samples_per_s": samples_per_second(folder, workers, batch_size),
            }
        audio = figures["audio"]
        audio["workers_spec_samples_per_s"] = samples_per_second(base / "audio", workers, batch_size, "workers")
        audio.update(stage_costs(base / "audio" / "train"))
    figures["size_ratio"] = figures["spectrogram"]["bytes_per_sample"] / figures["audio"]["bytes_per_sample"]
    figures.update(samples=samples, workers=workers, batch_size=batch_size)
    return figures


def report(figures: dict) -> str:
    audio, spec = figures["audio"], figures["spectrogram"]
    best = max(audio["samples_per_s"], audio["workers_spec_samples_per_s"])
    cores = os.cpu_count() or 1
    ceiling = cores * 1e3 / (audio["decode_ms"] + audio["spectrogram_ms"])
    rows = [f"{'':30s}{'audio (FLAC)':>16s}{'spectrogram':>16s}",
            f"{'bytes per sample':30s}{audio['bytes_per_sample']:16,.0f}{spec['bytes_per_sample']:16,.0f}",
            f"{'samples/s, loader only':30s}{audio['loader_samples_per_s']:16,.0f}"
            f"{spec['loader_samples_per_s']:16,.0f}",
            f"{'samples/s, spec in main proc':30s}{audio['samples_per_s']:16,.0f}{spec['samples_per_s']:16,.0f}",
            f"{'samples/s, spec in workers':30s}{audio['workers_spec_samples_per_s']:16,.0f}{'':>16s}",
            f"size ratio spectrogram/audio: {figures['size_ratio']:.2f}x "
            f"(goal >= {GOAL_SIZE_RATIO:.0f}x: {'met' if figures['size_ratio'] >= GOAL_SIZE_RATIO else 'NOT met'})",
            f"audio samples/s with {figures['workers']} workers, spectrogram on this CPU: {best:,.0f} "
            f"(goal >= {GOAL_AUDIO_RATE:,.0f}: {'met' if best >= GOAL_AUDIO_RATE else 'NOT met'}; "
            f"loader alone {audio['loader_samples_per_s']:,.0f})",
            f"one core per clip: FLAC decode {audio['decode_ms']:.2f} ms + spectrogram "
            f"{audio['spectrogram_ms']:.2f} ms, so at most {ceiling:,.0f} samples/s on {cores} cores",
            f"{figures['samples']} samples, batch size {figures['batch_size']}"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="keep the shards here (default: a temp dir)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    print(report(bench_data(args.root, args.samples, args.workers, args.batch_size)))


if __name__ == "__main__":
    main()
