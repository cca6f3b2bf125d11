"""Decoder training from face shards: landmark pass, batches, losses, preview, checkpoint."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger

from datamodules.bench import write_split
from datamodules.faces import (
    LANDMARK_READER,
    LANDMARKS_FILE,
    FaceSample,
    FaceShardDataModule,
    landmark_pass,
    target_face,
)
from s2f.decoder_training import PREVIEW_DIR, FaceDecoderModule, load_decoder
from s2f.demo.render import ClipVariation, FaceAppearance, render_face
from s2f.faces import align_face, detect_faces
from s2f.teacher import DlibTeacher
from shards import schema

IDENTITIES, FACES_PER_IDENTITY = 10, 4
VAL_IDENTITIES = 2  # the last ones
TINY_SIZE = 32  # the tiny preset's output side
# Rendering, aligning and describing the 40 faces takes 15-45 s on 2 CPU cores.
pytestmark = pytest.mark.slow


def _appearance(identity: int) -> FaceAppearance:
    rng = np.random.default_rng(identity)
    return FaceAppearance(
        face_width=rng.uniform(0.2, 0.8), jaw_width=rng.uniform(0.2, 0.8),
        nose_width=rng.uniform(0.1, 0.9), skin_tone=rng.uniform(0, 1),
        hair_style=int(rng.integers(0, 5)),
    )  # fmt: skip


def _crop(identity: int, clip: int) -> np.ndarray:
    variation = ClipVariation(yaw_deg=4.0 * (clip - 1.5), light_azimuth_deg=10.0 * clip,
                              background=(0.3 + 0.1 * clip, 0.5, 0.6))  # fmt: skip
    frame = render_face(_appearance(identity), variation)
    return align_face(frame, detect_faces(frame)[0])  # (224, 224, 3)


def _jpeg(crop: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_face_shards(
    root, identities: int = IDENTITIES, faces: int = FACES_PER_IDENTITY, val: int = VAL_IDENTITIES
):
    """A tiny world of rendered faces as shards: face.jpg, dlib fc7, json, a silent 6-s wav.
    The last `val` identities form the val split (and, copied, the test split)."""
    teacher = DlibTeacher.load()
    by_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for identity in range(identities):
        split = "val" if identity >= identities - val else "train"
        crops = np.stack([_crop(identity, clip) for clip in range(faces)])  # (F, 224, 224, 3)
        for clip, (crop, fc7) in enumerate(zip(crops, teacher.features(crops))):
            speaker = f"id{identity:03d}"
            by_split[split].append({
                "key": schema.sample_key("faces", speaker, f"clip{clip}"), "fc7": fc7,
                "meta": {"speaker": speaker, **_appearance(identity).__dict__},
                "face_jpg": _jpeg(crop), "wave": np.zeros(schema.NUM_SAMPLES, np.float32),
            })  # fmt: skip
    by_split["test"] = by_split["val"]
    for split, samples in by_split.items():
        write_split(root / split, split, samples, "audio", 128, samples_per_shard=16)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_face_shards(tmp_path_factory.mktemp("faces"))


def _datamodule(root, batch_size: int = 8) -> FaceShardDataModule:
    return FaceShardDataModule(str(root), batch_size=batch_size, num_workers=0,
                               image_size=TINY_SIZE, seed=0, shuffle_buffer=32)  # fmt: skip


class LossTrace(Callback):
    """The texture L1 of every training step (the landmark term starts near its floor: the
    decoder starts at the data's mean geometry)."""

    def __init__(self):
        self.texture: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.texture.append(float(trainer.callback_metrics["train/texture_l1"]))


@torch.no_grad()
def _val_texture(module: FaceDecoderModule, data: FaceShardDataModule) -> float:
    """Mean texture L1 of the module over the validation split."""
    module.eval()
    losses = [module.terms(batch, module(batch["fc7"]))["texture_l1"] for batch in data.val_dataloader()]
    module.train()
    return float(torch.stack(losses).mean())


def test_landmark_pass_writes_normalised_landmarks_and_mean(shards):
    paths = landmark_pass(shards)
    with np.load(paths["train"]) as table:
        keys, points, mean = table["keys"], table["landmarks"], table["mean"]
        missed = len(table["no_face"])
    assert len(keys) + missed == (IDENTITIES - VAL_IDENTITIES) * FACES_PER_IDENTITY
    assert points.shape == (len(keys), 68, 2) and mean.shape == (68, 2)
    assert np.abs(points).max() < 1.0  # the whole face lies inside the crop
    np.testing.assert_allclose(mean, points.mean(axis=0), rtol=1e-6)
    assert mean[36:42, 0].mean() < mean[42:48, 0].mean()  # image-left eye on the left
    assert (shards / "val" / LANDMARKS_FILE).is_file()
    stamp = paths["train"].stat().st_mtime_ns
    landmark_pass(shards)  # up to date: not redone
    assert paths["train"].stat().st_mtime_ns == stamp
    with np.load(paths["train"]) as table:
        unstamped = {name: table[name] for name in table.files if name != "reader"}
    np.savez(paths["train"], **unstamped)  # read by another landmark reader: redone
    landmark_pass(shards)
    with np.load(paths["train"]) as table:
        assert str(table["reader"]) == LANDMARK_READER


def test_batches_hold_targets_in_the_mean_geometry(shards):
    data = _datamodule(shards)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == batch["texture"].shape == (8, 3, TINY_SIZE, TINY_SIZE)
    assert batch["landmarks"].shape == (8, 68, 2) and batch["fc7"].shape == (8, 128)
    assert 0 <= batch["texture"].min() and batch["texture"].max() <= 1
    assert data.mean_landmarks.shape == (68, 2)
    val = list(data.val_dataloader())
    assert sum(len(b["key"]) for b in val) <= VAL_IDENTITIES * FACES_PER_IDENTITY


def test_the_target_face_is_the_portrait_when_the_sample_has_one():
    posed, portrait = _crop(0, 0), _crop(1, 3)  # (224, 224, 3) each, of different people
    raw = {"__key__": "faces/id000/clip0", schema.FACE: _jpeg(posed),
           schema.FC7: schema.npy_bytes(np.ones(128, np.float32))}  # fmt: skip
    np.testing.assert_array_equal(target_face(raw), np.asarray(Image.open(io.BytesIO(raw[schema.FACE]))))
    raw[schema.PORTRAIT] = _jpeg(portrait)
    decoded_portrait = np.asarray(Image.open(io.BytesIO(raw[schema.PORTRAIT])))
    np.testing.assert_array_equal(target_face(raw), decoded_portrait)
    points = np.zeros((68, 2), np.float32)
    sample = FaceSample({raw["__key__"]: points}, points, 224)(raw)  # target image at full size
    np.testing.assert_allclose(sample["image"].permute(1, 2, 0).numpy() * 255, decoded_portrait, atol=1.0)
    raw[schema.PORTRAIT] = b"not a jpeg"
    with pytest.raises(schema.BadSample, match="portrait.jpg does not decode"):
        target_face(raw)


def test_unknown_teacher_and_wrong_image_size_are_refused(shards):
    with pytest.raises(ValueError, match="vggface"):
        FaceDecoderModule(preset="tiny", identity_teacher="facenet")
    data = FaceShardDataModule(str(shards), image_size=64, num_workers=0)
    data.prepare_data()
    data.setup("fit")
    with pytest.raises(ValueError, match="data.image_size: 32"):
        FaceDecoderModule(preset="tiny")._take_geometry(data)


def test_training_lowers_the_loss_and_round_trips(shards, tmp_path, caplog):
    pl.seed_everything(0)
    data = _datamodule(shards)
    module = FaceDecoderModule(preset="tiny", in_dim=128, identity_teacher="dlib", lr=1e-2)
    data.prepare_data()
    data.setup("fit")
    module._take_geometry(data)
    before = _val_texture(module, data)
    trace = LossTrace()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=80, max_epochs=-1, val_check_interval=40,
        check_val_every_n_epoch=None, default_root_dir=tmp_path, logger=CSVLogger(tmp_path),
        callbacks=[trace], enable_checkpointing=False, enable_progress_bar=False,
        log_every_n_steps=5,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="s2f.decoder_training"):
        trainer.fit(module, datamodule=data)
    assert sum("identity loss off" in r.message for r in caplog.records) == 1
    assert len(trace.texture) == 80
    # Judged on the whole validation split, whose loss does not depend on batch order.
    assert _val_texture(module, data) < 0.85 * before
    assert "train/identity" not in trainer.callback_metrics
    assert {"val/texture_l1", "val/landmark_mse"} <= set(trainer.callback_metrics)
    assert sorted((tmp_path / PREVIEW_DIR).glob("step*.png"))
    torch.testing.assert_close(module.decoder.mean_landmarks, data.mean_landmarks)

    path = tmp_path / "decoder.ckpt"
    trainer.save_checkpoint(path)
    decoder = load_decoder(path)
    assert not decoder.training and not any(p.requires_grad for p in decoder.parameters())
    features = torch.randn(3, 128)
    module.eval()
    with torch.no_grad():
        expected = module(features)["image"]
    torch.testing.assert_close(decoder(features)["image"], expected)
    torch.testing.assert_close(decoder.mean_landmarks, data.mean_landmarks)
