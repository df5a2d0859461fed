"""Prepared data sets on disk, keyed on their raw input files and options, reused when unchanged.

Preparing a raw data set (parsing, remapping, sampling negatives) takes from a second to minutes; the
result is a :meth:`Split.save` folder (``.npy`` arrays, memory-mapped when loaded). :func:`prepare_cached`
computes a key from

* the source name and its pipeline version (bumped when a protocol changes),
* every input file: its absolute path and size, plus the SHA-256 of its content for files up to
  :data:`HASH_LIMIT` bytes, or its modification time (ns) for larger ones (hashing gigabytes would cost
  as much as parsing them),
* the options that change the result (seed, test fraction, ...),

and stores it, with the inputs and options, in the folder's ``summary.json``. A folder whose key
matches is reused without reading any raw file; anything else is rebuilt. Folders are written with
:func:`atomic_directory`, so an interrupted run leaves no half-written data behind.

Without an explicit ``out`` folder the data goes to ``<cache dir>/<source>-<key>``, the cache dir
being ``$DIN_CACHE_DIR`` or ``~/.cache/din``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ._io import PathLike, read_json
from .dataset import Split

__all__ = ["CACHE_ENV", "HASH_LIMIT", "Prepared", "cache_key", "default_cache_dir", "file_fingerprint",
           "prepare_cached"]

CACHE_ENV = "DIN_CACHE_DIR"
HASH_LIMIT = 16 << 20  # files up to 16 MiB are keyed by content, larger ones by size and mtime

Log = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$DIN_CACHE_DIR`` if set, else ``~/.cache/din``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "din"


def file_fingerprint(path: PathLike) -> Dict[str, Any]:
    """``{"path", "size", "sha256" | "mtime_ns"}`` of an input file (see the module doc).

    Raises:
        FileNotFoundError: if ``path`` is not a file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    stat = path.stat()
    entry: Dict[str, Any] = {"path": str(path.resolve()), "size": stat.st_size}
    if stat.st_size <= HASH_LIMIT:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        entry["sha256"] = digest.hexdigest()
    else:
        entry["mtime_ns"] = stat.st_mtime_ns
    return entry


def cache_key(source: str, version: int, inputs: Mapping[str, Dict[str, Any]], options: Mapping[str, Any]) -> str:
    """A 20-hex-digit key of a source, its pipeline version, input fingerprints and options."""
    payload = json.dumps({"source": source, "version": version, "inputs": dict(inputs), "options": dict(options)},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


@dataclass
class Prepared:
    """A prepared folder: where it is, its ``summary.json``, and whether an earlier run made it."""

    path: Path
    summary: Dict[str, Any]
    reused: bool
    seconds: float

    def load(self, mmap: bool = True) -> Split:
        """The prepared :class:`Split` (arrays memory-mapped when ``mmap``)."""
        return Split.load(self.path, mmap=mmap)


def _matching(target: Path, key: str) -> Optional[Dict[str, Any]]:
    """``target``'s summary if it is a saved split made with ``key``, else ``None``."""
    if not Split.is_saved(target):
        return None
    try:
        summary = read_json(target / "summary.json")
    except (OSError, ValueError):
        return None
    return summary if summary.get("cache_key") == key else None


def prepare_cached(
    source: str,
    inputs: Mapping[str, PathLike],
    options: Mapping[str, Any],
    build: Callable[[], Tuple[Split, Dict[str, Any]]],
    *,
    version: int = 1,
    out: Optional[PathLike] = None,
    overwrite: bool = False,
    cache_dir: Optional[PathLike] = None,
    log: Optional[Log] = None,
) -> Prepared:
    """Return the prepared folder of ``source`` on ``inputs`` with ``options``, building it if needed.

    Args:
        source: the source's name (``"amazon"``, ``"taobao"``, ...), part of the key and folder name.
        inputs: ``role -> input file`` (e.g. ``{"reviews": ..., "meta": ...}``), fingerprinted for the key.
        options: JSON-serialisable options that change the result, part of the key.
        build: makes ``(split, stats)``; ``stats`` (JSON-serialisable) go into ``summary.json``.
        version: the source's pipeline version, part of the key.
        out: write exactly this folder (default: ``<cache_dir>/<source>-<key>``).
        overwrite: replace an ``out`` folder that holds other data (otherwise ``FileExistsError``).
            Stale folders in the cache directory are always replaced.
        cache_dir: default :func:`default_cache_dir`.
        log: called with one line when a folder is reused or written.

    Raises:
        FileNotFoundError: if an input file is missing.
        FileExistsError: if ``out`` exists, holds other data, and ``overwrite`` is false.
    """
    log = log or (lambda line: None)
    fingerprints = {role: file_fingerprint(path) for role, path in inputs.items()}
    key = cache_key(source, version, fingerprints, options)
    in_cache = out is None
    target = Path(cache_dir or default_cache_dir()) / f"{source}-{key}" if in_cache else Path(out).expanduser()

    summary = _matching(target, key)
    if summary is not None:
        log(f"reusing {target}: prepared earlier from the same inputs and options (key {key})")
        return Prepared(target, summary, reused=True, seconds=0.0)
    if target.exists() and not in_cache and not overwrite:
        raise FileExistsError(f"{target} exists and does not hold this data (other inputs or options, or not a "
                              "prepared folder); choose another folder or pass --overwrite (overwrite=True)")

    started = time.perf_counter()
    split, stats = build()
    extra = {"source": source, "cache_key": key, "pipeline_version": version, "inputs": fingerprints,
             "options": dict(options), **stats}
    try:
        split.save(target, overwrite=overwrite or in_cache, extra=extra)
    except FileExistsError:
        summary = _matching(target, key)  # a concurrent run wrote the same data first
        if summary is None:
            raise
        log(f"reusing {target}: written meanwhile by another run (key {key})")
        return Prepared(target, summary, reused=True, seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    log(f"prepared {source} into {target} in {seconds:.1f} s")
    return Prepared(target, read_json(target / "summary.json"), reused=False, seconds=seconds)
