"""The one problem builder of the local activation unit's tests (``din_attention`` and its launchers).

A ``Case`` names a problem: its shape, how its histories are filled, the op's options and the dtype. Its
``id`` is what pytest prints (``B4-T9-D5-softmax``: the shape always, then only what differs from the
defaults), so a failure says which problem failed without reading the parametrization. ``build(case)``
draws the tensors from the case's own generator (seed 0 unless told), not from the global RNG: the same
case is the same numbers in every test and in any order, and on a GPU run (``DIN_TEST_DEVICE=cuda``) the
same numbers as in CI, moved to the default device.

``WEIRD_SHAPES`` holds the odd shapes every path is checked at (DESIGN.md, Testing: B=1, T=1, prime T, D
not a power of two, lengths 0 and T, all lengths 0; here also B=0, T=0 and a long history beside short
ones), defined once; a test file adds the shapes its own path cares about (tiles, chunks) next to them.

Usage::

    @pytest.mark.parametrize("case", cases(Case(3, 13, 7, (16,), lengths=(0, 13, 6), normalize="softmax")))
    def test_something(case):
        problem = build(case)                     # query [B, D], keys [B, T, D], lengths [B], weights, ...
        out = dk.din_attention(*problem.op_args(), **problem.op_kwargs())
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import pytest
import torch

import din_kernels as dk

LENGTH_KINDS = ("random", "nonempty", "full", "empty", "skewed")
DEFAULT_HIDDEN = (8, 4)
_DTYPE_NAMES = {torch.float32: None, torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    """One problem of the local activation unit, by name. ``lengths``: explicit per-row lengths (a tuple of
    B ints) or a kind: "random" (uniform in [0, T]), "nonempty" ([1, T]), "full" (T), "empty" (0),
    "skewed" (the first row full, the others at most T // 8 + 1: a lifelong history beside short ones).
    ``candidates``: None for query [B, D], else C for query [B, C, D] (C may be 0)."""

    batch: int = 4
    seq_len: int = 9
    dim: int = 5
    hidden: Tuple[int, ...] = DEFAULT_HIDDEN
    lengths: Union[str, Tuple[int, ...]] = "random"
    form: str = "concat"
    activation: str = "sigmoid"
    normalize: str = "none"
    scale: Optional[float] = None
    candidates: Optional[int] = None
    dtype: torch.dtype = torch.float32
    shared_alpha: bool = False  # one prelu/dice slope per layer (nn.PReLU()), broadcast over its units

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if isinstance(self.lengths, str):
            if self.lengths not in LENGTH_KINDS:
                raise ValueError(f"lengths must be one of {LENGTH_KINDS} or B ints, got {self.lengths!r}")
        else:
            object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
            if len(self.lengths) != self.batch or any(not 0 <= n <= self.seq_len for n in self.lengths):
                raise ValueError(f"lengths {self.lengths} do not fit B={self.batch}, T={self.seq_len}")
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {self.dtype}")

    @property
    def id(self) -> str:
        """``B4-T9-D5`` and what differs from the defaults: ``H16``, ``L0.13.6``, ``outer``, ``dice``,
        ``softmax``, ``s0.5``, ``C3``, ``fp64``, ``shared-alpha``."""
        parts = [f"B{self.batch}"] + ([] if self.candidates is None else [f"C{self.candidates}"])
        parts += [f"T{self.seq_len}", f"D{self.dim}"]
        if self.hidden != DEFAULT_HIDDEN:
            parts.append("H" + "x".join(map(str, self.hidden)) if self.hidden else "no-hidden")
        if self.lengths != "random":
            parts.append(self.lengths if isinstance(self.lengths, str) else
                         "L" + ".".join(map(str, self.lengths)))
        parts += [value for value, default in ((self.form, "concat"), (self.activation, "sigmoid"),
                                               (self.normalize, "none")) if value != default]
        if self.scale is not None:
            parts.append(f"s{self.scale:.3g}")
        if _DTYPE_NAMES[self.dtype]:
            parts.append(_DTYPE_NAMES[self.dtype])
        if self.shared_alpha:
            parts.append("shared-alpha")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.id

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)

    def options(self, **changes) -> dict:
        """The op's keyword options of this case (form, activation, normalize, scale), ``changes`` applied."""
        return {**dict(form=self.form, activation=self.activation, normalize=self.normalize, scale=self.scale),
                **changes}

    @property
    def in_features(self) -> int:
        """The first layer's input width: [q, k, q-k, q*k] (concat) or [q, k, vec(q outer k)] (outer)."""
        return 4 * self.dim if self.form == "concat" else 2 * self.dim + self.dim * self.dim


def cases(*groups) -> List:
    """pytest params of Cases (given one by one or as iterables), each with its readable id."""
    flat = []
    for group in groups:
        flat += [group] if isinstance(group, Case) else list(group)
    return [pytest.param(case, id=case.id) for case in flat]


@dataclass
class Problem:
    """The tensors of a Case. Unpacks as the launchers' first six arguments:
    ``query, keys, lengths, weights, alphas, dice_stats = problem``."""

    case: Case
    query: torch.Tensor                      # [B, D], or [B, C, D] with candidates
    keys: torch.Tensor                       # [B, T, D]
    lengths: torch.Tensor                    # [B] int64
    weights: List[torch.Tensor]              # (w1, b1, ..., w_out, b_out), nn.Linear layout
    alphas: Optional[List[torch.Tensor]] = None                               # prelu / dice: [H] (or [1])
    dice_stats: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = field(default=None)  # dice: (mean, var)

    def __iter__(self):
        return iter((self.query, self.keys, self.lengths, self.weights, self.alphas, self.dice_stats))

    def replace(self, **changes) -> "Problem":
        return dataclasses.replace(self, **changes)

    def op_args(self) -> tuple:
        """``din_attention``'s positional arguments."""
        return self.query, self.keys, self.lengths, self.weights

    def op_kwargs(self, **changes) -> dict:
        """``din_attention``'s keyword arguments: the case's options and the slopes and Dice statistics."""
        return {**self.case.options(), "alphas": self.alphas, "dice_stats": self.dice_stats, **changes}

    def launcher_args(self, eps: float = 1e-8) -> tuple:
        """(query, keys, lengths, weights, alphas, dice_eval, eps): the launchers' (din_kernels.testing)."""
        return (self.query, self.keys, self.lengths, tuple(self.weights),
                None if self.alphas is None else tuple(self.alphas), self.dice_stats, eps)

    def unit(self) -> dk.LocalActivationUnit:
        """A LocalActivationUnit (eval mode) holding exactly these weights, slopes and Dice statistics, for
        tests of the module path on the same numbers as the functional one."""
        case = self.case
        if not case.hidden or case.shared_alpha:
            raise ValueError("LocalActivationUnit needs a hidden layer and one slope per unit")
        unit = dk.LocalActivationUnit(case.dim, case.hidden, activation=case.activation, form=case.form,
                                      normalize=case.normalize, scale=case.scale).to(self.keys.device, case.dtype)
        with torch.no_grad():
            for parameter, value in zip(unit.weights(), self.weights):
                parameter.copy_(value)
            slopes = unit.prelu_alphas if unit.prelu_alphas is not None else \
                [d.alpha for d in unit.dice] if unit.dice is not None else []
            for parameter, value in zip(slopes, self.alphas or ()):
                parameter.copy_(value)
            for dice, (mean, var) in zip(unit.dice or (), self.dice_stats or ()):
                dice.running_mean.copy_(mean)
                dice.running_var.copy_(var)
        return unit.eval()


def unit_kwargs(unit: dk.LocalActivationUnit) -> dict:
    """``din_attention``'s ``alphas`` / ``dice_stats`` as the unit's own parameters and buffers (gradients
    reach the unit; the reference run on them sees what the module holds)."""
    if unit.prelu_alphas is not None:
        return dict(alphas=list(unit.prelu_alphas))
    if unit.dice is not None:
        return dict(alphas=[d.alpha for d in unit.dice],
                    dice_stats=[(d.running_mean, d.running_var) for d in unit.dice])
    return {}


def _lengths(case: Case, generator: torch.Generator) -> torch.Tensor:
    """[B] int64 on CPU (the generator's device, whatever the default device)."""
    batch, seq_len, cpu = case.batch, case.seq_len, "cpu"
    if not isinstance(case.lengths, str):
        return torch.tensor(case.lengths, dtype=torch.int64, device=cpu).reshape(batch)
    if case.lengths == "random":
        return torch.randint(0, seq_len + 1, (batch,), generator=generator, device=cpu)
    if case.lengths == "nonempty":
        return torch.randint(1, max(seq_len, 1) + 1, (batch,), generator=generator, device=cpu).clamp(max=seq_len)
    if case.lengths == "full":
        return torch.full((batch,), seq_len, dtype=torch.int64, device=cpu)
    if case.lengths == "empty":
        return torch.zeros(batch, dtype=torch.int64, device=cpu)
    short = torch.randint(0, seq_len // 8 + 2, (batch,), generator=generator, device=cpu)  # "skewed"
    short = short.clamp(max=seq_len)
    short[:1] = seq_len
    return short


def build(case: Case, seed: int = 0, requires_grad: bool = False) -> Problem:
    """The tensors of ``case``, drawn from a generator seeded with ``seed``: inputs N(0, 1), weights scaled by
    1/sqrt(fan_in) so that every layer's activations are O(1), biases 0.1 N(0, 1), slopes 0.25 + 0.5 N(0, 1)
    (negative and above 1 too), Dice statistics near what a trained layer holds (mean 0.2 N(0, 1), variance
    in [0.5, 1.5)). Drawn in fp32 and cast, so a case in fp64 or 16 bits holds the fp32 case's values
    (rounded); Dice statistics stay fp32 beside 16-bit inputs (as an autocast model keeps its buffers).
    ``requires_grad``: query, keys, the weights and the slopes are leaves that require a gradient."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, device="cpu")  # noqa: E731  (then moved)
    query_shape = (case.batch, case.dim) if case.candidates is None else (case.batch, case.candidates, case.dim)
    query, keys = randn(*query_shape), randn(case.batch, case.seq_len, case.dim)
    lengths = _lengths(case, generator)
    widths = (case.in_features,) + case.hidden + (1,)
    weights = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        weights += [randn(fan_out, fan_in) / math.sqrt(fan_in), 0.1 * randn(fan_out)]
    alphas = dice_stats = None
    if case.activation in ("prelu", "dice"):
        alphas = [0.25 + 0.5 * randn(1 if case.shared_alpha else h) for h in case.hidden]
    if case.activation == "dice":
        dice_stats = [(0.2 * randn(h), 0.5 + torch.rand(h, generator=generator, device="cpu")) for h in case.hidden]

    device = torch.get_default_device()
    stats_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    cast = lambda t: t.to(device, case.dtype).requires_grad_(requires_grad)  # noqa: E731
    return Problem(case=case, query=cast(query), keys=cast(keys), lengths=lengths.to(device),
                   weights=[cast(w) for w in weights],
                   alphas=None if alphas is None else [cast(a) for a in alphas],
                   dice_stats=None if dice_stats is None else
                   [(m.to(device, stats_dtype), v.to(device, stats_dtype)) for m, v in dice_stats])


# The odd shapes every path is checked at, nominal options (each test sets form, activation, normalize).
WEIRD_SHAPES = (
    Case(1, 1, 1, (2,), lengths="full"),                 # smallest everything
    Case(1, 1, 3, (4, 3), lengths="empty"),              # a single empty history
    Case(3, 13, 7, (5, 3), lengths=(13, 6, 1)),          # prime T, odd D, a full history
    Case(4, 8, 4, (6,), lengths="empty"),                # all histories empty
    Case(6, 40, 5, (8, 4), lengths="skewed"),            # one long history beside short ones (two T tiles)
    Case(0, 5, 4, (3,), lengths="full"),                 # empty batch
    Case(3, 0, 4, (3,), lengths="empty"),                # no positions, T = 0
)
