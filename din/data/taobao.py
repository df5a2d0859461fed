"""Taobao "UserBehavior" (Alibaba Tianchi, dataId 649) as next-click DIN samples.

Input: ``UserBehavior.csv`` as published, no header (one is tolerated), one event per line:
``user_id,item_id,category_id,behavior,timestamp`` with ``behavior`` in ``pv`` (click), ``buy``,
``cart``, ``fav``. The full file has 100 million lines, so it is parsed in chunks by numpy's C reader
(the behaviour words are rewritten to digits first); no Python object per line.

Protocol (the per-user leave-last-out of the official Amazon ``build_dataset``, which the long-sequence
DIN follow-ups -- MIMN, SIM -- also use on this data set, chosen over a global time cutoff so that every
user has a test pair and the evaluation is the same as Amazon's):

* behaviours are the ``pv`` events only, each user's in time order (ties keep file order); repeated
  clicks on one item are kept (they are real behaviours);
* user, item and category ids are remapped densely in sorted order of their raw ids, 1-based;
* each item has one category: the one of its first click in the file (the raw data lists a few items
  under two categories; their number is reported as ``items_with_several_categories``);
* for every click at position ``i >= 1`` of a user but the last: training samples
  ``(clicks[:i], clicks[i], 1)`` and ``(clicks[:i], random never-clicked item, 0)``; the last click
  gives the test pair (labels 1 and 0, same history). Negative items are uniform over the clicked
  vocabulary minus the user's own clicks, and carry their own category.

``split="time"`` instead splits by one global time cutoff: every click at or after the
``1 - test_fraction`` quantile of the click timestamps is a test target (a pair with the history of all
the user's earlier clicks), every earlier one a training target. No training sample then looks at the
test period. A quantile rather than "the last day" because the published file has a few clicks with
timestamps far outside its nine days.

:func:`click_log_split` is this protocol on decoded columns; ``din prepare csv`` (:mod:`.interactions`)
applies it to a log of your own without a label column.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ._csv import iter_numeric_chunks, read_header
from ._io import PathLike
from .amazon import next_item_split
from .cache import Log, Prepared, prepare_cached
from .dataset import SeedLike, Split

__all__ = ["BEHAVIOURS", "check_split", "click_log_split", "dense_log_ids", "load_taobao", "prepare_taobao",
           "read_taobao_clicks", "time_cutoff"]

#: behaviour word -> code in the parsed table
BEHAVIOURS = {"pv": 0, "buy": 1, "cart": 2, "fav": 3}
COLUMNS = ("user_id", "item_id", "category_id", "behavior", "timestamp")
PIPELINE_VERSION = 1
SPLITS = ("last", "time")


def read_taobao_clicks(path: PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, int]]:
    """The ``pv`` events of a UserBehavior file, in file order, and event counts per behaviour.

    Returns:
        ``({"user", "item", "category", "timestamp"}: [n_pv] each (ids int32 when they fit, timestamps
        int64), {"events": ..., "pv": ..., "buy": ..., "cart": ..., "fav": ...})``.

    Raises:
        FileNotFoundError: if ``path`` is missing.
        ValueError: ``"path:line: ..."`` for a malformed line (wrong field count, an id that is not a
            non-negative integer, an unknown behaviour).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    has_header = read_header(path)[:1] == ["user_id"]
    # behaviour words become negative codes: ids are non-negative, so no raw number can pass for a word
    codes = {word: -1 - code for word, code in BEHAVIOURS.items()}
    replace = {f",{word},": f",{code}," for word, code in codes.items()}

    def check(table: np.ndarray, text: str) -> None:
        behaviour = table[:, 3]
        words = sum(text.count(pattern) for pattern in replace.values())
        if words != len(table) or np.any(table[:, :3] < 0) or np.any((behaviour < -len(codes)) | (behaviour > -1)):
            raise ValueError("a behaviour field is not a known word, or an id is negative")

    def non_negative(text: str) -> int:
        value = int(text)
        if value < 0:
            raise ValueError(text)
        return value

    names = ("user", "item", "category", "timestamp")
    parts: Dict[str, list] = {name: [] for name in names}
    per_behaviour = np.zeros(len(BEHAVIOURS), dtype=np.int64)
    for table in iter_numeric_chunks(
        path, usecols=range(5), names=COLUMNS, skip_header=has_header, num_fields=5, replace=replace,
        validators={0: non_negative, 1: non_negative, 2: non_negative, 3: BEHAVIOURS.__getitem__}, check=check,
    ):
        behaviour = -1 - table[:, 3]  # back to BEHAVIOURS codes
        per_behaviour += np.bincount(behaviour, minlength=len(BEHAVIOURS))
        clicks = table[behaviour == BEHAVIOURS["pv"]]
        # ids as int32 where they fit (they do in the published file): 20 bytes per kept click, not 32
        ids = np.int32 if clicks[:, :3].max(initial=0) < 2**31 else np.int64
        for k, name in zip((0, 1, 2, 4), names):
            parts[name].append(clicks[:, k].astype(ids if k < 3 else np.int64))
    counts = {"events": int(per_behaviour.sum()), **{w: int(per_behaviour[c]) for w, c in BEHAVIOURS.items()}}
    columns = {name: np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
               for name, chunks in parts.items()}
    return columns, counts


def check_split(split: str, test_fraction: float, splits: Tuple[str, ...] = SPLITS) -> None:
    """Raise ``ValueError`` naming ``split`` or ``test_fraction`` if it is not one of ``splits`` / in (0, 1)."""
    if split not in splits:
        raise ValueError(f"split must be one of {splits}, got {split!r}")
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def time_cutoff(timestamps: np.ndarray, test_fraction: float) -> Union[int, float]:
    """The ``1 - test_fraction`` quantile of ``timestamps``, as one of its values (``method="higher"``):
    the rows at or after it are the test period of a time split."""
    return np.quantile(np.asarray(timestamps), 1.0 - test_fraction, method="higher").item()


def dense_log_ids(user: np.ndarray, item: np.ndarray, category: np.ndarray) -> Dict[str, Any]:
    """Dense 1-based ids of a log's raw user, item and category ids (integers, any range), in sorted order
    of the raw ids, and each item's one category: the one of its first row.

    Returns:
        ``{"user": [n], "item": [n], "item_cate": [num_items + 1] (entry 0: padding), "num_users",
        "num_items", "num_cates", "items_with_several_categories"}`` (ids int64).
    """
    user_keys, user = np.unique(user, return_inverse=True)
    item_keys, first_row, item = np.unique(item, return_index=True, return_inverse=True)
    user, item = user.reshape(-1) + 1, item.reshape(-1) + 1
    cate_keys, item_cate = np.unique(category[first_row], return_inverse=True)
    item_cate = np.concatenate(([0], item_cate.reshape(-1) + 1))
    pairs = np.unique(item * (np.int64(category.max(initial=0)) + 1) + category)
    return {"user": user, "item": item, "item_cate": item_cate, "num_users": len(user_keys),
            "num_items": len(item_keys), "num_cates": len(cate_keys),
            "items_with_several_categories": int(len(pairs) - len(item_keys))}


def click_log_split(user: np.ndarray, item: np.ndarray, category: np.ndarray, timestamp: np.ndarray, *,
                    seed: SeedLike, split: str = "last", test_fraction: float = 0.1, name: str = "taobao",
                    where: str = "the log", clicks: str = "pv clicks") -> Tuple[Split, Dict[str, Any]]:
    """The protocol of the module doc on the clicks of a log, given as columns in file order.

    Args:
        user, item, category: ``[n]`` raw integer ids (remapped by :func:`dense_log_ids`).
        timestamp: ``[n]`` numbers; ties keep file order.
        seed, split, test_fraction: as :func:`load_taobao`.
        name: the data set's name; ``where``: the input, for error messages; ``clicks``: what the
            behaviours are, for the ``protocol`` entry of the stats.

    Raises:
        ValueError: for a bad ``split``/``test_fraction``, no click, or a split that leaves a part empty.
    """
    check_split(split, test_fraction)
    if len(user) == 0:
        raise ValueError(f"{where} holds no clicks")
    ids = dense_log_ids(user, item, category)
    user = ids["user"]
    by_time = np.lexsort((np.arange(len(user)), timestamp, user))  # user, time, file order
    test_target, cutoff = None, None
    if split == "time":
        timestamps = timestamp[by_time]
        cutoff = time_cutoff(timestamps, test_fraction)
        test_target = timestamps >= cutoff
    parts, stats = next_item_split(user[by_time], ids["item"][by_time], ids["item_cate"], num_users=ids["num_users"],
                                   num_items=ids["num_items"], num_cates=ids["num_cates"], seed=seed, name=name,
                                   test_target=test_target)
    if len(parts.test) == 0 or len(parts.train) == 0:
        raise ValueError(f"split {split!r} of {where} leaves an empty {'test' if len(parts.test) == 0 else 'train'} "
                         "part: too few clicks (or a test_fraction too small or too large)")
    stats.update(items_with_several_categories=ids["items_with_several_categories"], split=split,
                 first_timestamp=timestamp.min().item(), last_timestamp=timestamp.max().item())
    stats["protocol"] = f"{clicks}; " + stats["protocol"].replace("never-reviewed", "never-clicked")
    if split == "time":
        stats.update(test_fraction=test_fraction, test_from_timestamp=cutoff)
        stats["protocol"] = (f"{clicks}; the official build_dataset pairs (history, next click, 1) and (history, "
                             f"random never-clicked item, 0) for every click after a user's first; clicks at "
                             f"or after timestamp {cutoff} (the {1 - test_fraction:g} quantile) are test targets")
    return parts, stats


def _build_taobao(path: PathLike, seed: SeedLike, split: str = "last",
                  test_fraction: float = 0.1) -> Tuple[Split, Dict[str, Any]]:
    check_split(split, test_fraction)
    clicks, counts = read_taobao_clicks(path)
    if len(clicks["user"]) == 0:
        raise ValueError(f"{path} holds no 'pv' (click) events")
    parts, stats = click_log_split(clicks["user"], clicks["item"], clicks["category"], clicks["timestamp"], seed=seed,
                                   split=split, test_fraction=test_fraction, name="taobao", where=str(path))
    stats.update(counts)
    return parts, stats


def load_taobao(path: PathLike, *, seed: SeedLike = 0, split: str = "last", test_fraction: float = 0.1) -> Split:
    """A UserBehavior file as a :class:`Split` of next-click samples (protocol in the module doc).

    Args:
        path: ``UserBehavior.csv`` (or a head of it).
        seed: seed of the negative items.
        split: ``"last"`` (each user's last click is the test target) or ``"time"`` (clicks after a
            global time cutoff are).
        test_fraction: with ``split="time"``, the share of clicks (by time) at or after the cutoff.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: ``"file:line: ..."`` for a malformed line, no click at all, a bad ``split`` or
            ``test_fraction``, or a split that leaves a part empty.
    """
    return _build_taobao(path, seed, split, test_fraction)[0]


def prepare_taobao(path: PathLike, *, seed: int = 0, split: str = "last", test_fraction: float = 0.1,
                   out: Optional[PathLike] = None, overwrite: bool = False, cache_dir: Optional[PathLike] = None,
                   log: Optional[Log] = None) -> Prepared:
    """:func:`load_taobao`, saved to ``out`` (or the cache) and reused while input and options are unchanged."""
    check_split(split, test_fraction)  # before any work, and before the cache is touched
    options: Dict[str, Any] = {"seed": seed}
    if split != "last":  # the default keeps the key of folders prepared before the option existed
        options.update(split=split, test_fraction=test_fraction)
    return prepare_cached("taobao", {"input": path}, options,
                          lambda: _build_taobao(path, seed, split, test_fraction),
                          version=PIPELINE_VERSION, out=out, overwrite=overwrite, cache_dir=cache_dir, log=log)
