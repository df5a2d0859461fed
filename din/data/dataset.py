"""The one sample format that every data source produces, and the one batch format the model eats.

A DIN sample is ``(user, behaviour history, candidate goods, candidate category, click label)``.
Storing every history as a padded ``[N, T]`` matrix would cost ``O(N * T)`` memory, and consecutive
samples of one user share almost all of their history. :class:`InteractionData` therefore keeps all
users' time-ordered behaviour sequences concatenated in one flat array, and a sample's history is the
slice ``behaviour_goods[hist_start:hist_end]`` of it: memory is ``O(samples + behaviours)``. Padded
tensors exist only per mini-batch, built by one vectorised gather in :meth:`InteractionData.batch`.

Conventions shared with the model (``din/model.py``) and the kernels (``din_kernels``):

* ids are 1-based and dense; id 0 is the padding id of every vocabulary (users, goods, categories);
  ``num_users``/``num_goods``/``num_cates`` are vocabulary sizes *including* the padding id, i.e.
  embedding-table row counts;
* a batch's history is left-aligned: positions ``[0, lengths[b])`` hold the last
  ``min(history, max_len)`` behaviours in time order (oldest first), padding (id 0) fills the end.

On disk a data set is a directory of ``.npy`` arrays plus ``meta.json``, written atomically and
memory-mapped when loaded; a :class:`Split` is ``train/``, ``test/`` and ``summary.json``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from ._io import PathLike, atomic_directory, read_json, write_json

__all__ = ["Batch", "InteractionData", "Split", "VALIDATION_PROTOCOLS", "carve_validation", "shard_bounds",
           "split_by_user"]

FORMAT = "din-kernels/interactions"
SPLIT_FORMAT = "din-kernels/split"
FORMAT_VERSION = 1

_ID_DTYPE = np.int32  # 2**31 ids is far beyond any DIN data set, and halves the memory of int64
_OFFSET_DTYPE = np.int64  # behaviour positions: Taobao-scale flat arrays pass 2**31
_LABEL_DTYPE = np.float32

_SAMPLE_ARRAYS = ("user", "hist_start", "hist_end", "goods", "cate", "label")
_BEHAVIOUR_ARRAYS = ("behaviour_goods", "behaviour_cates")
_ARRAYS = _BEHAVIOUR_ARRAYS + _SAMPLE_ARRAYS

SeedLike = Union[None, int, np.random.Generator]


# ----------------------------------------------------------------------------------------------
# Batch
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One mini-batch as torch tensors; ``B`` samples, histories padded to width ``T``.

    Attributes:
        user: ``LongTensor [B]`` user ids.
        hist_goods: ``LongTensor [B, T]`` goods ids of the history, oldest first, 0-padded at the end.
        hist_cates: ``LongTensor [B, T]`` category ids of the same behaviours, 0-padded at the end.
        lengths: ``LongTensor [B]`` number of valid history positions (may be 0).
        goods: ``LongTensor [B]`` candidate goods ids.
        cate: ``LongTensor [B]`` candidate category ids.
        label: ``FloatTensor [B]`` click labels in {0, 1}.
    """

    user: torch.Tensor
    hist_goods: torch.Tensor
    hist_cates: torch.Tensor
    lengths: torch.Tensor
    goods: torch.Tensor
    cate: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def max_len(self) -> int:
        """The padded history width ``T``."""
        return int(self.hist_goods.shape[1])

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "Batch":
        """Return a copy with every tensor on ``device`` (``non_blocking`` pays off from pinned memory)."""
        return Batch(
            **{
                name: getattr(self, name).to(device, non_blocking=non_blocking)
                for name in self.__dataclass_fields__
            }
        )

    def pin_memory(self) -> "Batch":
        """Return a copy in page-locked memory, so that ``to("cuda", non_blocking=True)`` overlaps."""
        return Batch(**{name: getattr(self, name).pin_memory() for name in self.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _vector(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _int_column(value: Any, name: str, dtype: type, low: int, high: Optional[int]) -> np.ndarray:
    """A 1-D integer column with values in ``[low, high)`` (``high=None``: unbounded), as ``dtype``.

    The range is checked before the cast, so that an id too large for int32 is reported rather than
    silently wrapped around.
    """
    array = _vector(value, name)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.size:
        lo, hi = int(array.min()), int(array.max())
        if lo < low or (high is not None and hi >= high):
            bound = f"[{low}, {high})" if high is not None else f">= {low}"
            raise ValueError(f"{name} must lie in {bound}, found values in [{lo}, {hi}]")
    return array.astype(dtype, copy=False)


def _index(index: Any, n: int, name: str = "index") -> np.ndarray:
    """Integer positions from an integer array or a boolean mask over ``n`` samples."""
    array = np.asarray(index)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype == np.bool_:
        if len(array) != n:
            raise ValueError(f"{name} is a boolean mask of length {len(array)}, expected {n}")
        return np.flatnonzero(array)
    if array.size == 0:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers or booleans, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def shard_bounds(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``[start, stop)`` of part ``rank`` when ``n`` items are cut into ``world_size`` contiguous parts whose
    sizes differ by at most one, the larger ones first (``numpy.array_split``'s rule). Contiguous parts in
    rank order concatenate back to the whole, which is what lets a data-parallel step see exactly the
    single-process batch (``din.distributed``)."""
    n = int(n)
    world_size = _positive_int(world_size, "world_size")
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world_size)
    start = int(rank) * base + min(int(rank), extra)
    return start, start + base + (1 if rank < extra else 0)


# ----------------------------------------------------------------------------------------------
# InteractionData
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class InteractionData:
    """Columnar samples. A sample's history is the slice ``behaviour_goods[hist_start:hist_end]`` of
    one flat, time-ordered behaviour array (all users' sequences concatenated) -- so memory is
    ``O(samples + behaviours)``, never ``O(samples * T)``. Ids are 1-based; 0 is the padding id.

    Arrays are converted on construction (ids to int32, offsets to int64, labels to float32; no copy
    when they already have those types, so memory-mapped arrays stay mapped) and validated; an invalid
    argument raises ``ValueError`` naming it.

    Attributes:
        behaviour_goods: ``int32 [L]`` goods id of every behaviour.
        behaviour_cates: ``int32 [L]`` category id of every behaviour.
        user: ``int32 [N]`` user id of every sample.
        hist_start: ``int64 [N]`` first behaviour of the sample's history.
        hist_end: ``int64 [N]`` one past the last behaviour of the history (``== hist_start``: empty).
        goods: ``int32 [N]`` candidate goods id.
        cate: ``int32 [N]`` candidate category id.
        label: ``float32 [N]`` click label in {0, 1}.
        num_users, num_goods, num_cates: vocabulary sizes including the padding id 0 (max id + 1 or
            more); embedding tables need exactly this many rows.
        name: a human-readable name ("movielens/train", ...).
    """

    behaviour_goods: np.ndarray
    behaviour_cates: np.ndarray
    user: np.ndarray
    hist_start: np.ndarray
    hist_end: np.ndarray
    goods: np.ndarray
    cate: np.ndarray
    label: np.ndarray
    num_users: int
    num_goods: int
    num_cates: int
    name: str = ""

    def __post_init__(self) -> None:
        for vocab in ("num_users", "num_goods", "num_cates"):
            setattr(self, vocab, _positive_int(getattr(self, vocab), vocab))
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {type(self.name).__name__}")
        self.behaviour_goods = _int_column(self.behaviour_goods, "behaviour_goods", _ID_DTYPE, 1, self.num_goods)
        self.behaviour_cates = _int_column(self.behaviour_cates, "behaviour_cates", _ID_DTYPE, 1, self.num_cates)
        if len(self.behaviour_cates) != len(self.behaviour_goods):
            raise ValueError(
                f"behaviour_cates has {len(self.behaviour_cates)} elements but behaviour_goods has "
                f"{len(self.behaviour_goods)}"
            )
        num_behaviours = len(self.behaviour_goods)
        self.user = _int_column(self.user, "user", _ID_DTYPE, 1, self.num_users)
        self.hist_start = _int_column(self.hist_start, "hist_start", _OFFSET_DTYPE, 0, num_behaviours + 1)
        self.hist_end = _int_column(self.hist_end, "hist_end", _OFFSET_DTYPE, 0, num_behaviours + 1)
        self.goods = _int_column(self.goods, "goods", _ID_DTYPE, 1, self.num_goods)
        self.cate = _int_column(self.cate, "cate", _ID_DTYPE, 1, self.num_cates)
        label = _vector(self.label, "label")
        if label.size and not (np.issubdtype(label.dtype, np.number) or label.dtype == np.bool_):
            raise ValueError(f"label must be numeric, got dtype {label.dtype}")
        self.label = label.astype(_LABEL_DTYPE, copy=False)
        if self.label.size and not np.all((self.label == 0) | (self.label == 1)):
            raise ValueError("label must contain only 0 and 1")
        n = len(self.user)
        for column in _SAMPLE_ARRAYS[1:]:
            if len(getattr(self, column)) != n:
                raise ValueError(f"{column} has {len(getattr(self, column))} elements but user has {n}")
        if np.any(self.hist_end < self.hist_start):
            raise ValueError("hist_end must be >= hist_start for every sample")

    @classmethod
    def _trusted(cls, source: "InteractionData", **columns: Any) -> "InteractionData":
        """A new instance from arrays derived from an already validated ``source``, unchecked.

        Validation is ``O(N + L)``; subsets and truncations share the (possibly huge) behaviour
        arrays and would otherwise re-scan them every time.
        """
        out = cls.__new__(cls)
        for field_name in cls.__dataclass_fields__:
            setattr(out, field_name, columns.get(field_name, getattr(source, field_name)))
        return out

    # -- size and summaries ----------------------------------------------------------------------

    def __len__(self) -> int:
        return int(len(self.user))

    def __repr__(self) -> str:
        return (
            f"InteractionData(name={self.name!r}, samples={len(self)}, behaviours={self.num_behaviours}, "
            f"num_users={self.num_users}, num_goods={self.num_goods}, num_cates={self.num_cates})"
        )

    @property
    def num_behaviours(self) -> int:
        """Length ``L`` of the flat behaviour arrays (shared with subsets, so possibly not all used)."""
        return int(len(self.behaviour_goods))

    @property
    def history_lengths(self) -> np.ndarray:
        """``int64 [N]`` full history length of every sample (before any ``max_len`` truncation)."""
        return self.hist_end - self.hist_start

    @property
    def positive_rate(self) -> float:
        """Fraction of positive labels (NaN when empty)."""
        return float(self.label.mean()) if len(self) else float("nan")

    # -- views -----------------------------------------------------------------------------------

    def subset(self, index: Any) -> "InteractionData":
        """The samples at ``index`` (integer positions or a boolean mask), in that order.

        The behaviour arrays are shared, not copied: a subset costs ``O(len(index))``.
        """
        idx = _index(index, len(self))
        return self._trusted(self, **{column: getattr(self, column)[idx] for column in _SAMPLE_ARRAYS})

    def truncated(self, max_len: int) -> "InteractionData":
        """The same samples with every history cut to its last ``max_len`` behaviours (shares arrays)."""
        max_len = _positive_int(max_len, "max_len")
        return self._trusted(self, hist_start=np.maximum(self.hist_start, self.hist_end - max_len))

    def compact(self) -> "InteractionData":
        """A copy whose behaviour arrays hold only the positions some history refers to.

        Subsets share the full behaviour arrays of their parent (a train split references only the
        training users' behaviours); compacting before saving keeps files proportional to the data.
        Kept positions keep their order, and every history stays a contiguous slice.
        """
        used = self._coverage(None) > 0  # [L]
        # new position of old position p = number of kept positions before p
        new_pos = np.concatenate(([0], np.cumsum(used, dtype=np.int64)))  # [L + 1]
        return self._trusted(
            self,
            behaviour_goods=np.ascontiguousarray(self.behaviour_goods[used]),
            behaviour_cates=np.ascontiguousarray(self.behaviour_cates[used]),
            hist_start=new_pos[self.hist_start],
            hist_end=new_pos[self.hist_end],
            user=np.ascontiguousarray(self.user),
            goods=np.ascontiguousarray(self.goods),
            cate=np.ascontiguousarray(self.cate),
            label=np.ascontiguousarray(self.label),
        )

    # -- batching --------------------------------------------------------------------------------

    def batch(self, index: Any, max_len: int, *, trim: bool = False) -> Batch:
        """Gather the samples at ``index`` into a padded :class:`Batch` (one vectorised gather).

        Each history keeps its last ``max_len`` behaviours (the most recent ones), left-aligned in
        time order; ``lengths = min(hist_end - hist_start, max_len)``; padding id 0 fills the end.

        Args:
            index: integer positions (or a boolean mask) of the samples, ``B`` of them.
            max_len: history width ``T`` (>= 1).
            trim: if true, ``T`` is cut to the longest history in this batch (at least 1) instead of
                ``max_len``; saves work when most histories are short. Padding stays at the end either
                way, so the result is the same up to trailing padding columns.
        """
        max_len = _positive_int(max_len, "max_len")
        idx = _index(index, len(self))
        start = self.hist_start[idx]  # [B]
        end = self.hist_end[idx]  # [B]
        lengths = np.minimum(end - start, max_len)  # [B]
        width = max(1, int(lengths.max(initial=0))) if trim else max_len
        offsets = np.arange(width, dtype=np.int64)  # [T]
        valid = offsets[None, :] < lengths[:, None]  # [B, T]
        # position of history slot t: the window's first behaviour is end - length
        positions = np.where(valid, (end - lengths)[:, None] + offsets[None, :], 0)  # [B, T]
        if self.num_behaviours:
            hist_goods = np.where(valid, self.behaviour_goods[positions], 0)  # [B, T]
            hist_cates = np.where(valid, self.behaviour_cates[positions], 0)  # [B, T]
        else:  # nothing to gather from (every history is empty)
            hist_goods = hist_cates = np.zeros(valid.shape, dtype=_ID_DTYPE)
        return Batch(
            user=torch.from_numpy(self.user[idx].astype(np.int64)),
            hist_goods=torch.from_numpy(hist_goods.astype(np.int64)),
            hist_cates=torch.from_numpy(hist_cates.astype(np.int64)),
            lengths=torch.from_numpy(lengths.astype(np.int64)),
            goods=torch.from_numpy(self.goods[idx].astype(np.int64)),
            cate=torch.from_numpy(self.cate[idx].astype(np.int64)),
            label=torch.from_numpy(self.label[idx].astype(np.float32)),
        )

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        batch_size = _positive_int(batch_size, "batch_size")
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def batches(
        self,
        batch_size: int,
        max_len: int,
        shuffle: bool = False,
        seed: SeedLike = None,
        drop_last: bool = False,
        *,
        trim: bool = False,
        shard: Optional[Tuple[int, int]] = None,
        start: int = 0,
    ) -> Iterator[Batch]:
        """Iterate over the data in batches of ``batch_size`` (see :meth:`batch`).

        Args:
            shuffle: visit the samples in a random order (a fresh permutation per call).
            seed: seed or ``numpy.random.Generator`` for the permutation; with the same int seed the
                order is reproducible, ``None`` draws fresh entropy.
            drop_last: skip the final, smaller batch.
            shard: ``(rank, world_size)``: cut each batch of ``batch_size`` (the global batch) into
                ``world_size`` contiguous parts (:func:`shard_bounds`) and yield part ``rank`` only, so that
                processes iterating with the same seed together visit exactly the unsharded batches, in the
                same order. A part may be empty when a batch has fewer samples than processes.
            start: begin at this batch of the order (the batches before it are not built): where an
                interrupted epoch continues.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        max_len = _positive_int(max_len, "max_len")
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        if shard is not None:
            rank, world_size = shard
            shard_bounds(0, rank, world_size)  # validates both
        n = len(self)
        order = _rng(seed).permutation(n) if shuffle else np.arange(n)
        stop = (n // batch_size) * batch_size if drop_last else n
        for begin in range(int(start) * batch_size, stop, batch_size):
            index = order[begin : begin + batch_size]
            if shard is not None:
                low, high = shard_bounds(len(index), rank, world_size)
                index = index[low:high]
            yield self.batch(index, max_len, trim=trim)

    # -- frequencies (for mini-batch aware regularisation) ---------------------------------------

    def _coverage(self, max_len: Optional[int]) -> np.ndarray:
        """``int64 [L]``: in how many sample histories (cut to ``max_len``) each behaviour occurs.

        Each history is an interval of the flat array, so a difference array and one cumulative sum
        count them all in ``O(N + L)`` -- never ``O(N * T)``.
        """
        start = self.hist_start
        if max_len is not None:
            start = np.maximum(start, self.hist_end - _positive_int(max_len, "max_len"))
        size = self.num_behaviours + 1
        delta = np.bincount(start, minlength=size) - np.bincount(self.hist_end, minlength=size)
        return np.cumsum(delta[:-1])

    def _frequencies(self, behaviour_ids: np.ndarray, candidate_ids: np.ndarray, size: int,
                     max_len: Optional[int]) -> np.ndarray:
        coverage = self._coverage(max_len)  # [L]
        from_history = np.bincount(behaviour_ids, weights=coverage, minlength=size)  # float64, exact < 2**53
        from_candidates = np.bincount(candidate_ids, minlength=size)
        return np.rint(from_history).astype(np.int64) + from_candidates

    def goods_frequencies(self, max_len: Optional[int] = None) -> np.ndarray:
        """``int64 [num_goods]``: how often each goods id is fed to the model by this data.

        Counts every sample's candidate once plus every behaviour of every sample's history as it is
        fed, i.e. an item in the histories of 7 samples counts 7 times; with ``max_len`` only the last
        ``max_len`` behaviours of each history count (pass the training ``max_len`` to match
        :meth:`batch` exactly). Padding never counts, so entry 0 is 0, as are ids that never occur:
        guard divisions (``1 / max(n_j, 1)``). These are the ``n_j`` of the paper's mini-batch aware
        regularisation (computed in ``O(N + L)``). Behaviours of the shared flat array that no sample
        of this data refers to (e.g. test users' behaviours in a train subset) do not count.
        """
        return self._frequencies(self.behaviour_goods, self.goods, self.num_goods, max_len)

    def cates_frequencies(self, max_len: Optional[int] = None) -> np.ndarray:
        """``int64 [num_cates]``: like :meth:`goods_frequencies`, for category ids."""
        return self._frequencies(self.behaviour_cates, self.cate, self.num_cates, max_len)

    def users_frequencies(self) -> np.ndarray:
        """``int64 [num_users]``: number of samples of each user id (entry 0 is 0)."""
        return np.bincount(self.user, minlength=self.num_users).astype(np.int64)

    # -- persistence -----------------------------------------------------------------------------

    def _meta(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "num_users": self.num_users,
            "num_goods": self.num_goods,
            "num_cates": self.num_cates,
            "num_samples": len(self),
            "num_behaviours": self.num_behaviours,
        }

    def _write(self, directory: Path) -> None:
        """Write the arrays and ``meta.json`` into an existing, empty ``directory`` (not atomic)."""
        for column in _ARRAYS:
            np.save(directory / f"{column}.npy", np.ascontiguousarray(getattr(self, column)), allow_pickle=False)
        write_json(directory / "meta.json", self._meta())

    def save(self, directory: PathLike, *, overwrite: bool = False, compact: bool = True) -> Path:
        """Save as ``.npy`` arrays + ``meta.json`` in ``directory``, atomically.

        Args:
            overwrite: replace an existing ``directory`` (otherwise ``FileExistsError``).
            compact: drop behaviours no sample refers to first (see :meth:`compact`).

        Returns:
            The directory written.
        """
        data = self.compact() if compact else self
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            data._write(tmp)
        return Path(directory)

    @classmethod
    def load(cls, directory: PathLike, mmap: bool = True) -> "InteractionData":
        """Load a directory written by :meth:`save`; ``mmap=True`` maps the arrays read-only."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"directory {directory} holds no meta.json; not a saved InteractionData")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path} has version {meta.get('version')!r}, expected {FORMAT_VERSION}")
        arrays = {
            column: np.load(directory / f"{column}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
            for column in _ARRAYS
        }
        data = cls(
            **arrays,
            num_users=meta["num_users"],
            num_goods=meta["num_goods"],
            num_cates=meta["num_cates"],
            name=meta.get("name", ""),
        )
        if len(data) != meta["num_samples"] or data.num_behaviours != meta["num_behaviours"]:
            raise ValueError(f"{directory}: array sizes disagree with meta.json")
        return data


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Split:
    """A train/test pair over the same vocabularies (embedding tables are sized from ``train``), with an
    optional validation part carved from the training samples (:func:`carve_validation`) for model selection.

    ``valid`` is not saved by :meth:`save`: it is carved again, deterministically, from the saved ``train``.
    """

    train: InteractionData
    test: InteractionData
    valid: Optional[InteractionData] = None

    def __post_init__(self) -> None:
        for part in ("train", "test", "valid"):
            value = getattr(self, part)
            if not isinstance(value, InteractionData) and not (part == "valid" and value is None):
                raise ValueError(f"{part} must be an InteractionData, got {type(value).__name__}")
        for part in ("test", "valid"):
            other = getattr(self, part)
            for vocab in ("num_users", "num_goods", "num_cates"):
                if other is not None and getattr(self.train, vocab) != getattr(other, vocab):
                    raise ValueError(
                        f"train and {part} disagree on {vocab}: {getattr(self.train, vocab)} vs "
                        f"{getattr(other, vocab)}; all parts must use one vocabulary"
                    )

    @property
    def name(self) -> str:
        """The data set's name (the train part's name without its ``/train`` suffix)."""
        name = self.train.name
        return name[: -len("/train")] if name.endswith("/train") else name

    @property
    def num_users(self) -> int:
        return self.train.num_users

    @property
    def num_goods(self) -> int:
        return self.train.num_goods

    @property
    def num_cates(self) -> int:
        return self.train.num_cates

    def summary(self) -> Dict[str, Any]:
        """Sizes for reports: vocabularies (without padding), samples, users per part, positive rates."""
        summary = {
            "name": self.name,
            "users": self.num_users - 1,
            "items": self.num_goods - 1,
            "categories": self.num_cates - 1,
            "train_samples": len(self.train),
            "test_samples": len(self.test),
            "train_users": int(len(np.unique(self.train.user))),
            "test_users": int(len(np.unique(self.test.user))),
            "train_positive_rate": self.train.positive_rate,
            "test_positive_rate": self.test.positive_rate,
        }
        if self.valid is not None:
            summary.update(valid_samples=len(self.valid), valid_users=int(len(np.unique(self.valid.user))),
                           valid_positive_rate=self.valid.positive_rate)
        return summary

    def truncated(self, max_len: int) -> "Split":
        """Every part with histories cut to their last ``max_len`` behaviours."""
        valid = self.valid.truncated(max_len) if self.valid is not None else None
        return Split(self.train.truncated(max_len), self.test.truncated(max_len), valid)

    def save(self, directory: PathLike, *, overwrite: bool = False,
             extra: Optional[Dict[str, Any]] = None) -> Path:
        """Write ``train/``, ``test/`` and ``summary.json`` into ``directory``, atomically.

        Args:
            overwrite: replace an existing ``directory`` (otherwise ``FileExistsError``).
            extra: more JSON-serialisable entries for ``summary.json`` (provenance, protocol counts);
                they may not replace the computed sizes (``ValueError``).
        """
        summary = Split(self.train, self.test).summary()  # valid is carved again at load, never stored
        # NaN (an empty part) is not valid JSON; store null
        summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
        payload = {"format": SPLIT_FORMAT, "version": FORMAT_VERSION, **summary}
        clash = sorted(set(extra or {}) & set(payload))
        if clash:
            raise ValueError(f"extra must not replace the summary's own entries {clash}")
        payload.update(extra or {})
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            for part in ("train", "test"):
                (tmp / part).mkdir()
                getattr(self, part).compact()._write(tmp / part)
            write_json(tmp / "summary.json", payload)
        return Path(directory)

    @staticmethod
    def is_saved(directory: PathLike) -> bool:
        """Whether ``directory`` looks like the output of :meth:`save`."""
        directory = Path(directory)
        return (directory / "summary.json").is_file() and (directory / "train").is_dir() and (
            directory / "test"
        ).is_dir()

    @classmethod
    def load(cls, directory: PathLike, mmap: bool = True) -> "Split":
        """Load a directory written by :meth:`save` (arrays memory-mapped when ``mmap``)."""
        directory = Path(directory)
        if not cls.is_saved(directory):
            raise ValueError(f"directory {directory} is not a saved Split (needs summary.json, train/, test/)")
        summary = read_json(directory / "summary.json")
        if summary.get("format") != SPLIT_FORMAT:
            raise ValueError(f"{directory / 'summary.json'} has format {summary.get('format')!r}, "
                             f"expected {SPLIT_FORMAT!r}")
        return cls(
            InteractionData.load(directory / "train", mmap=mmap),
            InteractionData.load(directory / "test", mmap=mmap),
        )


def split_by_user(data: InteractionData, test_fraction: float, seed: SeedLike) -> Split:
    """Put a seeded random ``test_fraction`` of the users (at least one, at most all but one) into test.

    Every sample of a user goes to the same side, so test users are never seen in training.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    users = np.unique(data.user)
    if len(users) < 2:
        raise ValueError("a split by user needs at least two users")
    n_test = min(max(int(round(test_fraction * len(users))), 1), len(users) - 1)
    test_users = _rng(seed).permutation(users)[:n_test]
    is_test = np.zeros(data.num_users, dtype=bool)
    is_test[test_users] = True
    in_test = is_test[data.user]  # [N]
    base = data.name or "data"
    train = data.subset(~in_test)
    test = data.subset(in_test)
    train.name, test.name = f"{base}/train", f"{base}/test"
    return Split(train, test)


#: how :func:`carve_validation` mirrors the test protocol
VALIDATION_PROTOCOLS = ("auto", "by-user", "latest")


def carve_validation(split: Split, fraction: float, seed: SeedLike = 0, protocol: str = "auto") -> Split:
    """Carve a validation part from ``split.train`` with the protocol of the test part, for model selection.

    * ``"by-user"`` (the test users never occur in training, as MovieLens here): a seeded random
      ``fraction`` of the training users, with all their samples (:func:`split_by_user`).
    * ``"latest"`` (every user is trained on and tested on their next click, as Amazon and Taobao): each
      user's latest training targets, newest first -- ``round(fraction * n_u)`` of the user's ``n_u``
      prediction targets, clipped to ``[1, n_u - 1]`` (a target is a history end: a positive and its
      sampled negative share one), for users with at least two, so that no user loses all their training.
      Every validation sample of a user comes after all of that user's remaining training samples, as
      the test does.
    * ``"auto"``: ``"by-user"`` when train and test share no user, else ``"latest"``.

    Test samples are never touched: they stay out of both the new train and the validation part.
    Returns a :class:`Split` with ``train`` (what remains), ``valid`` and the same ``test``.
    """
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1):
        raise ValueError(f"fraction (the validation share) must be a number in (0, 1), got {fraction!r}")
    if protocol not in VALIDATION_PROTOCOLS:
        raise ValueError(f"protocol must be one of {VALIDATION_PROTOCOLS}, got {protocol!r}")
    train = split.train
    if protocol == "auto":
        shared = np.intersect1d(np.unique(train.user), np.unique(split.test.user))
        protocol = "latest" if len(shared) else "by-user"
    base = train.name[: -len("/train")] if train.name.endswith("/train") else (train.name or "data")
    if protocol == "by-user":
        inner = split_by_user(train, fraction, seed)
        kept, valid = inner.train, inner.test
    else:
        in_valid = _latest_targets(train, fraction)
        if not in_valid.any():
            raise ValueError("no user has two or more training targets: nothing to carve a validation part from")
        kept, valid = train.subset(~in_valid), train.subset(in_valid)
    if len(kept) == 0:
        raise ValueError(f"a validation fraction of {fraction} leaves no training sample")
    kept.name, valid.name = f"{base}/train", f"{base}/valid"
    return Split(kept, split.test, valid)


def _latest_targets(data: InteractionData, fraction: float) -> np.ndarray:
    """``bool [N]``: the samples of each user's latest ``round(fraction * n_u)`` (in ``[1, n_u - 1]``) targets
    (users with ``n_u >= 2``; a target is one ``(user, hist_end)``, hist_end being the time order in a user)."""
    key = data.user.astype(np.int64) * np.int64(data.num_behaviours + 1) + data.hist_end  # [N]
    targets, target_of = np.unique(key, return_inverse=True)  # sorted by user, then time
    target_user = targets // np.int64(data.num_behaviours + 1)  # [K]
    first = np.searchsorted(target_user, target_user, side="left")
    count = np.searchsorted(target_user, target_user, side="right") - first  # [K] n_u of the target's user
    from_end = first + count - 1 - np.arange(len(targets))  # [K] 0 for the user's latest target
    wanted = np.where(count >= 2, np.clip(np.rint(fraction * count), 1, count - 1), 0)  # keep >= 1 to train on
    return (from_end < wanted)[target_of.reshape(-1)]
