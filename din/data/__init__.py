"""Data sources for DIN, all producing one format: :class:`Split` of :class:`InteractionData`,
batched into :class:`Batch` tensors.

``load_data(spec, max_len=..., seed=...)`` is the single entry point of the trainer and the CLI:

* ``"synthetic"``  -- :func:`make_synthetic` (planted, candidate-dependent clicks);
* ``"movielens"``  -- :func:`load_movielens` on the bundled ml-latest-small;
* a directory written by :meth:`Split.save` -- loaded (memory-mapped);
* a directory holding ``ratings.csv`` and ``movies.csv`` (or the path of such a ``ratings.csv``)
  -- loaded as MovieLens.

New sources register a builder in ``SOURCES`` (a name) and/or a detector in ``_PATH_LOADERS``
(a directory layout).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .dataset import Batch, InteractionData, Split, split_by_user
from .movielens import BUNDLED_MOVIELENS, load_movielens
from .synthetic import make_synthetic

__all__ = [
    "Batch",
    "InteractionData",
    "Split",
    "split_by_user",
    "make_synthetic",
    "load_movielens",
    "load_data",
    "SOURCES",
    "BUNDLED_MOVIELENS",
]


def _synthetic(*, max_len: Optional[int], seed: Optional[int], **options: Any) -> Split:
    return make_synthetic(max_len=max_len if max_len is not None else 50, seed=seed, **options)


def _movielens(*, max_len: Optional[int], seed: Optional[int], **options: Any) -> Split:
    return load_movielens(None, max_len=max_len, seed=seed, **options)


#: named sources: ``name -> builder(max_len=..., seed=..., **options) -> Split``
SOURCES: Dict[str, Callable[..., Split]] = {
    "synthetic": _synthetic,
    "movielens": _movielens,
}


def _is_movielens(path: Path) -> bool:
    if path.is_file():
        return path.name == "ratings.csv" and (path.parent / "movies.csv").is_file()
    return (path / "ratings.csv").is_file() and (path / "movies.csv").is_file()


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
        spec: a source name (``"synthetic"``, ``"movielens"``) or a path.
        max_len: cut every history to its last ``max_len`` behaviours (``None``: keep all; synthetic
            data then uses 50, the window its labels are planted in).
        seed: the seed of generation / of the train/test split (ignored for saved splits).
        **options: passed on to the builder (e.g. ``num_users=`` for synthetic, ``test_fraction=``).

    Raises:
        ValueError: if ``spec`` is neither a known name nor a path in a recognised layout.
    """
    if not isinstance(spec, (str, Path)):
        raise ValueError(f"spec must be a string, got {type(spec).__name__}")
    key = str(spec)
    if key in SOURCES:
        return SOURCES[key](max_len=max_len, seed=seed, **options)
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
        f"unknown data spec {key!r}: expected one of {sorted(SOURCES)} or an existing path "
        "(a saved split or a MovieLens directory)"
    )
