"""Serving a trained model: score one user's candidates, and ship the model as a program.

* :class:`Scorer` (``din.Scorer``): built from a checkpoint written by ``din train``; ``score(history_items,
  history_categories, candidates, user=None)`` gives one probability per candidate. The history is
  embedded and read by the attention once for all C candidates (``DIN.score_candidates``), not repeated C
  times. Every input is checked first (dtypes, shapes, ids within the checkpoint's tables), with a
  ValueError / TypeError naming the argument and the first bad entry.
* :func:`export_program`: the model as a ``torch.export`` program of plain tensors (no ``Batch``), the
  custom ops ``din_kernels::din_attention`` and ``din_kernels::dice_eval`` inside, batch, history and
  candidate counts dynamic; :func:`save_program` writes it, :func:`save_aoti_package` compiles it with
  AOTInductor (a C++ compiler is needed) and :func:`load_program` loads either. A process that loads one
  must ``import din_kernels`` first: that import registers the custom ops the program calls
  (``load_program`` does it).

Ids are the model's dense ids, as in the prepared data: 1 .. N - 1 for each table, 0 being padding.
"""
from __future__ import annotations

import contextlib
import copy
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .checkpoint import PathLike, atomic_file, load_checkpoint

Tensor = torch.Tensor
IdsLike = Union[Tensor, Sequence[int], Sequence[Sequence[int]]]

__all__ = ["PROGRAM_INPUTS", "REQUEST_KEYS", "Scorer", "ScoringProgram", "example_inputs", "export_program", "is_aoti_package",
           "load_program", "max_difference", "parse_request", "save_aoti_package", "save_program"]

#: the exported program's positional inputs, all int64: history [B, T] (x2), lengths [B], candidates [B, C]
#: (x2), user [B] (read only by models trained with ``--use-user``; pass zeros otherwise)
PROGRAM_INPUTS = ("history_items", "history_categories", "lengths", "candidate_items", "candidate_categories",
                  "user")

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _as_ids(name: str, value: Any, ndim: int) -> Tensor:
    """``value`` (a tensor, a list, a numpy array) as an int64 CPU tensor of ``ndim`` dimensions."""
    if isinstance(value, Tensor):
        ids = value
    else:
        try:
            ids = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise TypeError(f"{name} must be integer ids (a tensor or a sequence of ints): {error}") from None
        if ids.numel() == 0:  # [] comes out float32
            ids = ids.to(torch.int64)
    if ids.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if ndim == 2 and ids.numel() == 0 and ids.dim() == 1:  # no candidates: [] for [0, 2]
        ids = ids.reshape(0, 2)
    if ids.dim() != ndim:
        want = "[T]" if ndim == 1 else "[C, 2] (item, category) pairs"
        raise ValueError(f"{name} must be {want}, got shape {tuple(ids.shape)}")
    return ids.to(device="cpu", dtype=torch.int64)


def _check_range(name: str, ids: Tensor, rows: int, table: str, position=None) -> None:
    """Every id in 1 .. rows - 1, else a ValueError naming the first bad one."""
    bad = (ids < 1) | (ids >= rows)
    if bool(bad.any()):
        index = int(bad.reshape(-1).nonzero()[0])
        where = position(index) if position is not None else f"{name}[{index}]"
        value = int(ids.reshape(-1)[index])
        known = f"1..{rows - 1}" if rows > 1 else "none: the table holds only the padding row"
        reason = " (0 is the padding id)" if value == 0 else ""
        article = "an" if table == "item" else "a"  # item, category, user
        raise ValueError(f"{where} = {value} is not {article} {table} id of this model{reason}: its {table} ids "
                         f"are {known}")


class Scorer:
    """Score a user's candidates with a trained DIN (or BaseModel) in eval mode.

    ``Scorer.from_checkpoint("runs/din/model.pt").score(history_items, history_categories, candidates)``:
    history_items, history_categories [T] (oldest first, as in training), candidates [C, 2] (item,
    category) pairs, ``user`` an int (needed by, and only read by, models trained with ``--use-user``)
    -> click probabilities, a float32 tensor [C] on the CPU. Tensors, lists and numpy arrays are accepted.

    ``max_len``: only the last ``max_len`` behaviours of a longer history are read; None reads all of them.
    ``from_checkpoint``'s default, ``"trained"``, is the ``--max-len`` the model was trained with, so that it
    sees histories as in training.
    """

    def __init__(self, model: nn.Module, *, max_len: Optional[int] = None):
        if not hasattr(model, "score_candidates") or not hasattr(model, "config"):
            raise TypeError(f"model must be a din model (din.DIN or din.BaseModel), got {type(model).__name__}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        self.model = model.eval()
        self.config = model.config
        self.max_len = max_len
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: PathLike, *, device: Union[str, torch.device] = "cpu",
                        max_len: Union[int, None, str] = "trained") -> "Scorer":
        """The model of a ``model.pt`` written by ``din train``; ``max_len="trained"``: its training one (none
        recorded: every behaviour), None: every behaviour, an int: that many."""
        if isinstance(max_len, str) and max_len != "trained":
            raise ValueError(f"max_len must be 'trained', None or a positive int, got {max_len!r}")
        model, payload = load_checkpoint(path, map_location=device)
        if max_len == "trained":
            max_len = (payload.get("train_config") or {}).get("max_len")
        return cls(model.to(device), max_len=max_len)

    @property
    def uses_user(self) -> bool:
        """Whether the model reads the user id (trained with ``--use-user``)."""
        return self.config.use_user

    def check(self, history_items: IdsLike, history_categories: IdsLike, candidates: IdsLike,
              user: Optional[int] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The validated inputs of ``score`` as (history [2, T'] (items, categories; T' <= max_len, the
        latest), candidates [C, 2], user [1] or None), all int64 on the CPU; raises TypeError / ValueError
        naming the argument and its first bad entry."""
        items = _as_ids("history_items", history_items, 1)
        cates = _as_ids("history_categories", history_categories, 1)
        if items.shape != cates.shape:
            raise ValueError(f"history_items and history_categories must have one entry per behaviour, got "
                             f"{items.shape[0]} and {cates.shape[0]}")
        pairs = _as_ids("candidates", candidates, 2)
        if pairs.shape[1] != 2:
            raise ValueError(f"candidates must be [C, 2] (item, category) pairs, got shape {tuple(pairs.shape)}")
        config = self.config
        _check_range("history_items", items, config.num_goods, "item")
        _check_range("history_categories", cates, config.num_cates, "category")
        _check_range("candidates", pairs[:, 0], config.num_goods, "item",
                     position=lambda i: f"candidates[{i}] item")
        _check_range("candidates", pairs[:, 1], config.num_cates, "category",
                     position=lambda i: f"candidates[{i}] category")
        user_ids = None
        if self.uses_user:
            if user is None:
                raise ValueError("this model reads the user id (trained with --use-user): pass user")
            user_ids = _as_ids("user", [user] if not isinstance(user, Tensor) else user.reshape(1), 1)
            if user_ids.numel() != 1:
                raise ValueError(f"user must be one id, got {user_ids.numel()}")
            _check_range("user", user_ids, config.num_users, "user", position=lambda i: "user")
        if self.max_len is not None and items.shape[0] > self.max_len:
            items, cates = items[-self.max_len:], cates[-self.max_len:]  # the latest, as in training
        return torch.stack([items, cates]), pairs, user_ids

    def score(self, history_items: IdsLike, history_categories: IdsLike, candidates: IdsLike,
              user: Optional[int] = None) -> Tensor:
        """Click probabilities of the C candidates for this history -> float32 [C] (CPU)."""
        history, pairs, user_ids = self.check(history_items, history_categories, candidates, user)
        return self.score_checked(history, pairs, user_ids)

    def score_checked(self, history: Tensor, pairs: Tensor, user_ids: Optional[Tensor]) -> Tensor:
        """``score`` on the output of ``check`` (to check a whole file before scoring any of it)."""
        if pairs.shape[0] == 0:
            return torch.zeros(0)
        device = self.device
        history = history.to(device)
        pairs = pairs.to(device)
        lengths = torch.tensor([history.shape[1]], device=device)
        with torch.inference_mode():
            logits = self.model.score_candidates(history[0][None], history[1][None], lengths, pairs[:, 0][None],
                                                 pairs[:, 1][None],
                                                 None if user_ids is None else user_ids.to(device))  # [1, C]
            return torch.sigmoid(logits[0].float()).cpu()


#: the keys of a request line of ``din score`` (JSON lines); ``id`` and ``user`` are optional
REQUEST_KEYS = ("id", "user", "history_items", "history_categories", "candidates")


def _json_ids(name: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list of integer ids, got {type(value).__name__}")
    for index, item in enumerate(value):
        if type(item) is not int:  # bool is an int subclass: true is no id
            raise ValueError(f"{name}[{index}] is {json.dumps(item)}, not an integer id")
    return value


def parse_request(text: str, scorer: Scorer) -> Tuple[Any, Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """One line of ``din score``'s input -> (its ``id`` or None, ``scorer.check``'s tensors); a ValueError
    with a one-line reason for anything else. The line is a JSON object::

        {"id": "r1", "user": 7, "history_items": [3, 9, 4], "history_categories": [1, 2, 1],
         "candidates": [[12, 2], [40, 1]]}
    """
    try:
        request = json.loads(text.strip())  # (the line break would shift the error to a line 2)
    except json.JSONDecodeError as error:
        raise ValueError(f"not a JSON object: {error.msg} (column {error.colno})") from None
    if not isinstance(request, dict):
        raise ValueError(f"expected a JSON object {{...}}, got {type(request).__name__}")
    unknown = sorted(set(request) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (the keys are {', '.join(REQUEST_KEYS)})")
    for key in ("history_items", "history_categories", "candidates"):
        if key not in request:
            raise ValueError(f"missing key {key!r}")
    items = _json_ids("history_items", request["history_items"])
    cates = _json_ids("history_categories", request["history_categories"])
    pairs = request["candidates"]
    if not isinstance(pairs, list):
        raise ValueError(f"candidates must be a list of [item, category] pairs, got {type(pairs).__name__}")
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair)):
            raise ValueError(f"candidates[{index}] is {json.dumps(pair)}, not an [item, category] pair of "
                             "integer ids")
    user = request.get("user")
    if scorer.uses_user and user is None:
        raise ValueError("missing key 'user': this model reads the user id (trained with --use-user)")
    if user is not None and type(user) is not int:
        raise ValueError(f"user is {json.dumps(user)}, not an integer id")
    request_id = request.get("id")
    if isinstance(request_id, (dict, list)):
        raise ValueError("id must be a string or a number")
    return request_id, scorer.check(items, cates, pairs, user)


class ScoringProgram(nn.Module):
    """``model`` as a function of plain tensors (what ``export_program`` exports): the inputs of
    :data:`PROGRAM_INPUTS` -> click probabilities [B, C]. Row b's C candidates are scored against history b
    (``lengths[b]`` valid positions, padding after them). Inputs are not validated: check ids first
    (``Scorer.check``); the kernels clamp each length to [0, T]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.reads_user = model.config.use_user

    def forward(self, history_items: Tensor, history_categories: Tensor, lengths: Tensor, candidate_items: Tensor,
                candidate_categories: Tensor, user: Tensor) -> Tensor:
        logits = self.model.score_candidates(history_items, history_categories, lengths, candidate_items,
                                             candidate_categories, user if self.reads_user else None)
        return torch.sigmoid(logits)


def example_inputs(config, batch: int = 2, seq_len: int = 4, candidates: int = 3,
                   generator: Optional[torch.Generator] = None) -> Tuple[Tensor, ...]:
    """Random valid inputs of :data:`PROGRAM_INPUTS` for a model of ``config`` (lengths between 0 and T)."""
    def ids(rows, *shape):  # 1 .. rows - 1; zeros for a table of the padding row alone (or no user table)
        if rows <= 1:
            return torch.zeros(shape, dtype=torch.int64)
        return torch.randint(1, rows, shape, generator=generator)

    return (ids(config.num_goods, batch, seq_len), ids(config.num_cates, batch, seq_len),
            torch.randint(0, seq_len + 1, (batch,), generator=generator),
            ids(config.num_goods, batch, candidates), ids(config.num_cates, batch, candidates),
            ids(config.num_users, batch))


def export_program(model: nn.Module) -> "torch.export.ExportedProgram":
    """``ScoringProgram(model)`` in eval mode as a ``torch.export`` program whose batch (B >= 1), history
    (T >= 1) and candidate (C >= 1) sizes are dynamic. The parameters are frozen copies (no gradients: a
    serving program), the model itself is left as it was. A history of no behaviour is T = 1 with length 0."""
    if getattr(model.config, "history_search", "none") != "none":
        # (the retrieval cuts the attention to the most behaviours a row kept: a data-dependent size)
        raise ValueError(f"a model with history_search={model.config.history_search!r} cannot be exported yet; "
                         "score it with 'din score' or din.Scorer")
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    program = ScoringProgram(frozen)
    batch = torch.export.Dim("batch", min=1)
    history = torch.export.Dim("history", min=1)
    count = torch.export.Dim("candidates", min=1)
    dynamic = ({0: batch, 1: history}, {0: batch, 1: history}, {0: batch}, {0: batch, 1: count},
               {0: batch, 1: count}, {0: batch})
    # sizes >= 2 in the example: torch.export specialises sizes 0 and 1
    example = example_inputs(frozen.config, batch=2, seq_len=4, candidates=3,
                             generator=torch.Generator().manual_seed(0))
    device = next(frozen.parameters()).device
    example = tuple(t.to(device) for t in example)
    return torch.export.export(program, example, dynamic_shapes=dynamic)


Verify = Optional[Callable[[Callable[..., Tensor]], None]]


def save_program(program: "torch.export.ExportedProgram", path: PathLike, verify: Verify = None) -> Path:
    """``torch.export.save`` to ``path`` atomically (a temporary file beside it, then a rename). ``verify``
    gets the program loaded back from the temporary file before the rename, and may raise to keep it out."""
    path = Path(path)
    with atomic_file(path, suffix=".pt2") as tmp:
        torch.export.save(program, tmp)
        if verify is not None:
            verify(load_program(tmp))
    return path


def save_aoti_package(program: "torch.export.ExportedProgram", path: PathLike, verify: Verify = None) -> Path:
    """AOTInductor: compile ``program`` to a shared library (the C++ compiler runs; 7-17 s for the default
    model on the 2-core VM) packaged at ``path`` (a ``.pt2`` name), atomically, ``verify`` as for
    ``save_program``. The custom ops stay calls into din_kernels (AOTInductor's proxy executor calls them
    through the dispatcher), so the package runs in a Python process that imported din_kernels, not from
    C++ alone: the ops are Python custom ops."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package must be named *.pt2, got {path}")
    with atomic_file(path, suffix=".pt2") as tmp, _quiet_torch():
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        if verify is not None:
            verify(load_program(tmp))
    return path


@contextlib.contextmanager
def _quiet_torch():
    """Without a FutureWarning torch 2.13 raises from its own pickled tree specs in AOTInductor packages
    (``isinstance(treespec, LeafSpec)`` is deprecated): nothing a user of din can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        yield


def is_aoti_package(path: PathLike) -> bool:
    """True for an AOTInductor package, False for a ``torch.export.save`` program (both are .pt2 zips)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/data/aotinductor/" in name for name in archive.namelist())
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a .pt2 archive: {error}") from None


def load_program(path: PathLike) -> Callable[..., Tensor]:
    """The program at ``path`` (``save_program`` or ``save_aoti_package``) as a callable of the
    :data:`PROGRAM_INPUTS` -> probabilities [B, C]; imports din_kernels first, which registers the custom ops.
    An AOTInductor package is wrapped so that it gets contiguous inputs, which it assumes (unchecked) when
    loaded with ``torch._inductor.aoti_load_package`` directly."""
    import din_kernels  # noqa: F401  (registers torch.ops.din_kernels.*, which the program calls)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"program {path} does not exist")
    if is_aoti_package(path):
        with _quiet_torch():
            package = torch._inductor.aoti_load_package(str(path))

        def run(*inputs: Tensor) -> Tensor:
            # The compiled code indexes its inputs with the example's (contiguous) strides and does not
            # check them: a column slice such as pairs[:, 0][None] read an item id as a category (caught
            # only by the embedding's bounds check). .contiguous() is free for contiguous inputs.
            return package(*(t.contiguous() for t in inputs))

        return run
    return torch.export.load(path).module()


def max_difference(program: Callable[..., Tensor], model: nn.Module, inputs: Sequence[Tensor]) -> float:
    """The largest absolute difference between ``program`` and the eager model on ``inputs``."""
    with torch.inference_mode():
        expected = ScoringProgram(model.eval())(*inputs)
        got = program(*inputs)
    return float((got - expected).abs().max()) if expected.numel() else 0.0
