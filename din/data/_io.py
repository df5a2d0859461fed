"""Small file-system helpers shared by the data modules: atomic directory writes and JSON files."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_directory(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` when the block succeeds.

    The temporary directory lives next to ``target`` (same file system), so the final step is a
    rename: readers never see a half-written directory, and a crash leaves ``target`` untouched
    (at worst a hidden ``.<name>.tmp-*`` folder remains). A directory cannot be renamed over a
    non-empty one, so an existing ``target`` (``overwrite=True``) is first renamed aside and removed
    only after the new one is in place.

    Raises:
        FileExistsError: if ``target`` exists and ``overwrite`` is false.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not overwrite:  # appeared while we were writing
                raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "content")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: PathLike, payload: Dict[str, Any]) -> None:
    """Write ``payload`` as indented, key-sorted JSON (stable diffs, readable by hand)."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_json(path: PathLike) -> Dict[str, Any]:
    with open(path, "r", encoding="utf-8") as handle:
        payload = json.load(handle)
    if not isinstance(payload, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return payload
