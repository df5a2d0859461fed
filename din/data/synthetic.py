"""A synthetic data set with planted structure that attention pooling can exploit and sum pooling cannot.

Generative story (all vectorised numpy, deterministic for a seed):

1. Goods are spread evenly over categories; within a category, popularity is skewed (a low index is
   drawn more often: index = floor(size * u**popularity_skew)), giving the long-tailed frequencies that
   mini-batch aware regularisation is about.
2. Each user has ``interests_per_user`` favourite categories with decreasing weights. Each behaviour
   comes from a favourite category with probability ``1 - explore``, from a uniform random category
   otherwise, and its goods from that category.
3. A sample of a user takes a random prefix of the user's sequence as history and a candidate goods
   whose category is one of the user's favourites or a uniform random one (half each).
4. The click depends only on the RELEVANT part of the history: ``c`` = how many of the last
   ``max_len`` behaviours share the candidate's category. ``P(click) = noise + (1 - 2 noise) *
   sigmoid(sharpness * (c - threshold))``. Behaviours of other categories carry no signal.

Why attention wins: the label is a function of ``c``, a count over the behaviours *related to the
candidate*. DIN's local activation unit weighs each behaviour by its relevance to the candidate, so
the pooled vector is about ``c * e_category`` and the MLP reads ``c`` off directly (unnormalised
weights keep this intensity). A sum/mean pool mixes all categories into one vector, from which the MLP
must recover the count of one category that depends on the candidate -- much harder. Train and test
users are disjoint, so the user id cannot memorise the interests: the model has to read the history.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .dataset import InteractionData, Split, _positive_int, split_by_user

__all__ = ["make_synthetic"]


def _draw_goods(rng: np.random.Generator, category: np.ndarray, cate_start: np.ndarray,
                cate_size: np.ndarray, goods_by_cate: np.ndarray, skew: float) -> np.ndarray:
    """One goods id per entry of ``category`` (1-based ids), popular goods (low index) more often."""
    u = rng.random(len(category))
    within = np.minimum((cate_size[category] * u**skew).astype(np.int64), cate_size[category] - 1)
    return goods_by_cate[cate_start[category] + within]


def _categories(rng: np.random.Generator, owner: np.ndarray, interests: np.ndarray,
                interest_weights: np.ndarray, explore: float, num_cates: int) -> np.ndarray:
    """A category (0-based) per entry of ``owner``: a favourite of the owner, or random w.p. ``explore``."""
    pick = rng.choice(len(interest_weights), size=len(owner), p=interest_weights)
    favourite = interests[owner, pick]
    random = rng.integers(0, num_cates, size=len(owner))
    return np.where(rng.random(len(owner)) < explore, random, favourite)


def make_synthetic(
    num_users: int = 2000,
    num_goods: int = 1000,
    num_cates: int = 20,
    samples_per_user: int = 10,
    max_len: Optional[int] = 50,
    *,
    min_history: int = 5,
    max_history: Optional[int] = None,
    interests_per_user: int = 3,
    explore: float = 0.2,
    threshold: float = 2.5,
    sharpness: float = 1.5,
    noise: float = 0.05,
    popularity_skew: float = 2.0,
    test_fraction: float = 0.2,
    seed: Optional[int] = 0,
) -> Split:
    """Generate a user-disjoint train/test :class:`Split` with planted, candidate-dependent clicks.

    Args:
        num_users, num_goods, num_cates: how many users, goods and categories exist (ids 1..n; the
            vocabulary sizes of the result are these plus the padding id).
        samples_per_user: samples per user (``N = num_users * samples_per_user``).
        max_len: histories are cut to their last ``max_len`` behaviours, and the label counts only
            those; train with the same ``max_len`` (``None``: use 50 for the label window, keep all).
        min_history, max_history: each user's sequence length is uniform in this range
            (``max_history`` defaults to ``2 * max_len``). A sample's history is a uniform random
            prefix of length ``0..sequence length``, so a few samples have an empty history.
        interests_per_user: favourite categories per user (weights decrease geometrically).
        explore: probability that a behaviour comes from a uniform random category.
        threshold, sharpness, noise: the click model (module doc); ``noise`` is the label-flip floor.
        popularity_skew: >= 1; larger concentrates behaviours on fewer popular goods per category.
        test_fraction: fraction of users in the test part.
        seed: everything is drawn from ``numpy.random.default_rng(seed)``.

    Raises:
        ValueError: naming the first invalid argument.
    """
    num_users = _positive_int(num_users, "num_users")
    num_goods = _positive_int(num_goods, "num_goods")
    num_cates = _positive_int(num_cates, "num_cates")
    samples_per_user = _positive_int(samples_per_user, "samples_per_user")
    interests_per_user = _positive_int(interests_per_user, "interests_per_user")
    window = 50 if max_len is None else _positive_int(max_len, "max_len")
    min_history = _positive_int(min_history, "min_history")
    max_history = 2 * window if max_history is None else _positive_int(max_history, "max_history")
    if num_goods < num_cates:
        raise ValueError(f"num_goods ({num_goods}) must be >= num_cates ({num_cates}): every category needs goods")
    if interests_per_user > num_cates:
        raise ValueError(f"interests_per_user ({interests_per_user}) must be <= num_cates ({num_cates})")
    if max_history < min_history:
        raise ValueError(f"max_history ({max_history}) must be >= min_history ({min_history})")
    if num_users < 2:
        raise ValueError("num_users must be >= 2 (train and test need a user each)")
    for name, value, low, high in (("explore", explore, 0.0, 1.0), ("noise", noise, 0.0, 0.5)):
        if not low <= float(value) <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    if not float(sharpness) > 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness}")
    if not float(popularity_skew) >= 1.0:
        raise ValueError(f"popularity_skew must be >= 1, got {popularity_skew}")
    rng = np.random.default_rng(seed)

    # goods -> category (0-based here), evenly, in random order
    cate_of_goods = rng.permutation(np.arange(num_goods) % num_cates)  # [G]
    goods_by_cate = np.argsort(cate_of_goods, kind="stable") + 1  # 1-based goods ids grouped by category
    cate_size = np.bincount(cate_of_goods, minlength=num_cates)  # [C]
    cate_start = np.concatenate(([0], np.cumsum(cate_size)[:-1]))  # [C]

    # users' favourite categories: distinct per user, weights 1, 1/2, 1/4, ... normalised
    interests = np.argsort(rng.random((num_users, num_cates)), axis=1)[:, :interests_per_user]  # [U, K]
    weights = 0.5 ** np.arange(interests_per_user)
    weights /= weights.sum()

    # behaviour sequences, concatenated user by user (time order within a user)
    seq_len = rng.integers(min_history, max_history + 1, size=num_users)  # [U]
    seq_start = np.concatenate(([0], np.cumsum(seq_len)[:-1]))  # [U]
    owner = np.repeat(np.arange(num_users), seq_len)  # [L]
    behaviour_cate0 = _categories(rng, owner, interests, weights, explore, num_cates)  # [L]
    behaviour_goods = _draw_goods(rng, behaviour_cate0, cate_start, cate_size, goods_by_cate, popularity_skew)

    # samples: a random prefix of the sequence as history, in time order per user
    sample_user = np.repeat(np.arange(num_users), samples_per_user)  # [N]
    prefix = np.sort(rng.integers(0, seq_len[:, None] + 1, size=(num_users, samples_per_user)), axis=1)
    hist_end = seq_start[sample_user] + prefix.reshape(-1)
    hist_start = seq_start[sample_user]
    from_interest = rng.random(len(sample_user)) < 0.5
    candidate_cate0 = np.where(
        from_interest,
        _categories(rng, sample_user, interests, weights, 0.0, num_cates),
        rng.integers(0, num_cates, size=len(sample_user)),
    )
    candidate_goods = _draw_goods(rng, candidate_cate0, cate_start, cate_size, goods_by_cate, popularity_skew)

    data = InteractionData(
        behaviour_goods=behaviour_goods,
        behaviour_cates=behaviour_cate0 + 1,
        user=sample_user + 1,
        hist_start=hist_start,
        hist_end=hist_end,
        goods=candidate_goods,
        cate=candidate_cate0 + 1,
        label=np.zeros(len(sample_user), dtype=np.float32),
        num_users=num_users + 1,
        num_goods=num_goods + 1,
        num_cates=num_cates + 1,
        name="synthetic",
    ).truncated(window)

    # the planted signal: same-category behaviours among the last `window`, counted in chunks so the
    # [chunk, window] gather stays small whatever N is
    relevant = np.empty(len(data), dtype=np.int64)
    chunk = max(1, (1 << 20) // window)
    for begin in range(0, len(data), chunk):
        index = np.arange(begin, min(begin + chunk, len(data)))
        batch = data.batch(index, window)
        relevant[index] = (batch.hist_cates == batch.cate[:, None]).sum(dim=1).numpy()
    p_click = noise + (1 - 2 * noise) / (1 + np.exp(-sharpness * (relevant - threshold)))
    data.label = (rng.random(len(data)) < p_click).astype(np.float32)
    if max_len is None:  # the label used the last 50 behaviours; keep the full sequences as asked
        data.hist_start = hist_start.astype(np.int64)
    return split_by_user(data, test_fraction, seed)
