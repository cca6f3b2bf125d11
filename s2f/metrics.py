"""Evaluation math for every protocol of SPEC section 7: similarity, retrieval, 1:2 matching,
attribute agreement, per-group breakdowns and craniofacial correlation.

Conventions
- Features (N, D) and per-query values (N,) are torch tensors (numpy arrays are accepted and
  converted); scoring runs on the features' device, per-query results come back on the CPU.
  Labels, identities and index tables are numpy arrays of strings or ints.
- Every random choice takes an explicit integer seed (numpy's default PCG64 Generator).
- Results are plain Python floats, ints, lists and dicts, so they serialise to JSON. Recalls and
  accuracies are fractions in [0, 1], not percentages; angles are in degrees.
- Ranks are 1-based. Ties are pessimistic: a non-matching gallery item that scores exactly as
  well as the best match ranks above it, so a collapsed model (every score equal) gets rank M,
  never rank 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_KS = (1, 2, 5, 10)  # recall@K cut-offs of the paper's retrieval table
DEFAULT_GALLERY_SIZE = 5_000  # faces per retrieval gallery (SPEC section 7)
METRICS = ("cosine", "l2", "l1")  # similarity between a voice feature and a face feature
QUERY_CHUNK = 1_024  # queries scored at once: memory stays at QUERY_CHUNK x M scores
DEFAULT_N_BOOT = 1_000  # bootstrap resamples
BOOT_CHUNK_VALUES = 10_000_000  # resampled values held in memory at once by the bootstrap
DEFAULT_ALPHA = 0.05  # two-sided: 95 % intervals
DEFAULT_N_TUPLES = 10_000  # 1:2 trials: the 95 % interval is then about +-1 point wide
TUPLE_COLUMNS = ("voice", "true_face", "impostor_face")
PROBE_L2 = 1e-3  # linear-probe weight penalty on standardised features
PROBE_MAX_ITER = 200  # L-BFGS iterations of the linear probe
STD_FLOOR = 1e-6  # a feature whose std is below this is constant: it keeps scale 1
AGE_DECADE_MIN = 10  # years: every younger age is labelled "10s"
AGE_DECADE_MAX = 70  # years: this decade and every older age is labelled "70s+"
# (from age in years, label) of the age groups, youngest first.
AGE_GROUPS = ((0, "<18"), (18, "18-29"), (30, "30-44"), (45, "45-59"), (60, "60+"))
UNKNOWN_GROUP = "unknown"  # group of an item whose attribute is missing (None)
DEFAULT_N_PERM = 1_000  # shuffled pairings of the random-pair baseline
R_TIE_TOLERANCE = 1e-12  # |r| this close to the observed one counts as "at least as large"
CONSTANT_VARIANCE = 1e-12  # a resample of standardised values varying less than this is constant

Array = torch.Tensor | np.ndarray | Sequence


# ----------------------------------------------------------------------------- input checks


def _features(name: str, x: Array) -> torch.Tensor:
    """A finite float (N, D) tensor; float16/bfloat16 stored features are widened to float32."""
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a (N, D) feature matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinite values; check the model output")
    return t


def _paired(v_s: Array, v_f: Array) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _features("v_s", v_s), _features("v_f", v_f)
    if a.shape != b.shape:
        raise ValueError(
            f"v_s {tuple(a.shape)} and v_f {tuple(b.shape)}: expected the same (N, D); "
            "row i of each must be the same clip"
        )
    return _common(a, b)


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both on a's device in the wider of the two float dtypes."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(a.device, dtype)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}")


def _labels(name: str, labels: Array, n: int | None = None) -> np.ndarray:
    out = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if out.ndim != 1 or (n is not None and len(out) != n):
        raise ValueError(f"{name}: expected {n or 'N'} labels in a 1-D array, got {out.shape}")
    return out


def _codes(*label_arrays: np.ndarray) -> list[np.ndarray]:
    """Integer codes of labels shared across arrays (equal labels -> equal codes)."""
    try:
        _, codes = np.unique(np.concatenate(label_arrays), return_inverse=True)
    except TypeError as error:  # sorting fails on None or on strings mixed with numbers
        raise ValueError(
            f"labels {np.concatenate(label_arrays)[:5].tolist()}...: cannot be compared; "
            "give every item a label of one type (fill missing ones, e.g. 'unknown')"
        ) from error
    return np.split(codes.ravel(), np.cumsum([len(a) for a in label_arrays])[:-1])


# ----------------------------------------------------------------------------- feature similarity


def paired_scores(a: Array, b: Array, metric: str = "cosine") -> torch.Tensor:
    """Similarity of row i of `a` with row i of `b`, (N,); higher is more similar.

    cosine: cosine similarity; l2 / l1: minus the Euclidean / Manhattan distance.
    """
    _check_metric(metric)
    a, b = _paired(a, b)
    if metric == "cosine":
        return F.cosine_similarity(a, b, dim=1)
    return -torch.linalg.vector_norm(a - b, ord=2.0 if metric == "l2" else 1.0, dim=1)


def angles_deg(v_s: Array, v_f: Array) -> torch.Tensor:
    """Angle in degrees between each predicted and true feature, (N,)."""
    a, b = _paired(v_s, v_f)
    # float64: acos is steep near cos = 1, where float32 rounding alone reads as ~0.02 degrees.
    # The clamp: rounding can leave |cos| slightly above 1, where acos is NaN.
    cos = paired_scores(a.double(), b.double(), "cosine").clamp(-1.0, 1.0)  # (N,)
    return torch.rad2deg(torch.acos(cos))


def feature_similarity(v_s: Array, v_f: Array) -> dict[str, float]:
    """Mean and std (population) of the angle (degrees), L1 and L2 distance between v_s and v_f.

    Keys: angle_mean, angle_std, l1_mean, l1_std, l2_mean, l2_std.
    """
    per_pair = {
        "angle": angles_deg(v_s, v_f),
        "l1": -paired_scores(v_s, v_f, "l1"),
        "l2": -paired_scores(v_s, v_f, "l2"),
    }  # each (N,)
    out = {}
    for name, values in per_pair.items():
        out[f"{name}_mean"] = values.double().mean().item()
        out[f"{name}_std"] = values.double().std(correction=0).item()
    return out


# ----------------------------------------------------------------------------- retrieval


def similarity_scores(queries: torch.Tensor, gallery: torch.Tensor, metric: str) -> torch.Tensor:
    """Scores (B, M) of every query (B, D) against every gallery item (M, D); higher is closer."""
    _check_metric(metric)
    if metric == "cosine":
        return F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T  # (B, M)
    return -torch.cdist(queries, gallery, p=2.0 if metric == "l2" else 1.0)  # (B, M)


def _ranks_in_block(scores: torch.Tensor, is_match: torch.Tensor) -> torch.Tensor:
    """1-based rank (B,) of each row's best match: 1 + non-matches scoring at least as high."""
    best = scores.masked_fill(~is_match, -math.inf).amax(dim=1, keepdim=True)  # (B, 1)
    return ((scores >= best) & ~is_match).sum(dim=1) + 1  # (B,)


def _ranks(
    queries: Array, gallery: Array, query_codes: np.ndarray, gallery_codes: np.ndarray, metric: str
) -> torch.Tensor:
    """Rank (N,) of the best gallery item whose code equals the query's code."""
    q, g = _features("queries", queries), _features("gallery", gallery)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries D={q.shape[1]} and gallery D={g.shape[1]}: dims must agree")
    q, g = _common(q, g)
    q_codes = torch.as_tensor(query_codes, device=q.device)  # (N,)
    g_codes = torch.as_tensor(gallery_codes, device=q.device)  # (M,)
    ranks = []
    for start in range(0, len(q), QUERY_CHUNK):
        block = slice(start, start + QUERY_CHUNK)
        is_match = q_codes[block, None] == g_codes[None, :]  # (B, M)
        missing = (~is_match.any(dim=1)).nonzero()
        if len(missing):
            raise ValueError(
                f"query {start + int(missing[0])}: its true item is not in the gallery; "
                "build the gallery from the queries' own items or drop such queries"
            )
        ranks.append(_ranks_in_block(similarity_scores(q[block], g, metric), is_match))
    return torch.cat(ranks).cpu()


def retrieval_ranks(
    queries: Array, gallery: Array, match_index: Array | None = None, metric: str = "cosine"
) -> torch.Tensor:
    """Rank (N,) of each query's true gallery item, 1-based, ties pessimistic.

    match_index (N,): gallery row of each query's true item; None means query i matches row i.
    """
    n, m = len(queries), len(gallery)
    if match_index is None:
        if n != m:
            raise ValueError(f"{n} queries vs {m} gallery items: pass match_index when they differ")
        match_index = np.arange(n)
    index = _labels("match_index", match_index, n).astype(np.int64)
    if len(index) and (index.min() < 0 or index.max() >= m):
        raise ValueError(f"match_index: values must lie in [0, {m}), the gallery rows")
    return _ranks(queries, gallery, index, np.arange(m), metric)


def identity_ranks(
    queries: Array, gallery: Array, query_ids: Array, gallery_ids: Array, metric: str = "cosine"
) -> torch.Tensor:
    """Rank (N,) of the best gallery item of the query's identity (any such item is a hit)."""
    q_ids = _labels("query_ids", query_ids, len(queries))
    g_ids = _labels("gallery_ids", gallery_ids, len(gallery))
    q_codes, g_codes = _codes(q_ids, g_ids)
    return _ranks(queries, gallery, q_codes, g_codes, metric)


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks={ks}: expected positive integers such as {DEFAULT_KS}")


def hits_at_k(ranks: Array, k: int) -> torch.Tensor:
    """1.0 where the true item is within the top k, else 0.0, (N,)."""
    return (torch.as_tensor(ranks) <= k).double()


def recall_at_k(ranks: Array, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """{"recall@k": fraction of queries with rank <= k} for each k."""
    _check_ks(ks)
    return {f"recall@{k}": hits_at_k(ranks, k).mean().item() for k in ks}


def retrieval_recall(
    queries: Array,
    gallery: Array,
    match_index: Array | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    metric: str = "cosine",
) -> dict[str, float]:
    """Item-level recall@k: the query's own face must rank within the top k."""
    return recall_at_k(retrieval_ranks(queries, gallery, match_index, metric), ks)


def identity_recall(
    queries: Array,
    gallery: Array,
    query_ids: Array,
    gallery_ids: Array,
    ks: Sequence[int] = DEFAULT_KS,
    metric: str = "cosine",
) -> dict[str, float]:
    """Identity-level recall@k: any gallery face of the query's identity in the top k is a hit."""
    return recall_at_k(identity_ranks(queries, gallery, query_ids, gallery_ids, metric), ks)


def chance_recall(k: int, gallery_size: int) -> float:
    """Recall@k of a random ranking with one true item among `gallery_size`: k / M."""
    if gallery_size < 1:
        raise ValueError(f"gallery_size={gallery_size}: a gallery needs at least one item")
    return min(k, gallery_size) / gallery_size


def _miss_probability(matches: np.ndarray, gallery_size: int, k: int) -> np.ndarray:
    """C(M - m, k) / C(M, k) per query (N,): no match among the top k of a random ranking."""
    i = np.arange(min(k, gallery_size))  # (k,)
    factors = (gallery_size - matches[:, None] - i) / (gallery_size - i)  # (N, k)
    # A factor reaching zero means fewer than k non-matches exist: a hit is certain.
    return np.clip(factors, 0.0, None).prod(axis=1)


def identity_chance_recall(
    query_ids: Array, gallery_ids: Array, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Expected identity-level recall@k of a random ranking for this gallery composition.

    A query with m same-identity items among M hits with probability 1 - C(M-m, k) / C(M, k);
    the result averages that over queries.
    """
    _check_ks(ks)
    q_ids, g_ids = _labels("query_ids", query_ids), _labels("gallery_ids", gallery_ids)
    q_codes, g_codes = _codes(q_ids, g_ids)
    matches = np.bincount(g_codes, minlength=q_codes.max(initial=0) + 1)[q_codes]  # (N,)
    return {
        f"recall@{k}": float(np.mean(1.0 - _miss_probability(matches, len(g_ids), k))) for k in ks
    }


def sample_gallery(
    n_items: int, gallery_size: int = DEFAULT_GALLERY_SIZE, seed: int = 0
) -> np.ndarray:
    """Sorted indices of a reproducible subset of min(gallery_size, n_items) items."""
    if n_items < 1 or gallery_size < 1:
        raise ValueError(f"n_items={n_items}, gallery_size={gallery_size}: both must be >= 1")
    if n_items <= gallery_size:
        return np.arange(n_items)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_items, size=gallery_size, replace=False))


# ----------------------------------------------------------------------------- intervals


def bootstrap_ci(
    values: Array,
    statistic: Callable[..., np.ndarray] = np.mean,
    n_boot: int = DEFAULT_N_BOOT,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over per-query values (N,).

    `statistic(samples, axis=1)` must reduce (B, N) resamples to (B,), as numpy reductions do.
    """
    x = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"values: expected a non-empty 1-D array (one per query), got {x.shape}")
    rng = np.random.default_rng(seed)
    rows = max(1, BOOT_CHUNK_VALUES // len(x))
    stats = np.concatenate([
        statistic(x[rng.integers(0, len(x), size=(min(rows, n_boot - done), len(x)))], axis=1)
        for done in range(0, n_boot, rows)
    ])  # (n_boot,)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def pearson_ci_over_groups(
    x: Array,
    y: Array,
    groups: Sequence | np.ndarray,
    n_boot: int = DEFAULT_N_BOOT,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of Pearson r that resamples whole groups (speakers).

    A speaker's clips share one face, so they are not independent draws: resampling clips, or
    the p-value's n - 2 degrees of freedom, would make r look surer than the number of speakers
    allows. Each resample draws G groups with replacement from the G present and keeps every
    item of each drawn group, once per draw; r of a resample is the Pearson r of items weighted
    by those counts (B, N), which equals r of the concatenated resample. Resamples where x or y
    is constant are left out.
    """
    zx, zy = _standardised_pair(x, y)
    labels = np.asarray(groups)
    if labels.shape != zx.shape:
        raise ValueError(f"groups: expected one label per pair ({len(zx)},), got {labels.shape}")
    _, group_of = np.unique(labels, return_inverse=True)  # (N,) group index of each item
    n_groups = int(group_of.max()) + 1
    if n_groups < 2:
        raise ValueError("groups: need at least 2 groups to resample; got 1")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_groups, size=(n_boot, n_groups))  # (B, G)
    counts = np.zeros((n_boot, n_groups))
    np.add.at(counts, (np.arange(n_boot)[:, None], picks), 1.0)
    rows = max(1, BOOT_CHUNK_VALUES // len(zx))
    r = np.concatenate([
        _weighted_pearson(counts[start:start + rows, group_of], zx, zy)
        for start in range(0, n_boot, rows)
    ])  # (B,)
    low, high = np.nanquantile(r, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _weighted_pearson(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of x, y (N,) under each row of weights (B, N); NaN where a side is constant."""
    total = weights.sum(axis=1)  # (B,)

    def mean(values: np.ndarray) -> np.ndarray:
        return weights @ values / total  # (B,)

    mx, my = mean(x), mean(y)
    cov, vx, vy = mean(x * y) - mx * my, mean(x * x) - mx * mx, mean(y * y) - my * my
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(vx * vy)
    return np.where((vx > CONSTANT_VARIANCE) & (vy > CONSTANT_VARIANCE), np.clip(r, -1.0, 1.0), np.nan)


def wilson_ci(successes: int, n: int, alpha: float = DEFAULT_ALPHA) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes / n."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"successes={successes}, n={n}: need n >= 1 and 0 <= successes <= n")
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1; rounding would leave ~1e-17.
    low = 0.0 if successes == 0 else centre - half
    high = 1.0 if successes == n else centre + half
    return low, high


# ----------------------------------------------------------------------------- 1:2 matching


def _impostor_groups(identities: np.ndarray, genders: np.ndarray | None) -> np.ndarray:
    """Group code (N,) inside which impostors are drawn; raises if an item has no impostor."""
    (id_codes,) = _codes(identities)
    group = np.zeros(len(identities), np.int64) if genders is None else _codes(genders)[0]
    pair = group * (id_codes.max() + 1) + id_codes  # (N,) one code per (group, identity)
    candidates = np.bincount(group)[group] - np.bincount(pair)[pair]  # (N,)
    if (candidates == 0).any():
        item = int(np.flatnonzero(candidates == 0)[0])
        where = "" if genders is None else f" of gender {genders[item]!r}"
        raise ValueError(
            f"item {item}: no item of another identity{where} to use as impostor; "
            "add identities, drop such items, or pass same_gender=False"
        )
    return group


def make_matching_tuples(
    n_queries: int,
    identities: Array,
    genders: Array | None = None,
    n_tuples: int = DEFAULT_N_TUPLES,
    seed: int = 0,
    same_gender: bool = False,
) -> np.ndarray:
    """1:2 trials (T, 3): [voice index, true face index, impostor face index].

    Item i is one clip (voice i, face i), so the true face index equals the voice index. Voices
    are drawn without replacement while n_tuples <= n_queries; the impostor is uniform over items
    of a different identity (and of the voice's gender when same_gender).
    """
    ids = _labels("identities", identities, n_queries)
    if same_gender and genders is None:
        raise ValueError("same_gender=True needs genders: pass one gender label per item")
    sexes = _labels("genders", genders, n_queries) if same_gender else None
    group = _impostor_groups(ids, sexes)
    (id_codes,) = _codes(ids)
    order = np.argsort(group, kind="stable")  # items listed group by group
    sizes = np.bincount(group)
    starts = np.cumsum(sizes) - sizes
    rng = np.random.default_rng(seed)
    voices = rng.choice(n_queries, size=n_tuples, replace=n_tuples > n_queries)
    impostors = np.empty(n_tuples, np.int64)
    todo = np.arange(n_tuples)
    while len(todo):  # rejection: uniform over the group, redrawn while the identity matches
        g = group[voices[todo]]
        picks = order[starts[g] + rng.integers(0, sizes[g])]
        ok = id_codes[picks] != id_codes[voices[todo]]
        impostors[todo[ok]] = picks[ok]
        todo = todo[~ok]
    return np.stack([voices, voices, impostors], axis=1).astype(np.int64)


def _check_tuples(tuples: Array, n_items: int | None = None) -> np.ndarray:
    table = np.asarray(tuples)
    if table.ndim != 2 or table.shape[1] != 3 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"tuples: expected integer (T, 3) {TUPLE_COLUMNS}, got {table.shape}")
    too_big = n_items is not None and len(table) and table.max() >= n_items
    if too_big or (len(table) and table.min() < 0):
        bound = n_items or "N"
        raise ValueError(f"tuples: indices must lie in [0, {bound}); make them for this split")
    return table.astype(np.int64)


def save_tuples(path: str | Path, tuples: np.ndarray) -> None:
    """Write 1:2 trials as JSON so that runs are scored on the same trials."""
    table = _check_tuples(tuples)
    payload = {"columns": list(TUPLE_COLUMNS), "tuples": table.tolist()}
    Path(path).write_text(json.dumps(payload))


def load_tuples(path: str | Path) -> np.ndarray:
    """Read 1:2 trials (T, 3) written by `save_tuples`."""
    payload = json.loads(Path(path).read_text())
    if payload.get("columns") != list(TUPLE_COLUMNS):
        raise ValueError(f"{path}: not a 1:2 tuples file (columns {payload.get('columns')})")
    return _check_tuples(np.asarray(payload["tuples"], dtype=np.int64).reshape(-1, 3))


def matching_outcomes(
    v_s: Array, v_f: Array, tuples: Array, metric: str = "cosine"
) -> torch.Tensor:
    """Per trial (T,): True when the voice scores strictly higher with its true face (ties fail)."""
    v_s, v_f = _paired(v_s, v_f)
    table = torch.as_tensor(_check_tuples(tuples, len(v_s)), device=v_s.device)  # (T, 3)
    voice = v_s[table[:, 0]]  # (T, D)
    true = paired_scores(voice, v_f[table[:, 1]], metric)  # (T,)
    impostor = paired_scores(voice, v_f[table[:, 2]], metric)  # (T,)
    return (true > impostor).cpu()


def matching_accuracy(
    v_s: Array, v_f: Array, tuples: Array, metric: str = "cosine", alpha: float = DEFAULT_ALPHA
) -> tuple[float, float, float]:
    """(accuracy, ci_low, ci_high) of 1:2 matching; Wilson interval; chance is 0.5."""
    correct = matching_outcomes(v_s, v_f, tuples, metric)
    if len(correct) == 0:
        raise ValueError("tuples: empty; make some with make_matching_tuples")
    low, high = wilson_ci(int(correct.sum()), len(correct), alpha)
    return correct.double().mean().item(), low, high


# ----------------------------------------------------------------------------- attributes


def confusion_matrix(reference: Array, predicted: Array, classes: Sequence) -> np.ndarray:
    """Counts (C, C): row = reference class, column = predicted class, in the order of `classes`."""
    ref = _labels("reference", reference)
    pred = _labels("predicted", predicted, len(ref))
    position = {label: i for i, label in enumerate(np.asarray(classes).tolist())}
    seen = set(ref.tolist()) | set(pred.tolist())
    unknown = sorted((x for x in seen if x not in position), key=str)
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in classes {list(position)}; add them")
    rows = np.array([position[x] for x in ref.tolist()], dtype=np.int64)
    cols = np.array([position[x] for x in pred.tolist()], dtype=np.int64)
    counts = np.zeros((len(position), len(position)), dtype=np.int64)
    np.add.at(counts, (rows, cols), 1)
    return counts


def row_normalise(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum; a row with no items stays all zero (not NaN)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)  # (C, 1)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _agreement(reference: np.ndarray, predicted: np.ndarray, classes: list) -> dict[str, Any]:
    counts = confusion_matrix(reference, predicted, classes)
    return {
        "confusion": counts.tolist(),
        "row_normalised": row_normalise(counts).tolist(),
        "accuracy": float(np.trace(counts) / max(1, counts.sum())),
        "n": int(counts.sum()),
    }


class LinearProbe:
    """Multinomial logistic regression on standardised teacher features.

    Fitted full-batch with L-BFGS from zero weights: the objective is convex and the start fixed,
    so the same data give the same probe (no seed is involved).
    """

    def __init__(self, l2: float = PROBE_L2, max_iter: int = PROBE_MAX_ITER) -> None:
        self.l2, self.max_iter = l2, max_iter
        self.classes: list | None = None
        self.mean = self.scale = self.weight = self.bias = None  # torch tensors once fitted

    def fit(self, features: Array, labels: Array) -> LinearProbe:
        """Fit on features (N, D) of faces with their labels (N,) (strings or ints)."""
        x = _features("features", features).double().cpu()
        y_labels = _labels("labels", labels, len(x))
        classes, y = np.unique(y_labels, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"labels: a probe needs at least 2 classes, got {classes.tolist()}")
        self.classes = classes.tolist()
        self.mean = x.mean(dim=0)
        std = x.std(dim=0, correction=0)
        self.scale = torch.where(std > STD_FLOOR, std, torch.ones_like(std))
        self._optimise(self._standardise(x), torch.as_tensor(y.ravel()))
        return self

    def _optimise(self, z: torch.Tensor, y: torch.Tensor) -> None:
        weight = torch.zeros(len(self.classes), z.shape[1], dtype=z.dtype, requires_grad=True)
        bias = torch.zeros(len(self.classes), dtype=z.dtype, requires_grad=True)
        optimiser = torch.optim.LBFGS(
            [weight, bias], max_iter=self.max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            logits = z @ weight.T + bias  # (N, C)
            loss = F.cross_entropy(logits, y) + 0.5 * self.l2 * weight.square().sum()
            loss.backward()
            return loss

        optimiser.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale  # (N, D)

    def predict(self, features: Array) -> np.ndarray:
        """Predicted labels (N,) for features (N, D)."""
        if self.classes is None:
            raise RuntimeError("LinearProbe.predict before fit: call fit() or from_state() first")
        x = _features("features", features).double().cpu()
        if x.shape[1] != len(self.mean):
            raise ValueError(f"features: D={x.shape[1]}, but the probe has D={len(self.mean)}")
        logits = self._standardise(x) @ self.weight.T + self.bias  # (N, C)
        return np.asarray(self.classes)[logits.argmax(dim=1).numpy()]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: classes, standardisation and weights."""
        if self.classes is None:
            raise RuntimeError("LinearProbe.state_dict before fit: nothing to save yet")
        tensors = {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias}
        return {"classes": self.classes, "l2": self.l2, "max_iter": self.max_iter} | {
            name: t.tolist() for name, t in tensors.items()
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LinearProbe:
        """Rebuild a fitted probe from `state_dict()` output."""
        probe = cls(state["l2"], state["max_iter"])
        probe.classes = list(state["classes"])
        for name in ("mean", "scale", "weight", "bias"):
            setattr(probe, name, torch.tensor(state[name], dtype=torch.float64))
        return probe


def attribute_agreement(
    probe: LinearProbe, v_f: Array, v_s: Array, true_labels: Array | None = None
) -> dict[str, Any]:
    """Agreement of the probe's attribute on v_s (prediction) with it on v_f (reference).

    Returns "classes" (row and column order: the probe's classes, then any true label the probe
    never saw) and "reference_vs_prediction" (confusion, row_normalised, accuracy, n); with
    ground truth also "truth_vs_prediction" and "truth_vs_reference" (the upper bound).
    """
    v_s, v_f = _paired(v_s, v_f)
    return label_agreement(probe.predict(v_f), probe.predict(v_s), list(probe.classes), true_labels)


def label_agreement(
    reference: Array, predicted: Array, classes: Sequence, true_labels: Array | None = None
) -> dict[str, Any]:
    """Agreement of any attribute reader's labels on the prediction with those on the reference.

    The same layout as `attribute_agreement`: "classes" (the given classes, then any other label
    met), "reference_vs_prediction", and with ground truth "truth_vs_prediction" and
    "truth_vs_reference".
    """
    reference = _labels("reference", reference)
    predicted = _labels("predicted", predicted, len(reference))
    truth = None if true_labels is None else _labels("true_labels", true_labels, len(reference))
    met = set(reference.tolist()) | set(predicted.tolist()) | set([] if truth is None else truth.tolist())
    classes = list(classes) + sorted(met - set(classes), key=str)
    out: dict[str, Any] = {}
    if truth is not None:
        out["truth_vs_prediction"] = _agreement(truth, predicted, classes)
        out["truth_vs_reference"] = _agreement(truth, reference, classes)
    out["reference_vs_prediction"] = _agreement(reference, predicted, classes)
    return {"classes": classes} | out


def age_decade(age: float) -> str:
    """Decade label: "10s" (every age under 20), "20s", ..., "60s", "70s+" (70 and older)."""
    if not age >= 0:  # also rejects NaN
        raise ValueError(f"age={age}: expected a non-negative number of years")
    decade = min(max(int(age // 10) * 10, AGE_DECADE_MIN), AGE_DECADE_MAX)
    return f"{decade}s+" if decade == AGE_DECADE_MAX else f"{decade}s"


def age_group(age: float) -> str:
    """Age-group label: "<18", "18-29", "30-44", "45-59" or "60+"."""
    if not age >= 0:
        raise ValueError(f"age={age}: expected a non-negative number of years")
    return [label for start, label in AGE_GROUPS if age >= start][-1]


# ----------------------------------------------------------------------------- per-group breakdown


def by_group(
    values: Array,
    groups: Array,
    n_boot: int = DEFAULT_N_BOOT,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> dict[str, tuple[float, int, tuple[float, float]]]:
    """{group: (mean, n, bootstrap ci)} of per-query values (N,); None groups become "unknown"."""
    x = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    labels = _labels("groups", groups, len(x))
    names = np.array([UNKNOWN_GROUP if g is None else str(g) for g in labels.tolist()])
    out = {}
    for name in sorted(set(names.tolist())):
        member = x[names == name]
        ci = bootstrap_ci(member, np.mean, n_boot, alpha, seed)
        out[name] = (float(member.mean()), len(member), ci)
    return out


def breakdown_by_attribute(
    ranks: Array,
    angles: Array,
    attributes: Mapping[str, Array],
    ks: Sequence[int] = DEFAULT_KS,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> dict[str, dict[str, dict]]:
    """{attribute: {"recall@k" | "angle": by_group(...)}} for per-query ranks and angles (N,)."""
    _check_ks(ks)
    per_query = {f"recall@{k}": hits_at_k(ranks, k) for k in ks}
    per_query["angle"] = torch.as_tensor(angles)
    return {
        attribute: {name: by_group(v, groups, n_boot, seed=seed) for name, v in per_query.items()}
        for attribute, groups in attributes.items()
    }


# ----------------------------------------------------------------------------- craniofacial


def _standardised(name: str, x: Array) -> np.ndarray:
    v = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if v.ndim != 1 or len(v) < 3:
        raise ValueError(f"{name}: expected a 1-D array of at least 3 values, got {v.shape}")
    if not np.isfinite(v).all() or v.std() == 0:
        raise ValueError(f"{name}: must be finite and not constant (correlation is undefined)")
    return (v - v.mean()) / v.std()


def _standardised_pair(x: Array, y: Array) -> tuple[np.ndarray, np.ndarray]:
    """x and y (N,) each standardised to mean 0 and population std 1."""
    zx, zy = _standardised("x", x), _standardised("y", y)
    if len(zx) != len(zy):
        raise ValueError(f"x has {len(zx)} values, y has {len(zy)}: pair them one to one")
    return zx, zy


def pearson_with_p(x: Array, y: Array) -> tuple[float, float]:
    """Pearson r and its two-sided p-value (Student t with n - 2 degrees of freedom)."""
    try:
        from scipy.stats import t as student_t
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("pearson_with_p needs scipy: pip install 's2f[report]'") from error
    zx, zy = _standardised_pair(x, y)
    r = float(np.clip(np.mean(zx * zy), -1.0, 1.0))
    dof = len(zx) - 2
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt(dof / (1 - r * r))
    return r, float(2 * student_t.sf(abs(t), dof))


def random_pair_baseline(
    x: Array, y: Array, seed: int = 0, n_perm: int = DEFAULT_N_PERM
) -> dict[str, float]:
    """Pearson r with the pairing of x and y shuffled (the paper's random-pair baseline).

    Returns the mean and std of r over n_perm shuffles and the permutation p-value of the
    observed |r|: (1 + shuffles with |r| at least as large) / (1 + n_perm).
    """
    zx, zy = _standardised_pair(x, y)
    rng = np.random.default_rng(seed)
    shuffles = rng.permuted(np.tile(np.arange(len(zy)), (n_perm, 1)), axis=1)  # (P, N)
    r_perm = (zx[None, :] * zy[shuffles]).mean(axis=1)  # (P,)
    observed = abs(np.mean(zx * zy))
    return {
        "mean": float(r_perm.mean()),
        "std": float(r_perm.std()),
        "p_value": float((1 + np.sum(np.abs(r_perm) >= observed - R_TIE_TOLERANCE)) / (1 + n_perm)),
    }
