"""Checkpoints and metrics files, always written atomically (temp file in the same folder, then rename).

A crash or Ctrl-C while saving leaves the previous file intact, never a truncated one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple, Union

import torch

from .model import ModelConfig, build_model

PathLike = Union[str, "os.PathLike[str]"]
CHECKPOINT_FORMAT = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(path: PathLike, flag: str = "--out") -> Path:
    """``path`` usable as an output folder (created if missing, writable, not a file): checked before any
    work starts, so that a bad ``--out`` fails at once instead of after an epoch of training."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {path} cannot be created: {error.strerror or error}") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} is not writable")
    return path


@contextlib.contextmanager
def run_lock(folder: PathLike) -> Iterator[Path]:
    """Hold ``folder/.din.lock`` (this process's pid) for the block: a second run writing into the same
    folder fails at once with a one-line ValueError instead of both running and the last writer winning.
    A lock left by a process that no longer exists (killed) is taken over."""
    lock = Path(folder) / ".din.lock"
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                raise ValueError(f"{folder} is in use by another din run (pid {owner}; its lock: {lock})") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(handle, "w") as file:
            file.write(f"{os.getpid()}\n")
        break
    else:  # taken again between our takeover and our retry: another run got there first
        raise ValueError(f"{folder} is in use by another din run (its lock: {lock})")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds. The file
    gets the permissions a plain ``open`` would give it (0666 less the umask; ``mkstemp`` makes 0600).
    ``suffix`` ends the temporary name, for writers that insist on one (AOTInductor wants ``.pt2``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: PathLike, payload: Dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: PathLike, model: torch.nn.Module, **extra: Any) -> None:
    """Save ``model`` (its ``ModelConfig`` and state) plus JSON-able ``extra`` (train config, metrics)."""
    payload = {"format": CHECKPOINT_FORMAT, "model_config": model.config.to_dict(),
               "state_dict": model.state_dict(), **extra}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Tuple[torch.nn.Module, dict]:
    """Rebuild the model saved by ``save_checkpoint``; returns ``(model, payload)``. Tables trained with
    MBA load as plain embeddings (the regulariser matters only while training)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path} is not a din checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a din checkpoint (format {CHECKPOINT_FORMAT} expected)")
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = build_model(config)
        state = {key: value for key, value in payload["state_dict"].items() if not _is_training_only(key)}
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as error:  # missing entries, keys or wrong shapes
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is a damaged din checkpoint: {first}") from error
    return model, payload


def _is_training_only(key: str) -> bool:
    """MBA tables' frequency and optimiser buffers: needed to train, not to predict."""
    return key.startswith("items.") and key.endswith((".inv_freq", ".state"))
