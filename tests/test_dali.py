"""DaliShardDataModule (CPU pipeline): the same samples, waveforms, features as ShardDataModule."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from datamodules.dali import (
    DaliLoader, DaliShardDataModule, eval_batches, rank_samples, source_key, train_batches,
)
from datamodules.shards import ShardDataModule
from shards import schema
from tests.shard_factory import make_shards, round_robin_assignment

pytest.importorskip("nvidia.dali", reason="install s2f[dali]")

SPEAKERS, CLIPS, DIM = 8, 4, 16  # round robin: 4 train speakers (16 clips), 2 val (8), 2 test (8)
PER_SHARD, BATCH = 3, 3  # shards of 3 and batches of 3 leave short shards and short batches


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("dali_audio"), speakers=SPEAKERS, clips_per_speaker=CLIPS,
                       feature_dim=DIM, samples_per_shard=PER_SHARD,
                       assignment=round_robin_assignment(SPEAKERS))


@pytest.fixture(scope="module")
def spec_root(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("dali_spec"), speakers=4, clips_per_speaker=2,
                       feature_dim=DIM, payload="spectrogram", samples_per_shard=PER_SHARD,
                       assignment=round_robin_assignment(4))


def dali(root: Path, **kwargs) -> DaliShardDataModule:
    return DaliShardDataModule(str(root), **(dict(batch_size=BATCH, shuffle_buffer=4, seed=7) | kwargs))


def by_key(batches, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
    """key -> (payload, fc7, meta) over all batches; fails on a key seen twice."""
    samples = {}
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            assert key not in samples, f"{key} appears twice"
            samples[key] = (batch[name][i], batch["fc7"][i], batch["meta"][i])
    return samples


def rank_loaders(dm: DaliShardDataModule, split: str, train: bool, world: int = 2) -> list[DaliLoader]:
    """The loaders of ranks 0..world-1, built in this one process."""
    reading = dm.reading(split, train=train)
    return [DaliLoader(replace(reading, rank=rank, world_size=world)) for rank in range(world)]


# --- pure functions ----------------------------------------------------------------------------


def test_batch_counts_follow_dalis_contiguous_split():
    assert [rank_samples(7, r, 2) for r in range(2)] == [3, 4]
    assert sum(rank_samples(13, r, 4) for r in range(4)) == 13
    assert train_batches(7, 2, 2) == 1  # the smaller share, 3 samples, has one full batch
    assert [eval_batches(7, r, 2, 2) for r in range(2)] == [2, 2]


def test_source_info_gives_key_and_shard():
    assert source_key("/data/val:1/shard-000000.tar:5632:synth/spk0002/c000.fc7.npy") == (
        "synth/spk0002/c000", "/data/val:1/shard-000000.tar")
    assert source_key("/d/shard-000001.tar:1024:synth/spk:1:/c1.fc7.npy") == (
        "synth/spk:1:/c1", "/d/shard-000001.tar")  # the first :<digits>: ends the path
    with pytest.raises(ValueError, match="source_info"):
        source_key("/d/shard-000001.tar:1024:synth/spk0002/c000.json")


def test_missing_dali_names_the_extra(audio_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    loader = dali(audio_root).val_dataloader()  # building needs no DALI: it is imported on use
    with pytest.raises(ImportError, match=r"pip install 's2f\[dali\]'"):
        next(iter(loader))


# --- batches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_batches_equal_shard_datamodules(audio_root, split):
    reference = ShardDataModule(str(audio_root), batch_size=BATCH, num_workers=0)
    expected = by_key(getattr(reference, f"{split}_dataloader")(), "wav")
    loader = getattr(dali(audio_root), f"{split}_dataloader")()
    batches = list(loader)
    got = by_key(batches, "wav")
    assert set(got) == set(expected) and len(got) == 8
    for key, (wav, fc7, meta) in got.items():
        assert torch.equal(wav, expected[key][0]), key  # FLAC is lossless: exact
        assert torch.equal(fc7, expected[key][1]), key
        assert meta == expected[key][2]
    assert len(batches) == len(loader) == math.ceil(8 / BATCH)
    assert [len(b["key"]) for b in batches] == [3, 3, 2]  # stored order, short last batch kept


def test_audio_batch_format_and_spectrogram(audio_root):
    dm = dali(audio_root)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"wav", "fc7", "key", "meta"}
    assert batch["wav"].shape == (BATCH, schema.NUM_SAMPLES) and batch["wav"].dtype == torch.float32
    assert batch["fc7"].shape == (BATCH, DIM) and batch["fc7"].dtype == torch.float32
    assert batch["meta"][0]["source"] == "synth" and batch["key"][0].startswith("synth/")
    batch = dm.on_after_batch_transfer(batch, 0)
    assert batch["spec"].shape == (BATCH, *schema.SPEC_SHAPE) and batch["spec"].dtype == torch.float32


def test_spectrogram_payload_equals_shard_datamodules(spec_root):
    expected = by_key(ShardDataModule(str(spec_root), batch_size=BATCH, num_workers=0).val_dataloader(),
                      "spec")
    got = by_key(dali(spec_root).val_dataloader(), "spec")
    assert set(got) == set(expected) and len(got) == 2
    for key, (spec, fc7, _) in got.items():
        assert spec.shape == schema.SPEC_SHAPE and spec.dtype == torch.float32
        assert torch.equal(spec, expected[key][0]) and torch.equal(fc7, expected[key][1])


@pytest.mark.parametrize("world", [2, 5])  # 16 samples: shares 8/8, and 3/3/3/3/4 (one batch vs two)
def test_eval_ranks_cover_every_sample_once(audio_root, world):
    loaders = rank_loaders(dali(audio_root), "train", train=False, world=world)
    batches = [list(loader) for loader in loaders]
    assert [len(b) for b in batches] == [len(loader) for loader in loaders]
    assert all(batch["key"] for rank in batches for batch in rank)  # no empty batch
    keys = [key for rank in batches for batch in rank for key in batch["key"]]
    reference = ShardDataModule(str(audio_root), num_workers=0)._loader("train", train=False)
    assert sorted(keys) == sorted(by_key(reference, "wav"))


@pytest.mark.parametrize("world", [2, 3])  # 16 samples: shares 8/8, and 5/5/6
def test_train_ranks_get_equal_batches_of_disjoint_shuffled_samples(audio_root, world):
    loaders = rank_loaders(dali(audio_root), "train", train=True, world=world)
    epochs = [[list(loader) for _ in range(2)] for loader in loaders]  # 2 epochs per rank
    expected = train_batches(16, world, BATCH)  # 16 // (world * 3): 2, then 1
    for loader, rank_epochs in zip(loaders, epochs):
        assert len(loader) == expected
        assert [len(epoch) for epoch in rank_epochs] == [expected, expected]
        assert all(len(batch["key"]) == BATCH for epoch in rank_epochs for batch in epoch)
    first = [{k for batch in rank_epochs[0] for k in batch["key"]} for rank_epochs in epochs]
    assert not first[0] & first[1]  # a rank's share is its own
    order = [[k for batch in epoch for k in batch["key"]] for epoch in epochs[0]]
    assert order[0] != order[1]  # a new shard permutation and shuffle each epoch


def test_train_order_is_reproducible_per_epoch(audio_root):
    def keys(epoch: int) -> list[str]:
        loader = dali(audio_root).train_dataloader()
        loader.set_epoch(epoch)
        return [k for batch in loader for k in batch["key"]]

    assert keys(3) == keys(3)


def test_index_files_are_made_once_and_give_the_same_batches(audio_root, tmp_path):
    plain = by_key(dali(audio_root).val_dataloader(), "wav")
    dm = dali(audio_root, index_dir=str(tmp_path / "index"))
    shards = [len(schema.SplitIndex.read(audio_root / split).shards) for split in ("val", "train")]
    indexed = by_key(dm.val_dataloader(), "wav")
    made = {path: path.stat().st_mtime_ns for path in (tmp_path / "index").glob("*.idx")}
    assert len(made) == shards[0]
    assert by_key(dm.val_dataloader(), "wav").keys() == indexed.keys() == plain.keys()
    assert all(torch.equal(indexed[key][0], plain[key][0]) for key in plain)
    assert {path: path.stat().st_mtime_ns for path in made} == made  # reused, not rewritten
    list(dm.train_dataloader())
    assert len(list((tmp_path / "index").glob("*.idx"))) == sum(shards)  # equal shard names apart


def test_wrong_feature_dim_names_the_sample(audio_root, tmp_path):
    index = schema.SplitIndex.read(audio_root / "val")
    folder = tmp_path / "val"
    folder.mkdir()
    for shard in index.shards:
        (folder / shard["name"]).symlink_to(audio_root / "val" / shard["name"])
    replace(index, feature_dim=DIM + 1).write(folder)
    with pytest.raises(schema.BadSample, match=r"synth/spk\d+/c\d+.*fc7.npy has shape \(16,\)"):
        next(iter(DaliShardDataModule(str(tmp_path), batch_size=BATCH).val_dataloader()))


class SpecToFeature(pl.LightningModule):
    """The smallest model that reads what a Speech2Face model reads: `spec` in, `fc7` out."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(schema.SPEC_SHAPE[0], DIM)
        self.seen: dict[str, list[int]] = {"train": [], "val": []}

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        self.seen[stage].append(self.current_epoch)
        pooled = batch["spec"].mean(dim=(2, 3))  # (B, C, T, Q) -> (B, C)
        return torch.nn.functional.mse_loss(self.head(pooled), batch["fc7"])

    def training_step(self, batch: dict, _: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, _: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_lightning_fit_runs_epochs_and_validation(audio_root):
    model = SpecToFeature()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dali(audio_root))
    per_epoch = train_batches(16, 1, BATCH)  # 5
    assert model.seen["train"] == [0] * per_epoch + [1] * per_epoch
    # The 2-batch sanity check stops validation mid-pass; each later pass still sees all 3 batches.
    assert model.seen["val"] == [0, 0] + [0] * 3 + [1] * 3
