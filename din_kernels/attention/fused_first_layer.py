"""The Triton paths' reduction of every row's first-layer gradient ``dM_b`` ("concat"), in one read of it.

The backward kernels return ``dM_b = k_b^T dz1_b`` [B, D, H1] fp32 per row (``fused.py``,
``fused_dice_training.py``), the largest thing they write (B=2048, D=64, H1=80: 42 MB). With
``M_b = (Wb - Wc)^T + diag(q_b) Wd^T`` (``first_layer.py``) three things come from it::

    sum_b dM_b              -> d(Wb - Wc)^T   [D, H1]
    sum_b diag(q_b) dM_b    -> dWd^T          [D, H1]
    sum_h dM_b[d, h] WdT[d, h] -> dq_b's M part  [B, D]

torch's batched products read dM twice for them (``FirstLayer.m_sums``); this kernel reads it once, with a
program per (d, chunk of rows): the rows' ``dM_b[d, :]`` in tiles of ``BLOCK_B`` rows, summed in a fixed
order (deterministic, no atomics); the chunks' partial sums ([chunks, 2, D, H1], small) are summed by torch.
The launchers take it through ``dm_reduction`` (under the interpreter: torch's, ``INTERPRETER_USES_TORCH``).
(Summing dq's part inside the backward kernels instead, from dM in registers or read back in slices, spilled
their one-pass forms: 16-160 bytes at 255 registers; benchmarks/RESULTS.md, section 9.)
"""
from __future__ import annotations

import types
from typing import Tuple

import torch

from .._backend import interpreter_enabled, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional (setup.py): without it only the composite path runs
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = None

Tensor = torch.Tensor

# Rows a tile and warps: compiled for sm_90 / sm_80 (Triton 3.9's and 3.6's ptxas, gpu_compile_report.py), 32
# rows at 8 warps hold 62-128 registers for H1 80-200, none spilled, a 16 KB tile in flight a program; 4 warps
# spilled 16 bytes on sm_80 at H1=80, 64 rows reached 255 registers.
BLOCK_B = 32
NUM_WARPS = 8
PROGRAMS_PER_SM = 2  # two 16 KB tiles in flight per SM (D=64 on 132 SMs: 5 chunks of rows, 320 programs)
# Under the interpreter the launchers reduce dM with torch (``FirstLayer.m_sums``), against which this kernel's
# own tests check it: its D x chunks programs cost ~8 ms each there (0.3 s a backward at D=36, 6 more minutes
# of the suite). A test sets this False to run the launchers with the kernel.
INTERPRETER_USES_TORCH = True


@triton.jit
def _first_layer_m_grads_kernel(
    DM,      # [B, D, H1] ACC (fp32, or fp64 on Dice-training's fp64 path): every row's dM_b
    QT,      # [D, B] ACC: the queries, transposed (the program's d reads a contiguous run)
    WDT,     # [D, H1] ACC: Wd^T
    SUMS,    # [CHUNKS, 2, D, H1] ACC: per chunk, sum_b dM_b[d, :] and sum_b q_b[d] dM_b[d, :]
    DQMT,    # [D, B] ACC: dq's M part, transposed
    B, D, H1, ROWS,  # ROWS: rows per chunk, a multiple of BLOCK_B
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (d, j), rows b in [j ROWS, (j + 1) ROWS):

        SUMS[j, 0, d] = sum_b dM_b[d, :],   SUMS[j, 1, d] = sum_b q_b[d] dM_b[d, :]
        DQMT[d, b] = sum_h dM_b[d, h] WdT[d, h]
    """
    ACC: tl.constexpr = DM.dtype.element_ty
    d = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H1
    wdt = tl.load(WDT + d * H1 + offs_h, mask=mask_h, other=0.0)
    total = tl.zeros([BLOCK_H], dtype=ACC)
    weighted = tl.zeros([BLOCK_H], dtype=ACC)
    start = chunk * ROWS
    stop = tl.minimum(start + ROWS, B)
    for b0 in range(start, stop, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < stop
        tile = tl.load(DM + offs_b.to(tl.int64)[:, None] * D * H1 + d * H1 + offs_h[None, :],
                       mask=mask_b[:, None] & mask_h[None, :], other=0.0)  # [BB, BH]
        q = tl.load(QT + d * B + offs_b, mask=mask_b, other=0.0)  # [BB]
        total += tl.sum(tile, axis=0)
        weighted += tl.sum(tile * q[:, None], axis=0)
        tl.store(DQMT + d * B + offs_b, tl.sum(tile * wdt[None, :], axis=1), mask=mask_b)
    out = SUMS + (chunk * 2 * D + d) * H1 + offs_h
    tl.store(out, total, mask=mask_h)
    tl.store(out + D * H1, weighted, mask=mask_h)


def _chunks(batch: int, dim: int, device: torch.device) -> Tuple[int, int]:
    """(chunks, rows per chunk): about ``PROGRAMS_PER_SM`` programs per SM over the D columns, whole tiles."""
    wanted = max(1, min(triton.cdiv(batch, BLOCK_B), triton.cdiv(PROGRAMS_PER_SM * sm_count(device), dim)))
    rows = triton.cdiv(triton.cdiv(batch, wanted), BLOCK_B) * BLOCK_B
    return triton.cdiv(batch, rows), rows


def first_layer_m_grads(q: Tensor, dm: Tensor, wd_t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(sum_b dM_b [D, H1], sum_b diag(q_b) dM_b [D, H1], dq's M part [B, D]) from q [B, D], dM [B, D, H1] and
    Wd^T [D, H1], all of one dtype (fp32, fp64) on one device: ``FirstLayer.m_sums``'s contract, in one read
    of dM."""
    batch, dim, hidden = dm.shape
    if batch == 0:
        zeros = dm.new_zeros(dim, hidden)
        return zeros, zeros.clone(), dm.new_zeros(0, dim)
    chunks, rows = _chunks(batch, dim, dm.device)
    sums = dm.new_empty(chunks, 2, dim, hidden)
    dq_m_t = dm.new_empty(dim, batch)
    _first_layer_m_grads_kernel[(dim, chunks)](
        dm.contiguous(), q.t().contiguous(), wd_t.contiguous(), sums, dq_m_t, batch, dim, hidden, rows,
        BLOCK_B=BLOCK_B, BLOCK_H=max(16, triton.next_power_of_2(hidden)), num_warps=NUM_WARPS,
    )
    total, weighted = sums.sum(0) if chunks > 1 else sums[0]  # a fixed order: deterministic
    return total, weighted, dq_m_t.t()


def dm_reduction():
    """What the Triton launchers pass to ``FirstLayer.row_grads`` as ``m_sums``: ``first_layer_m_grads``, or
    None (torch's ``FirstLayer.m_sums``) under the interpreter (``INTERPRETER_USES_TORCH``)."""
    return None if interpreter_enabled() and INTERPRETER_USES_TORCH else first_layer_m_grads
