"""din.metrics against scikit-learn and hand-computed values."""
import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from din.metrics import auc, logloss, per_user_auc, rela_impr, user_weighted_auc


def _sklearn_per_user(users, labels, scores):
    """Reference per-user AUCs and counts with a plain loop over users (small inputs only)."""
    aucs, counts = [], []
    for u in np.unique(users):
        m = users == u
        if labels[m].min() != labels[m].max():
            aucs.append(roc_auc_score(labels[m], scores[m]))
            counts.append(m.sum())
    return np.array(aucs), np.array(counts, dtype=float)


# ---------------------------------------------------------------- auc


@pytest.mark.parametrize("n", [2, 7, 100, 5000])
@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn(n, ties):
    rng = np.random.default_rng(n + ties)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes
    scores = rng.integers(0, 5, n).astype(float) if ties else rng.normal(size=n)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_hand_computed_with_ties():
    # pairs (pos, neg): (0.8>0.3) 1, (0.8>0.5) 1, (0.5=0.5) 1/2, (0.5>0.3) 1 -> 3.5 / 4
    assert auc([1, 0, 1, 0], [0.8, 0.3, 0.5, 0.5]) == pytest.approx(0.875)
    assert auc([0, 1], [1.0, 1.0]) == 0.5  # all tied
    assert auc([0, 1], [0.0, 1.0]) == 1.0
    assert auc([1, 0], [0.0, 1.0]) == 0.0


def test_auc_accepts_lists_tensors_bools_and_columns():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = rng.random(50)
    expected = roc_auc_score(labels, scores)
    assert auc(labels.tolist(), scores.tolist()) == pytest.approx(expected)
    assert auc(torch.tensor(labels).float(), torch.tensor(scores)) == pytest.approx(expected)
    assert auc(labels.astype(bool), scores[:, None]) == pytest.approx(expected)
    s16 = torch.tensor(scores).bfloat16()
    assert auc(torch.tensor(labels), s16) == pytest.approx(roc_auc_score(labels, s16.float().numpy()))
    assert isinstance(auc(labels, scores), float)


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([0, 1, 1], [0.1, 0.2], "scores"),  # length mismatch names the argument
        ([], [], "empty"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "one class"),
        ([0, 0], [0.1, 0.2], "one class"),
        ([0, 2], [0.1, 0.2], "labels"),
        ([0, 1], [0.1, float("nan")], "scores"),
        ([[0, 1], [1, 0]], [0.1, 0.2], "labels"),
    ],
)
def test_auc_errors(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        auc(labels, scores)


# ---------------------------------------------------------------- user-weighted and per-user AUC


def test_user_weighted_auc_hand_computed():
    # user 7: 4 samples, pos {0.9, 0.2}, neg {0.5, 0.1}: 0.9>0.5, 0.9>0.1, 0.2<0.5, 0.2>0.1 -> AUC 3/4
    # user 3: 2 samples, AUC 0 (pos 0.1 < neg 0.6)
    # user 5: 3 samples, one class only -> skipped
    users = [7, 7, 7, 7, 3, 3, 5, 5, 5]
    labels = [1, 0, 1, 0, 1, 0, 1, 1, 1]
    scores = [0.9, 0.5, 0.2, 0.1, 0.1, 0.6, 0.3, 0.2, 0.1]
    assert user_weighted_auc(users, labels, scores) == pytest.approx((4 * 0.75 + 2 * 0.0) / 6)
    assert per_user_auc(users, labels, scores) == pytest.approx((0.75 + 0.0) / 2)


def test_ties_only_count_within_a_user():
    # equal scores across users must not be treated as ties of one user
    users = [1, 1, 2, 2]
    labels = [1, 0, 1, 0]
    scores = [0.5, 0.4, 0.4, 0.5]
    assert user_weighted_auc(users, labels, scores) == pytest.approx(0.5)  # user 1: 1, user 2: 0
    assert user_weighted_auc([1, 1], [1, 0], [0.3, 0.3]) == pytest.approx(0.5)


@pytest.mark.parametrize("ties", [False, True])
def test_grouped_aucs_match_sklearn_loop(ties):
    rng = np.random.default_rng(1 + ties)
    n = 3000
    users = rng.integers(0, 200, n) * 13 + 1000  # sparse, unsorted ids
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
    aucs, counts = _sklearn_per_user(users, labels, scores)
    assert user_weighted_auc(users, labels, scores) == pytest.approx(np.dot(aucs, counts) / counts.sum(), abs=1e-12)
    assert per_user_auc(users, labels, scores) == pytest.approx(aucs.mean(), abs=1e-12)


def test_single_user_equals_global_auc():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = rng.random(300)
    users = np.full(300, 42)
    assert user_weighted_auc(users, labels, scores) == pytest.approx(auc(labels, scores))


def test_user_weighted_auc_is_fast_for_many_users():
    import time

    rng = np.random.default_rng(0)
    n = 1_000_000
    users = rng.integers(0, 100_000, n)
    labels = rng.integers(0, 2, n)
    scores = rng.random(n).astype(np.float32)
    start = time.perf_counter()
    value = user_weighted_auc(torch.tensor(users), torch.tensor(labels), torch.tensor(scores))
    assert time.perf_counter() - start < 5.0
    assert 0.45 < value < 0.55


def test_grouped_auc_errors():
    with pytest.raises(ValueError, match="users"):
        user_weighted_auc([1, 2], [0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores"):
        per_user_auc([1, 2, 3], [0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="no user"):
        user_weighted_auc([1, 1, 2, 2], [0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="no user"):
        per_user_auc([1, 2], [0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="empty"):
        user_weighted_auc([], [], [])


# ---------------------------------------------------------------- logloss and RelaImpr


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 1000)
    probs = rng.random(1000)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-9)
    assert logloss(torch.tensor(labels), torch.tensor(probs, dtype=torch.float32)) == pytest.approx(
        log_loss(labels, probs), rel=1e-5
    )


def test_logloss_clips_certain_mistakes():
    value = logloss([1, 0], [0.0, 1.0])
    assert np.isfinite(value)
    assert value == pytest.approx(-np.log(1e-7), rel=1e-6)
    assert logloss([1, 0], [1.0, 0.0]) == pytest.approx(-np.log(1 - 1e-7), rel=1e-6)


@pytest.mark.parametrize(
    "labels, probs, kwargs, match",
    [
        ([0, 1], [0.5], {}, "probs"),
        ([], [], {}, "empty"),
        ([0, 1], [0.5, 1.5], {}, "probs"),
        ([0, 2], [0.5, 0.5], {}, "labels"),
        ([0, 1], [0.5, float("nan")], {}, "probs"),
        ([0, 1], [0.5, 0.5], {"eps": 0.0}, "eps"),
    ],
)
def test_logloss_errors(labels, probs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        logloss(labels, probs, **kwargs)


def test_rela_impr():
    assert rela_impr(0.75, 0.75) == pytest.approx(0.0)
    assert rela_impr(0.7, 0.6) == pytest.approx(1.0)  # twice as far from random
    assert rela_impr(0.55, 0.6) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="base_auc"):
        rela_impr(0.7, 0.5)
    with pytest.raises(ValueError, match="finite"):
        rela_impr(float("nan"), 0.6)
