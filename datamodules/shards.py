"""WebDataset shards -> batches, with an exactly resumable training stream.

Batches are dicts: `"wav"` (B, 96000) float32 for the audio payload or `"spec"` (B, 2, 598, 257)
float32 for the spectrogram payload, plus `"fc7"` (B, D) float32, `"key"` list[str] and `"meta"`
list[dict]. For the audio payload `on_after_batch_transfer` adds `"spec"`, computed on the
device the batch was moved to (with `spectrogram_in_workers` the workers add it instead); `"wav"`
stays in the batch for callbacks that play audio, and models read only `"spec"`.

Training order. Each epoch the shard list is permuted with a generator seeded by (seed, epoch,
cycle) and the permutations are concatenated into an endless sequence; reader slot
`rank * num_workers + worker` takes every (world_size * num_workers)-th shard of it, so within one
pass over the shards every sample goes to exactly one reader. Each reader shuffles the raw samples
of each pass in a buffer seeded by (seed, epoch, pass, rank, worker, num_workers) and flushed at the
end of the pass (so a pass is used up before the next begins), decodes them and makes batches inside
its DataLoader worker, and stops after its share of `epoch_samples // (world_size * batch_size)`
batches (the equivalent of WebDataset's `.with_epoch()`), so every rank yields the same number of
batches and DDP never waits on a rank that ran dry. A reader that needs more samples than one pass
gives it (uneven shards, skipped bad samples, fewer shards than readers) continues into the next
permutation, so a few samples can repeat within an epoch rather than a rank running short.

Exact resume. The DataLoader yields batch i from worker i % num_workers (torch's in-order round
robin). `ShardLoader` records the epoch, the batches consumed and, per worker, how many raw
samples it had drawn from its shuffle buffer; `state_dict()` / `load_state_dict()` are what
Lightning's fit loop saves in checkpoints and restores before a mid-epoch restart. On restore the
workers are renumbered so batch k still comes from the worker that would have made it, and each
worker replays its shard stream and shuffle buffer but discards the raw samples it had already
used without decoding them. Lightning calls `loader.sampler.set_epoch(epoch)` before every fit
epoch, including after a restore from an end-of-epoch checkpoint (whose loader state it does not
reload), and outside Lightning every new `iter()` after a finished epoch starts the next one.

Evaluation order. Worker w of every rank reads shards w, w + num_workers, ... of the split in
order, and sample j of shard s belongs to rank (s + j) % world_size: every sample is seen exactly
once across ranks, ranks differ by at most one sample per shard (so possibly by a batch), the last
batch of each worker may be short, and every rank reads all the bytes of the split (evaluation
splits are small; the others' members are skipped without decoding).

Bad samples (undecodable or invalid members, a missing member, a truncated or corrupt tar) are
logged with their key and shard at WARNING and skipped. Workers count them per shard and send the
counts inside the batches; the loader strips them and keeps the totals in the main process, and
raises `TooManyBadSamples` naming the worst shards once more than `max_bad_fraction` of the
samples seen failed (checked after `MIN_SAMPLES_CHECKED` samples and at the end of every epoch).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from s2f.audio import spectrogram
from shards import schema

log = logging.getLogger(__name__)

MIN_SAMPLES_CHECKED = 100  # samples seen before the bad-sample fraction is enforced mid-epoch
WORST_SHARDS_NAMED = 5  # shards listed when a run stops for bad samples
SPLIT_PLACEHOLDER = "{split}"  # in a URL pattern, replaced by train / val / test
POSITION, HEALTH = "__position__", "__health__"  # private batch fields, stripped by ShardLoader


class TooManyBadSamples(RuntimeError):
    """More than the allowed fraction of samples failed to decode or validate."""


# --- pure functions ----------------------------------------------------------------------------


def mixed_seed(*parts: object) -> int:
    """A 64-bit seed from any tuple of values, identical in every process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def worker_batches(total: int, worker: int, workers: int) -> int:
    """How many of batches 0..total-1 fall to `worker` under round robin (batch i -> i % workers)."""
    return max(0, -(-(total - worker) // workers))


def shard_passes(urls: list[str], seed: int, epoch: int, slot: int, slots: int) -> Iterator[list[str]]:
    """Endless passes of one reader slot: its share (every `slots`-th entry) of per-pass permutations.

    The permutations are concatenated before slicing, so with fewer shards than slots every slot
    still gets shards (in some passes only).
    """
    if not urls:
        raise ValueError("shard_passes: the split has no shards; build shards or fix the pattern")
    position = 0
    for cycle in itertools.count():
        order = list(urls)
        random.Random(mixed_seed(seed, epoch, cycle)).shuffle(order)
        mine = [url for i, url in enumerate(order, start=position) if i % slots == slot]
        position += len(order)
        yield mine


def rank_share(samples: int, shard: int, rank: int, world_size: int) -> int:
    """Samples j in 0..samples-1 of shard `shard` with (shard + j) % world_size == rank."""
    return worker_batches(samples, (rank - shard) % world_size, world_size)


def split_sources(root: str, split: str) -> tuple[list[str], dict[str, int] | None, schema.SplitIndex | None]:
    """Shard URLs of a split, their sample counts and the split index (None for URL patterns)."""
    folder = Path(root) / split
    if SPLIT_PLACEHOLDER not in root and folder.is_dir():
        index = schema.SplitIndex.read(folder)
        counts = {str(folder / shard["name"]): int(shard["samples"]) for shard in index.shards}
        return list(counts), counts, index
    if SPLIT_PLACEHOLDER not in root:
        raise FileNotFoundError(
            f"{folder}: no such split folder; give a folder with train/val/test subfolders or a "
            f"shard URL pattern containing {SPLIT_PLACEHOLDER}, e.g. "
            "'pipe:aws s3 cp s3://b/{split}/shard-{000000..000127}.tar -'")
    return wds.shardlists.expand_urls(root.replace(SPLIT_PLACEHOLDER, split)), None, None


def decode_sample(raw: dict, member: str, feature_dim: int | None) -> dict:
    """Decode and validate one raw sample; raises `schema.BadSample`."""
    key = raw["__key__"]
    for needed in (member, schema.FC7):
        if needed not in raw:
            raise schema.BadSample(key, f"missing member {needed}")
    decode = schema.decode_wave if member == schema.WAV else schema.decode_spec
    return {
        "x": decode(key, raw[member]),
        "fc7": schema.decode_fc7(key, raw[schema.FC7], feature_dim),
        "key": key,
        "meta": schema.decode_meta(key, raw.get(schema.META)),
    }


def collate(samples: list[dict], payload: str) -> dict:
    name = "wav" if payload == "audio" else "spec"
    return {
        name: torch.from_numpy(np.stack([s["x"] for s in samples])),  # (B, N) or (B, C, T, Q)
        "fc7": torch.from_numpy(np.stack([s["fc7"] for s in samples])),  # (B, D)
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


# --- worker side -------------------------------------------------------------------------------


class Tally:
    """Per-shard (seen, bad) counts of one worker since the last batch it sent."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.active = True  # off while a resumed worker fast-forwards over samples already counted

    def record(self, shard: str, seen: int, bad: int) -> None:
        if self.active:
            entry = self.counts.setdefault(shard, [0, 0])
            entry[0] += seen
            entry[1] += bad

    def take(self) -> dict[str, list[int]]:
        counts, self.counts = self.counts, {}
        return counts


def read_shard(url: str, expected: int | None, tally: Tally) -> Iterator[dict]:
    """Raw samples (member bytes) of one shard; read errors are logged and counted, never raised.

    A shard that ends early (truncated, corrupt header) loses the samples its index promised, and
    those are counted as bad; without an index a shard with a read error counts as one.
    """
    errors: list[str] = []

    def handler(error: Exception) -> bool:
        errors.append(str(error))
        log.warning("shard %s: read error, skipping the rest of the damaged part: %s", url, error)
        return True

    streams = wds.tariterators.url_opener([{"url": url}], handler=handler)
    members = wds.tariterators.tar_file_expander(streams, handler=handler)
    yielded = 0
    for raw in wds.tariterators.group_by_keys(members, handler=handler):
        yielded += 1
        yield raw
    lost = max(0, expected - yielded) if expected is not None else int(bool(errors))
    if lost:
        log.warning("shard %s: %d sample(s) lost (read %d of %s): %s",
                    url, lost, yielded, expected if expected is not None else "?", "; ".join(errors[:3]))
        tally.record(url, lost, lost)


@dataclass
class Plan:
    """Where a train epoch starts: epoch, batches already consumed, raw samples used per worker."""

    epoch: int = 0
    start_batch: int = 0
    skip: dict[int, int] = field(default_factory=dict)


class ShardStream(IterableDataset):
    """Batches of one split, made inside DataLoader workers (use with `batch_size=None`)."""

    def __init__(
        self, urls: list[str], payload: str, batch_size: int, *, train: bool,
        counts: dict[str, int] | None = None, feature_dim: int | None = None,
        shuffle_buffer: int = 1000, seed: int = 0, rank: int = 0, world_size: int = 1,
        epoch_batches: int = 0, spectrogram_in_workers: bool = False,
    ):
        if payload not in schema.PAYLOADS:
            raise ValueError(f"payload must be one of {sorted(schema.PAYLOADS)}, got {payload!r}")
        self.urls, self.payload, self.batch_size, self.train = list(urls), payload, batch_size, train
        self.counts, self.feature_dim = counts, feature_dim
        self.shuffle_buffer, self.seed = max(1, shuffle_buffer), seed
        self.rank, self.world_size, self.epoch_batches = rank, world_size, epoch_batches
        self.spectrogram_in_workers = spectrogram_in_workers and payload == "audio"
        self.plan = Plan()

    def num_batches(self, workers: int) -> int:
        """Batches this rank yields per pass with `workers` readers (train: exact; eval: at most)."""
        if self.train:
            return self.epoch_batches
        if self.counts is None:
            raise TypeError("the number of evaluation batches is unknown for URL patterns")
        return sum(self._eval_batches_of(w, workers) for w in range(workers))

    def _eval_batches_of(self, worker: int, workers: int) -> int:
        samples = sum(rank_share(self.counts[url], s, self.rank, self.world_size)
                      for s, url in enumerate(self.urls) if s % workers == worker)
        return -(-samples // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._train(worker, workers) if self.train else self._eval(worker, workers)

    def _expected(self, url: str) -> int | None:
        return None if self.counts is None else self.counts.get(url)

    def _decoded(self, raws: Iterable[tuple[int, dict]], tally: Tally) -> Iterator[tuple[int, dict]]:
        """(raw samples drawn so far, decoded sample) for every sample that decodes."""
        member, failures = schema.PAYLOADS[self.payload], 0
        for drawn, raw in raws:
            url = raw.get("__url__", "?")
            try:
                sample = decode_sample(raw, member, self.feature_dim)
            except schema.BadSample as error:
                log.warning("skipping bad sample %s in shard %s: %s", error.key, url, error.reason)
                tally.record(url, 1, 1)
                failures += 1
                if failures >= MIN_SAMPLES_CHECKED:  # no batch to carry the counts: stop here
                    raise TooManyBadSamples(f"{failures} samples in a row failed to decode, the "
                                            f"last in shard {url}; rebuild or remove the shards")
                continue
            failures = 0
            tally.record(url, 1, 0)
            yield drawn, sample

    def _batches(self, decoded: Iterator[tuple[int, dict]], tally: Tally, limit: int | None) -> Iterator[dict]:
        for _ in itertools.count() if limit is None else range(limit):
            chunk = list(itertools.islice(decoded, self.batch_size))
            if not chunk:
                return
            batch = collate([sample for _, sample in chunk], self.payload)
            if self.spectrogram_in_workers:
                batch["spec"] = spectrogram(batch["wav"])  # (B, N) -> (B, 2, T, Q)
            batch[POSITION], batch[HEALTH] = chunk[-1][0], tally.take()
            yield batch

    def _train(self, physical: int, workers: int) -> Iterator[dict]:
        plan = self.plan
        worker = (physical + plan.start_batch) % workers  # keeps batch k on the worker that made it
        todo = (worker_batches(self.epoch_batches, worker, workers)
                - worker_batches(plan.start_batch, worker, workers))
        tally = Tally()
        drawn = enumerate(self._shuffled_passes(worker, workers, tally), start=1)
        tally.active = False
        for _ in itertools.islice(drawn, plan.skip.get(worker, 0)):  # replay without decoding
            pass
        tally.active = True
        yield from self._batches(self._decoded(drawn, tally), tally, max(0, todo))

    def _shuffled_passes(self, worker: int, workers: int, tally: Tally) -> Iterator[dict]:
        """Raw samples of one reader, shuffled within each pass so a pass ends before the next."""
        epoch, empty = self.plan.epoch, 0
        passes = shard_passes(self.urls, self.seed, epoch, self.rank * workers + worker,
                              self.world_size * workers)
        for number, shards in enumerate(passes):
            raws = itertools.chain.from_iterable(read_shard(u, self._expected(u), tally) for u in shards)
            seed = mixed_seed(self.seed, epoch, number, self.rank, worker, workers)
            yielded = 0
            for raw in wds.filters._shuffle(raws, bufsize=self.shuffle_buffer,
                                            initial=self.shuffle_buffer, seed=seed):
                yielded += 1
                yield raw
            empty = 0 if yielded else empty + len(shards)
            if empty > len(self.urls):
                raise TooManyBadSamples(
                    f"reader {worker} of rank {self.rank} read {empty} shards in a row without a "
                    f"single sample (last: {shards}); check the shard URLs and files")

    def _eval(self, worker: int, workers: int) -> Iterator[dict]:
        tally = Tally()

        def mine() -> Iterator[tuple[int, dict]]:
            for s in range(worker, len(self.urls), workers):
                url = self.urls[s]
                for j, raw in enumerate(read_shard(url, self._expected(url), tally)):
                    if (s + j) % self.world_size == self.rank:
                        yield j, raw

        yield from self._batches(self._decoded(mine(), tally), tally, None)


# --- main process ------------------------------------------------------------------------------


class BadSampleLedger:
    """Per-shard (seen, bad) totals in the main process, and the stop rule."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}

    def add(self, counts: dict[str, list[int]]) -> None:
        for shard, (seen, bad) in counts.items():
            entry = self.counts.setdefault(shard, [0, 0])
            entry[0] += int(seen)
            entry[1] += int(bad)

    def totals(self) -> tuple[int, int]:
        return sum(c[0] for c in self.counts.values()), sum(c[1] for c in self.counts.values())

    def check(self, max_fraction: float, min_seen: int) -> None:
        seen, bad = self.totals()
        if seen >= max(min_seen, 1) and bad > max_fraction * seen:
            worst = sorted(self.counts.items(), key=lambda item: -item[1][1])[:WORST_SHARDS_NAMED]
            named = ", ".join(f"{shard} ({b} of {s} bad)" for shard, (s, b) in worst if b)
            raise TooManyBadSamples(
                f"{bad} of {seen} samples failed to decode or validate (more than "
                f"{max_fraction:.2%}); worst shards: {named}. Rebuild or remove these shards, or "
                "raise max_bad_fraction")


class ShardLoader:
    """Iterates a `ShardStream` through a DataLoader; resumable, and keeps bad-sample totals.

    Lightning sees a stateful loader (`state_dict` / `load_state_dict`) with a length, so its
    fit loop neither prefetches (the recorded position is exactly the batches trained on) nor
    warns about resuming mid-epoch.
    """

    batch_sampler = None  # batches are made in the workers; Lightning's shuffle check reads this

    def __init__(self, stream: ShardStream, num_workers: int = 2, max_bad_fraction: float = 0.01):
        self.stream, self.num_workers, self.max_bad_fraction = stream, num_workers, max_bad_fraction
        self.ledger = BadSampleLedger()
        self.epoch, self.consumed, self.positions = 0, 0, {}

    def __len__(self) -> int:
        return self.stream.num_batches(max(1, self.num_workers))

    @property
    def sampler(self) -> "ShardLoader":
        # Lightning calls `loader.sampler.set_epoch(epoch)` before every fit epoch.
        return self

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed, self.positions = epoch, 0, {}

    def _fingerprint(self) -> dict:
        s = self.stream
        return {"seed": s.seed, "batch_size": s.batch_size, "num_workers": self.num_workers,
                "world_size": s.world_size, "epoch_batches": s.epoch_batches,
                "shuffle_buffer": s.shuffle_buffer, "shards": mixed_seed(*s.urls)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "positions": dict(self.positions),
                "bad_samples": {k: list(v) for k, v in self.ledger.counts.items()},
                "config": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._fingerprint()
        changed = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if changed:
            raise ValueError(
                f"cannot resume the train stream exactly: settings changed since the checkpoint "
                f"(saved, now): {changed}; resume with the same data settings and world size")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.positions = {int(k): int(v) for k, v in state["positions"].items()}
        self.ledger.counts = {k: list(v) for k, v in state["bad_samples"].items()}

    def __iter__(self) -> Iterator[dict]:
        # A generator: the epoch is settled at the first next(), after Lightning's set_epoch.
        if not self.stream.train:
            self.consumed, self.positions = 0, {}
        elif self.consumed >= len(self):
            self.epoch, self.consumed, self.positions = self.epoch + 1, 0, {}
        self.stream.plan = Plan(self.epoch, self.consumed, dict(self.positions))
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available())
        workers = max(1, self.num_workers)
        for batch in loader:
            self.positions[self.consumed % workers] = int(batch.pop(POSITION))
            self.ledger.add(batch.pop(HEALTH))
            self.ledger.check(self.max_bad_fraction, MIN_SAMPLES_CHECKED)
            self.consumed += 1
            yield batch
        self.ledger.check(self.max_bad_fraction, 1)


def _rank_and_world(trainer: "pl.Trainer | None") -> tuple[int, int]:
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(pl.LightningDataModule):
    """Train / val / test batches from WebDataset shards (see the module docstring).

    Args:
        root: a folder with train/val/test subfolders (each with `index.json`), or a shard URL
            pattern with `{split}`, brace expansion and `pipe:` commands, e.g.
            `pipe:aws s3 cp s3://b/{split}/shard-{000000..000127}.tar -`.
        batch_size: samples per batch on each rank.
        num_workers: DataLoader worker processes per rank (0: read in the main process).
        shuffle_buffer: raw samples held by each reader's shuffle buffer.
        seed: the seed of every shard permutation and shuffle buffer.
        max_bad_fraction: stop when more than this fraction of the samples seen failed.
        epoch_samples: train samples per epoch across all ranks; default the train index's count
            (required for URL patterns).
        payload: "audio" or "spectrogram"; default: the split index's payload ("audio" for URL
            patterns).
        spectrogram_in_workers: for the audio payload, compute the spectrogram in the DataLoader
            workers instead of on the device in `on_after_batch_transfer`. For CPU training, where
            it spreads the STFT over the workers; on a GPU leave it off (the device is faster and
            the batches it receives are 4.6x smaller).
    """

    def __init__(
        self, root: str, batch_size: int = 8, num_workers: int = 2, shuffle_buffer: int = 1000,
        seed: int = 0, max_bad_fraction: float = 0.01, epoch_samples: int | None = None,
        payload: str | None = None, spectrogram_in_workers: bool = False,
    ):
        super().__init__()
        if batch_size < 1 or num_workers < 0 or not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError("ShardDataModule: need batch_size >= 1, num_workers >= 0 and "
                             f"0 <= max_bad_fraction <= 1, got {batch_size}, {num_workers}, {max_bad_fraction}")
        if payload is not None and payload not in schema.PAYLOADS:
            raise ValueError(f"payload must be one of {sorted(schema.PAYLOADS)} or None, got {payload!r}")
        self.save_hyperparameters()
        self.root, self.batch_size, self.num_workers = root, batch_size, num_workers
        self.shuffle_buffer, self.seed, self.max_bad_fraction = shuffle_buffer, seed, max_bad_fraction
        self.epoch_samples, self.payload = epoch_samples, payload
        self.spectrogram_in_workers = spectrogram_in_workers

    def _stream(self, split: str, train: bool) -> ShardStream:
        urls, counts, index = split_sources(self.root, split)
        if not urls:
            raise ValueError(f"{self.root}: split {split!r} has no shards; build it or fix the pattern")
        payload = self.payload or (index.payload if index is not None else "audio")
        rank, world = _rank_and_world(self.trainer)
        batches = 0
        if train:
            samples = self.epoch_samples or (index.num_samples if index is not None else None)
            if samples is None:
                raise ValueError("ShardDataModule: give epoch_samples when root is a URL pattern")
            batches = samples // (world * self.batch_size)
            if batches == 0:
                raise ValueError(f"epoch_samples={samples} is less than one batch on each of "
                                 f"{world} ranks (batch_size {self.batch_size}); lower batch_size")
            if len(urls) < world * max(1, self.num_workers):
                log.warning("%d train shards for %d readers: samples repeat within an epoch; "
                            "build more, smaller shards", len(urls), world * max(1, self.num_workers))
        return ShardStream(urls, payload, self.batch_size, train=train, counts=counts,
                           feature_dim=index.feature_dim if index is not None else None,
                           shuffle_buffer=self.shuffle_buffer, seed=self.seed, rank=rank,
                           world_size=world, epoch_batches=batches,
                           spectrogram_in_workers=self.spectrogram_in_workers)

    def _loader(self, split: str, train: bool) -> ShardLoader:
        return ShardLoader(self._stream(split, train), self.num_workers, self.max_bad_fraction)

    def train_dataloader(self) -> ShardLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> ShardLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> ShardLoader:
        return self._loader("test", train=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "wav" in batch and "spec" not in batch:
            batch["spec"] = spectrogram(batch["wav"])  # (B, N) -> (B, 2, T, Q) on the batch's device
        return batch
