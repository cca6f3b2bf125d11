"""ShardDataModule: batches, exact resume, DDP split, bad samples, the data benchmark."""

from __future__ import annotations

import itertools
import json
import logging
import random
import tarfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp

from datamodules.bench import bench_data, report
from datamodules.shards import (
    ShardDataModule, TooManyBadSamples, rank_share, shard_passes, worker_batches,
)
from shards import schema
from tests.shard_factory import make_shards, round_robin_assignment

SPEAKERS, CLIPS, DIM = 8, 4, 16  # round robin: 4 train speakers (16 clips), 2 val, 2 test
PER_SHARD, BATCH = 4, 2


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("audio"), speakers=SPEAKERS, clips_per_speaker=CLIPS,
                       feature_dim=DIM, samples_per_shard=PER_SHARD,
                       assignment=round_robin_assignment(SPEAKERS))


def split_keys(root: Path, split: str) -> list[str]:
    keys = []
    for shard in schema.SplitIndex.read(root / split).shards:
        with tarfile.open(root / split / shard["name"]) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


def module(root: Path, **kwargs) -> ShardDataModule:
    settings = dict(batch_size=BATCH, num_workers=0, shuffle_buffer=3, seed=7)
    return ShardDataModule(str(root), **(settings | kwargs))


def epoch_keys(loader, stop: int | None = None) -> list[str]:
    """Keys of the next `stop` batches (all: None); a batch once yielded counts as consumed."""
    return [key for batch in itertools.islice(loader, stop) for key in batch["key"]]


# --- pure functions ----------------------------------------------------------------------------


def test_round_robin_counts_and_rank_shares_cover_everything():
    assert [worker_batches(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert sum(rank_share(13, shard, r, 4) for r in range(4) for shard in [5]) == 13


def test_one_pass_of_shards_goes_to_exactly_one_slot():
    urls = [f"s{i}" for i in range(10)]
    first = [next(shard_passes(urls, seed=1, epoch=3, slot=slot, slots=4)) for slot in range(4)]
    assert sorted(sum(first, [])) == sorted(urls)
    other_epoch = next(shard_passes(urls, seed=1, epoch=4, slot=0, slots=4))
    assert first[0] != other_epoch or len(first[0]) < 2


# --- batches -----------------------------------------------------------------------------------


def test_audio_batches_get_their_spectrogram_after_transfer(audio_root):
    dm = module(audio_root)
    batch = next(iter(dm.train_dataloader()))
    assert batch["wav"].shape == (BATCH, schema.NUM_SAMPLES) and batch["wav"].dtype == torch.float32
    assert batch["fc7"].shape == (BATCH, DIM) and batch["fc7"].dtype == torch.float32
    assert len(batch["key"]) == BATCH and batch["meta"][0]["source"] == "synth"
    assert set(batch) == {"wav", "fc7", "key", "meta"}  # private fields stripped
    batch = dm.on_after_batch_transfer(batch, 0)
    assert batch["spec"].shape == (BATCH, *schema.SPEC_SHAPE)


def test_workers_can_make_the_spectrogram_instead(audio_root):
    on_device = module(audio_root)
    expected = on_device.on_after_batch_transfer(next(iter(on_device.train_dataloader())), 0)
    in_workers = module(audio_root, spectrogram_in_workers=True, num_workers=1)
    batch = next(iter(in_workers.train_dataloader()))
    assert batch["key"] == expected["key"]
    torch.testing.assert_close(batch["spec"], expected["spec"])  # float32 rounding: 1 thread vs 2
    assert in_workers.on_after_batch_transfer(batch, 0)["spec"] is batch["spec"]  # not made twice


def test_spectrogram_payload_comes_from_the_index(tmp_path):
    root = make_shards(tmp_path, speakers=4, clips_per_speaker=2, feature_dim=DIM, payload="spectrogram",
                       assignment=round_robin_assignment(4))
    batch = next(iter(module(root).train_dataloader()))
    assert batch["spec"].shape == (BATCH, *schema.SPEC_SHAPE) and "wav" not in batch


def test_train_epoch_is_disjoint_and_epochs_differ(audio_root):
    loader = module(audio_root, num_workers=2).train_dataloader()
    assert len(loader) == 16 // BATCH
    first, second = epoch_keys(loader), epoch_keys(loader)
    assert sorted(first) == sorted(second) == sorted(split_keys(audio_root, "train"))
    assert first != second


def test_val_is_ordered_and_complete(audio_root):
    loader = module(audio_root, num_workers=0).val_dataloader()
    assert epoch_keys(loader) == epoch_keys(loader) == split_keys(audio_root, "val")


# --- exact resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_replays_exactly(audio_root, workers):
    full = module(audio_root, num_workers=workers).train_dataloader()
    expected = epoch_keys(full) + epoch_keys(full)
    batches = len(full)
    rng = random.Random(workers)
    stops = [rng.randrange(1, batches), rng.randrange(1, batches)]

    loader = module(audio_root, num_workers=workers).train_dataloader()
    seen = epoch_keys(loader, stop=stops[0])
    for stop in (None, stops[1], None):  # rest of epoch 0; part of epoch 1; rest of epoch 1
        state = loader.state_dict()
        loader = module(audio_root, num_workers=workers).train_dataloader()
        loader.load_state_dict(state)
        seen += epoch_keys(loader, stop=stop)
    assert seen == expected


def test_resume_refuses_changed_settings(audio_root):
    state = module(audio_root).train_dataloader().state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        module(audio_root, num_workers=2).train_dataloader().load_state_dict(state)


class Killed(Exception):
    pass


class KeyRecorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(DIM, 1)
        self.keys: list[str] = []

    def training_step(self, batch, batch_idx):
        assert batch["spec"].shape[1:] == schema.SPEC_SHAPE
        self.keys += batch["key"]
        return self.layer(batch["fc7"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SaveAndDie(pl.Callback):
    """Checkpoint, then crash: mid-epoch after `step` optimizer steps, or at the end of epoch 0."""

    def __init__(self, path: Path, step: int | None):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self._die(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.step is None:
            self._die(trainer)

    def _die(self, trainer):
        trainer.save_checkpoint(self.path)
        raise Killed


def fit(root: Path, callbacks=(), ckpt: Path | None = None) -> KeyRecorder:
    model = KeyRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, callbacks=list(callbacks),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=module(root), ckpt_path=ckpt)
    return model


@pytest.mark.parametrize("step", [3, None], ids=["mid-epoch", "epoch-end"])
def test_lightning_checkpoint_resume_replays_exactly(audio_root, tmp_path, step):
    expected = fit(audio_root).keys
    ckpt = tmp_path / "killed.ckpt"
    first = KeyRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False,
                         callbacks=[SaveAndDie(ckpt, step)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(Killed):
        trainer.fit(first, datamodule=module(audio_root))
    assert first.keys + fit(audio_root, ckpt=ckpt).keys == expected


# --- DDP ---------------------------------------------------------------------------------------


def _ddp_rank(rank: int, world: int, root: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}.rendezvous",
                                         rank=rank, world_size=world)
    try:
        dm = ShardDataModule(root, batch_size=BATCH, num_workers=1, shuffle_buffer=3, seed=7)
        train = dm.train_dataloader()
        result = {"batches": len(train), "train": [], "val": epoch_keys(dm.val_dataloader())}
        for batch in train:
            result["train"].append(batch["key"])
        Path(f"{out}.{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ddp_ranks_split_train_and_val(audio_root, tmp_path):
    out = str(tmp_path / "rank")
    # fork: the ranks inherit the imports, where spawn would re-import torch and Lightning.
    mp.start_processes(_ddp_rank, args=(2, str(audio_root), out), nprocs=2, join=True, start_method="fork")
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == len(ranks[0]["train"]) == len(ranks[1]["train"])
    train = [set(sum(r["train"], [])) for r in ranks]
    assert not train[0] & train[1]
    assert train[0] | train[1] == set(split_keys(audio_root, "train"))
    val = ranks[0]["val"] + ranks[1]["val"]
    assert sorted(val) == sorted(split_keys(audio_root, "val"))


# --- bad samples -------------------------------------------------------------------------------


def corrupt(root: Path) -> tuple[Path, Path]:
    """Flip bytes inside one FLAC member of shard 0; cut shard 2 in half. Returns both shards."""
    flipped, cut = root / "train" / "shard-000000.tar", root / "train" / "shard-000002.tar"
    with tarfile.open(flipped) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(schema.WAV))
    data = bytearray(flipped.read_bytes())
    start = member.offset_data + 100
    data[start:start + 2000] = bytes(b ^ 0xFF for b in data[start:start + 2000])
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return flipped, cut


def test_bad_samples_are_counted_logged_and_skipped(tmp_path, caplog):
    root = make_shards(tmp_path, speakers=SPEAKERS, clips_per_speaker=CLIPS, feature_dim=DIM,
                       samples_per_shard=PER_SHARD, assignment=round_robin_assignment(SPEAKERS))
    flipped, cut = corrupt(root)
    loader = module(root, max_bad_fraction=1.0).train_dataloader()
    with caplog.at_level(logging.WARNING, logger="datamodules.shards"):
        keys = epoch_keys(loader)
    assert len(keys) == len(loader) * BATCH  # the epoch is still full: the readers read on
    bad = {shard: counts[1] for shard, counts in loader.ledger.counts.items() if counts[1]}
    assert set(bad) == {str(flipped), str(cut)} and bad[str(cut)] >= 2
    assert str(flipped) in caplog.text and str(cut) in caplog.text

    strict = module(root, max_bad_fraction=0.01).train_dataloader()
    with pytest.raises(TooManyBadSamples, match="shard-000002.tar") as error:
        epoch_keys(strict)
    assert "shard-000000.tar" in str(error.value)


# --- benchmark ---------------------------------------------------------------------------------


def test_bench_reports_both_payloads(tmp_path):
    figures = bench_data(str(tmp_path), samples=8, workers=2, batch_size=4, feature_dim=DIM)
    for payload in ("audio", "spectrogram"):
        assert figures[payload]["bytes_per_sample"] > 0 and figures[payload]["samples_per_s"] > 0
        assert figures[payload]["loader_samples_per_s"] > 0
    assert figures["audio"]["workers_spec_samples_per_s"] > 0
    assert figures["audio"]["decode_ms"] > 0 and figures["audio"]["spectrogram_ms"] > 0
    assert figures["size_ratio"] > 1
    assert "samples/s" in report(figures) and "FLAC decode" in report(figures)
