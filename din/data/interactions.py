"""Your own interaction log (CSV, TSV, or Parquet with pyarrow) as DIN samples, with named columns.

Input: one interaction per row, a header line naming the columns; the caller names the user, item,
category and time columns and, optionally, a 0/1 label column (other columns are ignored):

* user, item and category ids may be any text (``u_17``, ``B00X4WHP5E``, ``42``); surrounding spaces are
  dropped and an empty id is an error. They are remapped to dense 1-based ids (0 is the padding id of
  every table, as in every source here) in sorted order of the raw text (Parquet: of the typed values);
* time is a number (Unix seconds, milliseconds, a day index, any sortable number); rows of a user with
  equal times keep their file order;
* each item has one category: the one of its first row in the file (a log listing an item under
  several categories is accepted; their number is reported as ``items_with_several_categories``).
  A log without categories can name its item column twice (each item its own category).

Two protocols, chosen by whether there is a label column:

* **No label: every row is a click**, and the samples are those of the Taobao source
  (:func:`din.data.taobao.click_log_split`, the official DIN ``build_dataset`` pairs): for each click
  after a user's first, ``(earlier clicks, the click, 1)`` and ``(earlier clicks, a random item the user
  never clicked, 0)``. ``split="last"`` (default) makes each user's last click the test pair;
  ``split="time"`` every click at or after the ``1 - test_fraction`` quantile of the times (default 0.1).
* **A label column: every row is a sample with its label** (the MovieLens protocol,
  :func:`din.data.movielens.row_samples`): candidate = the row's item, history = the same user's earlier
  rows with label 1 (a shown-but-not-clicked item is not an interest). ``split="user"`` (default) puts a
  seeded random ``test_fraction`` (default 0.2) of the users, all their rows, in the test part, as
  MovieLens; ``split="time"`` every row at or after the ``1 - test_fraction`` quantile of the times
  (default 0.1). Labels are ``0``/``1`` (also ``0.0``/``1.0``, ``true``/``false``).

CSV files are read with Python's ``csv`` module (quoted fields may hold the delimiter; UTF-8, a byte
order mark is dropped, bytes that are not UTF-8 still make distinct ids), about 2 s per million rows
on the development VM; a bad row is reported as ``file:line: reason``. Parquet files (``.parquet``,
``.pq``; about 0.6 s per million rows) need ``pyarrow``, which is not a dependency of this package;
without it such an input is a one-line error saying so. Their id columns hold integers or strings,
the time column numbers or timestamps (as integers of their unit), the label 0/1 or booleans; a bad
value is reported as ``file: row N: reason``.
"""
from __future__ import annotations

import csv
import math
from array import array
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ._io import PathLike
from .cache import Log, Prepared, prepare_cached
from .dataset import SeedLike, Split, split_by_user
from .movielens import row_samples
from .taobao import check_split, click_log_split, dense_log_ids, time_cutoff

__all__ = ["ROLES", "PARQUET_SUFFIXES", "interaction_log_options", "load_interaction_log",
           "prepare_interaction_log", "read_interaction_log"]

#: the columns a log names, in the order of the CLI options
ROLES = ("user", "item", "category", "time", "label")
PARQUET_SUFFIXES = (".parquet", ".pq")
PIPELINE_VERSION = 1  # part of the cache key of prepared folders
_ID_ROLES = ("user", "item", "category")
_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}
#: split -> default test_fraction (``"last"`` has none: each user's last click is the test target)
_TEST_FRACTION = {"last": None, "time": 0.1, "user": 0.2}


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


def _column_names(user_col: Any, item_col: Any, category_col: Any, time_col: Any,
                  label_col: Any) -> Dict[str, str]:
    """``role -> column name`` (``label`` only when given), each checked to be a non-empty string."""
    given = {"user": user_col, "item": item_col, "category": category_col, "time": time_col, "label": label_col}
    columns = {}
    for role, name in given.items():
        if role == "label" and name is None:
            continue
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{role}_col must be a non-empty column name, got {name!r}")
        columns[role] = name.strip()
    return columns


def _delimiter(path: Path, delimiter: Optional[str]) -> str:
    if delimiter is None:
        return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    if delimiter in ("tab", "\\t"):
        return "\t"
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\"\r\n":
        raise ValueError(f"delimiter must be one character other than a quote or a line break ('tab' or '\\t' "
                         f"for a tab), got {delimiter!r}")
    return delimiter


def interaction_log_options(labelled: bool, split: Optional[str] = None,
                            test_fraction: Optional[float] = None) -> Tuple[str, Optional[float]]:
    """The ``(split, test_fraction)`` used for a log with (``labelled``) or without a label column.

    Defaults: without labels ``"last"``; with labels ``"user"``; ``test_fraction`` 0.1 for ``"time"``,
    0.2 for ``"user"``, none for ``"last"``.

    Raises:
        ValueError: naming ``split`` if it does not fit the protocol, or ``test_fraction`` if it is not
            in (0, 1) or given with ``split="last"``.
    """
    splits = ("user", "time") if labelled else ("last", "time")
    split = splits[0] if split is None else split
    if split not in splits:
        protocol = ("with a label column every row is a sample" if labelled
                    else "without a label column every row is a click")
        raise ValueError(f"split must be one of {splits} ({protocol}), got {split!r}")
    if split == "last":
        if test_fraction is not None:
            raise ValueError(f"test_fraction applies to split 'time' (or 'user' with labels), not 'last', where "
                             f"each user's last click is the test target; got {test_fraction!r}")
        return split, None
    test_fraction = _TEST_FRACTION[split] if test_fraction is None else test_fraction
    check_split(split, test_fraction, splits)
    return split, float(test_fraction)


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def _locate(path: Path, names: List[str], columns: Mapping[str, str], what: str = "the header") -> Dict[str, int]:
    """``role -> position`` of each named column in ``names`` (``what``: a header or a Parquet schema)."""
    missing = [f"{name!r} (the {role} column)" for role, name in columns.items() if name not in names]
    if missing:
        raise ValueError(f"{path}: {what} {names} has no column {', '.join(missing)}")
    twice = sorted({name for name in columns.values() if names.count(name) > 1})
    if twice:
        raise ValueError(f"{path}: {what} {names} names {', '.join(map(repr, twice))} more than once")
    return {role: names.index(name) for role, name in columns.items()}


def _sorted_codes(keys: Dict[str, int], codes: array) -> np.ndarray:
    """First-appearance codes (``keys``: text -> code) renumbered 0-based in sorted order of the text."""
    order = sorted(range(len(keys)), key=list(keys).__getitem__)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys), dtype=np.int64)
    return rank[np.frombuffer(codes, dtype=np.int64)] if len(codes) else np.zeros(0, dtype=np.int64)


def _read_csv(path: Path, columns: Mapping[str, str], delimiter: str) -> Dict[str, np.ndarray]:
    # the loop is the whole cost (~2 us a row): plain locals, no per-row function calls on the good path
    with open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as error:
            raise ValueError(f"{path}:1: {error}") from None
        if header is None:
            raise ValueError(f"{path} is empty: expected a header line naming the columns, then one row per "
                             "interaction")
        names = [name.strip() for name in header]
        if names in ([], [""]):
            raise ValueError(f"{path}:1: the first line must be the header naming the columns, found an empty line")
        at = _locate(path, names, columns)
        width = len(names)
        u_at, i_at, c_at, t_at, l_at = at["user"], at["item"], at["category"], at["time"], at.get("label")
        keys: Dict[str, Dict[str, int]] = {role: {} for role in _ID_ROLES}
        users, items, cates = keys["user"], keys["item"], keys["category"]
        codes = {role: array("q") for role in _ID_ROLES}
        u_codes, i_codes, c_codes = codes["user"], codes["item"], codes["category"]
        times = array("q")  # integers while every time is one, floats from the first that is not
        labels = array("b")
        try:
            for row in reader:
                if len(row) != width:
                    if not row:  # a blank line
                        continue
                    raise _bad(path, reader.line_num, f"expected {width} fields as in the header, found "
                                                      f"{len(row)}: {delimiter.join(row)[:200]!r}")
                user, item, cate = row[u_at].strip(), row[i_at].strip(), row[c_at].strip()
                if not (user and item and cate):
                    role = "user" if not user else "item" if not item else "category"
                    raise _bad(path, reader.line_num, f"column {columns[role]!r} (the {role} id) is empty")
                u_codes.append(users.setdefault(user, len(users)))
                i_codes.append(items.setdefault(item, len(items)))
                c_codes.append(cates.setdefault(cate, len(cates)))
                text = row[t_at]
                try:
                    times.append(int(text))
                except (ValueError, OverflowError):
                    value = _number(path, reader.line_num, columns["time"], text)
                    if times.typecode == "q":
                        times = array("d", times)
                    times.append(value)
                if l_at is not None:
                    text = row[l_at]
                    label = _LABELS.get(text.strip().lower())
                    labels.append(_label(path, reader.line_num, columns["label"], text) if label is None else label)
        except csv.Error as error:
            raise ValueError(f"{path}:{reader.line_num}: {error}") from None
    if not u_codes:
        raise ValueError(f"{path} has a header but no rows")
    result = {role: _sorted_codes(keys[role], codes[role]) for role in _ID_ROLES}
    result["time"] = np.frombuffer(times, dtype=np.int64 if times.typecode == "q" else np.float64)
    if l_at is not None:
        result["label"] = np.frombuffer(labels, dtype=np.int8)
    return result


def _bad(path: Path, line: int, reason: str) -> ValueError:
    return ValueError(f"{path}:{line}: {reason}")


def _number(path: Path, line: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(path, line, f"column {name!r} (the time) is not a number: {text[:50]!r}") from None
    if not math.isfinite(value):
        raise _bad(path, line, f"column {name!r} (the time) is not a finite number: {text[:50]!r}")
    return value


def _label(path: Path, line: int, name: str, text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (0.0, 1.0):
        raise _bad(path, line, f"column {name!r} (the label) must be 0 or 1 (or false/true), found {text[:50]!r}")
    return int(value)


def _read_parquet(path: Path, columns: Mapping[str, str]) -> Dict[str, np.ndarray]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow, which is not installed (pip install pyarrow, "
                         "or save the log as CSV)") from None
    try:
        names = list(pq.read_schema(path).names)
        _locate(path, names, columns, "the file's columns")
        table = pq.read_table(path, columns=sorted(set(columns.values())))
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    if table.num_rows == 0:
        raise ValueError(f"{path} holds no rows")

    def fail(role: str, mask: Any, reason: str, values: Optional[np.ndarray] = None) -> None:
        bad = np.asarray(mask, dtype=bool)
        if bad.any():
            row = int(np.argmax(bad))
            found = f", found {values[row].item()!r}" if values is not None else ""
            raise ValueError(f"{path}: row {row + 1}: column {columns[role]!r} (the {role}) {reason}{found}")

    result: Dict[str, np.ndarray] = {}
    for role, name in columns.items():
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        kind = column.type
        fail(role, column.is_null().to_numpy(zero_copy_only=False), "is empty (null)")
        if role in _ID_ROLES:
            if pa.types.is_string(kind) or pa.types.is_large_string(kind):
                column = pc.utf8_trim_whitespace(column)
                fail(role, pc.equal(column, "").to_numpy(zero_copy_only=False), "is an empty id")
            elif not pa.types.is_integer(kind):
                raise ValueError(f"{path}: column {name!r} (the {role} id) has type {kind}; expected integers or "
                                 "strings")
            # codes in sorted order of the values, in Arrow (np.unique on a million strings takes seconds)
            encoded = column.combine_chunks().dictionary_encode()
            rank = np.empty(len(encoded.dictionary), dtype=np.int64)
            rank[pc.sort_indices(encoded.dictionary).to_numpy()] = np.arange(len(rank), dtype=np.int64)
            result[role] = rank[encoded.indices.to_numpy(zero_copy_only=False)]
        elif role == "time":
            if pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_duration(kind):
                column = column.cast(pa.int64())  # in the column's own unit
            elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise ValueError(f"{path}: column {name!r} (the time) has type {kind}; expected numbers or "
                                 "timestamps")
            values = column.to_numpy(zero_copy_only=False)
            fail(role, ~np.isfinite(values), "is not a finite number", values)
            result[role] = values.astype(np.int64 if values.dtype.kind in "iu" else np.float64)
        else:
            if not (pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise ValueError(f"{path}: column {name!r} (the label) has type {kind}; expected 0/1 or booleans")
            raw = column.to_numpy(zero_copy_only=False)
            values = raw.astype(np.float64)
            fail(role, (values != 0) & (values != 1), "must be 0 or 1", raw)
            result[role] = values.astype(np.int8)
    return result


def read_interaction_log(path: PathLike, columns: Mapping[str, str],
                         delimiter: Optional[str] = None) -> Dict[str, np.ndarray]:
    """The named columns of a log, one array per role, in file order.

    Args:
        path: a CSV/TSV file with a header line, or a ``.parquet``/``.pq`` file (needs pyarrow).
        columns: ``role -> column name`` for the roles ``user``, ``item``, ``category``, ``time`` and,
            optionally, ``label``.
        delimiter: the CSV field separator (default ``","``, a tab for ``.tsv``/``.tab``; ``"tab"`` or
            ``"\\t"`` for a tab); not used for Parquet.

    Returns:
        ``{"user", "item", "category"}``: int64 0-based dense ids in sorted order of the raw ids;
        ``"time"``: int64 (or float64 when a time is not an integer); ``"label"``: int8 0/1 when named.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ValueError: for an empty file, a column missing from the header (all of them named), a
            malformed row (``file:line: reason``: field count, an empty id, a time that is not a
            number, a label that is not 0/1, bad quoting), or Parquet without pyarrow.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    unknown = sorted(set(columns) - set(ROLES))
    absent = [role for role in ROLES[:4] if role not in columns]
    if unknown or absent:
        raise ValueError(f"columns must name the roles {ROLES[:4]} (and optionally 'label'); "
                         f"missing {absent}, unknown {unknown}")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return _read_parquet(path, columns)
    return _read_csv(path, columns, _delimiter(path, delimiter))


# ----------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------


def _labelled_split(path: Path, log: Dict[str, np.ndarray], *, label_col: str, split: str, test_fraction: float,
                    seed: SeedLike, name: str) -> Tuple[Split, Dict[str, Any]]:
    label = log["label"].astype(bool)
    positives = int(label.sum())
    if positives == 0:
        raise ValueError(f"{path}: no row has label 1 in column {label_col!r}: there is nothing to learn")
    if positives == len(label):
        raise ValueError(f"{path}: every row has label 1 in column {label_col!r}: without negatives nothing can "
                         "be learnt; leave the label column out to treat the rows as clicks with sampled negatives")
    ids = dense_log_ids(log["user"], log["item"], log["category"])
    item = ids["item"]
    data, order = row_samples(ids["user"], item, ids["item_cate"][item], log["time"], label, behaviour=label,
                              num_users=ids["num_users"] + 1, num_goods=ids["num_items"] + 1,
                              num_cates=ids["num_cates"] + 1, name=name)
    stats: Dict[str, Any] = {"split": split, "test_fraction": test_fraction}
    if split == "user":
        if ids["num_users"] < 2:
            raise ValueError(f"{path}: split 'user' needs at least two users, found {ids['num_users']}")
        parts = split_by_user(data, test_fraction, seed)
        how = f"users split at random (test_fraction {test_fraction:g})"
    else:
        times = log["time"][order]
        cutoff = time_cutoff(times, test_fraction)
        test = times >= cutoff
        train_part, test_part = data.subset(~test), data.subset(test)
        train_part.name, test_part.name = f"{name}/train", f"{name}/test"
        parts = Split(train_part, test_part)
        stats["test_from_timestamp"] = cutoff
        how = f"rows at or after time {cutoff} (the {1 - test_fraction:g} quantile) are test samples"
    if len(parts.test) == 0 or len(parts.train) == 0:
        raise ValueError(f"split {split!r} of {path} leaves an empty {'test' if len(parts.test) == 0 else 'train'} "
                         "part: too few rows (or a test_fraction too small or too large)")
    stats.update(protocol=f"every row a sample with its label; history = the user's earlier rows with label 1 "
                          f"(time order, ties in file order); {how}",
                 behaviours=positives, positive_rows=positives,
                 items_with_several_categories=ids["items_with_several_categories"],
                 first_timestamp=log["time"].min().item(), last_timestamp=log["time"].max().item())
    return parts, stats


def _build(path: PathLike, columns: Mapping[str, str], delimiter: Optional[str], split: str,
           test_fraction: Optional[float], seed: SeedLike) -> Tuple[Split, Dict[str, Any]]:
    path = Path(path).expanduser()
    log = read_interaction_log(path, columns, delimiter)
    name = path.stem or "log"
    if "label" in columns:
        parts, stats = _labelled_split(path, log, label_col=columns["label"], split=split,
                                       test_fraction=float(test_fraction), seed=seed, name=name)
    else:
        parts, stats = click_log_split(log["user"], log["item"], log["category"], log["time"], seed=seed, split=split,
                                       test_fraction=0.1 if test_fraction is None else test_fraction, name=name,
                                       where=str(path), clicks="every row a click")
    stats.update(rows=int(len(log["user"])),
                 input_format="parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "csv")
    return parts, stats


def _arguments(path: PathLike, user_col: Any, item_col: Any, category_col: Any, time_col: Any, label_col: Any,
               delimiter: Optional[str], split: Optional[str], test_fraction: Optional[float]):
    columns = _column_names(user_col, item_col, category_col, time_col, label_col)
    split, test_fraction = interaction_log_options("label" in columns, split, test_fraction)
    if Path(path).suffix.lower() in PARQUET_SUFFIXES:
        if delimiter is not None:
            raise ValueError(f"delimiter applies to CSV files, not to the Parquet file {path}")
        return columns, None, split, test_fraction
    return columns, _delimiter(Path(path), delimiter), split, test_fraction


def load_interaction_log(path: PathLike, *, user_col: str, item_col: str, category_col: str, time_col: str,
                         label_col: Optional[str] = None, delimiter: Optional[str] = None,
                         split: Optional[str] = None, test_fraction: Optional[float] = None,
                         seed: SeedLike = 0) -> Split:
    """A log as a :class:`Split` (protocols in the module doc).

    Args:
        path: the CSV/TSV or Parquet file.
        user_col, item_col, category_col, time_col: the names of those columns in its header.
        label_col: the name of a 0/1 label column, or ``None``: every row is a click.
        delimiter: the CSV field separator (see :func:`read_interaction_log`).
        split: ``"last"`` or ``"time"`` without labels (default ``"last"``); ``"user"`` or ``"time"``
            with labels (default ``"user"``).
        test_fraction: the test share of the times (``"time"``, default 0.1) or of the users
            (``"user"``, default 0.2); not used with ``"last"``.
        seed: the seed of the sampled negatives (without labels) or of the user split (with labels).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: for a bad argument (naming it), a missing column, a malformed row (``file:line``),
            or a split that leaves a part empty.
    """
    columns, delimiter, split, test_fraction = _arguments(path, user_col, item_col, category_col, time_col,
                                                          label_col, delimiter, split, test_fraction)
    return _build(path, columns, delimiter, split, test_fraction, seed)[0]


def prepare_interaction_log(path: PathLike, *, user_col: str, item_col: str, category_col: str, time_col: str,
                            label_col: Optional[str] = None, delimiter: Optional[str] = None,
                            split: Optional[str] = None, test_fraction: Optional[float] = None, seed: int = 0,
                            out: Optional[PathLike] = None, overwrite: bool = False,
                            cache_dir: Optional[PathLike] = None, log: Optional[Log] = None) -> Prepared:
    """:func:`load_interaction_log`, saved to ``out`` (or the cache, as ``csv-<key>``) and reused while the
    file and the options (columns, delimiter, split, test fraction, seed) are unchanged."""
    columns, delimiter, split, test_fraction = _arguments(path, user_col, item_col, category_col, time_col,
                                                          label_col, delimiter, split, test_fraction)
    options = {"columns": dict(columns), "delimiter": delimiter, "split": split, "test_fraction": test_fraction,
               "seed": seed}
    return prepare_cached("csv", {"input": path}, options,
                          lambda: _build(path, columns, delimiter, split, test_fraction, seed),
                          version=PIPELINE_VERSION, out=out, overwrite=overwrite, cache_dir=cache_dir, log=log)
