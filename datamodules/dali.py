"""WebDataset shards -> batches through NVIDIA DALI (`pip install 's2f[dali]'`).

`DaliShardDataModule` reads the same split folders as `ShardDataModule` and yields the same
batches: `"wav"` (B, 96000) float32 or `"spec"` (B, 2, 598, 257) float32, `"fc7"` (B, D) float32,
`"key"` list[str], `"meta"` list[dict]; `on_after_batch_transfer` is ShardDataModule's, so the
audio payload's spectrogram is made on the device exactly as there.

Pipeline. `fn.readers.webdataset` reads the payload member (`wav.flac` or `spec.npy`), `fc7.npy`
and `json` of each sample; FLAC goes through `fn.decoders.audio` (mono float at the stored rate,
which must be 16 kHz as the schema says: checked, not resampled, like ShardDataModule), `.npy`
members through `fn.decoders.numpy` (float16 -> float32). The key is the sample's `source_info`
(`<shard>:<offset>:<key>.fc7.npy`). DALI 2.4 can infer a shard's index itself, but it then scans
the tar headers (and logs a line per shard) each time a pipeline is built, i.e. every epoch; with
`index_dir` the index files are made once there by DALI's `wds2idx` and reused while the shard is
not newer.

Devices. DALI has no GPU decoder for audio or .npy, so with CUDA the pipeline decodes on the CPU threads and
moves the payload and fc7 to GPU `local_rank` (its outputs are then CUDA tensors); without CUDA the
pipeline is CPU-only (`device_id=None`).

Sharding. DALI gives rank r the contiguous samples [r * N // W, (r + 1) * N // W) of the shard
list. Train: each epoch the shard list is permuted by (seed, epoch), identically on every rank,
and each rank shuffles its part in a buffer of `shuffle_buffer` samples seeded by (seed, epoch,
rank); DALIGenericIterator's DROP policy stops every rank when the smallest share has no full
batch left, so each rank yields N // (W * B) batches, as many as ShardDataModule's (the samples
left over differ from epoch to epoch). Evaluation: stored order, every sample once across ranks,
a short last batch kept; ranks differ by at most one sample, so possibly by a batch.

Differences from ShardDataModule: a pipeline is rebuilt for every epoch, so a run resumed mid-epoch
restarts that epoch (the order of each epoch is the same as in an uninterrupted run); local shard
folders only (DALI opens files, not `pipe:` URLs); a bad sample stops the run instead of being
skipped and counted: DALI raises on undecodable or missing members, and a wrong shape or sample rate
raises `schema.BadSample` naming the key and shard (values are not checked for NaN or Inf).
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch

from datamodules.shards import ShardDataModule, _rank_and_world, mixed_seed, split_sources
from shards import schema

READER = "shards"  # the reader's operator name, which DALIGenericIterator asks for the epoch size
SEED_MODULUS = 2**31  # DALI seeds are 32-bit signed integers
SOURCE_INFO = re.compile(r":\d+:(?P<member>.*)$")  # "<shard path>:<byte offset>:<member name>"
KEY_SUFFIX = "." + schema.FC7  # source_info is taken from the fc7 member, present in both payloads
EXTRA = "pip install 's2f[dali]'"


def _dali():
    """The DALI modules, or an ImportError that names the extra to install."""
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as error:
        raise ImportError(f"DaliShardDataModule needs NVIDIA DALI: {EXTRA}") from error
    return dali, fn, types, DALIGenericIterator, LastBatchPolicy


# --- pure functions ----------------------------------------------------------------------------


def rank_samples(samples: int, rank: int, world_size: int) -> int:
    """Samples of DALI's contiguous shard `rank` of `world_size` over `samples` samples."""
    return (rank + 1) * samples // world_size - rank * samples // world_size


def train_batches(samples: int, world_size: int, batch_size: int) -> int:
    """Train batches per rank: full batches of the smallest share (DALI's DROP policy)."""
    return samples // (world_size * batch_size)


def eval_batches(samples: int, rank: int, world_size: int, batch_size: int) -> int:
    return math.ceil(rank_samples(samples, rank, world_size) / batch_size)


def epoch_paths(paths: list[str], seed: int, epoch: int) -> list[str]:
    """The shard order of one train epoch; the same on every rank, so DALI's split stays disjoint."""
    order = list(paths)
    random.Random(mixed_seed(seed, epoch)).shuffle(order)
    return order


def index_files(paths: list[str], index_dir: str) -> list[str]:
    """DALI index files of `paths` in `index_dir`, made with DALI's wds2idx where missing or stale.

    Named by shard and a hash of its full path, since every split has a `shard-000000.tar`; each is
    written to a temporary name and renamed, so ranks making the same index never see half of one.
    """
    _dali()  # wds2idx comes with DALI: without it, name the extra to install
    from wds2idx import IndexCreator

    folder = Path(index_dir)
    folder.mkdir(parents=True, exist_ok=True)
    indexes = []
    for path in paths:
        index = folder / f"{Path(path).stem}-{mixed_seed(str(Path(path).resolve())):016x}.idx"
        if not index.is_file() or index.stat().st_mtime < Path(path).stat().st_mtime:
            partial = index.with_name(f".{index.name}.tmp{os.getpid()}")
            with IndexCreator(str(path), str(partial), verbose=False) as creator:
                creator.create_index()
            partial.replace(index)
        indexes.append(str(index))
    return indexes


def row_bytes(row: torch.Tensor) -> bytes:
    """A zero-padded byte row (the pipeline pads ragged byte strings to one length) unpadded."""
    return bytes(row.numpy()).rstrip(b"\0")


def source_key(source_info: str) -> tuple[str, str]:
    """(sample key, shard path) from the fc7 member's source_info.

    The first `:<digits>:` ends the path: shard paths are not expected to contain one, keys may.
    """
    match = SOURCE_INFO.search(source_info)
    if match is None or not match["member"].endswith(KEY_SUFFIX):
        raise ValueError(f"unexpected DALI source_info {source_info!r}; expected "
                         f"'<shard>:<offset>:<key>{KEY_SUFFIX}'")
    return match["member"][: -len(KEY_SUFFIX)], source_info[: match.start()]


# --- the pipeline ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """Everything one rank's pipeline of one split needs."""

    paths: tuple[str, ...]
    samples: int
    payload: str
    feature_dim: int
    batch_size: int
    train: bool
    seed: int = 0
    shuffle_buffer: int = 1000
    rank: int = 0
    world_size: int = 1
    num_threads: int = 2
    device_id: int | None = None  # None: CPU-only pipeline
    index_dir: str | None = None  # None: DALI infers each shard's index when the pipeline is built

    @property
    def name(self) -> str:
        return "wav" if self.payload == "audio" else "spec"

    @property
    def shape(self) -> tuple[int, ...]:
        return (schema.NUM_SAMPLES,) if self.payload == "audio" else schema.SPEC_SHAPE

    def num_batches(self) -> int:
        if self.train:
            return train_batches(self.samples, self.world_size, self.batch_size)
        return eval_batches(self.samples, self.rank, self.world_size, self.batch_size)


def _fixed(node, shape: tuple[int, ...], to_gpu: bool):
    """(node cut or zero-padded to `shape`, its decoded shape).

    The iterator can only stack equal shapes; fixing them here lets `check_batch` name a bad
    sample's key instead of the iterator failing on a ragged batch.
    """
    _, fn, *_ = _dali()
    decoded_shape = node.shape()
    node = node.gpu() if to_gpu else node
    return fn.slice(node, start=[0] * len(shape), shape=list(shape), axes=list(range(len(shape))),
                    out_of_bounds_policy="pad"), decoded_shape


def build_pipeline(r: Reading, epoch: int):
    """One rank's DALI pipeline for one epoch, and the names of its outputs."""
    dali, fn, types, *_ = _dali()
    seed = mixed_seed(r.seed, epoch, r.rank) % SEED_MODULUS
    paths = epoch_paths(list(r.paths), r.seed, epoch) if r.train else list(r.paths)
    pipe = dali.Pipeline(batch_size=r.batch_size, num_threads=r.num_threads, device_id=r.device_id,
                         seed=seed)
    indexes = index_files(paths, r.index_dir) if r.index_dir is not None else None
    with pipe:
        media, fc7, meta = fn.readers.webdataset(
            paths=paths, index_paths=indexes, ext=[schema.PAYLOADS[r.payload], schema.FC7, schema.META],
            name=READER, missing_component_behavior="error", shard_id=r.rank, num_shards=r.world_size,
            random_shuffle=r.train, initial_fill=max(1, r.shuffle_buffer))
        outputs = {"source": fn.get_property(fc7, key="source_info"), "meta": meta}
        if r.payload == "audio":
            media, outputs["rate"] = fn.decoders.audio(media, downmix=True)  # (N,), stored rate
        else:
            media = fn.decoders.numpy(media, dtype=types.FLOAT)  # (C, T, Q)
        to_gpu = r.device_id is not None
        outputs[r.name], outputs["media_shape"] = _fixed(media, r.shape, to_gpu)
        outputs["fc7"], outputs["fc7_shape"] = _fixed(
            fn.decoders.numpy(fc7, dtype=types.FLOAT), (r.feature_dim,), to_gpu)
        for name in ("source", "meta"):  # ragged bytes -> (B, L) zero-padded: the iterator stacks
            outputs[name] = fn.pad(outputs[name], fill_value=0)
        pipe.set_outputs(*outputs.values())
    return pipe, list(outputs)


def check_batch(out: dict, keys: list[str], shards: list[str], r: Reading) -> None:
    """Raise `schema.BadSample` for the first sample whose decoded shape or rate breaks the schema."""
    expected = {schema.PAYLOADS[r.payload]: ("media_shape", r.shape),
                schema.FC7: ("fc7_shape", (r.feature_dim,))}
    for i, key in enumerate(keys):
        shapes = {member: (tuple(out[name][i].tolist()), shape) for member, (name, shape) in expected.items()}
        problems = [f"{member} has shape {got}, expected {want}"
                    for member, (got, want) in shapes.items() if got != want]
        if "rate" in out and int(out["rate"][i]) != schema.SAMPLE_RATE:
            problems.append(f"{schema.WAV} is at {int(out['rate'][i])} Hz, expected {schema.SAMPLE_RATE}")
        if problems:
            raise schema.BadSample(key, f"{'; '.join(problems)} (shard {shards[i]}); the DALI loader "
                                        "stops at bad samples: rebuild the shard, or read it with "
                                        "ShardDataModule, which skips and counts them")


def to_batch(out: dict, r: Reading) -> dict:
    """A DALIGenericIterator output dict -> ShardDataModule's batch dict."""
    keys, shards = zip(*(source_key(row_bytes(row).decode()) for row in out["source"]))
    check_batch(out, list(keys), list(shards), r)
    return {r.name: out[r.name], "fc7": out["fc7"], "key": list(keys),
            "meta": [schema.decode_meta(key, row_bytes(row) or None)
                     for key, row in zip(keys, out["meta"])]}


class DaliLoader:
    """One rank's batches of one split; a fresh pipeline for each pass (see the module docstring)."""

    batch_sampler = None  # Lightning looks for one next to `sampler` before validating

    def __init__(self, reading: Reading):
        self.reading, self.epoch = reading, 0

    def __len__(self) -> int:
        return self.reading.num_batches()

    @property
    def sampler(self) -> "DaliLoader":
        # Lightning calls `loader.sampler.set_epoch(epoch)` before every fit epoch.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        # A generator: the epoch is settled at the first next(), after Lightning's set_epoch.
        *_, DALIGenericIterator, LastBatchPolicy = _dali()
        r = self.reading
        pipe, names = build_pipeline(r, self.epoch)
        policy = LastBatchPolicy.DROP if r.train else LastBatchPolicy.PARTIAL
        # reader_name: the iterator takes the epoch size and the rank split from the reader.
        batches = DALIGenericIterator(pipe, names, reader_name=READER, last_batch_policy=policy)
        for (out,) in batches:
            # Evaluation gives every rank as many batches as the largest share needs, so a
            # smaller share can end with an empty batch.
            if len(out["source"]):
                yield to_batch(out, r)
        self.epoch += 1  # outside Lightning, the next pass is the next epoch


def _local_rank(trainer: "pl.Trainer | None") -> int:
    return trainer.local_rank if trainer is not None else int(os.environ.get("LOCAL_RANK", 0))


class DaliShardDataModule(pl.LightningDataModule):
    """Train / val / test batches from local shard folders through DALI (see the module docstring).

    Args:
        root: a folder with train/val/test subfolders, each with `index.json` and its shards.
        batch_size: samples per batch on each rank.
        num_threads: DALI CPU threads per rank (reading and decoding).
        shuffle_buffer: samples in each rank's train shuffle buffer (DALI's `initial_fill`).
        seed: the seed of the shard permutations and shuffle buffers.
        payload: "audio" or "spectrogram"; default: the split index's payload.
        gpu: put the outputs on GPU `local_rank`; default: when CUDA is available.
        index_dir: a writable folder for DALI's shard index files, made on first use (see the
            module docstring); default: none, DALI scans the shards every epoch.
    """

    on_after_batch_transfer = ShardDataModule.on_after_batch_transfer  # the same spectrogram step

    def __init__(
        self, root: str, batch_size: int = 8, num_threads: int = 2, shuffle_buffer: int = 1000,
        seed: int = 0, payload: str | None = None, gpu: bool | None = None,
        index_dir: str | None = None,
    ):
        super().__init__()
        if batch_size < 1 or num_threads < 1:
            raise ValueError(f"DaliShardDataModule: need batch_size >= 1 and num_threads >= 1, got "
                             f"{batch_size}, {num_threads}")
        if payload is not None and payload not in schema.PAYLOADS:
            raise ValueError(f"payload must be one of {sorted(schema.PAYLOADS)} or None, got {payload!r}")
        self.save_hyperparameters()
        self.root, self.batch_size, self.num_threads = root, batch_size, num_threads
        self.shuffle_buffer, self.seed, self.payload, self.gpu = shuffle_buffer, seed, payload, gpu
        self.index_dir = index_dir

    def reading(self, split: str, train: bool) -> Reading:
        """What this rank's pipeline of `split` reads (rank and world size from the trainer)."""
        paths, counts, index = split_sources(self.root, split)
        if index is None:
            raise ValueError(f"{self.root}: DaliShardDataModule reads local split folders (DALI opens "
                             "files, not URL patterns); copy the shards locally or use ShardDataModule")
        rank, world = _rank_and_world(self.trainer)
        gpu = torch.cuda.is_available() if self.gpu is None else self.gpu
        reading = Reading(
            paths=tuple(paths), samples=sum(counts.values()), payload=self.payload or index.payload,
            feature_dim=index.feature_dim, batch_size=self.batch_size, train=train, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, rank=rank, world_size=world,
            num_threads=self.num_threads, device_id=_local_rank(self.trainer) if gpu else None,
            index_dir=self.index_dir)
        if train and reading.num_batches() == 0:
            raise ValueError(f"{split}: {reading.samples} samples are less than one batch on each of "
                             f"{world} ranks (batch_size {self.batch_size}); lower batch_size")
        return reading

    def train_dataloader(self) -> DaliLoader:
        return DaliLoader(self.reading("train", train=True))

    def val_dataloader(self) -> DaliLoader:
        return DaliLoader(self.reading("val", train=False))

    def test_dataloader(self) -> DaliLoader:
        return DaliLoader(self.reading("test", train=False))
