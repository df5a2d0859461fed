"""Data sources for DIN, all producing one format: :class:`Split` of :class:`InteractionData`,
batched into :class:`Batch` tensors.

``load_data(spec, max_len=..., seed=...)`` is the single entry point of the trainer and the CLI:

* ``"synthetic"``  -- :func:`make_synthetic` (planted, candidate-dependent clicks);
* ``"synthetic-long"`` -- :func:`make_long_range_synthetic` (histories of 200-500 behaviours whose clicks
  depend on interests older than the last 50: for search before attention);
* ``"movielens"``  -- :func:`load_movielens` on the bundled ml-latest-small;
* a directory written by :meth:`Split.save` -- loaded (memory-mapped);
* a directory holding ``ratings.csv`` and ``movies.csv`` (or ml-1m's ``ratings.dat`` and
  ``movies.dat``), or the path of such a ratings file -- loaded as MovieLens;
* ``"<source>:<path>"`` -- a raw data set, prepared once into the cache (``$DIN_CACHE_DIR`` or
  ``~/.cache/din``, see :mod:`din.data.cache`) and memory-mapped from there on:
  ``amazon:DIR/Electronics`` (``DIR/reviews_Electronics_5.json`` + ``DIR/meta_Electronics.json``),
  ``amazon-csv:DIR/Beauty`` (``DIR/Beauty_reviews.csv`` + ``DIR/Beauty_item_cate.csv``),
  ``taobao:FILE`` (UserBehavior.csv), ``movielens:DIR``. ``seed`` seeds the negative items (the
  user split for MovieLens); ``None`` means 0, so that the cache applies.

Your own interaction log (:mod:`din.data.interactions`, ``din prepare csv``) has no ``SOURCE:PATH`` form:
its column names are options, so it is prepared into a folder first and that folder is the spec.

New sources register a builder in ``SOURCES`` (a name), a preparer in ``PREPARERS`` (a
``name:path`` spec) and/or a detector in ``_PATH_LOADERS`` (a directory layout).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .amazon import amazon_files, load_amazon, load_amazon_csv, prepare_amazon, prepare_amazon_csv
from .cache import Prepared, default_cache_dir
from .dataset import (VALIDATION_PROTOCOLS, Batch, InteractionData, Split, carve_validation, shard_bounds,
                      split_by_user)
from .interactions import load_interaction_log, prepare_interaction_log
from .movielens import BUNDLED_MOVIELENS, load_movielens, prepare_movielens
from .synthetic import make_long_range_synthetic, make_synthetic
from .taobao import load_taobao, prepare_taobao

__all__ = [
    "Batch",
    "InteractionData",
    "Split",
    "split_by_user",
    "carve_validation",
    "shard_bounds",
    "VALIDATION_PROTOCOLS",
    "make_synthetic",
    "make_long_range_synthetic",
    "load_movielens",
    "load_amazon",
    "load_amazon_csv",
    "load_taobao",
    "load_interaction_log",
    "prepare_amazon",
    "prepare_amazon_csv",
    "prepare_taobao",
    "prepare_movielens",
    "prepare_interaction_log",
    "Prepared",
    "default_cache_dir",
    "load_data",
    "SOURCES",
    "PREPARERS",
    "BUNDLED_MOVIELENS",
]


def _synthetic(*, max_len: Optional[int], seed: Optional[int], **options: Any) -> Split:
    return make_synthetic(max_len=max_len if max_len is not None else 50, seed=seed, **options)


def _synthetic_long(*, max_len: Optional[int], seed: Optional[int], **options: Any) -> Split:
    split = make_long_range_synthetic(seed=seed, **options)  # its labels never depend on max_len
    return split.truncated(max_len) if max_len is not None else split


def _movielens(*, max_len: Optional[int], seed: Optional[int], **options: Any) -> Split:
    return load_movielens(None, max_len=max_len, seed=seed, **options)


#: named sources: ``name -> builder(max_len=..., seed=..., **options) -> Split``
SOURCES: Dict[str, Callable[..., Split]] = {
    "synthetic": _synthetic,
    "synthetic-long": _synthetic_long,
    "movielens": _movielens,
}


#: ``name:path`` specs: ``name -> preparer(path, seed=..., **options) -> Prepared`` (cached folders)
PREPARERS: Dict[str, Callable[..., Prepared]] = {
    "amazon": lambda path, **kw: prepare_amazon(*amazon_files(path, "raw"), **kw),
    "amazon-csv": lambda path, **kw: prepare_amazon_csv(*amazon_files(path, "csv"), **kw),
    "taobao": lambda path, **kw: prepare_taobao(path, **kw),
    "movielens": lambda path, **kw: prepare_movielens(path, **kw),
}


def _is_movielens(path: Path) -> bool:
    if path.is_file():
        return path.suffix in (".csv", ".dat") and path.name == f"ratings{path.suffix}" and (
            path.parent / f"movies{path.suffix}").is_file()
    return any((path / f"ratings{suffix}").is_file() and (path / f"movies{suffix}").is_file()
               for suffix in (".csv", ".dat"))


def _load_saved(path: Path, *, max_len: Optional[int], seed: Optional[int], **options: Any) -> Split:
    split = Split.load(path, **options)
    return split.truncated(max_len) if max_len is not None else split


def _load_movielens_path(path: Path, *, max_len: Optional[int], seed: Optional[int], **options: Any) -> Split:
    return load_movielens(path, max_len=max_len, seed=seed, **options)


#: directory layouts, tried in order: ``(detector(path) -> bool, loader(path, max_len=, seed=, **options))``
_PATH_LOADERS: List[Tuple[Callable[[Path], bool], Callable[..., Split]]] = [
    (Split.is_saved, _load_saved),
    (_is_movielens, _load_movielens_path),
]


def load_data(spec: str, *, max_len: Optional[int] = None, seed: Optional[int] = 0, **options: Any) -> Split:
    """Build or load the :class:`Split` that ``spec`` names (see the module doc).

    Args:
        spec: a source name (``"synthetic"``, ``"movielens"``), a path, or ``SOURCE:PATH`` with a
            source of :data:`PREPARERS` (prepared once into the cache, then memory-mapped).
        max_len: cut every history to its last ``max_len`` behaviours (``None``: keep all; synthetic
            data then uses 50, the window its labels are planted in).
        seed: the seed of generation / of the train/test split / of the sampled negatives (ignored for
            saved splits).
        **options: passed on to the builder (e.g. ``num_users=`` for synthetic, ``test_fraction=``;
            ``cache_dir=``, ``log=`` for ``SOURCE:PATH``).

    Raises:
        ValueError: if ``spec`` is neither a known name nor a path in a recognised layout.
        FileNotFoundError: if a ``SOURCE:PATH`` input file is missing.
    """
    if not isinstance(spec, (str, Path)):
        raise ValueError(f"spec must be a string, got {type(spec).__name__}")
    key = str(spec)
    if key in SOURCES:
        return SOURCES[key](max_len=max_len, seed=seed, **options)
    name, colon, rest = key.partition(":")
    if colon and name in PREPARERS:
        if not rest:
            raise ValueError(f"data spec {key!r} names no path after '{name}:'")
        options.setdefault("log", lambda line: print(line, file=sys.stderr))
        prepared = PREPARERS[name](rest, seed=0 if seed is None else seed, **options)
        split = prepared.load()
        return split.truncated(max_len) if max_len is not None else split
    path = Path(key).expanduser()
    if path.exists():
        for detect, loader in _PATH_LOADERS:
            if detect(path):
                return loader(path, max_len=max_len, seed=seed, **options)
        raise ValueError(
            f"spec {key!r} is a path, but neither a saved split (summary.json, train/, test/) nor a "
            "MovieLens directory (ratings.csv, movies.csv)"
        )
    raise ValueError(
        f"unknown data spec {key!r}: expected one of {sorted(SOURCES)}, an existing path "
        f"(a saved split or a MovieLens directory), or SOURCE:PATH with SOURCE in {sorted(PREPARERS)}"
    )
