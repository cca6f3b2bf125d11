"""Face shards -> decoder training batches: aligned face, its landmarks, texture and feature.

The decoder (SPEC section 6) learns feature -> (landmarks, texture in the mean geometry). Its
input is a sample's `fc7.npy` (the teacher feature of the clip's face crop); its target face is
the sample's `portrait.jpg` when the source gave one (the speaker frontal, neutral and evenly
lit, as the SPEC trains the decoder), else its `face.jpg` (the clip's aligned 224 x 224 crop in
whatever pose and light the clip has). Targets also need dlib's 68 landmarks of each target face:

- `landmark_pass(root)` finds them once per split (`prepare_data`) and writes
  `root/<split>/landmarks68.npz`: `keys` (N,), `landmarks` (N, 68, 2) in the decoder's
  normalised coordinates, `no_face` (keys where dlib found no face on the crop: recorded and
  skipped), `shards` (the shard names it covers: a rebuilt split is landmarked again),
  `reader` (LANDMARK_READER: a file read another way is landmarked again) and, for the
  training split, `mean` (68, 2): the mean geometry the textures are drawn in.
- Each sample's texture is `unwarp(face, landmarks, mean)`. The face is first resized to the
  decoder's output size S, then unwarped there: the landmarks are resolution-free, and at S
  the spline is evaluated on S^2 pixels instead of 224^2 (12x less work at S = 64).

Batches: "image" (B, 3, S, S) and "texture" (B, 3, S, S) RGB in [0, 1], "landmarks" (B, K, 2),
"fc7" (B, D) float32, "key" list[str]. Training streams are endless resampled shard streams
(`with_epoch` gives every rank and worker the same number of batches per epoch, as DDP needs);
validation reads each shard once, split over ranks and workers.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from s2f.craniofacial import find_landmarks
from s2f.decoder import unwarp
from shards import schema
from shards.build import complete_shards

log = logging.getLogger(__name__)

LANDMARKS_FILE = "landmarks68.npz"
LANDMARK_READER = "dlib68-mirror-averaged"  # s2f.craniofacial.find_landmarks
LANDMARK_SPLITS = ("train", "val")
CROP_UPSAMPLE = 0  # HOG doublings on a 224-px crop: the face fills ~0.8 of it, far above 80 px
MAX_NO_FACE_FRACTION = 0.1  # a split where dlib misses more crops than this is not face data


class NoLandmarks(RuntimeError):
    """Too many crops of a split had no face for dlib; the message names the split."""


# -- the landmark pass ------------------------------------------------------------------------


def _shard_names(folder: Path) -> list[str]:
    return [p.name for p in complete_shards(folder)]


def _is_current(path: Path, shards: list[str]) -> bool:
    if not path.is_file():
        return False
    with np.load(path) as table:
        reader = str(table["reader"]) if "reader" in table else None
        return table["shards"].tolist() == shards and reader == LANDMARK_READER


def target_face(raw: dict) -> np.ndarray:
    """The face the decoder learns to draw for a raw sample: (H, W, 3) uint8 RGB, writable."""
    from PIL import Image

    member = schema.PORTRAIT if schema.PORTRAIT in raw else schema.FACE
    data = raw[member]  # KeyError when the sample has no face: callers log and skip it
    try:
        return np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as error:
        raise schema.BadSample(raw["__key__"], f"{member} does not decode ({error})") from error


def shrink_face(face: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (1, 3, size, size) float in [0, 1]: bilinear with antialiasing,
    the decoder's view of its target face."""
    image = torch.from_numpy(face).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


def _raw_faces(folder: Path) -> wds.WebDataset:
    urls = [str(p) for p in complete_shards(folder)]
    return wds.WebDataset(urls, shardshuffle=False, empty_check=False)


def _landmark_split(folder: Path) -> dict[str, np.ndarray]:
    """Landmarks of every crop in one split folder (no file written)."""
    keys, points, no_face = [], [], []
    total = schema.SplitIndex.read(folder).num_samples
    for raw in tqdm(_raw_faces(folder), total=total, desc=f"landmarks {folder.name}", unit="face"):
        key = raw["__key__"]
        try:
            found = find_landmarks(target_face(raw), CROP_UPSAMPLE)
        except (KeyError, schema.BadSample) as error:
            log.warning("landmark pass: skipping %s in %s: %s", key, folder, error)
            found = None
        if found is None:
            no_face.append(key)
            continue
        keys.append(key)
        points.append(found)
    landmarks = np.stack(points) if points else np.zeros((0, 68, 2), np.float32)
    return {"keys": np.array(keys, dtype=str), "landmarks": landmarks,
            "no_face": np.array(no_face, dtype=str)}  # fmt: skip


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    tmp.replace(path)


def _check_no_face(folder: Path, table: dict[str, np.ndarray], max_fraction: float) -> None:
    missed, found = len(table["no_face"]), len(table["keys"])
    if missed:
        log.warning("%s: dlib found no face on %d of %d crops (first: %s); they are skipped",
                    folder, missed, missed + found, table["no_face"][0])
    if missed > max_fraction * max(1, missed + found):
        raise NoLandmarks(
            f"{folder}: dlib found no face on {missed} of {missed + found} crops "
            f"(over {max_fraction:.0%}); check that the shards hold aligned face crops"
        )


def landmark_pass(
    root: str | Path,
    splits: tuple[str, ...] = LANDMARK_SPLITS,
    max_no_face_fraction: float = MAX_NO_FACE_FRACTION,
) -> dict[str, Path]:
    """Write `root/<split>/landmarks68.npz` for each split whose file is missing or stale.

    The training split's file also holds `mean` (68, 2), the mean landmark geometry.
    """
    root, written = Path(root), {}
    for split in splits:
        folder = root / split
        path = folder / LANDMARKS_FILE
        shards = _shard_names(folder)
        if not shards:
            raise FileNotFoundError(f"{folder}: no shards; build them with `s2f shards`")
        if not _is_current(path, shards):
            table = _landmark_split(folder)
            _check_no_face(folder, table, max_no_face_fraction)
            if split == "train":
                table["mean"] = table["landmarks"].mean(axis=0)  # (K, 2)
            stamp = {"shards": np.array(shards, dtype=str), "reader": np.array(LANDMARK_READER)}
            _save_atomic(path, table | stamp)
        written[split] = path
    return written


def read_landmarks(root: str | Path, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({key: (68, 2) landmarks}, mean (68, 2) of the training split) from the landmark pass."""
    root = Path(root)
    paths = {s: root / s / LANDMARKS_FILE for s in (split, "train")}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no landmarks; run datamodules.faces.landmark_pass")
    with np.load(paths[split]) as table:
        points = dict(zip(table["keys"].tolist(), table["landmarks"]))
    with np.load(paths["train"]) as table:
        mean = table["mean"]
    return points, mean


# -- samples and batches ----------------------------------------------------------------------


class FaceSample:
    """Raw shard sample -> decoder targets, or None when it has no landmarks or is bad.

    Runs in DataLoader workers; holds the split's landmark table.
    """

    def __init__(self, landmarks: dict[str, np.ndarray], mean: np.ndarray, image_size: int):
        self.landmarks, self.image_size = landmarks, image_size
        self.mean = torch.from_numpy(np.asarray(mean, np.float32))  # (K, 2)

    def __call__(self, raw: dict) -> dict | None:
        key = raw["__key__"]
        points = self.landmarks.get(key)
        if points is None:  # dlib found no face on this crop: recorded by the landmark pass
            return None
        try:
            face = target_face(raw)
            fc7 = schema.decode_fc7(key, raw[schema.FC7])
        except KeyError as error:
            log.warning("skipping %s: missing member %s", key, error)
            return None
        except schema.BadSample as error:
            log.warning("skipping %s: %s", key, error.reason)
            return None
        return self.targets(key, face, points, fc7)

    def targets(self, key: str, face: np.ndarray, points: np.ndarray, fc7: np.ndarray) -> dict:
        image = shrink_face(face, self.image_size)  # (1, 3, S, S)
        landmarks = torch.from_numpy(np.asarray(points, np.float32))  # (K, 2)
        texture = unwarp(image, landmarks[None], self.mean)  # (1, 3, S, S)
        return {"image": image[0], "texture": texture[0], "landmarks": landmarks,
                "fc7": torch.from_numpy(fc7), "key": key}  # fmt: skip


def _usable(sample: dict | None) -> bool:
    return sample is not None


def collate(samples: list[dict]) -> dict:
    batch = {name: torch.stack([s[name] for s in samples])
             for name in ("image", "texture", "landmarks", "fc7")}  # fmt: skip
    batch["key"] = [s["key"] for s in samples]
    return batch


class FaceShardDataModule(pl.LightningDataModule):
    """Face crops + landmarks + teacher features from shard folders root/{train,val}.

    Args:
        root: the shard folder (as built by `s2f shards`), with train/ and val/ subfolders.
        batch_size: faces per batch (per device).
        num_workers: DataLoader workers per device.
        image_size: the decoder's output side S (its preset's `image_size`): targets are
            resized to it.
        seed: seeds shard resampling and the shuffle buffer.
        shuffle_buffer: training samples shuffled together.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 2,
        image_size: int = 64,
        seed: int = 0,
        shuffle_buffer: int = 500,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.mean_landmarks: torch.Tensor | None = None  # (K, 2), set in setup
        self._samples: dict[str, FaceSample] = {}
        self._counts: dict[str, int] = {}

    def prepare_data(self) -> None:
        landmark_pass(self.hparams.root)

    def setup(self, stage: str | None = None) -> None:
        for split in LANDMARK_SPLITS:
            points, mean = read_landmarks(self.hparams.root, split)
            self._samples[split] = FaceSample(points, mean, self.hparams.image_size)
            self._counts[split] = len(points)
        self.mean_landmarks = torch.from_numpy(np.asarray(mean, np.float32))

    def _urls(self, split: str) -> list[str]:
        return [str(p) for p in complete_shards(Path(self.hparams.root) / split)]

    def _world(self) -> int:
        trainer = self.trainer
        return trainer.world_size if trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        readers = self._world() * max(1, hp.num_workers)
        epoch_batches = max(1, math.ceil(self._counts["train"] / (hp.batch_size * readers)))
        # Resampled: every worker of every rank draws shards at random (seeded by `seed` and the
        # worker's torch seed), so no reader runs dry when there are fewer shards than readers
        # (the demo's train split is one shard); `with_epoch` bounds each reader's epoch.
        stream = wds.DataPipeline(
            wds.ResampledShards(self._urls("train"), seed=hp.seed, deterministic=True),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(hp.shuffle_buffer, initial=hp.shuffle_buffer),
            wds.map(self._samples["train"]),
            wds.select(_usable),
            wds.batched(hp.batch_size, collation_fn=collate, partial=False),
        ).with_epoch(epoch_batches)
        return DataLoader(stream, batch_size=None, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        stream = (
            wds.WebDataset(self._urls("val"), shardshuffle=False, nodesplitter=wds.split_by_node,
                           workersplitter=wds.split_by_worker, handler=wds.warn_and_continue,
                           empty_check=False)
            .map(self._samples["val"])
            .select(_usable)
            .batched(hp.batch_size, collation_fn=collate, partial=True)
        )  # fmt: skip
        return DataLoader(stream, batch_size=None, num_workers=hp.num_workers)
