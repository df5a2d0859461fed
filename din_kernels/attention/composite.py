"""Torch composite path of the local activation unit: the chunked launchers, for what the Triton kernels and
the C++ op do not run (no C++ build, ``set_backend("torch")``, CUDA problems outside the kernels' coverage,
activations without kernels).

Same algebra as the kernels (``first_layer.py``: ``z1[b, t] = u_b + k[b, t] @ M_b``, so the ``[B, T, 4D]``
feature tensor never exists); the other layers are plain GEMMs over the positions.

The backward is written by hand. Nothing of size ``[B, T, H]`` is kept between forward and backward
(only ``out``, the ``[B, T]`` weights and the ``[B]`` log-sum-exp): the backward recomputes the MLP and
fuses the activation derivatives into in-place passes (``activations.ActivationSpec.backward_``). The one
exception is bounded: a caller may let the forward keep the first chunks' activations, up to
``KEEP_FLOATS`` per call whatever B and T, so that those chunks skip the recompute (``kept=``;
``DinAttentionFunction`` does in eager training). Work is done in chunks of batch rows, sorted by history
length, each chunk cut to its longest history: padded positions (weight 0, gradient 0) are never scored,
and a chunk's intermediates stay small enough to live in the CPU caches, which also bounds the extra memory
by the chunk size instead of ``B * T``. fp16/bf16 inputs are computed in fp32 (fp64 in fp64, for
gradcheck). Small problems have a plain-autograd variant of the same algebra (``small.py``).

Launchers (the contract of the Triton launchers in ``fused.py`` and the C++ ones in ``cpu.py``)::

    attention_torch_forward(query, keys, lengths, weights, alphas, dice_eval, eps, *, form, activation,
                            normalize, scale) -> (out [B, D], attn [B, T], lse [B] or empty)
    attention_torch_backward(grad_out, query, keys, lengths, weights, alphas, dice_eval, eps, out, attn, lse,
                             *, form, activation, normalize, scale) -> (dquery, dkeys, dweights, dalphas)

``activation="dice"`` is Dice in eval mode (running statistics):
``f(x) = x * (alpha + (1 - alpha) * sigmoid((x - mean) / sqrt(var + eps)))``.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._checks import ACTIVATIONS, FORMS, NORMALIZATIONS, check_choice
from .._dtypes import accumulation_dtype
from ..activations import activation_spec
from .first_layer import FirstLayer

Tensor = torch.Tensor

__all__ = ["attention_torch_forward", "attention_torch_backward"]

# Workspace per chunk, in floats: a chunk takes as many rows as fit (``_MLP.chunk_floats``). Large enough that
# every GEMM is efficient, small enough that a chunk's intermediates stay in the CPU caches (and the extra
# memory small). 3 Mi floats (12 MB in fp32) is ~8,400 positions at D=36, T=100, H=(80, 40), and ~5,000 at
# D=64, T=20: measured on the 2-core CPU (forward + backward, interleaved runs), 8192 positions was as fast as
# or faster than 4096, 16384 and 32768 at B=1024, T=100, D=36, and 4096 the fastest at B=4096, T=20, D=64
# (whose per-position chunks need twice the floats per position).
CHUNK_FLOATS = 3 * 2 ** 20

# Activations the forward may keep for the backward, in floats per call (``kept`` below), so that the first
# chunks skip their recompute: a bounded cache (12 MB in fp32, whatever B and T), not O(B * T) memory. A
# training call of DIN (B=256, T=50, D=36) fits whole; B=1024, T=100 keeps about a quarter of its chunks.
KEEP_FLOATS = 3 * 2 ** 20


# What one more chunk costs, in multiply-adds of the MLP: twice the per-chunk Python and launch overhead
# measured on the 2-core CPU (~0.3 ms forward + backward, ~12 M multiply-adds at the MLP's effective rate
# there), since smaller chunks also run their GEMMs less efficiently: with 12 M, B=64, T=20 (uniform
# lengths) ran 1.2x slower than without cuts; with 24 M it is unchanged, and B=256 batches of Amazon Beauty
# histories (cut at 50, median 8) run 1.5x-1.75x faster. A chunk ends early where the histories get shorter
# when the padding that saves is worth more (``_padding_cut``).
CHUNK_OVERHEAD_MACS = 24_000_000

# A chunk of one row longer than this runs in segments of this many positions, forward and backward, so that
# no intermediate grows with T: a lifelong history costs its inputs and outputs (and a [T] score row), not
# T * H of scratch. Below it nothing changes (a chunk of one such row is ~4 MB of scratch at H = (80, 40)).
SEGMENT_POSITIONS = 8192


def _row_chunks(lengths: Tensor, max_len: int, batch: int, chunk_floats: Callable[[int], Tuple[int, int]],
                position_macs: Callable[[int], int]) -> List[Tuple[Union[slice, Tensor], int]]:
    """Chunks of batch rows, longest histories first: a list of (rows, Tc) with Tc the chunk's longest length.

    A chunk takes as many rows as fit in ``CHUNK_FLOATS`` of workspace, where ``chunk_floats(Tc)`` gives the
    floats needed per position and per row (at least one row), or fewer, so that the rows left are split
    evenly (1024 rows at 84 per chunk: 13 chunks of 78-79 rows, not 12 of 84 and one of 16). It ends earlier
    where the histories get shorter if the padding saved is worth more than a chunk (``_padding_cut``);
    ``position_macs(Tc)``: multiply-adds per scored position.

    ``rows`` is a slice when the lengths are already non-increasing (e.g. all equal: no gather needed),
    else an index tensor. Rows of length 0 are never listed: they pool to zeros with zero gradients.
    """
    if batch == 0 or max_len == 0:
        return []
    lengths_host = lengths.detach().to("cpu", torch.int64)
    sorted_len, perm = torch.sort(lengths_host, descending=True, stable=True)
    in_order = bool(torch.equal(perm, torch.arange(batch)))
    perm_device = None if in_order else perm.to(lengths.device)
    sorted_list = sorted_len.tolist()
    sorted_host = np.asarray(sorted_list, dtype=np.int64)
    nonempty = batch - sorted_list.count(0)  # the empty rows sort last and are never read
    chunks = []
    start = 0
    while start < nonempty:
        longest = sorted_list[start]
        per_position, per_row = chunk_floats(longest)
        fit = max(1, CHUNK_FLOATS // (longest * per_position + per_row))
        # as many chunks as the remaining rows need at this length, evenly filled (no last sliver of a chunk)
        stop = start + -(-(nonempty - start) // -(-(nonempty - start) // fit))
        stop = _padding_cut(sorted_host, start, stop, position_macs(longest))
        chunks.append((slice(start, stop) if in_order else perm_device[start:stop], longest))
        start = stop
    return chunks


def _padding_cut(sorted_len: np.ndarray, start: int, stop: int, position_macs: int) -> int:
    """Where the chunk of sorted rows ``[start, stop)`` should end: at the row ``j`` that saves the most
    padding, ``(len[start] - len[j]) * (stop - j)`` positions (rows ``j..stop-1`` then run at ``len[j]``, a
    lower bound: the next chunk may take more rows), if that is worth more than ``CHUNK_OVERHEAD_MACS``;
    else at ``stop``. Amazon Beauty batches (B=256, histories cut at 50, median 8) scored 2.35x the valid
    positions without this."""
    window = sorted_len[start:stop]  # numpy: a few small host-side operations per chunk
    if stop - start < 2 or window[0] == window[-1]:
        return stop
    saved = (window[0] - window) * np.arange(stop - start, 0, -1) * position_macs  # [rows]
    best = int(np.argmax(saved))
    return start + best if saved[best] > CHUNK_OVERHEAD_MACS else stop


def _row_count(rows: Union[slice, Tensor]) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


class _Activation:
    """A hidden layer's activation on the chunked path: the entry of ``activations.ACTIVATION_SPECS`` (math
    there) with its per-layer parameters in the compute dtype, and the alpha gradients summed over chunks.

    ``forward(z, layer, keep)`` returns ``(h, saved)``, working in place where it can: ``saved`` is what
    ``backward`` needs (h for sigmoid/relu/tanh, z for prelu/dice when ``keep``, nothing for identity).
    ``backward(dh, saved, layer)`` turns ``dh`` into ``dz`` in place and accumulates ``dalpha``.
    """

    def __init__(self, kind: str, alphas, dice_eval, eps: float, widths: Sequence[int], dtype, device):
        self.kind = kind
        self.spec = spec = activation_spec(kind)
        self.alphas: List[Optional[Tensor]] = [None] * len(widths)
        self.alpha_grads: List[Optional[Tensor]] = [None] * len(widths)
        self.alpha_full: List[bool] = [True] * len(widths)
        self.dice: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(widths)  # (mean, rstd) per layer
        if spec.has_alpha:
            for layer, width in enumerate(widths):
                alpha = alphas[layer].reshape(-1).to(dtype)
                self.alpha_full[layer] = alpha.numel() == width
                self.alphas[layer] = alpha.expand(width)
                self.alpha_grads[layer] = torch.zeros(width, dtype=dtype, device=device)
        if spec.has_stats and dice_eval is not None:  # (None: Dice in training, the call's own statistics)
            for layer in range(len(widths)):
                mean, var = dice_eval[layer]
                self.dice[layer] = (mean.to(dtype), torch.rsqrt(var.to(dtype) + eps))

    def forward(self, z: Tensor, layer: int, keep: bool) -> Tuple[Tensor, Optional[Tensor]]:
        spec = self.spec
        mean, rstd = self.dice[layer] if spec.has_stats else (None, None)
        if spec.saves == "input":
            return spec.forward_(z, self.alphas[layer], mean, rstd), (z if keep else None)
        h = spec.forward_(z, self.alphas[layer], mean, rstd)
        return h, (h if spec.saves == "output" else None)

    def backward(self, dh: Tensor, saved: Optional[Tensor], layer: int) -> Tensor:
        spec = self.spec
        mean, rstd = self.dice[layer] if spec.has_stats else (None, None)
        dz, dalpha = spec.backward_(dh, saved, self.alphas[layer], mean, rstd)
        if dalpha is not None:
            self.alpha_grads[layer] += dalpha
        return dz

    def alpha_grads_like(self, alphas) -> Optional[Tuple[Tensor, ...]]:
        if not self.spec.has_alpha:
            return None
        grads = []
        for layer, alpha in enumerate(alphas):
            grad = self.alpha_grads[layer]
            if not self.alpha_full[layer]:
                grad = grad.sum()
            grads.append(grad.reshape(alpha.shape).to(alpha.dtype))
        return tuple(grads)


class Workspace:
    """Scratch buffers shared by the chunks of one call. Every chunk writes its intermediates (``out=``) into
    the same memory: the pages are faulted in once and stay warm in cache, where a fresh multi-MB tensor per
    chunk and op costs page faults (measured: ~0.3 ms per MB touched here) and cache misses.

    Each buffer is sized once, for the largest chunk of the call: an intermediate is proportional to a chunk's
    positions (``take``: [r, Tc, H], [r * Tc, H]) or to its rows (``take_per_row``: [r, D, H1]), so the first
    request for a name reserves room for the most positions (or rows) of any chunk. Buffers grown chunk by
    chunk instead (the row counts grow as the sorted histories get shorter) faulted in fresh pages in most
    chunks.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device,
                 chunks: Sequence[Tuple[Union[slice, Tensor], int]]):
        self.dtype, self.device = dtype, device
        self.buffers = {}
        sizes = [(_row_count(rows), length) for rows, length in chunks]
        self.max_rows = max((rows for rows, _ in sizes), default=1)
        self.max_positions = max((rows * length for rows, length in sizes), default=1)
        self.rows = self.positions = 1

    def start_chunk(self, rows: int, length: int) -> None:
        """Declare the next chunk's size, which the requested shapes are proportional to."""
        self.rows, self.positions = rows, rows * length

    def take(self, name: str, *shape: int) -> Tensor:
        """A buffer of ``shape``, proportional to the chunk's positions."""
        return self._take(name, shape, self.max_positions / self.positions)

    def take_per_row(self, name: str, *shape: int) -> Tensor:
        """A buffer of ``shape``, proportional to the chunk's rows."""
        return self._take(name, shape, self.max_rows / self.rows)

    def _take(self, name: str, shape: Tuple[int, ...], growth: float) -> Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            capacity = max(numel, math.ceil(numel * growth))
            buffer = self.buffers[name] = torch.empty(capacity, dtype=self.dtype, device=self.device)
        return buffer[:numel].view(shape)


class _FreshBuffers:
    """The ``Workspace`` interface with a new tensor per request: for the chunks whose activations are kept
    for the backward (they must outlive the next chunk)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device

    def take(self, name: str, *shape: int) -> Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    take_per_row = take


class _MLP:
    """The scoring MLP on one chunk of rows: recomputable forward, hand-written backward."""

    def __init__(self, weights: Sequence[Tensor], dim: int, form: str, activation: str, alphas, dice_eval,
                 eps: float, dtype: torch.dtype, device: torch.device):
        self.first = FirstLayer(weights[0], weights[1], dim, form, dtype)
        self.layers = [(weights[i].to(dtype), weights[i + 1].to(dtype)) for i in range(2, len(weights) - 2, 2)]
        self.w_out = weights[-2].to(dtype).reshape(-1)  # [H_L]
        self.b_out = weights[-1].to(dtype)  # [1]
        self.widths = [weights[i].shape[0] for i in range(0, len(weights) - 2, 2)]
        self.act = _Activation(activation, alphas, dice_eval, eps, self.widths, dtype, device)
        self.dtype, self.device = dtype, device
        self.work: Optional[Workspace] = None  # set by ``plan``

    def chunk_floats(self, length: int) -> Tuple[int, int]:
        """Workspace floats a chunk whose longest history is ``length`` needs: (per position, per row)."""
        per_position = 2 * sum(self.widths) + 1 + 2 * self.first.dim  # z_l and dz_l, scores, keys and dkeys
        if self.first.per_position(length):
            return per_position + 4 * self.first.dim, 0  # [k, k * q_b] and its gradient
        return per_position, 2 * self.first.dim * self.widths[0]  # M_b and dM_b

    def position_macs(self, length: int) -> int:
        """Multiply-adds per scored position, forward and backward (the backward recomputes the forward and
        takes two products per layer), for a chunk whose longest history is ``length``."""
        first = (2 if self.first.per_position(length) else 1) * self.first.dim * self.widths[0]
        rest = sum(a * b for a, b in zip(self.widths, self.widths[1:])) + self.widths[-1]
        return 4 * (first + rest)

    def plan(self, lengths: Tensor, max_len: int, batch: int) -> List[Tuple[Union[slice, Tensor], int]]:
        """The chunks of this call (``_row_chunks``), and a workspace sized for the largest."""
        chunks = _row_chunks(lengths, max_len, batch, self.chunk_floats, self.position_macs)
        # sized for the segments of the chunks that run in segments (``_segments``)
        self.work = Workspace(self.dtype, self.device,
                              [(rows, min(length, SEGMENT_POSITIONS)) for rows, length in chunks])
        return chunks

    def kept_floats(self, rows: int, length: int) -> int:
        """Floats that ``scores(..., keep=True, fresh=True)`` allocates for a chunk of ``rows`` x ``length``."""
        positions = rows * length
        saved = 2 if self.act.spec.saves == "input" else 1  # (a backward that needs z keeps it besides h)
        if self.first.per_position(length):
            first = positions * 2 * self.first.dim  # [k, k * q_b]
        else:
            first = rows * self.first.dim * self.widths[0]  # M_b
        return positions * (saved * sum(self.widths) + 1) + first

    def scores(self, q: Tensor, k: Tensor, keep: bool, fresh: bool = False):
        """q [r, D], k [r, Tc, D] -> scores [r, Tc] (+ what ``backward`` needs when ``keep``).
        The scores and the kept tensors live in the workspace (consume them before the next chunk), or in
        new tensors with ``fresh`` (kept for the backward)."""
        rows, length, _ = k.shape
        n = rows * length
        work = _FreshBuffers(self.dtype, self.device) if fresh else self.work
        z, first_cache = self.first.forward(q, k, work)  # [r, Tc, H1]
        h, saved = self.act.forward(z.view(n, -1), 0, keep)  # [n, H1]
        hs, saveds = [h], [saved]
        for layer, (w, b) in enumerate(self.layers, start=1):
            z = torch.addmm(b, h, w.t(), out=work.take(f"z{layer}", n, self.widths[layer]))  # [n, H_l]
            h, saved = self.act.forward(z, layer, keep)
            hs.append(h)
            saveds.append(saved)
        s = torch.addmv(self.b_out, h, self.w_out, out=work.take("s", n)).view(rows, length)  # [r, Tc]
        return (s, (first_cache, hs, saveds)) if keep else (s, None)

    def start_backward(self) -> None:
        self.first.start_backward()
        self.d_layers = [(torch.zeros_like(w), torch.zeros_like(b)) for w, b in self.layers]
        self.d_w_out = torch.zeros_like(self.w_out)
        self.d_b_out = torch.zeros_like(self.b_out)

    def backward(self, q: Tensor, k: Tensor, grad_scores: Tensor, cache, dk_out: Tensor) -> Tensor:
        """grad_scores [r, Tc] -> dq [r, D]; writes dk through the MLP (dz1 @ M_b^T) into ``dk_out``
        [r, Tc, D]; accumulates the weight gradients."""
        first_cache, hs, saveds = cache
        rows, length, dim = k.shape
        n, work = rows * length, self.work
        g = grad_scores.reshape(-1)  # [n]
        self.d_w_out.addmv_(hs[-1].t(), g)
        self.d_b_out += g.sum()
        last = len(hs) - 1
        dh = torch.mul(g[:, None], self.w_out, out=work.take(f"d{last}", n, self.widths[last]))  # [n, H_L]
        for layer in range(last, 0, -1):
            dz = self.act.backward(dh, saveds[layer], layer)  # [n, H_l]
            w, _ = self.layers[layer - 1]
            d_w, d_b = self.d_layers[layer - 1]
            d_w.addmm_(dz.t(), hs[layer - 1])
            d_b += dz.sum(0)
            dh = torch.mm(dz, w, out=work.take(f"d{layer - 1}", n, self.widths[layer - 1]))  # [n, H_{l-1}]
        dz1 = self.act.backward(dh, saveds[0], 0).view(rows, length, -1)  # [r, Tc, H1]
        return self.first.backward(q, k, dz1, first_cache, dk_out, work)

    def weight_grads(self, weights: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        grads = list(self.first.weight_grads(weights[0], weights[1]))
        for index, (d_w, d_b) in enumerate(self.d_layers, start=1):
            grads += [d_w.to(weights[2 * index].dtype), d_b.to(weights[2 * index + 1].dtype)]
        grads += [self.d_w_out.view_as(weights[-2]).to(weights[-2].dtype), self.d_b_out.to(weights[-1].dtype)]
        return tuple(grads)


def _gather_keys(keys: Tensor, rows: Union[slice, Tensor], length: int, work: Workspace) -> Tensor:
    """keys[rows, :length] in the compute dtype: a view when possible, else one copy into the workspace."""
    if isinstance(rows, slice):
        k = keys[rows, :length]
        return k if k.dtype == work.dtype else work.take("k", *k.shape).copy_(k)
    out = work.take("k", rows.numel(), length, keys.shape[2])
    if keys.dtype == work.dtype:
        return torch.index_select(keys[:, :length], 0, rows, out=out)
    return out.copy_(keys[rows, :length])


def candidates_per_history(query: Tensor, keys: Tensor) -> int:
    """C, for query [R, D] holding C candidate rows per history of keys [B, T, D] (R = B * C; 1 when B = 0)."""
    batch = keys.shape[0]
    return query.shape[0] // batch if batch else 1


def _key_rows(rows: Union[slice, Tensor], candidates: int, device) -> Union[slice, Tensor]:
    """The histories of candidate rows ``rows``: row r scores history r // C."""
    if candidates == 1:
        return rows
    if isinstance(rows, slice):
        rows = torch.arange(rows.start, rows.stop, device=device)
    return torch.div(rows, candidates, rounding_mode="floor")


def _row_lengths(lengths: Tensor, candidates: int) -> Tensor:
    """lengths [B] -> [B * C], each history's length once per candidate row."""
    return lengths if candidates == 1 else lengths.repeat_interleave(candidates)


def _segments(rows: Union[slice, Tensor], length: int) -> Optional[List[Tuple[int, int]]]:
    """The position ranges a chunk runs in: None (all at once) but for one row longer than SEGMENT_POSITIONS."""
    if _row_count(rows) != 1 or length <= SEGMENT_POSITIONS:
        return None
    return [(t0, min(length, t0 + SEGMENT_POSITIONS)) for t0 in range(0, length, SEGMENT_POSITIONS)]


def _long_row_forward(mlp: "_MLP", q: Tensor, keys: Tensor, key_rows, row_lengths: Tensor, length: int,
                      segments, normalize: str, scale: Optional[float]):
    """One long row, segment by segment: (weights [1, Tc], pooled [1, D], lse [1] or None). q [1, D]."""
    scores = torch.empty(1, length, dtype=mlp.dtype, device=mlp.device)  # [1, Tc]: the row's raw scores
    for t0, t1 in segments:
        mlp.work.start_chunk(1, t1 - t0)
        k = _gather_keys(keys[:, t0:t1], key_rows, t1 - t0, mlp.work)  # [1, n, D]
        scores[:, t0:t1] = mlp.scores(q, k, keep=False)[0]
    w, row_lse = _normalize_(scores, row_lengths, normalize, scale)
    pooled = torch.zeros(1, keys.shape[2], dtype=mlp.dtype, device=mlp.device)
    for t0, t1 in segments:
        mlp.work.start_chunk(1, t1 - t0)
        k = _gather_keys(keys[:, t0:t1], key_rows, t1 - t0, mlp.work)
        pooled += torch.mm(w[:, t0:t1], k[0])  # sum_t w * k
    return w, pooled, row_lse


def _long_row_backward(mlp: "_MLP", q: Tensor, keys: Tensor, key_rows, g_out: Tensor, w: Tensor, segments,
                       normalize: str, scale: Optional[float], d_keys: Tensor, candidates: int) -> Tensor:
    """One long row's backward, segment by segment (the MLP recomputed per segment): dq [1, D]; writes its
    keys' gradient into ``d_keys``. q, g_out [1, D], w [1, Tc] the final weights."""
    # dattn_t = k_t . g_out, kept for the row ([1, Tc], as w): the softmax needs delta = sum_t w_t dattn_t
    # over the whole row before any segment's ds
    d_attn = torch.empty_like(w)
    for t0, t1 in segments:
        mlp.work.start_chunk(1, t1 - t0)
        k = _gather_keys(keys[:, t0:t1], key_rows, t1 - t0, mlp.work)
        torch.mv(k[0], g_out[0], out=d_attn[0, t0:t1])
    delta = float(d_attn[0].dot(w[0])) if normalize == "softmax" else 0.0
    dq = torch.zeros_like(q)
    for t0, t1 in segments:
        n = t1 - t0
        mlp.work.start_chunk(1, n)
        k = _gather_keys(keys[:, t0:t1], key_rows, n, mlp.work)  # [1, n, D]
        w_seg = w[:, t0:t1]
        d_scores = d_attn[:, t0:t1]  # [1, n] (every position of a segment is valid; consumed in place)
        if normalize == "softmax":
            d_scores = d_scores.sub_(delta).mul_(w_seg)
        if scale is not None:
            d_scores.mul_(scale)
        cache = mlp.scores(q, k, keep=True)[1]
        dk = mlp.work.take("dk", 1, n, keys.shape[2])
        dq += mlp.backward(q, k, d_scores, cache, dk)
        dk.addcmul_(w_seg[:, :, None], g_out[:, None, :])
        if candidates > 1:
            d_keys[:, t0:t1].index_add_(0, key_rows, dk.to(d_keys.dtype))
        else:
            d_keys[key_rows, t0:t1] = dk.to(d_keys.dtype)
    return dq


def _valid(lengths: Tensor, length: int) -> Tensor:
    return torch.arange(length, device=lengths.device) < lengths[:, None]  # [r, Tc] bool


def _normalize_(scores: Tensor, lengths: Tensor, normalize: str, scale: Optional[float]):
    """Scores [r, Tc] -> final weights (in place) and the softmax log-sum-exp [r] (None for "none")."""
    if scale is not None:
        scores.mul_(scale)
    invalid = ~_valid(lengths, scores.shape[1])
    if normalize == "none":
        return scores.masked_fill_(invalid, 0.0), None
    scores.masked_fill_(invalid, -math.inf)
    lse = torch.logsumexp(scores, dim=1)  # [r]; -inf for a row with no valid position
    lse.masked_fill_(lengths == 0, 0.0)  # finite, and exp(-inf - 0) = 0 weights that row out
    return scores.sub_(lse[:, None]).exp_(), lse


def _check_launcher_args(weights, alphas, dice_eval, form, activation, normalize):
    check_choice("form", form, FORMS)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("normalize", normalize, NORMALIZATIONS)
    hidden = len(weights) // 2 - 1
    if len(weights) % 2 or hidden < 1:
        raise ValueError(f"weights must be (w1, b1, [w2, b2, ...], w_out, b_out) with at least one hidden "
                         f"layer, got {len(weights)} tensors")
    spec = activation_spec(activation)
    if spec.has_alpha and (alphas is None or len(alphas) != hidden):
        raise ValueError(f"activation={activation!r} needs alphas, one per hidden layer ({hidden})")
    if spec.has_stats and (dice_eval is None or len(dice_eval) != hidden):
        raise ValueError(f"activation='dice' needs dice_eval: (running_mean, running_var) per hidden layer "
                         f"({hidden}); the composite path runs Dice in eval mode only")


def _plan_call(query, keys, lengths, weights, alphas, dice_eval, eps, form, activation):
    """What the forward and the backward of one call set up alike: (R query rows, C candidates per history,
    lengths per row [R], the MLP in the compute dtype, the chunks of rows and their workspace)."""
    num_rows, candidates = query.shape[0], candidates_per_history(query, keys)
    lengths = _row_lengths(lengths, candidates)
    mlp = _MLP(weights, keys.shape[2], form, activation, alphas, dice_eval, eps, accumulation_dtype(keys.dtype),
               keys.device)
    return num_rows, candidates, lengths, mlp, mlp.plan(lengths, keys.shape[1], num_rows)


def attention_torch_forward(
    query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    *, form: str, activation: str, normalize: str, scale: Optional[float], kept: Optional[list] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Local activation unit, forward. query [R, D] (R = B * C: C candidate rows per history, row r scoring
    history r // C), keys [B, T, D], lengths [B] -> (out [R, D] in the query's dtype, attn [R, T] final
    weights (0 at padding), lse [R] (softmax) or empty). The chunks are of candidate rows; a chunk gathers
    the keys of its rows' histories (bounded by the chunk, never the C-fold history).

    attn and lse are fp32 (fp64 for fp64 inputs). Arguments are assumed validated by the caller
    (``_checks.check_attention_args``). ``kept``: a list to append the first chunks' activations to, up to
    ``KEEP_FLOATS`` in all, for ``attention_torch_backward(..., kept=)`` (which then skips their recompute).
    """
    _check_launcher_args(weights, alphas, dice_eval, form, activation, normalize)
    _, max_len, dim = keys.shape
    num_rows, candidates, lengths, mlp, chunks = _plan_call(query, keys, lengths, weights, alphas, dice_eval, eps,
                                                            form, activation)
    dtype, device = mlp.dtype, mlp.device
    out = torch.zeros(num_rows, dim, dtype=query.dtype, device=device)
    attn = torch.zeros(num_rows, max_len, dtype=dtype, device=device)
    lse = torch.zeros(num_rows if normalize == "softmax" else 0, dtype=dtype, device=device)
    budget = KEEP_FLOATS if kept is not None else 0
    with torch.no_grad():
        for rows, length in chunks:
            segments = _segments(rows, length)
            if segments:  # (never kept: the chunks after it are not either, kept[i] stays chunk i's)
                budget = 0
                w, pooled, row_lse = _long_row_forward(mlp, query[rows].to(dtype), keys,
                                                       _key_rows(rows, candidates, device), lengths[rows], length,
                                                       segments, normalize, scale)
                attn[rows, :length] = w
                out[rows] = pooled.to(out.dtype)
                if row_lse is not None:
                    lse[rows] = row_lse
                continue
            mlp.work.start_chunk(_row_count(rows), length)
            q = query[rows].to(dtype)  # [r, D]
            k = _gather_keys(keys, _key_rows(rows, candidates, device), length, mlp.work)  # [r, Tc, D]
            row_lengths = lengths[rows]
            # keep the first chunks while they fit: kept[i] belongs to chunk i
            need = mlp.kept_floats(_row_count(rows), length)
            keep = need <= budget
            budget = budget - need if keep else 0
            scores, cache = mlp.scores(q, k, keep=keep, fresh=keep)
            if keep:
                kept.append(cache)
            w, row_lse = _normalize_(scores, row_lengths, normalize, scale)  # [r, Tc]
            attn[rows, :length] = w
            out[rows] = torch.bmm(w[:, None, :], k).squeeze(1).to(out.dtype)  # sum_t w * k
            if row_lse is not None:
                lse[rows] = row_lse
    return out, attn, lse


def attention_torch_backward(
    grad_out: Tensor, query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    out: Tensor, attn: Tensor, lse: Tensor,
    *, form: str, activation: str, normalize: str, scale: Optional[float], kept: Optional[list] = None,
):
    """Local activation unit, backward: recomputes the MLP chunk by chunk from the inputs (except for the
    first ``len(kept)`` chunks, whose activations the forward kept: ``attention_torch_forward(kept=)``).

    dattn[b, t] = grad_out_b . k[b, t];  softmax: ds = attn * (dattn - sum_t attn * dattn), else ds = dattn at
    valid positions; the scores' gradient is ds * scale. dk = attn * grad_out + dz1 @ M_b^T; dq, dW from
    du_b = sum_t dz1 and dM_b = k_b^T dz1 (``FirstLayer.backward``).
    Returns (dquery [R, D], dkeys [B, T, D], dweights like weights, dalphas like alphas or None); with C > 1
    candidate rows per history, dkeys sums over them (``index_add_``).
    ``out`` and ``lse`` are not needed here (the saved weights carry the softmax) but are part of the
    launcher contract shared with the Triton path.
    """
    _check_launcher_args(weights, alphas, dice_eval, form, activation, normalize)
    batch, max_len, dim = keys.shape
    num_rows, candidates, lengths, mlp, chunks = _plan_call(query, keys, lengths, weights, alphas, dice_eval, eps,
                                                            form, activation)
    dtype, device = mlp.dtype, mlp.device
    mlp.start_backward()
    d_query = torch.zeros(num_rows, dim, dtype=query.dtype, device=device)

    def direct(rows, length: int) -> bool:
        """Full-length rows in order, one candidate each, in the compute dtype: dk goes straight into d_keys."""
        return isinstance(rows, slice) and length == max_len and keys.dtype == dtype and candidates == 1

    # Every row of d_keys written by a chunk, or zeros first (padding tails, empty rows, sums over
    # candidates; cheaper than zeroing the tails chunk by chunk).
    written = sum(_row_count(rows) for rows, length in chunks if direct(rows, length)) == batch
    d_keys = (torch.empty if written else torch.zeros)(batch, max_len, dim, dtype=keys.dtype, device=device)
    with torch.no_grad():
        for index, (rows, length) in enumerate(chunks):
            segments = _segments(rows, length)
            if segments:
                dq = _long_row_backward(mlp, query[rows].to(dtype), keys, _key_rows(rows, candidates, device),
                                        grad_out[rows].to(dtype), attn[rows, :length].to(dtype), segments,
                                        normalize, scale, d_keys, candidates)
                d_query[rows] = dq.to(d_query.dtype)
                continue
            mlp.work.start_chunk(_row_count(rows), length)
            q = query[rows].to(dtype)  # [r, D]
            key_rows = _key_rows(rows, candidates, device)
            k = _gather_keys(keys, key_rows, length, mlp.work)  # [r, Tc, D]
            g_out = grad_out[rows].to(dtype)  # [r, D]
            w = attn[rows, :length].to(dtype)  # [r, Tc]
            # g_out^T k^T rather than k g_out: bmm runs a matrix-vector product 5x faster this way round here
            d_attn = torch.bmm(g_out[:, None, :], k.transpose(1, 2)).squeeze(1)  # [r, Tc]
            if normalize == "softmax":
                d_scores = d_attn.sub_((w * d_attn).sum(1, keepdim=True)).mul_(w)
            else:
                d_scores = d_attn.masked_fill_(~_valid(lengths[rows], length), 0.0)
            if scale is not None:
                d_scores.mul_(scale)
            cache = kept[index] if kept and index < len(kept) else mlp.scores(q, k, keep=True)[1]
            in_place = direct(rows, length)
            dk = d_keys[rows] if in_place else mlp.work.take("dk", k.shape[0], length, dim)  # [r, Tc, D]
            dq = mlp.backward(q, k, d_scores, cache, dk)
            dk.addcmul_(w[:, :, None], g_out[:, None, :])  # pooling: d(sum_t w k)/dk = w * grad_out
            d_query[rows] = dq.to(d_query.dtype)
            if candidates > 1:
                d_keys[:, :length].index_add_(0, key_rows, dk.to(d_keys.dtype))
            elif not in_place:
                d_keys[rows, :length] = dk.to(d_keys.dtype)
    d_alphas = mlp.act.alpha_grads_like(alphas) if alphas is not None else None
    return d_query, d_keys, mlp.weight_grads(weights), d_alphas
