"""Decoded-face stage of `s2f evaluate --decoder`: F2F and S2F faces -> what a face reader sees.

F2F = decoder(v_f), the canonical face of the true face feature: the upper bound of what the
decoder keeps. S2F = decoder(v_s), the canonical face of the voice's predicted feature, one
per evaluated duration (SPEC sections 6-7).

Reading a decoded face. The decoder draws small aligned crops (64 px for the demo's "small"
preset); dlib's HOG detector misses faces that small, so each image is first enlarged by
`craniofacial.upsample_for_dlib`. On the enlarged image: the best HOG box, dlib's 68 landmarks
(the craniofacial measurements) and an aligned crop cut as the shard builder cuts face.jpg
(`s2f.faces.align_face`: 5 landmarks, `dlib.get_face_chip`, FACE_SIZE, ALIGN_PADDING); the
teacher that built the shards turns that crop into a descriptor. A face dlib does not find has
no landmarks and no descriptor: it counts in the detection rate, is left out of every
landmark statistic, and in retrieval ranks after every non-match (a query that ties with the
whole gallery; ties count against the model, as in `s2f.metrics`).

metrics.json "faces" (sorted keys; recalls are fractions, `{"value", "ci"}` a 95 % interval):
- decoder, image_size, items; teacher (the spec that reads the faces) or retrieval_skipped.
- f2f and s2f[dur], each: detection {detected, n, rate, ci (Wilson)} over all items;
  drawn_vs_read: `craniofacial_table(drawn, read)`, per measurement r between the geometry the
  decoder drew (its landmark output) and dlib's reading of the image: where r is low, a
  measurement on decoded faces reflects the reader, not the decoder;
  retrieval and identity_retrieval (with a teacher): the evaluation's gallery, the decoded
  face's descriptor as query, the true features v_f as gallery; the layout of the top-level
  retrieval sections plus chance_ratio[metric][recall@k] = recall / chance;
  true_geometry (when the samples carry the demo world's face geometry): per
  "<field> ~ <measurement>", craniofacial._correlate's {r, p, n, baseline, ci}, on dlib's reading;
  fields "<width>/IOD" are the true widths in the measurements' unit (craniofacial.TRUE_GEOMETRY);
  true_geometry_drawn: the same on the landmarks the decoder drew.
- s2f[dur].craniofacial: `craniofacial_table(F2F landmarks, S2F landmarks)` over all items.
- reference: each item's true target face (portrait.jpg, else face.jpg) shrunk to the decoded
  size as the decoder's training targets are, then read exactly as a decoded face: image_size,
  items (those with a face), detection, f2f_vs_reference (`craniofacial_table(F2F, reference)`:
  how closely F2F's measurements follow the true face's at the same size) and true_geometry.
  It is the ceiling of the reading: an F2F decoder that drew every true face exactly would
  score the reference's true_geometry. At 64 px dlib reads face width far less steadily than
  at 224 px, so a measurement's F2F r is judged against this row, not against 1.
Every correlation row also holds "ci", the 95 % interval of r over speakers: a speaker's clips
share one face, so the p-value, which counts clips as independent, overstates the evidence;
the interval resamples whole speakers (metrics.pearson_ci_over_groups).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2f import metrics as m
from s2f.craniofacial import (
    NUM_LANDMARKS,
    TRUE_GEOMETRY,
    best_face,
    craniofacial_table,
    decode_faces,
    landmarks_in_box,
    to_uint8,
    true_geometry_table,
    upsample_for_dlib,
)
from s2f.demo.render import widths_in_iod
from s2f.evaluate import FACE_CHUNK, SplitFeatures, read_members, retrieval_tables
from shards import schema

GRID_FACES = 8  # test clips shown as (true face | F2F | S2F)
F2F = "f2f"  # reading key of the faces decoded from v_f; S2F readings are keyed by duration
REFERENCE = "reference"  # the true faces shrunk to the decoded size

log = logging.getLogger(__name__)


@dataclass
class FaceReading:
    """Decoded faces and what dlib and the teacher found in them; row i is face i."""

    images: np.ndarray  # (N, S, S, 3) uint8 RGB, as decoded
    drawn: np.ndarray | None  # (N, 68, 2) the landmarks the decoder drew each face with; None: not decoded
    landmarks: np.ndarray  # (N, 68, 2) dlib's reading, normalised coordinates, NaN where no face
    descriptors: np.ndarray | None  # (N, D) teacher features, NaN rows where no face; None: no teacher

    @property
    def detected(self) -> np.ndarray:
        return ~np.isnan(self.landmarks[:, 0, 0])  # (N,) bool


# ----------------------------------------------------------------------------- reading faces


def landmarks_and_crop(image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(68, 2) normalised landmarks and the (224, 224, 3) aligned crop of a decoded face, or None."""
    from s2f.faces import align_face

    enlarged = upsample_for_dlib(image)
    box = best_face(enlarged)
    if box is None:
        return None
    # Normalised coordinates do not depend on the enlargement: they are the decoded image's too.
    return landmarks_in_box(enlarged, box), align_face(enlarged, box)


def read_decoded_faces(
    images: np.ndarray, drawn: np.ndarray | None, teacher: Any | None = None
) -> FaceReading:
    """dlib's landmarks of decoded faces (N, S, S, 3) drawn with landmarks `drawn` (N, 68, 2)
    (None for faces no decoder drew) and, with a teacher, their descriptors."""
    from tqdm import tqdm

    n = len(images)
    landmarks = np.full((n, NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
    descriptors = None if teacher is None else np.full((n, teacher.feature_dim), np.nan, np.float32)
    for start in tqdm(range(0, n, FACE_CHUNK), desc="read decoded faces", unit="chunk"):
        crops: dict[int, np.ndarray] = {}
        for i in range(start, min(start + FACE_CHUNK, n)):
            found = landmarks_and_crop(images[i])
            if found is not None:
                landmarks[i], crops[i] = found
        if descriptors is not None and crops:
            descriptors[list(crops)] = teacher.features(np.stack(list(crops.values())))  # (C, D)
    return FaceReading(images, drawn, landmarks, descriptors)


# ----------------------------------------------------------------------------- statistics


def detection(detected: np.ndarray) -> dict[str, Any]:
    """Share of decoded faces dlib found, with its Wilson interval."""
    found, n = int(np.sum(detected)), len(detected)
    return {"detected": found, "n": n, "rate": found / n, "ci": list(m.wilson_ci(found, n))}


def decoded_ranks(
    descriptors: np.ndarray, true_features: torch.Tensor, speakers: np.ndarray, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Item and identity ranks (M,) of decoded faces' descriptors (M, D) among the true
    features (M, D), query i's own clip being row i; NaN rows (no face found) rank after every
    non-match: item rank M, identity rank 1 + the gallery's clips of other speakers."""
    size = len(true_features)
    read = np.flatnonzero(~np.isnan(descriptors).any(axis=1))  # (R,)
    others = (speakers[:, None] != speakers[None, :]).sum(axis=1)  # (M,)
    items = torch.full((size,), size, dtype=torch.long)
    identity = torch.as_tensor(others + 1, dtype=torch.long)
    if len(read):
        queries = torch.from_numpy(descriptors[read]).float()  # (R, D)
        items[read] = m.retrieval_ranks(queries, true_features, read, metric).long()
        identity[read] = m.identity_ranks(queries, true_features, speakers[read], speakers, metric).long()
    return items, identity


def with_chance_ratio(table: dict[str, Any]) -> dict[str, Any]:
    """A retrieval table plus chance_ratio[metric][recall@k] = recall / chance."""
    chance = table["chance"]
    ratio = {
        metric: {k: table[metric][k]["value"] / chance[k] for k in chance}
        for metric in m.METRICS
    }
    return table | {"chance_ratio": ratio}


def decoded_retrieval(reading: FaceReading, split: SplitFeatures, gallery: np.ndarray, seed: int) -> dict:
    """{"retrieval", "identity_retrieval"} of the gallery's decoded faces against v_f."""
    descriptors, faces, ids = reading.descriptors[gallery], split.v_f[gallery], split.speakers[gallery]
    tables, _ = retrieval_tables(lambda metric: decoded_ranks(descriptors, faces, ids, metric), ids, seed)
    return {"retrieval": with_chance_ratio(tables["items"]),
            "identity_retrieval": with_chance_ratio(tables["identity"])}  # fmt: skip


def true_geometry(attributes: list[dict]) -> dict[str, np.ndarray]:
    """{field: (N,) values} of the demo world's face geometry known for every item: the fields,
    and the widths in IODs where eye_spacing is known (s2f.demo.render.widths_in_iod)."""
    derived = [truth | widths_in_iod(truth) for truth in attributes]
    columns = {field: [truth.get(field) for truth in derived] for field in TRUE_GEOMETRY}
    return {
        field: np.asarray(values, dtype=np.float64)
        for field, values in columns.items()
        if all(isinstance(v, (int, float)) for v in values)
    }


def face_set(
    reading: FaceReading, split: SplitFeatures, gallery: np.ndarray, geometry: dict, seed: int
) -> dict[str, Any]:
    """Detection, drawn-vs-read geometry, retrieval (with a teacher) and true-geometry
    correlation of one face set."""
    out: dict[str, Any] = {
        "detection": detection(reading.detected),
        "drawn_vs_read": craniofacial_table(reading.drawn, reading.landmarks, seed, split.speakers),
    }
    if reading.descriptors is not None:
        out |= decoded_retrieval(reading, split, gallery, seed)
    if geometry:
        out["true_geometry"] = true_geometry_table(reading.landmarks, geometry, seed, split.speakers)
        out["true_geometry_drawn"] = true_geometry_table(reading.drawn, geometry, seed, split.speakers)
    return out


def reference_faces(shards: Path, keys: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's true target face (portrait.jpg, else face.jpg: what the decoder learns to
    draw) shrunk to the decoded size as for training: RGB uint8 (N, size, size, 3), black
    where an item has neither, and which items have one (N,) bool."""
    from datamodules.faces import shrink_face, target_face

    found = read_members(shards, keys, (schema.PORTRAIT, schema.FACE))
    images = np.zeros((len(keys), size, size, 3), np.uint8)
    present = np.zeros(len(keys), bool)
    for i, key in enumerate(keys):
        members = found.get(key, {})
        if not members:
            continue
        try:
            face = target_face({"__key__": key, **members})
        except schema.BadSample as error:
            log.warning("reference faces: skipping %s: %s", key, error.reason)
            continue
        images[i] = to_uint8(shrink_face(face, size))[0]
        present[i] = True
    return images, present


def reference_set(
    reference: FaceReading, present: np.ndarray, f2f: FaceReading, geometry: dict,
    speakers: np.ndarray, seed: int,
) -> dict[str, Any]:
    """What the true faces at the decoded size give, read as decoded faces are: detection,
    F2F's measurements against the true face's, and true-geometry correlation (demo world)."""
    out: dict[str, Any] = {
        "image_size": int(reference.images.shape[1]), "items": int(present.sum()),
        "detection": detection(reference.detected[present]),
        "f2f_vs_reference": craniofacial_table(f2f.landmarks, reference.landmarks, seed, speakers),
    }  # fmt: skip
    if geometry:
        out["true_geometry"] = true_geometry_table(reference.landmarks, geometry, seed, speakers)
    return out


# ----------------------------------------------------------------------------- the stage


def load_face_teacher(spec: str | None, index: schema.SplitIndex) -> tuple[Any | None, str | None]:
    """The teacher that reads decoded faces and its spec: `spec` ("dlib" or "vggface:PATH"),
    else the split's own teacher when its name alone loads it (dlib); (None, None) otherwise."""
    from s2f.teacher import teacher_from_spec

    spec = spec or (index.teacher if index.teacher == "dlib" else None)
    if spec is None:
        return None, None
    teacher = teacher_from_spec(spec)
    if teacher.feature_dim != index.feature_dim:
        raise ValueError(
            f"--face-teacher {spec}: gives {teacher.feature_dim}-D features, but the shards hold "
            f"{index.feature_dim}-D features of teacher {index.teacher!r}; pass the teacher that "
            "built the shards"
        )
    return teacher, spec


@dataclass
class FaceStage:
    """The decoder and the face reader of `s2f evaluate --decoder`, loaded and checked."""

    decoder_path: Path
    decoder: torch.nn.Module
    teacher: Any | None
    teacher_spec: str | None
    split_teacher: str
    shards: Path  # the evaluated split, whose true faces are the reference

    @classmethod
    def load(cls, decoder_path: str | Path, teacher_spec: str | None, shards: Path) -> FaceStage:
        from s2f.decoder_training import load_decoder

        index = schema.SplitIndex.read(shards)
        decoder = load_decoder(decoder_path)
        if decoder.config.in_dim != index.feature_dim:
            raise ValueError(
                f"--decoder {decoder_path}: decodes {decoder.config.in_dim}-D features, but {shards} "
                f"holds {index.feature_dim}-D features; train a decoder on these shards "
                "(s2f fit --config configs/decoder-*.yaml)"
            )
        teacher, spec = load_face_teacher(teacher_spec, index)
        return cls(Path(decoder_path), decoder, teacher, spec, index.teacher, Path(shards))

    def read(self, features: torch.Tensor) -> FaceReading:
        """Decode features (N, D) and read the faces."""
        return read_decoded_faces(*decode_faces(self.decoder, features), teacher=self.teacher)

    def evaluate(self, split: SplitFeatures, gallery: np.ndarray, seed: int) -> tuple[dict, dict[str, FaceReading]]:
        """metrics.json "faces" (module docstring) and the readings: F2F, then S2F per duration."""
        readings = {F2F: self.read(split.v_f)} | {label: self.read(v_s) for label, v_s in split.v_s.items()}
        geometry = true_geometry(split.attributes)
        f2f = readings[F2F]
        size = int(f2f.images.shape[1])
        images, present = reference_faces(self.shards, list(split.keys), size)
        reference = read_decoded_faces(images, None)
        section: dict[str, Any] = {
            "decoder": str(self.decoder_path), "image_size": size,
            "items": len(split.keys), "teacher": self.teacher_spec,
            F2F: face_set(f2f, split, gallery, geometry, seed),
            "s2f": {
                label: face_set(readings[label], split, gallery, geometry, seed)
                | {"craniofacial": craniofacial_table(
                    f2f.landmarks, readings[label].landmarks, seed, split.speakers)}
                for label in split.v_s
            },
            REFERENCE: reference_set(reference, present, f2f, geometry, split.speakers, seed),
        }  # fmt: skip
        if self.teacher is None:
            section["retrieval_skipped"] = (
                f"the shards' teacher {self.split_teacher!r} cannot be loaded by name; pass "
                "--face-teacher with the teacher that built them (dlib or vggface:PATH)")
        return section, readings


# ----------------------------------------------------------------------------- report media


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 image (H, W, 3) as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def face_grid(
    split: SplitFeatures, readings: dict[str, FaceReading], shards: Path, duration: str, seed: int
) -> dict[str, Any]:
    """Rows (true face.jpg | portrait.jpg when the shards have one | F2F | S2F of `duration`)
    for a seeded sample of GRID_FACES clips."""
    rows = m.sample_gallery(len(split.keys), GRID_FACES, seed)
    jpegs = read_members(shards, [split.keys[i] for i in rows], (schema.FACE, schema.PORTRAIT))
    f2f, s2f = readings[F2F], readings[duration]
    return {"duration": duration, "rows": [
        {"key": split.keys[i], "true": jpegs.get(split.keys[i], {}).get(schema.FACE),
         "portrait": jpegs.get(split.keys[i], {}).get(schema.PORTRAIT),
         "f2f": png_bytes(f2f.images[i]), "f2f_detected": bool(f2f.detected[i]),
         "s2f": png_bytes(s2f.images[i]), "s2f_detected": bool(s2f.detected[i])}
        for i in rows
    ]}  # fmt: skip
