"""Amazon product reviews (McAuley et al. 2015, 2014 dump) as DIN samples, with the official protocol.

Two input formats:

* **raw** -- ``reviews_<Cat>_5.json`` (the 5-core reviews) and ``meta_<Cat>.json`` as published: one
  dict per line, strict JSON for the reviews and a Python literal (single quotes) for the metadata.
  Each line is read with ``json.loads`` and, when that fails, ``ast.literal_eval`` -- never ``eval``,
  so a line of code is an error, not a program. The official pipeline (zhougr1993/DeepInterestNetwork,
  ``utils/1_convert_pd.py`` and ``2_remap_id.py``) is followed:

  - reviews keep ``reviewerID``, ``asin``, ``unixReviewTime``; metadata is kept only for reviewed items;
  - an item's category is the last entry of the last list of its ``categories`` (an item without one
    gets the category ``"(no category)"``; a review of an item absent from the metadata is dropped
    and counted -- the official code would have mapped it to NaN);
  - asins, categories and reviewer ids are remapped to dense ids in sorted order of their keys, then
    shifted to 1-based (0 is padding);
  - each user's reviews are ordered by ``unixReviewTime`` (ties keep file order).

* **remapped CSV** -- ``<Cat>_reviews.csv`` (``user_id,item_id,day``) and ``<Cat>_item_cate.csv``
  (``item_id,cate_id``), the DIN remap step's output with 0-based integer ids (the TLSAN copies in
  ``../shared/data/amazon-tlsan-remap``). Ids are remapped densely in sorted order and shifted to
  1-based -- for the usual dense 0-based files that is exactly ``id + 1``.

Samples follow the official ``din/build_dataset.py`` (:func:`next_item_split`): for a user with the
time-ordered items ``pos_list`` and one random never-reviewed item per position ``neg_list``, every
``1 <= i < len - 1`` gives the training samples ``(pos_list[:i], pos_list[i], 1)`` and
``(pos_list[:i], neg_list[i], 0)``; ``i = len - 1`` gives the test pair, stored as two samples
(labels 1 and 0) with the same history. Users with a single review give no sample. Histories are
kept whole (cut at batch time by ``max_len``).
"""
from __future__ import annotations

import ast
import json
import re
from array import array
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._csv import read_numeric_columns
from ._io import PathLike
from .cache import Log, Prepared, prepare_cached
from .dataset import InteractionData, SeedLike, Split, _rng

__all__ = [
    "NO_CATEGORY",
    "amazon_files",
    "load_amazon",
    "load_amazon_csv",
    "next_item_split",
    "parse_literal_line",
    "prepare_amazon",
    "prepare_amazon_csv",
    "read_amazon_meta",
    "read_amazon_reviews",
    "sample_negatives",
]

NO_CATEGORY = "(no category)"
PIPELINE_VERSION = 1  # part of the cache key: bump when the samples change

PROTOCOL = ("DIN build_dataset: per user, time-ordered items; position i>=1 before the last -> train pair "
            "(history items[:i], items[i], 1) and (history, random never-reviewed item, 0); the last "
            "position -> test pair (labels 1 and 0, same history)")


# ----------------------------------------------------------------------------------------------
# the official build_dataset protocol, vectorised
# ----------------------------------------------------------------------------------------------


def sample_negatives(user: np.ndarray, item: np.ndarray, query_user: np.ndarray, num_items: int,
                     seed: SeedLike) -> np.ndarray:
    """One item per entry of ``query_user``, uniform over the items ``1..num_items`` that this user
    never has in ``item`` (the rows of ``user``/``item`` are the user's behaviours).

    Exact and vectorised, without rejection loops: with ``s_0 < s_1 < ...`` a user's distinct items,
    ``s_j - 1 - j`` (items missing below ``s_j``) is nondecreasing, so the ``r``-th missing item
    (``r`` uniform in ``[0, num_items - #distinct)``) is ``r + 1 + #{j : s_j - 1 - j <= r}``, one
    ``searchsorted`` over all users' sets at once (each user's block offset by ``user * (num_items + 1)``).

    Raises:
        ValueError: if a queried user has every item (no negative exists).
    """
    base = np.int64(num_items + 1)
    keys = np.unique(user.astype(np.int64) * base + item.astype(np.int64))  # sorted distinct (user, item)
    set_user, set_item = keys // base, keys % base
    query_user = np.asarray(query_user, dtype=np.int64)
    lo = np.searchsorted(set_user, query_user, side="left")  # [Q] the user's block in keys
    hi = np.searchsorted(set_user, query_user, side="right")
    free = num_items - (hi - lo)  # [Q] how many items the user never had
    if np.any(free <= 0):
        bad = int(query_user[np.argmax(free <= 0)])
        raise ValueError(f"user {bad} has every one of the {num_items} items: no negative item to sample")
    block_start = np.searchsorted(set_user, set_user, side="left")  # [K]
    missing_below = set_item - 1 - (np.arange(len(keys), dtype=np.int64) - block_start)  # [K] in [0, num_items)
    rank = _rng(seed).integers(0, free)  # [Q] which missing item
    before = np.searchsorted(set_user * base + missing_below, query_user * base + rank, side="right") - lo
    return rank + 1 + before


def next_item_split(user: np.ndarray, item: np.ndarray, item_cate: np.ndarray, *, num_users: int,
                    num_items: int, num_cates: int, seed: SeedLike, name: str,
                    test_target: Optional[np.ndarray] = None) -> Tuple[Split, Dict[str, Any]]:
    """The official DIN ``build_dataset`` samples (module doc) of one behaviour sequence per user.

    Args:
        user: ``[L]`` 1-based user ids, grouped by user (each user's rows contiguous).
        item: ``[L]`` 1-based item ids, time-ordered within each user.
        item_cate: ``[num_items + 1]`` category of each item id (entry 0 unused).
        num_users, num_items, num_cates: vocabulary sizes without padding.
        seed: seed of the negative items.
        name: the data set's name (parts are ``name/train``, ``name/test``).
        test_target: optional ``[L]`` bool: which behaviours, as prediction targets, make test pairs
            (e.g. those after a time cutoff); the rest make training pairs. Default: each user's last.

    Returns:
        ``(split, stats)``: train and test share the flat behaviour arrays (``user``/``item`` in the
        given order); ``stats`` counts behaviours and users.
    """
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    item_cate = np.asarray(item_cate, dtype=np.int64)
    n = len(user)
    change = np.flatnonzero(user[1:] != user[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)
    ends = np.concatenate((change, [n])).astype(np.int64)
    if n and len(starts) != len(np.unique(user)):
        raise ValueError("user must be grouped: every user's behaviours contiguous")
    run_length = ends - starts
    first = np.repeat(starts, run_length)  # [L] first position of the behaviour's user
    last = np.repeat(ends - 1, run_length)  # [L] last position of the behaviour's user
    position = np.arange(n, dtype=np.int64)
    target = position > first  # every position i >= 1 of a user is predicted
    is_test = position == last if test_target is None else np.asarray(test_target, dtype=bool)
    if len(is_test) != n:
        raise ValueError(f"test_target must have one entry per behaviour ({n}), got {len(is_test)}")
    test_at = np.flatnonzero(target & is_test)
    train_at = np.flatnonzero(target & ~is_test)
    targets = np.flatnonzero(target)
    negative = np.zeros(n, dtype=np.int64)
    negative[targets] = sample_negatives(user, item, user[targets], num_items, seed)

    # the stored dtypes from the start (ids int32, positions int64): no int64 copy of every sample column
    ids = np.int32
    del position, target, is_test
    cate_table, user_ids, negative = item_cate.astype(ids), user.astype(ids), negative.astype(ids)
    behaviour_goods = item.astype(ids)
    behaviour_cates = cate_table[item]

    def pairs(at: np.ndarray, part: str) -> InteractionData:
        twice = np.repeat(at, 2)  # [2m] each position gives a positive then a negative sample
        goods = np.empty(2 * len(at), dtype=ids)
        goods[0::2], goods[1::2] = behaviour_goods[at], negative[at]
        return InteractionData(
            behaviour_goods=behaviour_goods, behaviour_cates=behaviour_cates, user=user_ids[twice],
            hist_start=first[twice], hist_end=twice, goods=goods, cate=cate_table[goods],
            label=np.tile(np.array([1, 0], np.float32), len(at)), num_users=num_users + 1,
            num_goods=num_items + 1, num_cates=num_cates + 1, name=f"{name}/{part}",
        )

    split = Split(pairs(train_at, "train"), pairs(test_at, "test"))
    tested_users = len(np.unique(user[test_at]))
    stats = {"protocol": PROTOCOL, "behaviours": int(n), "users_with_test_pair": int(tested_users),
             "users_without_samples": int(num_users - len(np.unique(user[targets])))}
    return split, stats


def _dense_ids(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(sorted distinct values, 1-based dense id of each value)``."""
    keys, inverse = np.unique(values, return_inverse=True)
    return keys, inverse.reshape(-1).astype(np.int64) + 1


# ----------------------------------------------------------------------------------------------
# raw JSON / Python-literal files
# ----------------------------------------------------------------------------------------------


def parse_literal_line(line: bytes, path: PathLike, line_no: int) -> Dict[str, Any]:
    """One line of a raw Amazon file as a dict: JSON, else a Python literal (``ast.literal_eval``).

    Raises:
        ValueError: ``"path:line: ..."`` if the line is neither, or not a dict.
    """
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        try:
            record = ast.literal_eval(line.decode("utf-8").strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}:{line_no}: not a JSON or Python-literal dict "
                             f"({type(error).__name__}: {error}): {line[:120]!r}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_no}: expected a dict, found {type(record).__name__}")
    return record


def _open_lines(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return open(path, "rb")


def read_amazon_reviews(path: PathLike) -> Dict[str, Any]:
    """Parse ``reviews_<Cat>_5.json`` into columns (no Python object per review survives).

    Returns:
        ``{"user": int32 [n], "item": int32 [n], "time": int64 [n], "users": [reviewerID, ...],
        "items": [asin, ...]}``: ``user``/``item`` index the key lists in order of first appearance.

    Raises:
        FileNotFoundError: if ``path`` is missing.
        ValueError: ``"path:line: ..."`` for a malformed line or a missing/ill-typed field.
    """
    path = Path(path)
    users: Dict[str, int] = {}
    items: Dict[str, int] = {}
    user_col, item_col, time_col = array("i"), array("i"), array("q")
    with _open_lines(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = parse_literal_line(line, path, line_no)
            try:
                reviewer, asin, when = record["reviewerID"], record["asin"], record["unixReviewTime"]
            except KeyError as error:
                raise ValueError(f"{path}:{line_no}: review lacks the field {error.args[0]!r}") from None
            if type(reviewer) is not str or type(asin) is not str or type(when) is not int:
                raise ValueError(f"{path}:{line_no}: reviewerID and asin must be strings and unixReviewTime an "
                                 f"integer, found {reviewer!r}, {asin!r}, {when!r}")
            user_col.append(users.setdefault(reviewer, len(users)))
            item_col.append(items.setdefault(asin, len(items)))
            time_col.append(when)
    if not user_col:
        raise ValueError(f"{path} holds no reviews")
    return {"user": np.frombuffer(user_col, dtype=np.int32), "item": np.frombuffer(item_col, dtype=np.int32),
            "time": np.frombuffer(time_col, dtype=np.int64), "users": list(users), "items": list(items)}


# the asin key opening a metadata line; lets lines of never-reviewed items skip the (slow) full parse
_LEADING_ASIN = re.compile(rb"""^\s*\{\s*(['"])asin\1\s*:\s*(['"])([A-Za-z0-9_.\-]*)\2\s*[,}]""")


def _last_category(record: Dict[str, Any], path: Path, line_no: int) -> Optional[str]:
    """The last entry of the last list of ``categories`` (``None`` when absent or empty)."""
    categories = record.get("categories")
    if categories is None or categories == []:
        return None
    if not isinstance(categories, list) or not all(isinstance(level, list) for level in categories):
        raise ValueError(f"{path}:{line_no}: categories must be a list of lists, found {categories!r:.120}")
    if not categories[-1]:
        return None
    last = categories[-1][-1]
    if not isinstance(last, str):
        raise ValueError(f"{path}:{line_no}: category {last!r} is not a string")
    return last


def read_amazon_meta(path: PathLike, wanted: Dict[str, int]) -> Tuple[np.ndarray, List[Optional[str]], Dict[str, int]]:
    """The category (:func:`_last_category`) of each ``wanted`` asin, from ``meta_<Cat>.json``.

    Only lines of wanted (reviewed) items are parsed in full; a line that starts with another asin is
    skipped after a regular-expression match (the metadata lists ~8x more items than the 5-core
    reviews). An asin listed twice keeps its first line.

    Args:
        wanted: ``asin -> index``; the result lists a category (or ``None``) per index.

    Returns:
        ``(found, category, counts)``: ``found[k]`` whether wanted index ``k`` has a metadata line,
        ``category[k]`` its category (``None`` when absent or without one), and line counts.
    """
    path = Path(path)
    category: List[Optional[str]] = [None] * len(wanted)
    found = np.zeros(len(wanted), dtype=bool)
    counts = {"meta_lines": 0, "meta_duplicates": 0}
    with _open_lines(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            counts["meta_lines"] += 1
            match = _LEADING_ASIN.match(line)
            if match and line.count(b"'asin'") + line.count(b'"asin"') == 1 \
                    and match.group(3).decode("ascii") not in wanted:
                continue
            record = parse_literal_line(line, path, line_no)
            asin = record.get("asin")
            if not isinstance(asin, str):
                raise ValueError(f"{path}:{line_no}: metadata lacks a string 'asin'")
            index = wanted.get(asin)
            if index is None:
                continue
            if found[index]:
                counts["meta_duplicates"] += 1
                continue
            found[index] = True
            category[index] = _last_category(record, path, line_no)
    counts["items_without_meta"] = int((~found).sum())
    counts["items_without_category"] = int(sum(c is None for c, f in zip(category, found) if f))
    return found, category, counts


def _build_amazon(reviews: PathLike, meta: PathLike, seed: SeedLike) -> Tuple[Split, Dict[str, Any]]:
    columns = read_amazon_reviews(reviews)
    item_keys: List[str] = columns["items"]
    found, category, counts = read_amazon_meta(meta, {asin: k for k, asin in enumerate(item_keys)})
    if not found.any():
        raise ValueError(f"{meta}: holds metadata for none of the {len(item_keys)} reviewed items")

    # items with metadata, remapped by sorted asin; reviews of the others are dropped
    kept_items = sorted((asin, k) for k, asin in enumerate(item_keys) if found[k])
    item_id = np.zeros(len(item_keys), dtype=np.int64)  # first-appearance index -> 1-based id (0: dropped)
    item_id[[k for _, k in kept_items]] = np.arange(1, len(kept_items) + 1)
    cate_names = sorted({category[k] if category[k] is not None else NO_CATEGORY for _, k in kept_items})
    cate_index = {name: c for c, name in enumerate(cate_names, start=1)}
    item_cate = np.zeros(len(kept_items) + 1, dtype=np.int64)
    item_cate[1:] = [cate_index[category[k] if category[k] is not None else NO_CATEGORY] for _, k in kept_items]

    item = item_id[columns["item"]]
    keep = item > 0
    user_code, when = columns["user"][keep], columns["time"][keep]
    item = item[keep]
    # reviewers (with a kept review) remapped by sorted reviewerID
    user_keys: List[str] = columns["users"]
    present = np.unique(user_code)
    order = sorted(present.tolist(), key=user_keys.__getitem__)
    user_id = np.zeros(len(user_keys), dtype=np.int64)
    user_id[order] = np.arange(1, len(order) + 1)
    user = user_id[user_code]
    del columns

    by_time = np.lexsort((np.arange(len(user)), when, user))  # user, then time, then file order
    split, stats = next_item_split(user[by_time], item[by_time], item_cate, num_users=len(order),
                                   num_items=len(kept_items), num_cates=len(cate_names), seed=seed, name="amazon")
    stats.update(counts, reviews=int(len(keep)), reviews_without_meta=int((~keep).sum()))
    return split, stats


def load_amazon(reviews: PathLike, meta: PathLike, *, seed: SeedLike = 0) -> Split:
    """The raw Amazon files as a :class:`Split` with the official protocol (module doc).

    Args:
        reviews: ``reviews_<Cat>_5.json``.
        meta: ``meta_<Cat>.json``.
        seed: seed of the negative items.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: ``"file:line: ..."`` for a malformed line.
    """
    return _build_amazon(reviews, meta, seed)[0]


def prepare_amazon(reviews: PathLike, meta: PathLike, *, seed: int = 0, out: Optional[PathLike] = None,
                   overwrite: bool = False, cache_dir: Optional[PathLike] = None,
                   log: Optional[Log] = None) -> Prepared:
    """:func:`load_amazon`, saved to ``out`` (or the cache) and reused while inputs and seed are unchanged."""
    return prepare_cached("amazon", {"reviews": reviews, "meta": meta}, {"seed": seed},
                          lambda: _build_amazon(reviews, meta, seed), version=PIPELINE_VERSION, out=out,
                          overwrite=overwrite, cache_dir=cache_dir, log=log)


# ----------------------------------------------------------------------------------------------
# remapped CSV files
# ----------------------------------------------------------------------------------------------


def _build_amazon_csv(reviews: PathLike, item_cate: PathLike, seed: SeedLike) -> Tuple[Split, Dict[str, Any]]:
    rows = read_numeric_columns(reviews, ("user_id", "item_id", "day"))
    table = read_numeric_columns(item_cate, ("item_id", "cate_id"))
    if len(rows["user_id"]) == 0:
        raise ValueError(f"{reviews} holds no reviews")
    item_keys, cate_of_item = table["item_id"], table["cate_id"]
    if len(np.unique(item_keys)) != len(item_keys):
        raise ValueError(f"{item_cate}: an item_id is listed more than once")
    order = np.argsort(item_keys, kind="stable")
    item_keys, cate_of_item = item_keys[order], cate_of_item[order]
    cate_keys, cate_id = _dense_ids(cate_of_item)
    position = np.searchsorted(item_keys, rows["item_id"])
    known = (position < len(item_keys)) & (item_keys[np.minimum(position, len(item_keys) - 1)] == rows["item_id"])
    if not known.all():
        raise ValueError(f"{reviews}: item_id {int(rows['item_id'][~known][0])} has no row in {item_cate}")
    item = position + 1
    user_keys, user = _dense_ids(rows["user_id"])
    item_cate_table = np.concatenate(([0], cate_id))
    by_time = np.lexsort((np.arange(len(user)), rows["day"], user))  # user, then day, then file order
    split, stats = next_item_split(user[by_time], item[by_time], item_cate_table, num_users=len(user_keys),
                                   num_items=len(item_keys), num_cates=len(cate_keys), seed=seed,
                                   name="amazon-csv")
    stats.update(reviews=int(len(user)), ids_were_dense_0_based=bool(
        np.array_equal(user_keys, np.arange(len(user_keys))) and np.array_equal(item_keys, np.arange(len(item_keys)))
        and np.array_equal(cate_keys, np.arange(len(cate_keys)))))
    return split, stats


def load_amazon_csv(reviews: PathLike, item_cate: PathLike, *, seed: SeedLike = 0) -> Split:
    """The remapped Amazon CSV pair as a :class:`Split` with the official protocol (module doc).

    Args:
        reviews: ``<Cat>_reviews.csv`` with header ``user_id,item_id,day``.
        item_cate: ``<Cat>_item_cate.csv`` with header ``item_id,cate_id``.
        seed: seed of the negative items.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: for a missing column, a malformed line (``file:line``), or an item without category.
    """
    return _build_amazon_csv(reviews, item_cate, seed)[0]


def prepare_amazon_csv(reviews: PathLike, item_cate: PathLike, *, seed: int = 0, out: Optional[PathLike] = None,
                       overwrite: bool = False, cache_dir: Optional[PathLike] = None,
                       log: Optional[Log] = None) -> Prepared:
    """:func:`load_amazon_csv`, saved to ``out`` (or the cache) and reused while inputs and seed are unchanged."""
    return prepare_cached("amazon-csv", {"reviews": reviews, "item_cate": item_cate}, {"seed": seed},
                          lambda: _build_amazon_csv(reviews, item_cate, seed), version=PIPELINE_VERSION, out=out,
                          overwrite=overwrite, cache_dir=cache_dir, log=log)


def amazon_files(prefix: PathLike, kind: str) -> Tuple[Path, Path]:
    """The two files of a category from ``DIR/<Cat>``: ``kind="csv"`` gives ``DIR/<Cat>_reviews.csv``
    and ``DIR/<Cat>_item_cate.csv``; ``kind="raw"`` gives ``DIR/reviews_<Cat>_5.json`` and
    ``DIR/meta_<Cat>.json``."""
    prefix = Path(prefix).expanduser()
    if kind == "csv":
        return prefix.parent / f"{prefix.name}_reviews.csv", prefix.parent / f"{prefix.name}_item_cate.csv"
    if kind == "raw":
        return prefix.parent / f"reviews_{prefix.name}_5.json", prefix.parent / f"meta_{prefix.name}.json"
    raise ValueError(f"kind must be 'csv' or 'raw', got {kind!r}")
