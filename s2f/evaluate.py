"""`s2f evaluate`: run a checkpoint over a test split -> DIR/metrics.json and DIR/report.html.

The model sees the first D seconds of every clip for each evaluated duration D (the first
`num_frames(D)` frames of the 6-s spectrogram: the framing has no centre padding, so they are
exactly the spectrogram of the first D seconds). Every number comes from `s2f.metrics`; this
module only chooses what to compare with what. `s2f.report` turns the result into HTML.

metrics.json (sorted keys; the same inputs give identical bytes: no times or hosts inside).
Durations are keyed "3s", "6s"; recalls are fractions; `{"value", "ci"}` holds a 95 % interval.
- config: checkpoint, shards, train_shards, seed, gallery_size, durations, ks.
- data: items, speakers, skipped (bad samples, with their key or shard).
- similarity[dur]: angle/l1/l2 mean and std over all items.
- retrieval[dur]: gallery_size, chance[recall@k], and per metric (cosine, l2, l1)
  recall@k -> {value, ci}. The gallery is `sample_gallery(items, gallery_size, seed)`, queries
  are the gallery items, a query's own clip is its match.
- identity_retrieval[dur]: the same gallery, any clip of the query's speaker is a hit; chance is
  `identity_chance_recall` for this gallery's composition.
- oracle (when the training and evaluated samples carry voice-side truths): fields used, n_train,
  recall@k -> {value, ci} of the voice-truth oracle (`oracle`), and
  ratio[dur][metric][recall@k] = model / oracle.
- matching["random" | "same_gender"]: n_tuples and durations[dur][metric] -> {accuracy, ci}
  (Wilson); the trials are DIR/tuples.json and DIR/tuples_same_gender.json, reused when present.
- attributes[reader][attribute]: n_train, classes and durations[dur] -> attribute_agreement
  (truth_vs_prediction, truth_vs_reference, reference_vs_prediction), or skipped: reason.
- groups[dur][attribute][recall@k | angle][group] -> [mean, n, [ci_low, ci_high]], over the
  gallery with cosine ranks.
- faces (with --decoder): F2F = decoder(v_f) and S2F = decoder(v_s) read by dlib and the
  teacher: detection, retrieval, craniofacial tables; layout in `s2f.decoded_faces`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.shards import Tally, decode_sample, read_shard
from s2f import metrics as m
from s2f.audio import SAMPLE_RATE, num_frames, spectrogram
from s2f.encoder import MIN_FRAMES
from s2f.module import Speech2Face
from shards import schema

log = logging.getLogger(__name__)

DEFAULT_DURATIONS = (3.0, 6.0)  # s: the paper's two input lengths
ORACLE_KS = (1, 5, 10)
PROBE_ATTRIBUTES = ("gender", "age_decade", "origin")  # read from faces by the linear probe
GROUP_ATTRIBUTES = ("gender", "age_group", "origin")  # per-group breakdowns
ORIGIN_FIELDS = ("origin", "ethnicity", "nationality")  # the first one known names the group
# The speaker's truths a voice carries, which the oracle predicts a face from: categorical, then
# numeric. Nationality stands for accent (VoxCeleb); the demo world has the spoken language and
# its voices' vocal-tract length and F0. Face-side truths (origin, face width) are left out: a
# voice carries them only through these.
ORACLE_CATEGORICAL = ("gender", "language", "nationality")
ORACLE_NUMERIC = ("age", "vocal_tract_length", "f0_hz")
ORACLE_RIDGE = 1e-3  # per training item: keeps the one-hot columns of rare classes finite
GRID_QUERIES = 8  # queries shown with their retrieved faces
GRID_TOP = 5  # retrieved faces per query
FACE_CHUNK = 64  # faces read by a face network at a time
EMBEDDING_MAX = 1_000  # v_s points handed to the report's t-SNE (minutes on 2 CPU cores)
METRICS_FILE, REPORT_FILE = "metrics.json", "report.html"
TUPLE_FILES = {"random": "tuples.json", "same_gender": "tuples_same_gender.json"}


# ----------------------------------------------------------------------------- reading shards


@dataclass
class SplitFeatures:
    """One split run through the model: row i of every field is clip i, in shard order."""

    keys: list[str]
    speakers: np.ndarray  # (N,) str
    v_f: torch.Tensor  # (N, D) teacher features of the true faces
    v_s: dict[str, torch.Tensor]  # duration label -> (N, D) predictions
    attributes: list[dict]  # (N,) flat ground truth, {} when unknown
    skipped: list[str]  # bad samples: "key: reason" or "shard: n lost"


def duration_label(seconds: float) -> str:
    return f"{seconds:g}s"


def clip_frames(seconds: float) -> int:
    """Spectrogram frames of the first `seconds` of a clip (3 s -> 298, 6 s -> 598)."""
    frames = num_frames(round(seconds * SAMPLE_RATE))
    if not MIN_FRAMES <= frames <= schema.SPEC_SHAPE[1]:
        raise ValueError(
            f"duration {seconds} s: gives {frames} frames; choose between "
            f"{MIN_FRAMES * 0.01 + 0.02:.2f} s and {schema.SECONDS:g} s (the clips' length)"
        )
    return frames


def flat_attributes(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar ground truth of a sample; the demo world nests face geometry under "appearance"."""
    truth = dict(meta.get("attributes") or {})
    merged = {**(truth.pop("appearance", None) or {}), **truth}
    return {k: v for k, v in merged.items() if isinstance(v, (str, int, float, bool))}


def _samples(folder: Path, payload: bool, skipped: list[str]) -> Iterator[dict]:
    """Decoded samples of a split in shard order; bad ones are logged, listed and skipped.

    payload=False decodes only fc7 and json (what the probes need from the training split).
    """
    index = schema.SplitIndex.read(folder)
    tally = Tally()
    for shard in index.shards:
        for raw in read_shard(str(folder / shard["name"]), shard["samples"], tally):
            try:
                yield _decode(raw, index, payload)
            except schema.BadSample as error:
                log.warning("%s: skipped", error)
                skipped.append(f"{error.key}: {error.reason}")
    skipped += [f"{url}: {bad} lost" for url, (_, bad) in tally.take().items()]


def _decode(raw: dict, index: schema.SplitIndex, payload: bool) -> dict:
    if payload:
        return decode_sample(raw, schema.PAYLOADS[index.payload], index.feature_dim)
    key = raw["__key__"]
    if schema.FC7 not in raw:
        raise schema.BadSample(key, f"missing member {schema.FC7}")
    fc7 = schema.decode_fc7(key, raw[schema.FC7], index.feature_dim)
    return {"key": key, "fc7": fc7, "meta": schema.decode_meta(key, raw.get(schema.META))}


def _chunks(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_members(
    folder: str | Path, keys: Sequence[str], members: Sequence[str]
) -> dict[str, dict[str, bytes]]:
    """{key: {member: bytes}}: which of `members` each sample named in `keys` has, one pass."""
    folder, wanted = Path(folder), set(keys)
    index = schema.SplitIndex.read(folder)
    found: dict[str, dict[str, bytes]] = {}
    for shard in index.shards:
        for raw in read_shard(str(folder / shard["name"]), shard["samples"], Tally()):
            if raw["__key__"] in wanted:
                found[raw["__key__"]] = {member: raw[member] for member in members if member in raw}
        if len(found) == len(wanted):
            break  # the rest of the split holds nothing we need
    return found


def read_faces(folder: str | Path, keys: Sequence[str]) -> dict[str, bytes]:
    """face.jpg bytes of the samples named in `keys` (those that have one), read from a split."""
    found = read_members(folder, keys, (schema.FACE,))
    return {key: members[schema.FACE] for key, members in found.items() if members}


# ----------------------------------------------------------------------------- the model


def load_model(ckpt: str | Path, device: str) -> Speech2Face:
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such checkpoint; give a Lightning .ckpt file")
    model = Speech2Face.load_from_checkpoint(ckpt, map_location=device, weights_only=True)
    return model.eval()


def _batch_spectrogram(batch: list[dict], device: str) -> torch.Tensor:
    """(B, 2, 598, 257) for either payload; the audio one is transformed on `device`."""
    x = torch.from_numpy(np.stack([s["x"] for s in batch])).to(device)  # (B, N) or (B, 2, T, Q)
    return x if x.dim() == 4 else spectrogram(x)


@torch.no_grad()
def embed_split(
    model: Speech2Face, folder: str | Path, durations: Sequence[float], batch_size: int = 32,
    device: str = "cpu",
) -> SplitFeatures:
    """Run the model over a split for every duration (the first D seconds of each clip)."""
    from tqdm import tqdm

    folder = Path(folder)
    frames = {duration_label(s): clip_frames(s) for s in durations}
    total = schema.SplitIndex.read(folder).num_samples
    keys, fc7, metas, skipped = [], [], [], []
    v_s: dict[str, list[torch.Tensor]] = {label: [] for label in frames}
    batches = _chunks(_samples(folder, True, skipped), batch_size)
    for batch in tqdm(batches, total=math.ceil(total / batch_size), unit="batch", desc="evaluate"):
        spec = _batch_spectrogram(batch, device)  # (B, 2, 598, 257)
        for label, t in frames.items():
            v_s[label].append(model(spec[:, :, :t]).float().cpu())  # (B, D)
        keys += [s["key"] for s in batch]
        fc7 += [s["fc7"] for s in batch]
        metas += [s["meta"] for s in batch]
    if not keys:
        raise ValueError(f"{folder}: no readable samples; rebuild the split with `s2f shards`")
    return SplitFeatures(
        keys=keys,
        speakers=np.array([schema.speaker_of(k) for k in keys]),
        v_f=torch.from_numpy(np.stack(fc7)),  # (N, D)
        v_s={label: torch.cat(parts) for label, parts in v_s.items()},  # each (N, D)
        attributes=[flat_attributes(meta) for meta in metas],
        skipped=skipped,
    )


# ----------------------------------------------------------------------------- labels


def _origin(truth: Mapping[str, Any]) -> str | None:
    return next((str(truth[f]) for f in ORIGIN_FIELDS if truth.get(f) is not None), None)


def _age(to_label: Callable[[float], str]) -> Callable[[Mapping[str, Any]], str | None]:
    return lambda truth: None if truth.get("age") is None else to_label(truth["age"])


# Group label of an item from its ground truth; None when unknown.
LABELS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "gender": lambda truth: truth.get("gender"),
    "age_decade": _age(m.age_decade),
    "age_group": _age(m.age_group),
    "origin": _origin,
}


def label_column(attributes: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
    """(N,) object array of one label, None where unknown."""
    return np.array([LABELS[name](truth) for truth in attributes], dtype=object)


# ----------------------------------------------------------------------------- retrieval


def recall_with_ci(ranks: torch.Tensor, ks: Sequence[int], seed: int) -> dict[str, dict]:
    """{recall@k: {value, ci}}: the CI is a bootstrap over queries."""
    return {
        f"recall@{k}": {
            "value": m.hits_at_k(ranks, k).mean().item(),
            "ci": list(m.bootstrap_ci(m.hits_at_k(ranks, k), seed=seed)),
        }
        for k in ks
    }


# metric -> (item ranks (M,), identity ranks (M,)) of a gallery whose query i's own clip is row i.
Ranker = Callable[[str], tuple[torch.Tensor, torch.Tensor]]


def retrieval_tables(rank: Ranker, ids: np.ndarray, seed: int) -> tuple[dict, dict]:
    """Item- and identity-level recall@k per metric with their chance, over a gallery of
    speakers `ids` (M,); and the item-level ranks per metric."""
    size = len(ids)
    items = {"gallery_size": size, "chance": {f"recall@{k}": m.chance_recall(k, size) for k in m.DEFAULT_KS}}
    identity = {"gallery_size": size, "chance": m.identity_chance_recall(ids, ids)}
    ranks = {}
    for metric in m.METRICS:
        ranks[metric], id_ranks = rank(metric)  # (M,) each
        items[metric] = recall_with_ci(ranks[metric], m.DEFAULT_KS, seed)
        identity[metric] = recall_with_ci(id_ranks, m.DEFAULT_KS, seed)
    return {"items": items, "identity": identity}, ranks


def retrieval(split: SplitFeatures, label: str, gallery: np.ndarray, seed: int) -> tuple[dict, dict]:
    """Item- and identity-level recall of one duration, and the item-level ranks per metric."""
    queries, faces, ids = split.v_s[label][gallery], split.v_f[gallery], split.speakers[gallery]
    return retrieval_tables(lambda metric: (
        m.retrieval_ranks(queries, faces, metric=metric), m.identity_ranks(queries, faces, ids, ids, metric)
    ), ids, seed)


def oracle_columns(attributes: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, list[str]] | None:
    """(N, A) oracle columns of the fields known for every item, and the fields' names.

    Categorical fields become one-hot columns (one per value seen), numeric fields one column each.
    """
    columns, fields = [], []
    for name in ORACLE_CATEGORICAL:
        values = [truth.get(name) for truth in attributes]
        if all(isinstance(v, str) for v in values):
            columns += [np.array([v == c for v in values], np.float64) for c in sorted(set(values))]
            fields.append(name)
    for name in ORACLE_NUMERIC:
        values = [truth.get(name) for truth in attributes]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            columns.append(np.asarray(values, np.float64))
            fields.append(name)
    return (np.stack(columns, axis=1), fields) if fields else None


def oracle_features(x_train: np.ndarray, fc7_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Ridge regression of teacher features (N, D) on standardised columns x_train (N, A), fitted
    on the training split and applied to x (M, A) -> (M, D)."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > m.STD_FLOOR, std, 1.0)

    def design(columns: np.ndarray) -> np.ndarray:
        return np.concatenate([np.ones((len(columns), 1)), (columns - mean) / std], axis=1)  # (., 1 + A)

    a = design(x_train)
    penalty = ORACLE_RIDGE * len(a) * np.eye(a.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    weights = np.linalg.solve(a.T @ a + penalty, a.T @ fc7_train.astype(np.float64))  # (1 + A, D)
    return design(x) @ weights


def oracle(
    evaluation: Evaluation, gallery: np.ndarray, retrieved: Mapping[str, dict], seed: int
) -> dict | None:
    """The voice-truth oracle: each query's face feature predicted linearly from its speaker's
    true voice-side traits (ORACLE_CATEGORICAL, ORACLE_NUMERIC), the map fitted on the training
    split's faces, the gallery ranked by cosine as for the model. What a linear reading of those
    traits retrieves; a model hears more and need not be linear, so it may exceed it."""
    split, training = evaluation.split, evaluation.training_faces
    if training is None:
        return None
    truths, fc7 = training
    found = oracle_columns([*truths, *(split.attributes[i] for i in gallery)])
    if found is None:
        return None
    columns, fields = found
    predicted = oracle_features(columns[: len(truths)], fc7, columns[len(truths) :])  # (M, D)
    ranks = m.retrieval_ranks(torch.from_numpy(predicted).float(), split.v_f[gallery], metric="cosine")
    recall = recall_with_ci(ranks, ORACLE_KS, seed)
    ratio = {
        label: {
            metric: {k: _ratio(result["items"][metric][k]["value"], recall[k]["value"]) for k in recall}
            for metric in m.METRICS
        }
        for label, result in retrieved.items()
    }
    return {"fields": fields, "gallery_size": len(gallery), "n_train": len(truths),
            "recall": recall, "ratio": ratio}  # fmt: skip


def _ratio(model: float, best: float) -> float | None:
    return model / best if best > 0 else None


# ----------------------------------------------------------------------------- 1:2 matching


def _tuples(path: Path, make: Callable[[], np.ndarray], speakers: np.ndarray) -> np.ndarray:
    """The trials saved at `path`, or new ones (then saved), so that runs score the same trials."""
    if not path.is_file():
        m.save_tuples(path, make())
    table = m.load_tuples(path)
    stale = len(table) and (table.max() >= len(speakers) or (
        speakers[table[:, 0]] == speakers[table[:, 2]]).any())
    if stale:
        raise ValueError(f"{path}: its trials do not fit this split (index out of range or an "
                         "impostor of the voice's own speaker); delete it or use another --out")
    return table


def matching(split: SplitFeatures, out: Path, seed: int, n_tuples: int) -> dict:
    n, genders = len(split.keys), label_column(split.attributes, "gender")
    makers = {"random": lambda: m.make_matching_tuples(n, split.speakers, n_tuples=n_tuples, seed=seed)}
    if all(g is not None for g in genders):
        makers["same_gender"] = lambda: m.make_matching_tuples(
            n, split.speakers, genders.astype(str), n_tuples=n_tuples, seed=seed, same_gender=True)
    result: dict[str, Any] = {}
    for kind, make in makers.items():
        table = _tuples(out / TUPLE_FILES[kind], make, split.speakers)
        result[kind] = {"n_tuples": len(table), "durations": {
            label: {metric: _accuracy(v_s, split.v_f, table, metric) for metric in m.METRICS}
            for label, v_s in split.v_s.items()
        }}
    return result


def _accuracy(v_s: torch.Tensor, v_f: torch.Tensor, table: np.ndarray, metric: str) -> dict:
    accuracy, low, high = m.matching_accuracy(v_s, v_f, table, metric)
    return {"accuracy": accuracy, "ci": [low, high]}


# ----------------------------------------------------------------------------- attribute readers


@dataclass
class Evaluation:
    """What an attribute reader may use: the evaluated split and where the data lives."""

    split: SplitFeatures
    shards: Path
    train_shards: Path | None
    decoder: Path | None = None

    @cached_property
    def training_faces(self) -> tuple[list[dict[str, Any]], np.ndarray] | None:
        """(flat truths, fc7 (N_train, D)) of the training split, read once; None without one."""
        train = self.train_shards
        if train is None or not (train / schema.INDEX).is_file():
            return None
        from tqdm import tqdm

        skipped: list[str] = []
        records = list(tqdm(_samples(train, False, skipped), unit="clip", desc=f"read {train.name}"))
        return [flat_attributes(r["meta"]) for r in records], np.stack([r["fc7"] for r in records])


def probe_reader(evaluation: Evaluation) -> dict[str, Any]:
    """Reader (a): a linear probe per attribute, fitted on training faces' teacher features and
    applied to v_f (reference) and v_s (prediction) of the evaluated split."""
    train = evaluation.train_shards
    if evaluation.training_faces is None:
        return {"skipped": f"no training split at {train}; pass --train-shards OUT/train"}
    train_truth, train_fc7 = evaluation.training_faces  # fc7: (N_train, D)
    split = evaluation.split
    out: dict[str, Any] = {}
    for name in PROBE_ATTRIBUTES:
        labels = label_column(train_truth, name)
        known = np.array([v is not None for v in labels])
        if len(set(labels[known])) < 2:
            continue  # fewer than 2 known classes in training: nothing to learn
        probe = m.LinearProbe().fit(train_fc7[known], labels[known].astype(str))
        truth = label_column(split.attributes, name)
        truth = truth.astype(str) if all(v is not None for v in truth) else None
        out[name] = {"n_train": int(known.sum()), "durations": {
            label: m.attribute_agreement(probe, split.v_f, v_s, truth) for label, v_s in split.v_s.items()
        }}
    return out or {"skipped": f"{train}: no attribute with 2 or more known classes"}


def _read_age_gender(net: Any, faces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(gender labels, age-decade labels) of RGB face images, read in chunks."""
    genders, decades = [], []
    for start in range(0, len(faces), FACE_CHUNK):
        found = net.predict(faces[start : start + FACE_CHUNK])
        genders += found.gender.tolist()
        decades += [m.age_decade(float(age)) for age in found.age]
    return np.array(genders), np.array(decades)


def agegender_reader(evaluation: Evaluation) -> dict[str, Any]:
    """Reader (b): face-api's AgeGenderNet on face images: the clip's own face (reference) vs the
    canonical face decoded from v_s (prediction). Needs --decoder and the weights (make faceapi)."""
    from s2f.agegender import DEFAULT_MODEL_DIR, MANIFEST_NAME, AgeGenderNet

    if evaluation.decoder is None:
        return {"skipped": "reads faces decoded from v_s: pass --decoder DECODER_CKPT"}
    if not (DEFAULT_MODEL_DIR / MANIFEST_NAME).is_file():
        return {"skipped": f"no AgeGenderNet weights in {DEFAULT_MODEL_DIR}; run `make faceapi`"}
    from PIL import Image

    from s2f.craniofacial import decode_faces
    from s2f.decoder_training import load_decoder

    net, decoder, split = AgeGenderNet.load(), load_decoder(evaluation.decoder), evaluation.split
    jpegs = read_faces(evaluation.shards, split.keys)
    originals = [np.asarray(Image.open(io.BytesIO(jpegs[key])).convert("RGB")) for key in split.keys]
    reference = dict(zip(("gender", "age_decade"), _read_age_gender(net, originals)))
    out: dict[str, Any] = {name: {"durations": {}} for name in reference}
    for label, v_s in split.v_s.items():
        predicted = dict(zip(("gender", "age_decade"), _read_age_gender(net, decode_faces(decoder, v_s)[0])))
        for name in reference:
            truth = label_column(split.attributes, name)
            truth = truth.astype(str) if all(v is not None for v in truth) else None
            out[name]["durations"][label] = m.label_agreement(
                reference[name], predicted[name], sorted(set(reference[name])), truth)
    return out


Reader = Callable[[Evaluation], dict[str, Any]]
# Attribute readers: name -> reader. Each returns {attribute: {"durations": {dur:
# label_agreement(...)}, ...}} or {"skipped": reason}; the report shows each as its own block.
READERS: dict[str, Reader] = {"linear_probe": probe_reader, "agegender_net": agegender_reader}


# ----------------------------------------------------------------------------- groups and media


def groups(split: SplitFeatures, gallery: np.ndarray, label: str, ranks: torch.Tensor, seed: int) -> dict:
    """Per-group recall@k and angle over the gallery for every group attribute that is known."""
    columns = {name: label_column([split.attributes[i] for i in gallery], name) for name in GROUP_ATTRIBUTES}
    known = {name: col for name, col in columns.items() if any(v is not None for v in col)}
    angles = m.angles_deg(split.v_s[label][gallery], split.v_f[gallery])  # (M,)
    return m.breakdown_by_attribute(ranks, angles, known, seed=seed)


def retrieval_grid(
    queries: torch.Tensor, gallery: torch.Tensor, n_queries: int, top: int, seed: int
) -> list[tuple[int, list[int]]]:
    """(query row, its `top` best gallery rows by cosine) for a seeded choice of queries;
    query i's true face is gallery row i."""
    chosen = m.sample_gallery(len(queries), min(n_queries, len(queries)), seed)
    scores = m.similarity_scores(queries[chosen], gallery, "cosine")  # (Q, M)
    best = scores.topk(min(top, len(gallery)), dim=1).indices  # (Q, top)
    return [(int(q), row.tolist()) for q, row in zip(chosen, best)]


def media(split: SplitFeatures, gallery: np.ndarray, shards: Path, longest: str, seed: int) -> dict[str, Any]:
    """What the report draws besides metrics.json: angle histograms, retrieval grids (duration
    `longest`, cosine, with face.jpg bytes) and a seeded subset of v_s for the t-SNE."""
    grid = retrieval_grid(split.v_s[longest][gallery], split.v_f[gallery], GRID_QUERIES, GRID_TOP, seed)
    wanted = {split.keys[gallery[i]] for q, top in grid for i in [q, *top]}
    faces = read_faces(shards, sorted(wanted))
    rows = [
        {"query": split.keys[gallery[q]], "faces": [
            {"key": split.keys[gallery[i]], "jpeg": faces.get(split.keys[gallery[i]]), "true": i == q}
            for i in [q, *top]
        ]}
        for q, top in grid
    ]  # faces[0] is the true face, then the retrieved ones
    subset = m.sample_gallery(len(split.keys), EMBEDDING_MAX, seed)
    return {
        "angles": {label: m.angles_deg(v_s, split.v_f).numpy() for label, v_s in split.v_s.items()},
        "grid": {"duration": longest, "rows": rows if faces else []},
        "embedding": {
            "duration": longest,
            "v_s": split.v_s[longest][subset].numpy(),  # (P, D)
            "labels": {name: label_column([split.attributes[i] for i in subset], name).tolist()
                       for name in GROUP_ATTRIBUTES},
        },
    }


# ----------------------------------------------------------------------------- the stage


def compute_metrics(
    split: SplitFeatures, out: Path, gallery_size: int, seed: int, n_tuples: int,
    evaluation: Evaluation, readers: Mapping[str, Reader],
) -> tuple[dict, np.ndarray]:
    """Every section of metrics.json except config, and the gallery rows used."""
    gallery = m.sample_gallery(len(split.keys), min(gallery_size, len(split.keys)), seed)
    retrieved, ranks = {}, {}
    for label in split.v_s:
        retrieved[label], ranks[label] = retrieval(split, label, gallery, seed)
    result = {
        "data": {"items": len(split.keys), "speakers": len(set(split.speakers)), "skipped": split.skipped},
        "similarity": {label: m.feature_similarity(v_s, split.v_f) for label, v_s in split.v_s.items()},
        "retrieval": {label: r["items"] for label, r in retrieved.items()},
        "identity_retrieval": {label: r["identity"] for label, r in retrieved.items()},
        "matching": matching(split, out, seed, n_tuples),
        "attributes": {name: reader(evaluation) for name, reader in readers.items()},
        "groups": {label: groups(split, gallery, label, ranks[label]["cosine"], seed) for label in split.v_s},
    }
    found = oracle(evaluation, gallery, retrieved, seed)
    if found is not None:
        result["oracle"] = found
    return result, gallery


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(
    ckpt: str | Path, shards: str | Path, out: str | Path, gallery_size: int = m.DEFAULT_GALLERY_SIZE,
    durations: Sequence[float] = DEFAULT_DURATIONS, seed: int = 0, train_shards: str | Path | None = None,
    batch_size: int = 32, device: str | None = None, n_tuples: int = m.DEFAULT_N_TUPLES,
    readers: Mapping[str, Reader] | None = None, decoder: str | Path | None = None,
    face_teacher: str | None = None,
) -> dict:
    """Evaluate a checkpoint on a split folder; writes out/metrics.json and out/report.html.

    train_shards: the split the attribute probes learn from; None means the `train` folder next
    to `shards`. readers: attribute readers (default `READERS`). decoder: a face decoder
    checkpoint: adds the "faces" section (`s2f.decoded_faces`) and the readers that look at
    decoded faces. face_teacher: the teacher spec that reads decoded faces ("dlib",
    "vggface:PATH"); None uses the shards' teacher when its name alone loads it.
    """
    from s2f.decoded_faces import FaceStage, face_grid
    from s2f.report import render_report

    shards, out = Path(shards), Path(out)
    train = Path(train_shards) if train_shards is not None else shards.parent / "train"
    if gallery_size < 1:
        raise ValueError(f"gallery_size={gallery_size}: need at least 1 face per gallery")
    # Loaded before the model runs: a wrong decoder or teacher fails in seconds, not minutes.
    faces = FaceStage.load(decoder, face_teacher, shards) if decoder is not None else None
    out.mkdir(parents=True, exist_ok=True)
    device = device or default_device()
    split = embed_split(load_model(ckpt, device), shards, durations, batch_size, device)
    evaluation = Evaluation(split, shards, train, Path(decoder) if decoder is not None else None)
    result, gallery = compute_metrics(
        split, out, gallery_size, seed, n_tuples, evaluation, READERS if readers is None else readers)
    longest = duration_label(max(durations))
    pictures = media(split, gallery, shards, longest, seed)
    if faces is not None:
        result["faces"], readings = faces.evaluate(split, gallery, seed)
        pictures["faces"] = face_grid(split, readings, shards, longest, seed)
    result["config"] = {
        "checkpoint": str(ckpt), "shards": str(shards), "train_shards": str(train), "seed": seed,
        "gallery_size": gallery_size, "durations": [duration_label(s) for s in durations],
        "ks": list(m.DEFAULT_KS), "n_tuples": n_tuples, "decoder": None if decoder is None else str(decoder),
    }
    (out / METRICS_FILE).write_text(json.dumps(result, sort_keys=True, indent=2) + "\n")
    render_report(result, pictures, out / REPORT_FILE)
    return result


# ----------------------------------------------------------------------------- CLI


def _durations(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--durations {text!r}: expected seconds like 3,6") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2f evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint of a Speech2Face model")
    p.add_argument("--shards", required=True, help="split folder to evaluate, e.g. OUT/test")
    p.add_argument("--out", help="output folder (default: eval-<checkpoint name> next to it)")
    p.add_argument("--gallery-size", type=int, default=m.DEFAULT_GALLERY_SIZE)
    p.add_argument("--durations", type=_durations, default=DEFAULT_DURATIONS, help="seconds, e.g. 3,6")
    p.add_argument("--train-shards", help="split the attribute probes learn from (default: the "
                                          "train folder next to --shards)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tuples", type=int, default=m.DEFAULT_N_TUPLES, help="1:2 matching trials")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--decoder", help="face decoder checkpoint: adds F2F / S2F faces (detection, retrieval, "
                                     "craniofacial) and the age/gender reader on decoded faces")
    p.add_argument("--face-teacher", help="teacher that reads decoded faces: dlib or vggface:PATH (default: "
                                          "the shards' teacher when it is dlib)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else ckpt.parent / f"eval-{ckpt.stem}"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    evaluate(ckpt, args.shards, out, args.gallery_size, args.durations, args.seed,
             args.train_shards, args.batch_size, args.device, args.tuples, decoder=args.decoder,
             face_teacher=args.face_teacher)
    print(f"wrote {out / METRICS_FILE} and {out / REPORT_FILE}")
    return 0
