"""Evaluation math against hand-computed cases and independent references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from s2f import metrics as m


def _loop_ranks(queries: np.ndarray, gallery: np.ndarray, match: np.ndarray, metric: str) -> list:
    """Reference ranks with plain loops: 1 + gallery items (other than the match) scoring >=."""

    def score(a: np.ndarray, b: np.ndarray) -> float:
        if metric == "cosine":
            return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        return -float(np.sum(np.abs(a - b))) if metric == "l1" else -float(np.linalg.norm(a - b))

    ranks = []
    for i, q in enumerate(queries):
        true = score(q, gallery[match[i]])
        others = [score(q, g) for j, g in enumerate(gallery) if j != match[i]]
        ranks.append(1 + sum(s >= true for s in others))
    return ranks


# ----------------------------------------------------------------------------- feature similarity


def test_feature_similarity_hand_case():
    v_s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    v_f = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    out = m.feature_similarity(v_s, v_f)
    assert out["angle_mean"] == pytest.approx(45.0) and out["angle_std"] == pytest.approx(45.0)
    assert out["l1_mean"] == pytest.approx(1.0) and out["l1_std"] == pytest.approx(1.0)
    assert out["l2_mean"] == pytest.approx(math.sqrt(2) / 2)
    assert out["l2_std"] == pytest.approx(math.sqrt(2) / 2)


def test_angle_is_finite_for_parallel_vectors():
    v = torch.tensor([[0.1, 0.2, 0.3]]) * 1e3
    assert torch.isfinite(m.angles_deg(v, v * 3)).all()
    assert m.angles_deg(v, -v).item() == pytest.approx(180.0)


def test_feature_similarity_rejects_mismatched_rows_and_nan():
    with pytest.raises(ValueError, match="same"):
        m.feature_similarity(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        m.feature_similarity(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))


# ----------------------------------------------------------------------------- retrieval


def test_recall_on_hand_made_4x4_case():
    # Gallery = unit vectors, so cosine score of query i with item j is q_ij / |q_i|.
    gallery = torch.eye(4)
    queries = torch.tensor([
        [4.0, 3.0, 2.0, 1.0],  # true item 0 scores highest: rank 1
        [4.0, 3.0, 2.0, 1.0],  # true item 1 has one above it: rank 2
        [1.0, 1.0, 1.0, 1.0],  # all tie: pessimistic rank 4
        [1.0, 4.0, 3.0, 2.0],  # true item 3 has two above it: rank 3
    ])
    ranks = m.retrieval_ranks(queries, gallery)
    assert ranks.tolist() == [1, 2, 4, 3]
    recall = m.retrieval_recall(queries, gallery, ks=(1, 2, 3, 4))
    assert recall == {"recall@1": 0.25, "recall@2": 0.5, "recall@3": 0.75, "recall@4": 1.0}


def test_collapsed_model_gets_worst_rank():
    gallery = torch.tensor(np.random.default_rng(0).normal(size=(5, 3)))
    assert m.retrieval_ranks(torch.zeros(5, 3), gallery).tolist() == [5] * 5


def test_metrics_differ_on_constructed_case():
    q = [1.0, 0.0]
    gallery = torch.tensor([[3.0, 0.3], [1.0, 0.9], [1.6, 0.6]])  # best by cosine / L1 / L2
    queries = torch.tensor([q, q, q])
    match = torch.tensor([0, 1, 2])
    assert m.retrieval_ranks(queries, gallery, match, "cosine").tolist() == [1, 3, 2]
    assert m.retrieval_ranks(queries, gallery, match, "l2").tolist() == [3, 2, 1]
    assert m.retrieval_ranks(queries, gallery, match, "l1").tolist() == [3, 1, 2]


@pytest.mark.parametrize("metric", m.METRICS)
def test_ranks_match_loop_reference(metric, monkeypatch):
    monkeypatch.setattr(m, "QUERY_CHUNK", 7)  # exercise several query blocks
    rng = np.random.default_rng(1)
    queries, gallery = rng.normal(size=(20, 5)), rng.normal(size=(30, 5))
    gallery[3] = gallery[4]  # an exact tie inside the gallery
    match = rng.integers(0, 30, size=20)
    match[:2] = [3, 4]
    got = m.retrieval_ranks(torch.tensor(queries), torch.tensor(gallery), match, metric)
    assert got.tolist() == _loop_ranks(queries, gallery, match, metric)


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match="match_index"):
        m.retrieval_ranks(torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        m.retrieval_ranks(torch.ones(2, 2), torch.ones(4, 2), [0, 4])
    with pytest.raises(ValueError, match="metric"):
        m.retrieval_ranks(torch.ones(2, 2), torch.ones(2, 2), metric="dot")


def test_identity_recall_hand_case():
    gallery = torch.eye(4)
    gallery_ids = ["a", "a", "b", "c"]
    queries = torch.tensor([
        [1.0, 2.0, 3.0, 4.0],  # "a": best a-item scores 2, non-matches 3 and 4 above: rank 3
        [4.0, 3.0, 2.0, 1.0],  # "b": item 2 scores 2, the two a-items above: rank 3
        [1.0, 1.0, 5.0, 1.0],  # "c": item 3 scores 1, ties with items 0, 1 and 5 above: rank 4
        [0.0, 5.0, 1.0, 1.0],  # "a": item 1 scores highest: rank 1
    ])
    query_ids = ["a", "b", "c", "a"]
    assert m.identity_ranks(queries, gallery, query_ids, gallery_ids).tolist() == [3, 3, 4, 1]
    recall = m.identity_recall(queries, gallery, query_ids, gallery_ids, ks=(1, 2, 3, 4))
    assert recall == {"recall@1": 0.25, "recall@2": 0.25, "recall@3": 0.75, "recall@4": 1.0}


def test_identity_ranks_equal_item_ranks_for_unique_ids():
    rng = np.random.default_rng(2)
    queries, gallery = rng.normal(size=(15, 4)), rng.normal(size=(15, 4))
    ids = np.arange(15) * 7
    by_identity = m.identity_ranks(queries, gallery, ids, ids)
    assert torch.equal(by_identity, m.retrieval_ranks(queries, gallery))


def test_identity_ranks_need_each_query_in_gallery():
    with pytest.raises(ValueError, match="not in the gallery"):
        m.identity_ranks(torch.ones(2, 2), torch.ones(2, 2), ["a", "z"], ["a", "b"])


def test_chance_recall_matches_random_features():
    rng = np.random.default_rng(3)
    hits = []
    for _ in range(20):
        ranks = m.retrieval_ranks(rng.normal(size=(200, 16)), rng.normal(size=(200, 16)))
        hits.append((ranks <= 5).double().mean().item())
    assert m.chance_recall(5, 200) == 0.025
    assert np.mean(hits) == pytest.approx(m.chance_recall(5, 200), abs=0.006)
    assert m.chance_recall(10, 4) == 1.0


def test_identity_chance_recall_exact_and_monte_carlo():
    gallery_ids = np.array(["a"] + ["b"] * 2 + ["c"] * 3 + ["d"] * 6)  # M = 12
    query_ids = np.array(["a", "b", "c", "d"])
    ks = (1, 3, 7)
    got = m.identity_chance_recall(query_ids, gallery_ids, ks)
    for k in ks:
        exact = np.mean([1 - math.comb(12 - c, k) / math.comb(12, k) for c in (1, 2, 3, 6)])
        assert got[f"recall@{k}"] == pytest.approx(exact, abs=1e-12)
    # Monte Carlo: random rankings, hit when any same-identity item lands in the top k.
    rng = np.random.default_rng(4)
    order = np.argsort(rng.random((20_000, 12)), axis=1)  # (S, M) random rankings
    for k in ks:
        top = gallery_ids[order[:, :k]]  # (S, k)
        simulated = np.mean([(top == q).any(axis=1).mean() for q in query_ids])
        assert simulated == pytest.approx(got[f"recall@{k}"], abs=0.01)


def test_sample_gallery_reproducible_subset():
    a = m.sample_gallery(10_000, 500, seed=5)
    assert len(a) == 500 and len(np.unique(a)) == 500 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, m.sample_gallery(10_000, 500, seed=5))
    assert not np.array_equal(a, m.sample_gallery(10_000, 500, seed=6))
    assert np.array_equal(m.sample_gallery(300), np.arange(300))  # default min(5000, split)


# ----------------------------------------------------------------------------- intervals


def test_bootstrap_ci_coverage_on_bernoulli():
    p, n, trials = 0.3, 100, 1_000
    rng = np.random.default_rng(7)
    data = rng.random((trials, n)) < p  # (trials, n) simulated datasets
    covered = []
    for i, sample in enumerate(data):
        low, high = m.bootstrap_ci(sample, n_boot=500, seed=i)
        covered.append(low <= p <= high)
    assert 0.93 <= np.mean(covered) <= 0.97


def test_bootstrap_ci_simple_cases():
    assert m.bootstrap_ci(np.full(10, 2.5)) == (2.5, 2.5)
    values = np.arange(100.0)
    low, high = m.bootstrap_ci(values, np.median, seed=1)
    assert low < 49.5 < high
    assert m.bootstrap_ci(values, seed=1) == m.bootstrap_ci(torch.tensor(values), seed=1)


def test_wilson_known_value_and_quadratic_reference():
    low, high = m.wilson_ci(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    # The Wilson bounds are the roots of (p_hat - p)^2 = z^2 p (1 - p) / n.
    z, n, p_hat = scipy.stats.norm.ppf(0.995), 50, 0.14
    roots = np.sort(np.roots([1 + z * z / n, -(2 * p_hat + z * z / n), p_hat**2]))
    assert m.wilson_ci(7, 50, alpha=0.01) == pytest.approx(tuple(roots), abs=1e-12)
    assert m.wilson_ci(0, 5)[0] == 0.0 and m.wilson_ci(5, 5)[1] == 1.0


def test_wilson_coverage_on_bernoulli():
    p, n = 0.3, 200
    successes = np.random.default_rng(8).binomial(n, p, size=2_000)
    covered = [low <= p <= high for low, high in (m.wilson_ci(int(s), n) for s in successes)]
    assert 0.93 <= np.mean(covered) <= 0.97


# ----------------------------------------------------------------------------- 1:2 matching


def _population() -> tuple[np.ndarray, np.ndarray]:
    identities = np.repeat(np.arange(12), 3)  # 12 people x 3 clips
    genders = np.where(np.repeat(np.arange(12), 3) % 3 == 0, "f", "m")
    return identities, genders


@pytest.mark.parametrize("same_gender", [False, True])
def test_matching_tuples_respect_constraints(same_gender):
    identities, genders = _population()
    tuples = m.make_matching_tuples(36, identities, genders, 500, seed=9, same_gender=same_gender)
    assert tuples.shape == (500, 3) and tuples.dtype == np.int64
    voice, true, impostor = tuples.T
    assert np.array_equal(voice, true)
    assert np.all(identities[impostor] != identities[voice])
    if same_gender:
        assert np.all(genders[impostor] == genders[voice])
    else:
        assert np.any(genders[impostor] != genders[voice])
    # Every valid impostor of voice 0 ("f", identity 0) gets drawn eventually.
    many = m.make_matching_tuples(36, identities, genders, 20_000, seed=1, same_gender=same_gender)
    drawn = set(many[many[:, 0] == 0, 2].tolist())
    valid = {j for j in range(36) if identities[j] != 0 and (not same_gender or genders[j] == "f")}
    assert drawn == valid


def test_matching_tuples_deterministic_and_saved(tmp_path):
    identities, genders = _population()
    a = m.make_matching_tuples(36, identities, genders, 30, seed=3)
    assert np.array_equal(a, m.make_matching_tuples(36, identities, genders, 30, seed=3))
    assert not np.array_equal(a, m.make_matching_tuples(36, identities, genders, 30, seed=4))
    assert len(set(a[:, 0].tolist())) == 30  # voices without replacement while possible
    m.save_tuples(tmp_path / "tuples.json", a)
    assert json.loads((tmp_path / "tuples.json").read_text())["columns"] == list(m.TUPLE_COLUMNS)
    assert np.array_equal(m.load_tuples(tmp_path / "tuples.json"), a)


def test_matching_tuples_errors():
    with pytest.raises(ValueError, match="same_gender"):
        m.make_matching_tuples(4, [0, 0, 1, 1], ["f", "f", "m", "m"], 5, same_gender=True)
    with pytest.raises(ValueError, match="genders"):
        m.make_matching_tuples(4, [0, 0, 1, 1], None, 5, same_gender=True)
    with pytest.raises(ValueError, match="identities"):
        m.make_matching_tuples(5, [0, 0, 1, 1], None, 5)
    with pytest.raises(ValueError, match="one type"):
        genders = np.array(["f", None, "m", "m"], dtype=object)
        m.make_matching_tuples(4, [0, 1, 2, 3], genders, 5, same_gender=True)


def test_matching_accuracy_constructed_case():
    v_f = torch.eye(4)
    v_s = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 1.0], [0, 0, 0, 1.0]])
    tuples = np.array([
        [0, 0, 1],  # 1 vs 0: correct
        [1, 1, 0],  # 0 vs 1: wrong
        [2, 2, 3],  # tie: wrong
        [3, 3, 0],  # 1 vs 0: correct
    ])
    assert m.matching_outcomes(v_s, v_f, tuples).tolist() == [True, False, False, True]
    accuracy, low, high = m.matching_accuracy(v_s, v_f, tuples)
    assert accuracy == 0.5 and (low, high) == m.wilson_ci(2, 4)
    with pytest.raises(ValueError, match="this split"):
        m.matching_accuracy(v_s, v_f, np.array([[0, 0, 4]]))


# ----------------------------------------------------------------------------- attributes


def test_confusion_and_row_normalisation():
    reference = ["f", "f", "m", "m", "m"]
    predicted = ["f", "m", "m", "m", "f"]
    counts = m.confusion_matrix(reference, predicted, ["f", "m", "x"])
    assert counts.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    rows = m.row_normalise(counts)
    assert np.allclose(rows[:2].sum(axis=1), 1.0) and rows[2].tolist() == [0.0, 0.0, 0.0]
    assert rows[1].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    with pytest.raises(ValueError, match="not in classes"):
        m.confusion_matrix(["f"], ["q"], ["f", "m"])


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    w = np.random.default_rng(0).normal(size=(3, 8))  # the same labelling for every sample
    return x, np.array(["asian", "black", "white"])[np.argmax(x @ w.T, axis=1)]


def test_linear_probe_recovers_separable_labels_deterministically():
    x, y = _separable(600, seed=1)
    x_test, y_test = _separable(400, seed=2)
    probe = m.LinearProbe().fit(x, y)
    predictions = probe.predict(x_test)
    assert np.mean(predictions == y_test) > 0.95
    assert np.array_equal(m.LinearProbe().fit(x, y).predict(x_test), predictions)
    restored = m.LinearProbe.from_state(json.loads(json.dumps(probe.state_dict())))
    assert np.array_equal(restored.predict(x_test), predictions)


def test_linear_probe_errors():
    with pytest.raises(RuntimeError, match="fit"):
        m.LinearProbe().predict(np.ones((2, 3)))
    with pytest.raises(ValueError, match="2 classes"):
        m.LinearProbe().fit(np.ones((3, 2)), ["a", "a", "a"])


def test_attribute_agreement_hand_case():
    # Probe on x0's sign: "m" when positive, "f" when negative.
    train = np.array([[2.0, 0.1], [3.0, -0.2], [1.5, 0.3], [-2.0, 0.2], [-3.0, -0.1], [-1.0, 0.0]])
    probe = m.LinearProbe().fit(train, ["m", "m", "m", "f", "f", "f"])
    v_f = torch.tensor([[2.0, 0], [2.0, 0], [-2.0, 0], [-2.0, 0]])  # reference m, m, f, f
    v_s = torch.tensor([[2.0, 0], [-2.0, 0], [-2.0, 0], [-2.0, 0]])  # prediction m, f, f, f
    out = m.attribute_agreement(probe, v_f, v_s, true_labels=["m", "f", "f", "kid"])
    # Truth has a class the probe never saw: it gets its own row and column, last.
    assert out["classes"] == ["f", "m", "kid"]
    assert out["reference_vs_prediction"]["confusion"] == [[2, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert out["reference_vs_prediction"]["row_normalised"] == [
        [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]
    ]
    assert out["reference_vs_prediction"]["accuracy"] == 0.75
    assert out["truth_vs_prediction"]["confusion"] == [[2, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert out["truth_vs_reference"]["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert out["truth_vs_reference"]["accuracy"] == 0.5
    json.dumps(out)


@pytest.mark.parametrize(
    ("age", "decade", "group"),
    [(5, "10s", "<18"), (18, "10s", "18-29"), (29.9, "20s", "18-29"), (30, "30s", "30-44"),
     (45, "40s", "45-59"), (59, "50s", "45-59"), (60, "60s", "60+"), (70, "70s+", "60+"),
     (93, "70s+", "60+")],
)  # fmt: skip
def test_age_bins(age, decade, group):
    assert m.age_decade(age) == decade and m.age_group(age) == group


def test_age_rejects_nan():
    with pytest.raises(ValueError, match="age"):
        m.age_decade(float("nan"))


# ----------------------------------------------------------------------------- per-group breakdown


def test_by_group_counts_and_means():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 4.0])
    groups = np.array(["f", "m", "f", "m", None, "f"], dtype=object)
    out = m.by_group(values, groups, n_boot=200)
    assert sorted(out) == ["f", "m", "unknown"]
    assert out["f"][:2] == (2.0, 3) and out["m"][:2] == (0.5, 2) and out["unknown"][:2] == (0.0, 1)
    low, high = out["f"][2]
    assert 1.0 <= low <= 2.0 <= high <= 4.0


def test_breakdown_by_attribute():
    ranks = torch.tensor([1, 3, 1, 10])
    angles = torch.tensor([40.0, 50.0, 60.0, 70.0])
    out = m.breakdown_by_attribute(ranks, angles, {"gender": ["f", "f", "m", "m"]}, ks=(1, 5))
    assert out["gender"]["recall@1"]["f"][:2] == (0.5, 2)
    assert out["gender"]["recall@5"]["m"][:2] == (0.5, 2)
    assert out["gender"]["angle"]["m"][:2] == (65.0, 2)


# ----------------------------------------------------------------------------- craniofacial


def test_pearson_matches_scipy():
    rng = np.random.default_rng(10)
    x = rng.normal(size=40)
    y = 0.4 * x + rng.normal(size=40)
    r, p = m.pearson_with_p(x, y)
    reference = scipy.stats.pearsonr(x, y)
    assert r == pytest.approx(reference.statistic, abs=1e-12)
    assert p == pytest.approx(reference.pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="constant"):
        m.pearson_with_p(np.ones(5), np.arange(5.0))


def clustered_pairs(groups: int, per_group: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y (G * per_group,) where each group shares most of its value (one face per speaker)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=groups)
    x = np.repeat(shared, per_group) + 0.3 * rng.normal(size=groups * per_group)
    y = 0.5 * np.repeat(shared, per_group) + rng.normal(size=groups * per_group)
    return x, y, np.repeat([f"spk{g:02d}" for g in range(groups)], per_group)


def test_pearson_ci_over_groups_equals_resampling_whole_groups_by_hand():
    x, y, groups = clustered_pairs(groups=12, per_group=3, seed=4)
    n_boot = 300
    # the same draws by hand: G group indices per resample (PCG64, seed 7), every item of each
    # drawn group concatenated once per draw, np.corrcoef of the concatenation
    labels, group_of = np.unique(groups, return_inverse=True)
    picks = np.random.default_rng(7).integers(0, len(labels), size=(n_boot, len(labels)))
    members = [np.flatnonzero(group_of == g) for g in range(len(labels))]
    by_hand = [np.corrcoef(x[idx], y[idx])[0, 1]
               for idx in (np.concatenate([members[g] for g in row]) for row in picks)]  # fmt: skip
    expected = np.quantile(by_hand, [0.025, 0.975])
    low, high = m.pearson_ci_over_groups(x, y, groups, n_boot=n_boot, seed=7)
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-9)
    assert low < m.pearson_with_p(x, y)[0] < high


def test_pearson_ci_over_groups_counts_speakers_not_clips():
    x, y, groups = clustered_pairs(groups=20, per_group=1, seed=5)
    one_each = m.pearson_ci_over_groups(x, y, groups, seed=0)
    # five identical copies of each clip add no evidence: the interval over speakers is unchanged,
    # while an interval treating the 100 copies as independent clips is far narrower
    copies = [np.repeat(v, 5) for v in (x, y, groups)]
    assert m.pearson_ci_over_groups(*copies, seed=0) == pytest.approx(one_each, abs=1e-12)
    as_clips = m.pearson_ci_over_groups(copies[0], copies[1], np.arange(100), seed=0)
    assert as_clips[1] - as_clips[0] < 0.6 * (one_each[1] - one_each[0])
    exact = m.pearson_ci_over_groups(x, 2 * x + 1, groups, seed=0)
    assert exact == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="at least 2 groups"):
        m.pearson_ci_over_groups(x, y, ["one"] * len(x))
    with pytest.raises(ValueError, match="one label per pair"):
        m.pearson_ci_over_groups(x, y, groups[:-1])


def test_random_pair_baseline():
    rng = np.random.default_rng(11)
    x = rng.normal(size=50)
    y = x + 0.5 * rng.normal(size=50)
    out = m.random_pair_baseline(x, y, seed=0, n_perm=2_000)
    assert abs(out["mean"]) < 0.015  # shuffling destroys the pairing: r near 0
    assert out["std"] == pytest.approx(1 / math.sqrt(49), rel=0.15)
    assert out["p_value"] == pytest.approx(1 / 2_001)  # no shuffle reaches r ~ 0.9
    assert out == m.random_pair_baseline(x, y, seed=0, n_perm=2_000)
