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

:func:`make_long_range_synthetic` plants the signal further back: half of each user's interests occur only
before the last 50 behaviours of a long history, where truncation cannot see them and a search before
attention (:mod:`din.search`) can.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .dataset import InteractionData, Split, _positive_int, split_by_user

__all__ = ["make_long_range_synthetic", "make_synthetic"]


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


def _check_common(num_users, explore, noise, sharpness, popularity_skew) -> None:
    """The checks both generators share."""
    if num_users < 2:
        raise ValueError("num_users must be >= 2 (train and test need a user each)")
    for name, value, low, high in (("explore", explore, 0.0, 1.0), ("noise", noise, 0.0, 0.5)):
        if not low <= float(value) <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    if not float(sharpness) > 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness}")
    if not float(popularity_skew) >= 1.0:
        raise ValueError(f"popularity_skew must be >= 1, got {popularity_skew}")


def _goods_layout(rng: np.random.Generator, num_goods: int, num_cates: int):
    """Goods -> category (0-based), evenly and in random order: (category of each good [G], 1-based goods
    ids grouped by category [G], category sizes [C], each category's first index in that grouping [C])."""
    cate_of_goods = rng.permutation(np.arange(num_goods) % num_cates)
    goods_by_cate = np.argsort(cate_of_goods, kind="stable") + 1
    cate_size = np.bincount(cate_of_goods, minlength=num_cates)
    cate_start = np.concatenate(([0], np.cumsum(cate_size)[:-1]))
    return cate_of_goods, goods_by_cate, cate_size, cate_start


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
    _check_common(num_users, explore, noise, sharpness, popularity_skew)
    rng = np.random.default_rng(seed)

    # goods -> category (0-based here), evenly, in random order
    cate_of_goods, goods_by_cate, cate_size, cate_start = _goods_layout(rng, num_goods, num_cates)

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


def make_long_range_synthetic(
    num_users: int = 2000,
    num_goods: int = 2000,
    num_cates: int = 50,
    samples_per_user: int = 10,
    *,
    min_history: int = 200,
    max_history: int = 500,
    recent: int = 60,
    jitter: int = 10,
    interests_per_user: int = 2,
    explore: float = 0.1,
    threshold: float = 2.5,
    sharpness: float = 1.5,
    noise: float = 0.05,
    popularity_skew: float = 2.0,
    test_fraction: float = 0.2,
    seed: Optional[int] = 0,
) -> Split:
    """A user-disjoint :class:`Split` whose clicks depend on interests that only a long history shows.

    Built for search before attention (:mod:`din.search`): cutting the history to its last 50 behaviours
    hides half of every user's interests, and retrieving the behaviours of the candidate's category from the
    whole history finds them again. Generative story (vectorised, deterministic for a seed):

    1. Goods as in :func:`make_synthetic` (evenly over categories, popularity skewed within one).
    2. Each user has ``interests_per_user`` *old* favourite categories and as many *recent* ones, all
       distinct. A user's sequence has ``min_history..max_history`` behaviours (uniform): its last ``recent``
       behaviours come from the recent favourites, the earlier ones from the old favourites, each from a
       uniform random category instead with probability ``explore``.
    3. A sample's history is the user's sequence without its last ``0..jitter`` behaviours (uniform), so
       the last ``recent - jitter`` behaviours of every history are recent ones and the old interests lie
       further back. Its candidate's category is an old favourite, a recent favourite or a uniform random
       category (a third each), its goods drawn from that category.
    4. ``c`` = how many behaviours of the WHOLE history share the candidate's category;
       ``P(click) = noise + (1 - 2 noise) * sigmoid(sharpness * (c - threshold))``.

    So a candidate of an old favourite is clicked about as often as one of a recent favourite, and far
    more often than a random one, but with the last ``recent - jitter`` (50 by default) behaviours alone it
    looks like a random one. Unlike :func:`make_synthetic` the data does not depend on a ``max_len``: the
    label always counts the whole history, and cutting histories (``load_data("synthetic-long",
    max_len=...)``, ``--max-len``) only changes what the model sees.

    Raises:
        ValueError: naming the first invalid argument.
    """
    num_users = _positive_int(num_users, "num_users")
    num_goods = _positive_int(num_goods, "num_goods")
    num_cates = _positive_int(num_cates, "num_cates")
    samples_per_user = _positive_int(samples_per_user, "samples_per_user")
    interests_per_user = _positive_int(interests_per_user, "interests_per_user")
    min_history = _positive_int(min_history, "min_history")
    max_history = _positive_int(max_history, "max_history")
    recent = _positive_int(recent, "recent")
    if isinstance(jitter, bool) or not isinstance(jitter, (int, np.integer)) or jitter < 0:
        raise ValueError(f"jitter must be an int >= 0, got {jitter!r}")
    if num_goods < num_cates:
        raise ValueError(f"num_goods ({num_goods}) must be >= num_cates ({num_cates}): every category needs goods")
    if 2 * interests_per_user > num_cates:
        raise ValueError(f"2 * interests_per_user ({2 * interests_per_user}) must be <= num_cates ({num_cates}): "
                         "old and recent favourites are distinct")
    if max_history < min_history:
        raise ValueError(f"max_history ({max_history}) must be >= min_history ({min_history})")
    if not jitter < recent < min_history:
        raise ValueError(f"need jitter ({jitter}) < recent ({recent}) < min_history ({min_history}): every "
                         "history must end in recent behaviours and reach back to old ones")
    _check_common(num_users, explore, noise, sharpness, popularity_skew)
    rng = np.random.default_rng(seed)

    cate_of_goods, goods_by_cate, cate_size, cate_start = _goods_layout(rng, num_goods, num_cates)

    favourites = np.argsort(rng.random((num_users, num_cates)), axis=1)[:, :2 * interests_per_user]  # [U, 2K]
    old, new = favourites[:, :interests_per_user], favourites[:, interests_per_user:]  # [U, K] each
    weights = 0.5 ** np.arange(interests_per_user)
    weights /= weights.sum()

    seq_len = rng.integers(min_history, max_history + 1, size=num_users)  # [U]
    seq_start = np.concatenate(([0], np.cumsum(seq_len)[:-1]))  # [U]
    owner = np.repeat(np.arange(num_users), seq_len)  # [L]
    from_end = seq_start[owner] + seq_len[owner] - np.arange(len(owner))  # [L] 1 for a user's last behaviour
    old_cate = _categories(rng, owner, old, weights, explore, num_cates)
    new_cate = _categories(rng, owner, new, weights, explore, num_cates)
    behaviour_cate0 = np.where(from_end <= recent, new_cate, old_cate)  # [L]
    behaviour_goods = _draw_goods(rng, behaviour_cate0, cate_start, cate_size, goods_by_cate, popularity_skew)

    sample_user = np.repeat(np.arange(num_users), samples_per_user)  # [N]
    cut = np.sort(rng.integers(0, jitter + 1, size=(num_users, samples_per_user)), axis=1)[:, ::-1]  # time order
    hist_start = seq_start[sample_user]
    hist_end = hist_start + seq_len[sample_user] - cut.reshape(-1)
    kind = rng.integers(0, 3, size=len(sample_user))  # 0: old favourite, 1: recent favourite, 2: random
    candidate_cate0 = np.select(
        [kind == 0, kind == 1],
        [_categories(rng, sample_user, old, weights, 0.0, num_cates),
         _categories(rng, sample_user, new, weights, 0.0, num_cates)],
        rng.integers(0, num_cates, size=len(sample_user)))
    candidate_goods = _draw_goods(rng, candidate_cate0, cate_start, cate_size, goods_by_cate, popularity_skew)

    # the planted signal: same-category behaviours in the whole history, one prefix count per category
    # (a [L, C] table would be large; sort the behaviours by (category, position) and search instead)
    key = behaviour_cate0.astype(np.int64) * (len(owner) + 1) + np.arange(len(owner))  # sorted per category
    order = np.sort(key)
    base = candidate_cate0.astype(np.int64) * (len(owner) + 1)
    relevant = np.searchsorted(order, base + hist_end) - np.searchsorted(order, base + hist_start)  # [N]
    p_click = noise + (1 - 2 * noise) / (1 + np.exp(-sharpness * (relevant - threshold)))
    label = (rng.random(len(sample_user)) < p_click).astype(np.float32)

    data = InteractionData(
        behaviour_goods=behaviour_goods,
        behaviour_cates=behaviour_cate0 + 1,
        user=sample_user + 1,
        hist_start=hist_start,
        hist_end=hist_end,
        goods=candidate_goods,
        cate=candidate_cate0 + 1,
        label=label,
        num_users=num_users + 1,
        num_goods=num_goods + 1,
        num_cates=num_cates + 1,
        name="synthetic-long",
    )
    return split_by_user(data, test_fraction, seed)
