"""The local activation unit's fused Triton kernels and their launchers (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``).

``out_b = sum_t w[b, t] * k[b, t]``, ``w`` scored by the MLP over (``q_b``, ``k[b, t]``) whose first layer
is ``z1[b, t] = u_b + k[b, t] @ M_b`` (``first_layer.py``). ``u`` and ``M`` (``O(B*D*H1)``) come from torch;
the kernels do the ``O(B*T*D*H)`` work: one program per candidate row (forward) loops over the valid
positions in tiles, recomputes the MLP, and never stores anything of size ``[B, T, H]``; with several
candidates per history ("concat", TF32 or 16-bit) one program per block of candidates, which reads each key
tile once for the block (``_din_attention_fwd_candidates_kernel``); the backward runs once per candidate,
accumulating into the history's gradients. The backward kernel recomputes the activations and returns
per-row ``dM_b``/``du_b`` and per-row weight-gradient partials, reduced afterwards (deterministic, no
atomics): ``dM`` by ``fused_first_layer`` in one read, the rest by torch's sums. Where the rows are too few
to fill a GPU (B = 256 on 132 SMs), both run rows x position splits (``_position_splits``): the forward's
partial (max, sum, pooled sum) per split combined by ``_din_attention_fwd_merge_kernel``, the backward's
partials per split summed with the rows'. Activations: ``ACT``/``HAS_ALPHA``/``HAS_STATS`` from
``activations.ACTIVATION_SPECS``.

Launchers (the contract every path honours, ``composite.py``)::

    attention_forward(query, keys, lengths, weights, alphas, dice_eval, eps, *, form, activation,
                      normalize, scale) -> (out [B, D], attn [B, T] fp32, lse [B] fp32 or empty)
    attention_backward(grad_out, query, keys, lengths, weights, alphas, dice_eval, eps, out, attn, lse,
                       *, form, activation, normalize, scale) -> (dquery, dkeys, dweights, dalphas)

for 1 or 2 hidden layers of width <= 256 and ``D <= 256`` whose resident tiles fit (``fused_supported``),
fp32/fp16/bf16; ``plan.py`` sends every other problem elsewhere.
"""
from __future__ import annotations

import functools
import re
import types
from typing import List, Optional, Sequence, Tuple

import torch

from .._backend import interpreter_enabled, sm_count
from ..activations import activation_spec
from .composite import candidates_per_history
from .first_layer import FirstLayer
from .fused_first_layer import dm_reduction

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional (setup.py): without it only the composite path runs
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = None

Tensor = torch.Tensor

_MAX_FUSED_WIDTH = 256  # hidden widths and D the kernels hold in registers
# M_b [BD, BH1] and W2 [BH2, BH1] stay resident in a program, with same-sized gradient accumulators in the
# backward, whose tl.dot operands are staged through shared memory. Compiled for sm_90a (ptxas, no GPU
# run), the backward's shared memory grew ~9 bytes per resident element: 151 KB at DIN's 64x128 + 128x64,
# 197 KB at 20480 elements, 295 KB (over the 227 KB a Hopper block may use) at 128x128 + 128x128.
_MAX_RESIDENT_ELEMENTS = 20 * 1024
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _pool_tile(s, k, valid, m_i, l_i, acc, SOFTMAX: tl.constexpr):
    """One tile of a row's pooling from its scores s [BT] and keys k [BT, BD] (fp32): with softmax the online
    update of the running max m_i (base 2), sum l_i and weighted sum acc, returning the raw scores to store
    (normalised by a second pass); without, acc += sum_t s_t k_t over the valid positions, returning the
    weights. -> (m_i, l_i, acc, what the tile writes into the weights)"""
    if SOFTMAX:
        s2 = tl.where(valid, s * 1.4426950408889634, float("-inf"))  # (log2 e)
        m_new = tl.maximum(m_i, tl.max(s2, axis=0))
        p = tl.exp2(s2 - m_new)
        correction = tl.exp2(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, axis=0)
        acc = acc * correction + tl.sum(p[:, None] * k, axis=0)
        return m_new, l_i, acc, s
    w = tl.where(valid, s, 0.0)
    acc += tl.sum(w[:, None] * k, axis=0)
    return m_i, l_i, acc, w


@triton.jit
def _act_fwd(z, alpha, mean, rstd, ACT: tl.constexpr):
    """h = act(z) for ``ACT = ActivationSpec.code`` (``activations.py``: 0 identity, 1 sigmoid, 2 relu,
    3 prelu ``where(z >= 0, z, alpha z)``, 4 dice (eval) ``z (alpha + (1 - alpha) p)``,
    ``p = sigmoid((z - mean) rstd)``). ``alpha``/``mean``/``rstd`` are [1, H] rows."""
    if ACT == 0:
        h = z
    elif ACT == 1:
        h = tl.sigmoid(z)
    elif ACT == 2:
        h = tl.maximum(z, 0.0)
    elif ACT == 3:
        h = tl.where(z >= 0, z, alpha * z)
    else:
        p = tl.sigmoid((z - mean) * rstd)
        h = z * (alpha + (1.0 - alpha) * p)
    return h


@triton.jit
def _act_bwd(z, dh, alpha, mean, rstd, ACT: tl.constexpr):
    """(dz, dalpha elementwise) for h = act(z):
    sigmoid: ``dz = dh s (1 - s)``; relu: ``dz = dh [z > 0]``; prelu: ``dz = dh where(z >= 0, 1, alpha)``,
    ``dalpha = dh where(z >= 0, 0, z)``; dice: ``dz = dh (alpha + (1 - alpha) (p + z p (1 - p) rstd))``,
    ``dalpha = dh z (1 - p)``. Only prelu and dice have a meaningful ``dalpha`` (zeros otherwise)."""
    if ACT == 0:
        # ``+ 0 z`` (z is finite: masked keys are 0): dz depending on z as every other activation's does keeps
        # Triton's schedule of theirs; ``dz = dh`` spilled 1.8-9.5 KB in the fp32 TF32-off pass 2 (sm_90 /
        # sm_80), this none
        dz = dh + z * 0.0
        dalpha = tl.zeros_like(dh)
    elif ACT == 1:
        s = tl.sigmoid(z)
        dz = dh * s * (1.0 - s)
        dalpha = tl.zeros_like(dh)
    elif ACT == 2:
        dz = tl.where(z > 0, dh, 0.0)
        dalpha = tl.zeros_like(dh)
    elif ACT == 3:
        dz = tl.where(z >= 0, dh, alpha * dh)
        dalpha = tl.where(z >= 0, 0.0, dh * z)
    else:
        p = tl.sigmoid((z - mean) * rstd)
        dz = dh * (alpha + (1.0 - alpha) * (p + z * p * (1.0 - p) * rstd))
        dalpha = dh * z * (1.0 - p)
    return dz, dalpha


@triton.jit
def _load_act_params(A, MU, RS, offs_h, mask_h, BLOCK_H: tl.constexpr, HAS_ALPHA: tl.constexpr,
                     HAS_STATS: tl.constexpr):
    """[1, H] rows of the activation's parameters (zeros where the activation has none)."""
    if HAS_ALPHA:
        alpha = tl.load(A + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    else:
        alpha = tl.zeros([BLOCK_H], dtype=tl.float32)
    if HAS_STATS:
        mean = tl.load(MU + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        rstd = tl.load(RS + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    else:
        mean = tl.zeros([BLOCK_H], dtype=tl.float32)
        rstd = tl.zeros([BLOCK_H], dtype=tl.float32)
    return alpha[None, :], mean[None, :], rstd[None, :]


@triton.jit
def _dot_operand(x, OPERAND: tl.constexpr, INTERPRETED: tl.constexpr):
    """``x`` rounded to the ``tl.dot`` operand dtype (the keys': fp32, or bf16/fp16 for 16-bit MMAs with fp32
    accumulation). Under the interpreter, whose bf16 dot is wrong (numpy has no bf16), the rounded values go
    back to fp32: the same products, since a product of two 16-bit values is exact in fp32."""
    y = x.to(OPERAND)
    if INTERPRETED:
        y = y.to(tl.float32)
    return y


@triton.jit
def _din_attention_fwd_kernel(
    K,            # [B, T, D] keys
    M,            # [R, D, H1] fp32, M_r (R = B * C candidate rows; row r scores history r // C)
    U,            # [R, H1] fp32, u_r (b1 included)
    W2, B2,       # [H2, H1], [H2] (second hidden layer; unused with one layer)
    WO, BO,       # [HL] (output layer row), [1]
    A1, MU1, RS1,  # [H1] alpha, dice running mean, dice rsqrt(running var + eps)
    A2, MU2, RS2,  # [H2]
    LENGTHS,      # [B] int64
    OUT,          # [R, D] pooled output (query dtype)
    ATTN,         # [R, T] fp32 final weights, zero-initialised
    LSE,          # [R] fp32 (softmax only)
    PACC, PML,    # SPLIT: [R * SPLITS, D] fp32 partial pooled sums, [R * SPLITS, 2] fp32 partial (max, sum)
    C, T, D, H1, H2, scale,
    stride_kb, stride_kt,
    CHUNK, SPLITS,  # SPLIT: positions per split (a multiple of BLOCK_T), splits per row
    ACT: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_STATS: tl.constexpr, TWO_LAYERS: tl.constexpr,
    SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    INTERPRETED: tl.constexpr, SPLIT: tl.constexpr,
):
    """One program per candidate row r (history b = r // C), looping over the valid positions t < L_b in tiles:

        z1 = k @ M_r + u_r,  h1 = act(z1),  [z2 = h1 @ W2^T + b2,  h2 = act(z2)],
        s_t = (h_last @ w_out + b_out) * scale
        none:    w_t = s_t,                        out_r = sum_t w_t k_t
        softmax: w_t = exp(s_t - lse_r),           out_r = sum_t w_t k_t   (online softmax, base 2)
    ATTN holds w (0 at padding); LSE holds lse_r = log sum_{t < L_b} exp(s_t) (0 for an empty row). The C
    programs of one history are adjacent in the grid, so after the first its key tiles mostly come from L2.

    ``SPLIT`` (grid [R, SPLITS]): program (r, j) covers positions [j CHUNK, (j + 1) CHUNK) only and writes its
    partial pooled sum (PACC) and, for softmax, its running (max m_j, sum l_j) of the base-2 scores (PML) and
    its raw scores (ATTN); ``_din_attention_fwd_merge_kernel`` combines them (``_position_splits``).
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    r = tl.program_id(0).to(tl.int64)
    b = r // C
    # Clamped so that a bad length can never send a load or store outside the row.
    L = tl.minimum(tl.maximum(tl.load(LENGTHS + b), 0), T).to(tl.int32)

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h1 = tl.arange(0, BLOCK_H1)
    mask_d = offs_d < D
    mask_h1 = offs_h1 < H1
    OPERAND: tl.constexpr = K.dtype.element_ty  # of every tl.dot (``_dot_operand``)
    # Padded hidden units read 0 from M, u and every weight touching them, so the 0.5 a padded
    # sigmoid unit produces never reaches a score.
    m1 = tl.load(M + r * D * H1 + offs_d[:, None] * H1 + offs_h1[None, :],
                 mask=mask_d[:, None] & mask_h1[None, :], other=0.0)
    m1 = _dot_operand(m1, OPERAND, INTERPRETED)  # [BD, BH1]
    u1 = tl.load(U + r * H1 + offs_h1, mask=mask_h1, other=0.0)  # [BH1]
    a1, mu1, rs1 = _load_act_params(A1, MU1, RS1, offs_h1, mask_h1, BLOCK_H1, HAS_ALPHA, HAS_STATS)
    if TWO_LAYERS:
        offs_h2 = tl.arange(0, BLOCK_H2)
        mask_h2 = offs_h2 < H2
        w2t = tl.load(W2 + offs_h2[None, :] * H1 + offs_h1[:, None],
                      mask=mask_h1[:, None] & mask_h2[None, :], other=0.0)
        w2t = _dot_operand(w2t, OPERAND, INTERPRETED)  # [BH1, BH2]
        b2 = tl.load(B2 + offs_h2, mask=mask_h2, other=0.0).to(tl.float32)
        a2, mu2, rs2 = _load_act_params(A2, MU2, RS2, offs_h2, mask_h2, BLOCK_H2, HAS_ALPHA, HAS_STATS)
        wo = tl.load(WO + offs_h2, mask=mask_h2, other=0.0).to(tl.float32)  # [BH2]
    else:
        wo = tl.load(WO + offs_h1, mask=mask_h1, other=0.0).to(tl.float32)  # [BH1]
    bo = tl.load(BO).to(tl.float32)

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    m_i = tl.full([], float("-inf"), tl.float32)  # running max of the base-2 scores
    l_i = tl.full([], 0.0, tl.float32)  # running sum of exp2(s2 - m_i)
    if SPLIT:
        split = tl.program_id(1)
        start = split * CHUNK
        stop = tl.minimum(start + CHUNK, L)  # (CHUNK a multiple of BLOCK_T: no tile crosses two splits)
    else:
        start = 0
        stop = L
    for t0 in range(start, stop, BLOCK_T):
        offs = t0 + offs_t
        valid = offs < L
        k_in = tl.load(K + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                       mask=valid[:, None] & mask_d[None, :], other=0.0)  # [BT, BD], keys' dtype
        k = k_in.to(tl.float32)
        z1 = tl.dot(_dot_operand(k_in, OPERAND, INTERPRETED), m1, input_precision=DOT_PRECISION)
        z1 += u1[None, :]  # [BT, BH1] fp32
        h = _act_fwd(z1, a1, mu1, rs1, ACT)
        if TWO_LAYERS:
            z2 = tl.dot(_dot_operand(h, OPERAND, INTERPRETED), w2t, input_precision=DOT_PRECISION)
            z2 += b2[None, :]  # [BT, BH2]
            h = _act_fwd(z2, a2, mu2, rs2, ACT)
        s = (tl.sum(h * wo[None, :], axis=1) + bo) * scale  # [BT]
        m_i, l_i, acc, stored = _pool_tile(s, k, valid, m_i, l_i, acc, SOFTMAX)
        tl.store(ATTN + r * T + offs, stored, mask=valid)

    if SPLIT:
        part = r * SPLITS + split
        tl.store(PACC + part * D + offs_d, acc, mask=mask_d)
        if SOFTMAX:
            tl.store(PML + part * 2, m_i)
            tl.store(PML + part * 2 + 1, l_i)
    else:
        if SOFTMAX:
            has_any = L > 0
            l_safe = tl.where(has_any, l_i, 1.0)
            m_safe = tl.where(has_any, m_i, 0.0)
            acc = acc / l_safe
            tl.store(LSE + r, (m_safe + tl.log2(l_safe)) * LN2)
            # the scores written above are re-read by (possibly) other threads of this program
            tl.debug_barrier()
            for t0 in range(0, L, BLOCK_T):
                offs = t0 + offs_t
                valid = offs < L
                s = tl.load(ATTN + r * T + offs, mask=valid, other=0.0)
                tl.store(ATTN + r * T + offs, tl.exp2(s * LOG2E - m_safe) / l_safe, mask=valid)
        tl.store(OUT + r * D + offs_d, acc.to(OUT.dtype.element_ty), mask=mask_d)


@triton.jit
def _din_attention_fwd_merge_kernel(
    PACC, PML,    # [R * SPLITS, D], [R * SPLITS, 2] fp32 from ``_din_attention_fwd_kernel`` with SPLIT
    LENGTHS, OUT, ATTN, LSE,
    C, T, D, CHUNK, SPLITS,
    SOFTMAX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Combine a row's SPLITS partials (grid [R, SPLITS] for softmax, [R, 1] otherwise):

        none:    out_r = sum_j acc_j
        softmax: m = max_j m_j,  l = sum_j l_j 2^(m_j - m),  out_r = sum_j acc_j 2^(m_j - m) / l,
                 lse_r = (m + log2 l) ln 2,  w_t = 2^(s_t log2 e - m) / l   for t in split j's positions
    (base-2 running maxima as the forward keeps them; an empty split has m_j = -inf, l_j = 0 and weighs 0;
    an empty row pools to 0 with lse 0). Program (r, j) normalises split j's scores; (r, 0) writes out and lse.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    r = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    L = tl.minimum(tl.maximum(tl.load(LENGTHS + r // C), 0), T).to(tl.int32)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < SPLITS
    mask_d = offs_d < D
    parts = r * SPLITS + offs_s  # [BS]
    acc = tl.load(PACC + parts[:, None] * D + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :],
                  other=0.0)  # [BS, BD]
    if SOFTMAX:
        m = tl.load(PML + parts * 2, mask=mask_s, other=float("-inf"))
        l = tl.load(PML + parts * 2 + 1, mask=mask_s, other=0.0)
        has_any = L > 0
        m_safe = tl.where(has_any, tl.max(m, axis=0), 0.0)
        weight = tl.exp2(m - m_safe)  # [BS], 0 for an empty split
        l_safe = tl.where(has_any, tl.sum(l * weight, axis=0), 1.0)
        pooled = tl.sum(acc * weight[:, None], axis=0) / l_safe
        if split == 0:
            tl.store(LSE + r, (m_safe + tl.log2(l_safe)) * LN2)
        start = split * CHUNK
        for t0 in range(start, tl.minimum(start + CHUNK, L), BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            valid = offs < L
            s = tl.load(ATTN + r * T + offs, mask=valid, other=0.0)
            tl.store(ATTN + r * T + offs, tl.exp2(s * LOG2E - m_safe) / l_safe, mask=valid)
    else:
        pooled = tl.sum(acc, axis=0)
    if split == 0:
        tl.store(OUT + r * D + offs_d, pooled.to(OUT.dtype.element_ty), mask=mask_d)


@triton.jit
def _din_attention_fwd_candidates_kernel(
    K,            # [B, T, D] keys
    Q,            # [R, D] fp32 candidate rows (R = B * C; row r = b C + c)
    U,            # [R, H1] fp32, u_r (b1 included)
    BASE, WDT,    # [D, H1] fp32 each: (Wb - Wc)^T and Wd^T ("concat")
    W2, B2, WO, BO, A1, MU1, RS1, A2, MU2, RS2, LENGTHS,
    OUT,          # [R, D] pooled output (query dtype)
    ATTN,         # [R, T] fp32 final weights, zero-initialised
    LSE,          # [R] fp32 (softmax only)
    C, T, D, H1, H2, scale,
    stride_kb, stride_kt,
    ACT: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_STATS: tl.constexpr, TWO_LAYERS: tl.constexpr,
    SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """"concat" with several candidates per history: one program per (history b, block of BLOCK_C
    candidates), which reads each key tile once for the whole block. Per tile::

        shared = k @ (Wb - Wc)^T                         (once for the block)
        z1_c = shared + (k * q_c) @ Wd^T + u_c          (= k @ M_c + u_c, for each candidate c of the block)

    then the same layers, scores and online softmax as ``_din_attention_fwd_kernel``, kept per candidate
    ([BLOCK_C] running maxima and sums, [BLOCK_C, BD] pooled sums). The resident tiles are (Wb - Wc)^T and
    Wd^T whatever BLOCK_C: no per-candidate M_c is built or read."""
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * BLOCK_C  # the block's first candidate
    L = tl.minimum(tl.maximum(tl.load(LENGTHS + b), 0), T).to(tl.int32)

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h1 = tl.arange(0, BLOCK_H1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_d = offs_d < D
    mask_h1 = offs_h1 < H1
    mask_c = first + offs_c < C
    rows = b * C + first + offs_c  # [BC]
    OPERAND: tl.constexpr = K.dtype.element_ty
    mask_dh1 = mask_d[:, None] & mask_h1[None, :]
    base = tl.load(BASE + offs_d[:, None] * H1 + offs_h1[None, :], mask=mask_dh1, other=0.0)
    base = _dot_operand(base, OPERAND, INTERPRETED)  # [BD, BH1]
    wdt = tl.load(WDT + offs_d[:, None] * H1 + offs_h1[None, :], mask=mask_dh1, other=0.0)
    wdt = _dot_operand(wdt, OPERAND, INTERPRETED)  # [BD, BH1]
    qs = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :], other=0.0)
    us = tl.load(U + rows[:, None] * H1 + offs_h1[None, :], mask=mask_c[:, None] & mask_h1[None, :], other=0.0)
    a1, mu1, rs1 = _load_act_params(A1, MU1, RS1, offs_h1, mask_h1, BLOCK_H1, HAS_ALPHA, HAS_STATS)
    if TWO_LAYERS:
        offs_h2 = tl.arange(0, BLOCK_H2)
        mask_h2 = offs_h2 < H2
        w2t = tl.load(W2 + offs_h2[None, :] * H1 + offs_h1[:, None],
                      mask=mask_h1[:, None] & mask_h2[None, :], other=0.0)
        w2t = _dot_operand(w2t, OPERAND, INTERPRETED)  # [BH1, BH2]
        b2 = tl.load(B2 + offs_h2, mask=mask_h2, other=0.0).to(tl.float32)
        a2, mu2, rs2 = _load_act_params(A2, MU2, RS2, offs_h2, mask_h2, BLOCK_H2, HAS_ALPHA, HAS_STATS)
        wo = tl.load(WO + offs_h2, mask=mask_h2, other=0.0).to(tl.float32)  # [BH2]
    else:
        wo = tl.load(WO + offs_h1, mask=mask_h1, other=0.0).to(tl.float32)  # [BH1]
    bo = tl.load(BO).to(tl.float32)

    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_C], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        offs = t0 + offs_t
        valid = offs < L
        k_in = tl.load(K + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                       mask=valid[:, None] & mask_d[None, :], other=0.0)  # [BT, BD], read once per block
        k = k_in.to(tl.float32)
        shared = tl.dot(_dot_operand(k_in, OPERAND, INTERPRETED), base, input_precision=DOT_PRECISION)
        for c in tl.static_range(BLOCK_C):
            pick = offs_c == c  # [BC]: this candidate's entry of the block's state
            q_c = tl.sum(tl.where(pick[:, None], qs, 0.0), axis=0)  # [BD]
            u_c = tl.sum(tl.where(pick[:, None], us, 0.0), axis=0)  # [BH1]
            kq = _dot_operand(k * q_c[None, :], OPERAND, INTERPRETED)
            z1 = shared + tl.dot(kq, wdt, input_precision=DOT_PRECISION) + u_c[None, :]  # [BT, BH1]
            h = _act_fwd(z1, a1, mu1, rs1, ACT)
            if TWO_LAYERS:
                z2 = tl.dot(_dot_operand(h, OPERAND, INTERPRETED), w2t, input_precision=DOT_PRECISION)
                z2 += b2[None, :]
                h = _act_fwd(z2, a2, mu2, rs2, ACT)
            s = (tl.sum(h * wo[None, :], axis=1) + bo) * scale  # [BT]
            row = b * C + first + c
            store = valid & (offs * 0 + first + c < C)  # [BT] (a padding candidate of the block stores nothing)
            if SOFTMAX:
                s2 = tl.where(valid, s * LOG2E, float("-inf"))
                m_old = tl.max(tl.where(pick, m_i, float("-inf")), axis=0)
                m_new = tl.maximum(m_old, tl.max(s2, axis=0))
                p = tl.exp2(s2 - m_new)
                correction = tl.exp2(m_old - m_new)
                l_i = tl.where(pick, l_i * correction + tl.sum(p, axis=0), l_i)
                acc = tl.where(pick[:, None], acc * correction + tl.sum(p[:, None] * k, axis=0)[None, :], acc)
                m_i = tl.where(pick, m_new, m_i)
                tl.store(ATTN + row * T + offs, s, mask=store)  # raw scores, normalised below
            else:
                w = tl.where(valid, s, 0.0)
                acc = tl.where(pick[:, None], acc + tl.sum(w[:, None] * k, axis=0)[None, :], acc)
                tl.store(ATTN + row * T + offs, w, mask=store)

    if SOFTMAX:
        has_any = L > 0
        l_safe = tl.where(has_any, l_i, 1.0)  # [BC]
        m_safe = tl.where(has_any, m_i, 0.0)
        acc = acc / l_safe[:, None]
        tl.store(LSE + rows, (m_safe + tl.log2(l_safe)) * LN2, mask=mask_c)
        tl.debug_barrier()  # the scores written above are re-read by (possibly) other threads
        for t0 in range(0, L, BLOCK_T):
            offs = t0 + offs_t
            valid = offs < L
            pointers = ATTN + rows[:, None] * T + offs[None, :]  # [BC, BT]
            both = mask_c[:, None] & valid[None, :]
            s = tl.load(pointers, mask=both, other=0.0)
            tl.store(pointers, tl.exp2(s * LOG2E - m_safe[:, None]) / l_safe[:, None], mask=both)
    tl.store(OUT + rows[:, None] * D + offs_d[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask_c[:, None] & mask_d[None, :])


@triton.jit
def _din_attention_bwd_kernel(
    K, M, U, W2, B2, WO, A1, MU1, RS1, A2, MU2, RS2, LENGTHS,
    ATTN,         # [B, T] fp32 final weights from the forward
    DOUT,         # [B, D] upstream gradient
    DELTA,        # [B] fp32, dout_b . out_b (softmax only)
    DK,           # [B, T, D] keys gradient (keys dtype)
    DM, DU,       # [P, D, H1], [P, H1] fp32: gradients of M_b and u_b (P = B, or B * SPLITS partials)
    DW2, DB2,     # [P, H2, H1], [P, H2] fp32 per-program partials
    DWO, DBO,     # [P, HL], [P] fp32 per-program partials
    DA1, DA2,     # [P, H1], [P, H2] fp32 per-program partials of the prelu / dice alphas
    # (several candidates per history: one launch per candidate, ACCUMULATE from the second on)
    T, D, H1, H2, scale,
    stride_kb, stride_kt,
    CHUNK, SPLITS,  # SPLIT: positions per split (a multiple of BLOCK_T), splits per row
    ACT: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_STATS: tl.constexpr, TWO_LAYERS: tl.constexpr,
    SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    INTERPRETED: tl.constexpr, PASS: tl.constexpr, ACCUMULATE: tl.constexpr, SPLIT: tl.constexpr,
):
    """Recompute the tile's activations and backpropagate, for t < L_b:

        dw_t = dout_b . k_t
        ds_t = scale * dw_t                          (none)
        ds_t = scale * w_t (dw_t - delta_b)          (softmax; delta_b = dout_b . out_b = sum_t w_t dw_t)
        dh_last = ds_t w_out,  [dz2 = act'(z2) dh2,  dW2 += dz2^T h1,  dh1 = dz2 @ W2],  dz1 = act'(z1) dh1
        dk_t = w_t dout_b + dz1_t @ M_b^T,   dM_b = sum_t k_t^T dz1_t,   du_b = sum_t dz1_t
    dk is 0 at padding. Weight and alpha gradients are written per row and summed by the launcher.
    ``ACCUMULATE``: dk and the per-row partials add to what DK, DW2, ... hold (a history's earlier candidates:
    the launcher runs the kernel once per candidate, each reading its candidate's M, u, w and dout rows;
    deterministic, no atomics, no [B, C, T, D] buffer); the padding is left as the first launch wrote it.
    ``PASS`` 0 does all of it; with two layers, 1 only the second layer's and the output layer's gradients
    (dW2, db2, dalpha2, dw_out, db_out) and 2 only the rest (dk, dM, du, dalpha1), so that each holds three
    [64, 128]-sized tiles instead of four (resident M_b and W2, one accumulator): fp32 without TF32 runs
    its products on FMA units, whose operand layouts spilled 2-3 KB per thread in one pass.
    ``SPLIT`` (grid [B, SPLITS]): program (b, j) covers positions [j CHUNK, (j + 1) CHUNK) (dk of those, zeros
    at their padding) and writes its partial dM, du and weight gradients at p = b SPLITS + j; the launcher
    sums the SPLITS partials of a row (``_position_splits``).
    """
    b = tl.program_id(0).to(tl.int64)
    L = tl.minimum(tl.maximum(tl.load(LENGTHS + b), 0), T).to(tl.int32)
    if SPLIT:
        split = tl.program_id(1)
        p = b * SPLITS + split  # this program's partials
        start = split * CHUNK
        stop = tl.minimum(start + CHUNK, L)  # (CHUNK a multiple of BLOCK_T: no tile crosses two splits)
        end = tl.minimum(start + CHUNK, T)  # of the positions whose dk this program writes
    else:
        p = b
        start = 0
        stop = L
        end = T

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h1 = tl.arange(0, BLOCK_H1)
    mask_d = offs_d < D
    mask_h1 = offs_h1 < H1
    mask_dh1 = mask_d[:, None] & mask_h1[None, :]
    OPERAND: tl.constexpr = K.dtype.element_ty  # of every tl.dot (``_dot_operand``), fp32 accumulators
    m1 = tl.load(M + b * D * H1 + offs_d[:, None] * H1 + offs_h1[None, :], mask=mask_dh1, other=0.0)
    m1 = _dot_operand(m1, OPERAND, INTERPRETED)
    u1 = tl.load(U + b * H1 + offs_h1, mask=mask_h1, other=0.0)
    a1, mu1, rs1 = _load_act_params(A1, MU1, RS1, offs_h1, mask_h1, BLOCK_H1, HAS_ALPHA, HAS_STATS)
    if TWO_LAYERS:
        offs_h2 = tl.arange(0, BLOCK_H2)
        mask_h2 = offs_h2 < H2
        mask_h21 = mask_h2[:, None] & mask_h1[None, :]
        w2 = tl.load(W2 + offs_h2[:, None] * H1 + offs_h1[None, :], mask=mask_h21, other=0.0)
        w2 = _dot_operand(w2, OPERAND, INTERPRETED)
        w2t = tl.trans(w2)  # [BH1, BH2]
        b2 = tl.load(B2 + offs_h2, mask=mask_h2, other=0.0).to(tl.float32)
        a2, mu2, rs2 = _load_act_params(A2, MU2, RS2, offs_h2, mask_h2, BLOCK_H2, HAS_ALPHA, HAS_STATS)
        wo = tl.load(WO + offs_h2, mask=mask_h2, other=0.0).to(tl.float32)
        if PASS != 2:
            dw2 = tl.zeros([BLOCK_H2, BLOCK_H1], dtype=tl.float32)
        db2 = tl.zeros([BLOCK_H2], dtype=tl.float32)
        da2 = tl.zeros([BLOCK_H2], dtype=tl.float32)
        dwo = tl.zeros([BLOCK_H2], dtype=tl.float32)
    else:
        wo = tl.load(WO + offs_h1, mask=mask_h1, other=0.0).to(tl.float32)
        dwo = tl.zeros([BLOCK_H1], dtype=tl.float32)
    dout = tl.load(DOUT + b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # [BD]
    if SOFTMAX:
        delta = tl.load(DELTA + b)

    if PASS != 1:
        dm = tl.zeros([BLOCK_D, BLOCK_H1], dtype=tl.float32)
    du = tl.zeros([BLOCK_H1], dtype=tl.float32)
    da1 = tl.zeros([BLOCK_H1], dtype=tl.float32)
    dbo = tl.full([], 0.0, tl.float32)
    for t0 in range(start, stop, BLOCK_T):
        offs = t0 + offs_t
        valid = offs < L
        mask_k = valid[:, None] & mask_d[None, :]
        k_in = tl.load(K + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                       mask=mask_k, other=0.0)  # [BT, BD], keys' dtype
        k = k_in.to(tl.float32)
        k_in = _dot_operand(k_in, OPERAND, INTERPRETED)
        w = tl.load(ATTN + b * T + offs, mask=valid, other=0.0)  # [BT]
        dw = tl.sum(k * dout[None, :], axis=1)
        if SOFTMAX:
            ds = w * (dw - delta)
        else:
            ds = dw
        # zero at padding: every gradient below is then zero there too
        ds = tl.where(valid, ds, 0.0) * scale

        z1 = tl.dot(k_in, m1, input_precision=DOT_PRECISION) + u1[None, :]  # [BT, BH1]
        h1 = _act_fwd(z1, a1, mu1, rs1, ACT)
        if TWO_LAYERS:
            h1_in = _dot_operand(h1, OPERAND, INTERPRETED)
            z2 = tl.dot(h1_in, w2t, input_precision=DOT_PRECISION) + b2[None, :]  # [BT, BH2]
            h2 = _act_fwd(z2, a2, mu2, rs2, ACT)
            dwo += tl.sum(ds[:, None] * h2, axis=0)
            dz2, dalpha2 = _act_bwd(z2, ds[:, None] * wo[None, :], a2, mu2, rs2, ACT)
            da2 += tl.sum(dalpha2, axis=0)
            db2 += tl.sum(dz2, axis=0)
            dz2_in = _dot_operand(dz2, OPERAND, INTERPRETED)
            if PASS != 2:
                dw2 += tl.dot(tl.trans(dz2_in), h1_in, input_precision=DOT_PRECISION)  # [BH2, BH1]
            if PASS != 1:
                dh1 = tl.dot(dz2_in, w2, input_precision=DOT_PRECISION)  # [BT, BH1]
        else:
            dwo += tl.sum(ds[:, None] * h1, axis=0)
            dh1 = ds[:, None] * wo[None, :]
        dbo += tl.sum(ds, axis=0)
        if PASS != 1:
            dz1, dalpha1 = _act_bwd(z1, dh1, a1, mu1, rs1, ACT)
            da1 += tl.sum(dalpha1, axis=0)
            du += tl.sum(dz1, axis=0)
            dz1_in = _dot_operand(dz1, OPERAND, INTERPRETED)
            dm += tl.dot(tl.trans(k_in), dz1_in, input_precision=DOT_PRECISION)  # [BD, BH1]
            dk = w[:, None] * dout[None, :] + tl.dot(dz1_in, tl.trans(m1), input_precision=DOT_PRECISION)
            dk_ptrs = DK + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :]
            if ACCUMULATE:
                dk += tl.load(dk_ptrs, mask=mask_k, other=0.0).to(tl.float32)
            tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=(offs[:, None] < T) & mask_d[None, :])
    if PASS != 1:
        if not ACCUMULATE:
            # padding past the last tile touched above
            pad = tl.cdiv(L, BLOCK_T) * BLOCK_T
            if SPLIT:
                pad = tl.maximum(pad, start)
            for t0 in range(pad, end, BLOCK_T):
                offs = t0 + offs_t
                tl.store(DK + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                         tl.zeros([BLOCK_T, BLOCK_D], dtype=DK.dtype.element_ty),
                         mask=(offs[:, None] < T) & mask_d[None, :])
        tl.store(DM + p * D * H1 + offs_d[:, None] * H1 + offs_h1[None, :], dm, mask=mask_dh1)
        tl.store(DU + p * H1 + offs_h1, du, mask=mask_h1)
        if HAS_ALPHA:
            if ACCUMULATE:
                da1 += tl.load(DA1 + p * H1 + offs_h1, mask=mask_h1, other=0.0)
            tl.store(DA1 + p * H1 + offs_h1, da1, mask=mask_h1)
    if PASS != 2:
        if ACCUMULATE:
            dbo += tl.load(DBO + p)
        tl.store(DBO + p, dbo)
        if TWO_LAYERS:
            if ACCUMULATE:
                dw2 += tl.load(DW2 + p * H2 * H1 + offs_h2[:, None] * H1 + offs_h1[None, :], mask=mask_h21,
                               other=0.0)
                db2 += tl.load(DB2 + p * H2 + offs_h2, mask=mask_h2, other=0.0)
                dwo += tl.load(DWO + p * H2 + offs_h2, mask=mask_h2, other=0.0)
            tl.store(DW2 + p * H2 * H1 + offs_h2[:, None] * H1 + offs_h1[None, :], dw2, mask=mask_h21)
            tl.store(DB2 + p * H2 + offs_h2, db2, mask=mask_h2)
            tl.store(DWO + p * H2 + offs_h2, dwo, mask=mask_h2)
            if HAS_ALPHA:
                if ACCUMULATE:
                    da2 += tl.load(DA2 + p * H2 + offs_h2, mask=mask_h2, other=0.0)
                tl.store(DA2 + p * H2 + offs_h2, da2, mask=mask_h2)
        else:
            if ACCUMULATE:
                dwo += tl.load(DWO + p * H1 + offs_h1, mask=mask_h1, other=0.0)
            tl.store(DWO + p * H1 + offs_h1, dwo, mask=mask_h1)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _hidden_widths(weights: Sequence[Tensor]) -> List[int]:
    return [weights[i].shape[0] for i in range(0, len(weights) - 2, 2)]


def _block(n: int) -> int:
    """Padded tile extent: a power of two >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def fused_supported(keys: Tensor, weights: Sequence[Tensor], dtypes: Sequence[torch.dtype] = _FUSED_DTYPES) -> bool:
    """True when the Triton kernels cover this problem: 1 or 2 hidden layers of width <= 256, D <= 256,
    keys of ``dtypes`` (fp32/fp16/bf16; the Dice-training kernels add fp64), and padded resident tiles
    ``D x H1 + H1 x H2`` of at most 20480 elements (DIN's D=36, (80, 40): 64x128 + 128x64 = 16384). Everything
    else runs the composite path (same API and results)."""
    widths = _hidden_widths(weights)
    dim = keys.shape[2]
    if len(widths) not in (1, 2) or max(widths) > _MAX_FUSED_WIDTH or keys.dtype not in dtypes:
        return False
    if not 0 < dim <= _MAX_FUSED_WIDTH:
        return False
    resident = _block(dim) * _block(widths[0])
    if len(widths) == 2:
        resident += _block(widths[0]) * _block(widths[1])
    return resident <= _MAX_RESIDENT_ELEMENTS


def _block_sizes(seq_len: int, dim: int, widths: Sequence[int], backward: bool = False,
                 dot_precision: str = "tf32", backward_pass: int = 0, *, activation: str = "sigmoid",
                 accumulate: bool = False, split: bool = False, softmax: bool = True, arch: int = 90):
    """(BLOCK_T, BLOCK_D, BLOCK_H1, BLOCK_H2, num_warps). One config per problem (and backward ``PASS``,
    ``_backward_passes``; ``accumulate``: a later candidate's backward launch, ``ACCUMULATE``; ``split``: the
    rows x position-splits form, ``SPLIT``; ``softmax``: ``SOFTMAX``; ``arch``: ``_device_arch``), chosen
    from compiles for sm_90 / sm_80 (``benchmarks/gpu_compile_report.py``): autotuning needs a GPU to
    measure. BLOCK_T does not depend on ``split`` (``_position_splits`` reads it first)."""
    block_d, block_h1 = _block(dim), _block(widths[0])
    block_h2 = _block(widths[1]) if len(widths) == 2 else 16
    widest = max(block_d, block_h1, block_h2)
    # [BT, BH] activation tiles live beside the resident ones; the backward keeps about twice as many
    # (activations and their gradients), so its position tile is halved (sm_90a compile: smem 164 KB at
    # BT=32 -> 151 KB at BT=16 for DIN's shape, fewer spilled registers).
    block_t = 64 if widest <= 64 else 32
    if backward or dot_precision == "ieee":
        # fp32 without TF32 multiplies on FMA units: its forward at 32 positions x 8 warps spilled 15-16 KB
        # on Triton 3.6 (ptxas fell back to 32 registers), none at 16 on 3.6 or 3.9
        block_t //= 2
    block_t = max(16, min(block_t, _block(seq_len)))
    if backward_pass == 2 and dot_precision == "ieee" and _fp32_dot_min_k() <= 8:
        # the two-pass fp32 TF32-off backward's second pass (dk, dM, du: five FMA products a tile, one [BD,
        # BH1] accumulator) at 16 positions spilled 176-192 bytes on sm_90 with Triton 3.9 even without
        # pipelining (``_backward_stages``), none at 8 (144 registers on sm_90, 128 on sm_80). The price is
        # no FMA: each tile re-reads M_b and W2 from shared memory into the FMA operand layout, so per
        # position that pass issues ~45% more shared-memory loads and ~26% more instructions (static SASS
        # counts of the kernel, sm_90: 418 LDS / 2,928 instructions at 8 positions against 575 / 4,656 at
        # 16). A third pass over 16 positions would instead recompute the forward's two products once more
        # (+16 K of the ~64 K FMAs a position costs): more work than the extra loads. Triton 3.6 rejects an
        # fp32 tl.dot with K < 16 (dM's K is the position tile): it keeps 16, pipelined there
        # (``_backward_stages``), which compiles without a spill.
        block_t = 8
    # 8 warps from DIN's 64 x 128 tiles up: compiled for sm_90 / sm_80 (benchmarks/gpu_compile_report.py,
    # RESULTS.md section 9), 4 warps there left ptxas at 32 registers with 35-68 KB spilled for fp32 without
    # TF32 and at 255 registers with 0.3-1.8 KB spilled in every backward; 8 warps spill nothing in the
    # forward, nor in the backward with TF32 or 16-bit inputs (fp32 without TF32: 2.3-2.8 KB in one pass,
    # none in two, unpipelined, the second at 8 positions: ``_backward_passes``)
    num_warps = 4 if block_d * block_h1 < 64 * 128 else 8
    if num_warps == 8 and dot_precision == "ieee" and backward_pass:
        block_t, num_warps = _fma_pass_tile(block_t, seq_len, activation, backward_pass, accumulate, split, arch,
                                            softmax)
    return block_t, block_d, block_h1, block_h2, num_warps


# The fp32 TF32-off backward passes (FMA products) that spilled at 8 warps and compile without a spill at 16,
# as (activation, PASS, ACCUMULATE, SPLIT, sm_90 or later, SOFTMAX): at DIN's shape, Triton 3.9's ptxas
# stopped at 128 or 255 registers and spilled 28-64 bytes (identity's pass 2 with ACCUMULATE 56); at 16
# warps 75-128 registers, none. A register cap (``maxnreg`` 168-255) moved relu's spill without removing it
# (12-388 bytes). The other passes keep 8 warps, where 16 spilled (sigmoid's pass 1: 224 bytes; relu's pass 1
# on sm_90 split or without softmax: 28, none at 8). ptxas near its limit is not monotonic in these knobs:
# every entry is a compile (the ACCUMULATE ones with softmax, as the report compiles several candidates).
# Triton 3.9's choices; Triton before 3.9 has its own (``_fma_pass_tile``).
_FMA_PASSES_AT_16_WARPS = {
    ("relu", 1, False, False, True, True), ("relu", 2, True, False, True, True),
    ("identity", 2, True, False, True, True), ("dice", 2, True, False, False, True),
}


def _fma_pass_tile(block_t: int, seq_len: int, activation: str, backward_pass: int, accumulate: bool,
                   split: bool, arch: int, softmax: bool) -> Tuple[int, int]:
    """(positions a tile, warps) of one pass of the two-pass fp32 TF32-off backward (FMA products) where its
    tiles would run 8 warps (DIN's 64 x 128 and up), by compiler:
    - Triton 3.9: 16 warps for ``_FMA_PASSES_AT_16_WARPS``, 8 otherwise.
    - Triton before 3.9 (``_triton_before_3_9``; pass 2 at 16 positions, pipelined: ``_backward_stages``):
      prelu's pass 1 below sm_90 at 16 warps (at 8: 68-156 bytes spilled at 255 registers, with and without
      softmax, split, ACCUMULATE; at 16: 128 registers, none); sigmoid's and relu's pass 2 with ACCUMULATE
      below sm_90 at 16 warps and 32 positions (at 8 warps 24 / 80-112 bytes, pipelined or not; at 16 warps
      and 16 positions pipelined 1.7 KB; at 16 warps and 32 positions 128 registers, none). 3.9's 16-warp
      entries spill there (relu's pass 1 12 bytes at 16 warps, none at 8; pass 2 with ACCUMULATE pipelined
      at 16 warps 1.2-1.9 KB, none at 8), so they keep 8.
    Compiled at T=200, D=36, hidden (80, 40), every activation, sm_90 and sm_80 (benchmarks/RESULTS.md,
    section 9, 2026-12-02)."""
    if not _triton_before_3_9():
        key = (activation, backward_pass, accumulate, split, arch >= 90, softmax)
        return block_t, (16 if key in _FMA_PASSES_AT_16_WARPS else 8)
    if arch < 90 and activation == "prelu" and backward_pass == 1:
        return block_t, 16
    if arch < 90 and accumulate and backward_pass == 2 and activation in ("sigmoid", "relu"):
        return max(block_t, min(32, _block(seq_len))), 16
    return block_t, 8


def _backward_passes(dtype: torch.dtype, widths: Sequence[int], *, activation: str = "sigmoid",
                     accumulate: bool = False, split: bool = False, arch: int = 90) -> Tuple[int, ...]:
    """The backward kernel's ``PASS`` values, launched in order: two passes over the positions (each
    recomputing the forward) with two hidden layers for
    - fp32 without TF32, whose one-pass form spilled 2.2-2.8 KB per thread on sm_90 / sm_80
      (``benchmarks/gpu_compile_report.py``). The two passes as Triton pipelines them still spilled (pass 1
      1.3-1.5 KB, pass 2 up to 184 bytes on Triton 3.9); unpipelined (``_backward_stages``) and with 8
      positions a tile in pass 2 (``_block_sizes``) neither spills on sm_90 / sm_80 with Triton 3.9
      (benchmarks/RESULTS.md, section 9). Triton 3.6 (16 positions in both): none either with pass 2
      pipelined (``_backward_stages``) and ``_fma_pass_tile``'s tiles;
    - a later candidate's launch (``accumulate``: ACCUMULATE reads dk and the partials back), whose one pass
      spilled 224-460 bytes at 255 registers with TF32 / 16-bit inputs on sm_80 and, Dice, 36 on sm_90;
    - prelu and Dice (``has_alpha``: alpha rows, Dice's statistics) below sm_90 (``arch``), whose one pass
      spilled 8-24 bytes at 255 registers on sm_80 (mma.sync keeps its accumulators in registers);
    - Dice split over positions (``split``, ``SPLIT``): its one pass spilled 24 bytes with 16-bit inputs on
      sm_90 (normalize none);
    - on Triton before 3.9 (``_triton_before_3_9``), also Dice on every architecture (its one pass spilled
      16-24 bytes at 255 registers on sm_90 with TF32 and 16-bit inputs) and fp32 inputs with TF32 below
      sm_90 (one pass: 96-112 bytes at 255 registers on sm_80, every activation; bf16 / fp16 there compile in
      one pass without a spill); in two passes 206-254 registers, none.
    Two passes with TF32 / 16-bit inputs (16 positions, unpipelined): 163-255 registers, no spill. One pass
    otherwise (unpipelined: 183-255 registers, none). The price of two: the forward's two products are
    recomputed once more (about a third more tensor-core work in the backward)."""
    if len(widths) != 2:
        return (0,)
    if (_dot_precision(dtype) == "ieee" or accumulate or (split and activation == "dice")
            or (arch < 90 and activation_spec(activation).has_alpha)):
        return (1, 2)
    if _triton_before_3_9() and (activation == "dice" or (arch < 90 and dtype == torch.float32)):
        return (1, 2)
    return (0,)


def _device_arch(device: torch.device) -> int:
    """The GPU's compute capability as 10 * major + minor (90 for an H100 / H200); 90 off CUDA (the
    interpreter), which runs whatever ``_block_sizes`` / ``_backward_passes`` choose."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _fp32_dot_min_k() -> int:
    """The smallest K this Triton's CUDA backend accepts in an fp32 ``tl.dot`` (8 on Triton 3.9, 16 on
    3.6; 16 when it cannot be read)."""
    try:
        from triton.backends.nvidia.compiler import min_dot_size

        return int(min_dot_size(None)(tl.float32, tl.float32)[2])
    except Exception:  # no triton, another backend layout, another signature: the safe size
        return 16


@functools.lru_cache(maxsize=None)
def _triton_before_3_9() -> bool:
    """True under a Triton older than 3.9, whose compiler takes launch choices of its own (``_fma_pass_tile``,
    ``_backward_passes``, ``_backward_stages``, ``_forward_options``, ``_candidates_forward_options``; the
    Dice-training kernels' ``_stage_configs``). Measured with Triton 3.6.0, the release a stock CUDA image ships: its own PTX,
    assembled for sm_80 and sm_90 by ptxas 12.8 (Triton 3.9: ptxas 12.9 for sm_80, 13.4 for sm_90, both with
    ``--regAllocOptLevel=2``); with 3.9's choices 86 of its 1,024 compiled specialisations spilled 8-240 bytes
    (``make compile-report-triton36``; benchmarks/RESULTS.md, section 9, 2026-12-02). Nothing tells a
    launcher how another compiler allocates registers, so the version is the key; 3.7 and 3.8 were not
    compiled and take 3.6's choices. False without Triton (nothing is compiled)."""
    numbers = re.findall(r"\d+", getattr(triton, "__version__", ""))[:2]
    return len(numbers) == 2 and (int(numbers[0]), int(numbers[1])) < (3, 9)


def _backward_stages(backward_pass: int) -> dict:
    """Launch options of one backward ``PASS`` beyond the block sizes: the two-pass fp32 TF32-off backward
    (``PASS`` 1 and 2) runs its loop unpipelined (``num_stages=1``). Triton's default software pipelining
    prefetches the next key and weight tile through shared memory (cp.async) and kept ptxas at 255 registers
    with 1,284-1,512 bytes spilled in pass 1 (``num_stages`` 2 or 3 alike); unpipelined, pass 1 compiles to
    142-196 registers without a spill on sm_90 / sm_80 (Triton 3.9), and so does pass 2 at 8 positions
    (pipelined there: up to 296 bytes). The price: each tile's key and weight
    loads are no longer in flight during the previous tile's FMAs (about 4 KB a tile of 16 positions against
    ~1,500 FMAs per thread, which the 8 warps' other tiles partly hide). The TF32 / 16-bit one-pass backward
    (``PASS`` 0) too: pipelined (Triton's default, 3 stages) it spilled 24-184 bytes at 255 registers on sm_90
    with Dice and identity (Triton 3.9's own ptxas flags, benchmarks/RESULTS.md section 9); unpipelined none
    (183-255 registers), at the same price.

    Triton before 3.9 (``_triton_before_3_9``) pipelines pass 2 (two stages): there pass 2 runs 16 positions
    (``_fp32_dot_min_k``), where unpipelined Dice's FMA pass 2 spilled 240 bytes at 255 registers on sm_80
    (16 warps: 32-40 bytes); pipelined it takes 207-242 registers, none, and so does every other activation's
    pass 2, TF32 and 16-bit included (compiled at DIN's shape, sm_90 / sm_80). Pass 1 stays unpipelined
    there (pipelined it spilled 1.4-1.7 KB)."""
    if backward_pass == 2 and _triton_before_3_9():
        return dict(num_stages=2)
    return dict(num_stages=1)


# The forward at 8 warps may use 128 registers a thread: two blocks per SM, which its shared memory (fp32
# 80 KB a block) allows anyway. Left to itself ptxas aimed at three (80 registers) and spilled 16-24 bytes
# in fp32 without TF32 on sm_90; capped at 128 it takes 96-128, none (every activation, sm_90 / sm_80).
_FORWARD_MAX_REGISTERS = 128


def _forward_options(num_warps: int, dot_precision: str, arch: int) -> dict:
    """Launch options of ``_din_attention_fwd_kernel`` beyond the block sizes (``_FORWARD_MAX_REGISTERS``),
    and of the Dice-training forward stages (``fused_dice_training._stage_configs``). No cap for fp32
    without TF32 on sm_90 under Triton before 3.9 (``_triton_before_3_9``): there any cap (96-255) made
    ptxas spill 144-272 bytes in that FMA forward (every activation with softmax), while uncapped it takes
    80 registers and none; with TF32 and on sm_80 3.6 wants the cap (uncapped, Dice spilled 16 bytes at
    128 registers with TF32 on sm_90 and 8 at 80 in fp32 on sm_80; capped none)."""
    if num_warps != 8 or (_triton_before_3_9() and dot_precision == "ieee" and arch >= 90):
        return {}
    return dict(maxnreg=_FORWARD_MAX_REGISTERS)


def _candidates_forward_options(activation: str) -> dict:
    """Launch options of ``_din_attention_fwd_candidates_kernel`` beyond the block sizes: none, except sigmoid's
    under Triton before 3.9 (``_triton_before_3_9``), allowed every register a thread has (``maxnreg=255``):
    left to itself Triton 3.6's ptxas settled at 128 registers and spilled 32 bytes with TF32 on sm_90
    (blocks of 2: 24), allowed 255 it takes 247 and none (224: 16 bytes). The other activations compile
    without a spill uncapped (202-204 registers), and Dice capped spilled 16 bytes (224-255). Triton 3.9
    needs no cap (173-255 registers, none)."""
    return dict(maxnreg=255) if _triton_before_3_9() and activation == "sigmoid" else {}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 problems follow torch's own TF32 switch (off by default): the kernel then matches an fp32
    # reference to 1e-5. 16-bit inputs reach tl.dot as they are (bf16/fp16 MMAs, fp32 accumulation; the
    # fp32 activations are rounded to the keys' dtype before each product), where the setting is moot.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _activation_constexprs(activation: str) -> dict:
    """The kernels' activation constexprs: ``ACT`` (which formula), ``HAS_ALPHA``, ``HAS_STATS``."""
    spec = activation_spec(activation)
    if not spec.fused:  # (the plan sends it to the composite path)
        raise ValueError(f"activation={activation!r} has no Triton kernel (activations.ACTIVATION_SPECS)")
    return dict(ACT=spec.code, HAS_ALPHA=spec.has_alpha, HAS_STATS=spec.has_stats)


def _act_params(alphas, dice_eval, eps: float, widths: Sequence[int], dummy: Tensor):
    """Per-layer (alpha [H], mean [H], rsqrt(var + eps) [H]) as contiguous tensors the kernel reads."""
    params = []
    for layer, width in enumerate(widths):
        alpha = alphas[layer].reshape(-1).expand(width).contiguous() if alphas is not None else dummy
        if dice_eval is not None:
            mean, var = dice_eval[layer]
            mean = mean.float().contiguous()
            rstd = torch.rsqrt(var.float() + eps).contiguous()
        else:
            mean = rstd = dummy
        params.append((alpha, mean, rstd))
    if len(params) == 1:
        params.append((dummy, dummy, dummy))
    return params


def attention_forward(query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
                      alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]],
                      eps: float, *, form: str, activation: str, normalize: str, scale: Optional[float]):
    """Fused forward. query [R, D] (R = B * C: C candidate rows per history, row r scoring history r // C),
    keys [B, T, D], lengths [B], validated arguments (``fused_supported``).
    Returns (out [R, D] query dtype, attn [R, T] fp32, lse [R] fp32 or empty)."""
    if not fused_supported(keys, weights):
        raise ValueError("attention_forward: problem outside the fused kernels' coverage (fused_supported)")
    keys, lengths = keys.contiguous(), lengths.to(torch.int64).contiguous()  # no-ops from din_attention
    batch, seq_len, dim = keys.shape
    rows, candidates = query.shape[0], candidates_per_history(query, keys)
    widths = _hidden_widths(weights)
    softmax = normalize == "softmax"
    out = torch.empty(rows, dim, dtype=query.dtype, device=keys.device)
    attn = torch.zeros(rows, seq_len, dtype=torch.float32, device=keys.device)
    lse = torch.zeros(rows if softmax else 0, dtype=torch.float32, device=keys.device)
    if rows == 0:
        return out, attn, lse
    first, q = FirstLayer(weights[0], weights[1], dim, form, torch.float32), query.float()
    u = first.u(q)  # [R, H1]
    weights = [w.contiguous() for w in weights]
    (a1, mu1, rs1), (a2, mu2, rs2) = _act_params(alphas, dice_eval, eps, widths, u)
    two = len(widths) == 2
    w2, b2 = (weights[2], weights[3]) if two else (u, u)
    block_t, block_d, block_h1, block_h2, num_warps = _block_sizes(seq_len, dim, widths,
                                                                   dot_precision=_dot_precision(keys.dtype))
    common = dict(**_activation_constexprs(activation), TWO_LAYERS=two, SOFTMAX=softmax,
                  DOT_PRECISION=_dot_precision(keys.dtype), BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H1=block_h1,
                  BLOCK_H2=block_h2, INTERPRETED=interpreter_enabled(), num_warps=num_warps)
    sizes = (candidates, seq_len, dim, widths[0], widths[1] if two else 1, 1.0 if scale is None else float(scale),
             keys.stride(0), keys.stride(1))
    # Several candidates ("concat"): each key tile read once per block of candidates. Not for fp32 without
    # TF32, whose FMA products spilled 11-46 KB per thread in that kernel (sm_80 / sm_90 compiles,
    # benchmarks/gpu_compile_report.py; none with TF32 or 16-bit inputs): it runs a program per candidate.
    if form == "concat" and candidates > 1 and _dot_precision(keys.dtype) != "ieee":
        block_c = _candidate_block(candidates, activation)
        _din_attention_fwd_candidates_kernel[(batch, triton.cdiv(candidates, block_c))](
            keys, q.contiguous(), u, first.m_base, first.wd_t, w2, b2, weights[-2], weights[-1],
            a1, mu1, rs1, a2, mu2, rs2, lengths, out, attn, lse, *sizes, BLOCK_C=block_c, **common,
            **_candidates_forward_options(activation))
        return out, attn, lse
    m = first.m(q)  # [R, D, H1] row-major (the layout the kernel reads)
    split = _position_splits(rows, seq_len, block_t, keys.device)
    options = _forward_options(num_warps, _dot_precision(keys.dtype), _device_arch(keys.device))
    if split is None:
        _din_attention_fwd_kernel[(rows,)](
            keys, m, u, w2, b2, weights[-2], weights[-1], a1, mu1, rs1, a2, mu2, rs2, lengths,
            out, attn, lse, u, u, *sizes, seq_len, 1, SPLIT=False, **common, **options)
        return out, attn, lse
    # rows x position splits, then a merge (``_position_splits``: too few rows to fill the GPU)
    splits, chunk = split
    pacc = torch.empty(rows * splits, dim, dtype=torch.float32, device=keys.device)
    pml = torch.empty(rows * splits * 2 if softmax else 0, dtype=torch.float32, device=keys.device)
    _din_attention_fwd_kernel[(rows, splits)](
        keys, m, u, w2, b2, weights[-2], weights[-1], a1, mu1, rs1, a2, mu2, rs2, lengths,
        out, attn, lse, pacc, pml if softmax else pacc, *sizes, chunk, splits, SPLIT=True, **common, **options)
    _din_attention_fwd_merge_kernel[(rows, splits if softmax else 1)](
        pacc, pml if softmax else pacc, lengths, out, attn, lse, candidates, seq_len, dim, chunk, splits,
        SOFTMAX=softmax, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
        num_warps=_MERGE_NUM_WARPS)
    return out, attn, lse


# Position splits (``_position_splits``): wanted programs per SM, and the fewest positions a split covers.
_SPLIT_PROGRAMS_PER_SM = 4
_SPLIT_MIN_POSITIONS = 32
_MERGE_NUM_WARPS = 4  # the merge kernel's: a few [SPLITS, D] partials and one pass over the row's scores
_forced_splits: Optional[int] = None  # the testing hook (``din_kernels.testing.force_position_splits``)


def _position_splits(programs: int, seq_len: int, block_t: int,
                     device: torch.device) -> Optional[Tuple[int, int]]:
    """(splits, positions per split) of a kernel launched once per row (``programs`` of them) over ``seq_len``
    positions in tiles of ``block_t``, or None: no split. None unless the rows are fewer than
    ``_SPLIT_PROGRAMS_PER_SM`` programs per SM (B = 256 on 132 SMs: 256 programs, under two waves of the
    forward's two resident blocks per SM, two of the backward's one) and T holds two splits of about
    ``_SPLIT_MIN_POSITIONS`` positions or more (T = 50: 2, T = 200: up to 6); then enough splits to reach that
    count (B = 256, T = 200: 3). Splits are whole tiles (no tile crosses two splits). Each split re-reads the
    row's resident tiles (M_b, W2: L2 hits after the first) and its partials go through a merge (forward) or
    a sum (backward): cheap beside ~32 positions of MLP work. Under the interpreter (programs run one after
    another) only the testing hook splits: it asks for ``_forced_splits`` splits (as many as whole tiles
    allow, one at least) whatever the rows."""
    if _forced_splits is not None:
        wanted = _forced_splits
    elif device.type != "cuda":
        return None
    else:
        target = _SPLIT_PROGRAMS_PER_SM * sm_count(device)
        wanted = 1 if programs >= target else min(triton.cdiv(target, max(programs, 1)),
                                                   (seq_len + _SPLIT_MIN_POSITIONS // 2) // _SPLIT_MIN_POSITIONS)
        if wanted <= 1 or seq_len <= block_t:
            return None
    chunk = triton.cdiv(triton.cdiv(max(seq_len, 1), max(wanted, 1)), block_t) * block_t
    return triton.cdiv(max(seq_len, 1), chunk), chunk


def _candidate_block(candidates: int, activation: str = "sigmoid") -> int:
    """Candidates per program of ``_din_attention_fwd_candidates_kernel``: 2 or 4 (its per-candidate work is
    unrolled; 4 keeps the code and the [BLOCK_C, BD] state small). Dice (alpha and statistics rows live
    beside the block's state): 2, whose 4 spilled 40 bytes at 255 registers with TF32 on sm_90 (2: 204-211
    registers, none)."""
    return 2 if candidates <= 2 or activation == "dice" else 4


def attention_backward(grad_out: Tensor, query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
                       alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]],
                       eps: float, out: Tensor, attn: Tensor, lse: Tensor, *, form: str, activation: str,
                       normalize: str, scale: Optional[float]):
    """Fused backward: (dquery [R, D], dkeys [B, T, D], dweights like weights, dalphas like alphas or None)."""
    if not fused_supported(keys, weights):
        raise ValueError("attention_backward: problem outside the fused kernels' coverage (fused_supported)")
    keys, lengths = keys.contiguous(), lengths.to(torch.int64).contiguous()
    batch, seq_len, dim = keys.shape
    rows, candidates = query.shape[0], candidates_per_history(query, keys)
    widths = _hidden_widths(weights)
    two = len(widths) == 2
    softmax = normalize == "softmax"
    device, f32 = keys.device, torch.float32
    h1, h2 = widths[0], (widths[1] if two else 1)
    width_last = widths[-1]
    dot_precision, arch = _dot_precision(keys.dtype), _device_arch(device)
    def launches(split: bool):
        """(PASS, block sizes) of each launch: the first candidate's, and the later ones' (ACCUMULATE)."""
        return {accumulate: [(bp, _block_sizes(seq_len, dim, widths, backward=True, dot_precision=dot_precision,
                                               backward_pass=bp, activation=activation, accumulate=accumulate,
                                               split=split, softmax=softmax, arch=arch))
                             for bp in _backward_passes(keys.dtype, widths, activation=activation,
                                                        accumulate=accumulate, split=split, arch=arch)]
                for accumulate in ((False, True) if candidates > 1 else (False,))}

    # one split for every launch: whole tiles of each (their BLOCK_T are powers of two)
    split = _position_splits(batch, seq_len, max(config[0] for runs in launches(False).values()
                                                 for _, config in runs), device)
    runs_of = launches(split is not None)
    splits, chunk = split if split is not None else (1, seq_len)
    parts = batch * splits  # per-program partials of dM, du and the weight gradients, B * SPLITS
    dkeys = torch.empty_like(keys)
    dm = torch.empty(rows, dim, h1, dtype=f32, device=device)
    du = torch.empty(rows, h1, dtype=f32, device=device)
    dw2 = torch.empty(parts, h2, h1, dtype=f32, device=device) if two else du
    db2 = torch.empty(parts, h2, dtype=f32, device=device) if two else du
    dwo = torch.empty(parts, width_last, dtype=f32, device=device)
    dbo = torch.empty(parts, dtype=f32, device=device)
    has_alpha = activation_spec(activation).has_alpha
    da1 = torch.empty(parts, h1, dtype=f32, device=device) if has_alpha else du
    da2 = torch.empty(parts, h2, dtype=f32, device=device) if has_alpha and two else du
    first, q = FirstLayer(weights[0], weights[1], dim, form, torch.float32), query.float()
    if rows > 0:
        grad_out = grad_out.contiguous()
        u, m = first.u(q), first.m(q)
        weights = [w.contiguous() for w in weights]
        (a1, mu1, rs1), (a2, mu2, rs2) = _act_params(alphas, dice_eval, eps, widths, u)
        w2, b2 = (weights[2], weights[3]) if two else (u, u)
        delta = (grad_out.float() * out.float()).sum(-1) if softmax else u  # [R]
        for c in range(candidates):
            # candidate c of every history: its rows b * C + c (the whole of them for C = 1, no copy)
            pick = (lambda t: t) if candidates == 1 else (lambda t: t.view(batch, candidates, *t.shape[1:])[:, c]
                                                          .contiguous())
            direct = candidates == 1 and splits == 1
            dm_c, du_c = (dm, du) if direct else (dm.new_empty(parts, dim, h1), du.new_empty(parts, h1))
            for backward_pass, (block_t, block_d, block_h1, block_h2, num_warps) in runs_of[c > 0]:
                _din_attention_bwd_kernel[(batch, splits)](
                    keys, pick(m), pick(u), w2, b2, weights[-2], a1, mu1, rs1, a2, mu2, rs2, lengths,
                    pick(attn), pick(grad_out), pick(delta) if softmax else delta, dkeys, dm_c, du_c,
                    dw2, db2, dwo, dbo, da1, da2,
                    seq_len, dim, h1, h2, 1.0 if scale is None else float(scale),
                    keys.stride(0), keys.stride(1), chunk, splits,
                    **_activation_constexprs(activation), TWO_LAYERS=two, SOFTMAX=softmax,
                    DOT_PRECISION=dot_precision,
                    BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H1=block_h1, BLOCK_H2=block_h2,
                    INTERPRETED=interpreter_enabled(), PASS=backward_pass, ACCUMULATE=c > 0,
                    SPLIT=split is not None, num_warps=num_warps, **_backward_stages(backward_pass),
                )
            if not direct:
                # a row's split partials summed once (a view, no copy, when there is one split)
                dm.view(batch, candidates, dim, h1)[:, c] = dm_c.view(batch, splits, dim, h1).sum(1)
                du.view(batch, candidates, h1)[:, c] = du_c.view(batch, splits, h1).sum(1)
    else:
        for buffer in (dkeys, dm, du, dw2, db2, dwo, dbo, da1, da2):
            buffer.zero_()
    dquery, dw1, db1 = first.row_grads(q, du, dm, weights[0], weights[1], m_sums=dm_reduction())
    grads = [dw1, db1]
    if two:
        grads += [dw2.sum(0), db2.sum(0)]
    grads += [dwo.sum(0)[None, :], dbo.sum(0, keepdim=True)]
    dweights = tuple(g.to(w.dtype) for g, w in zip(grads, weights))
    dalphas = None
    if has_alpha:
        partials = [da1, da2][:len(widths)]
        # a shared slope (one entry) gets the sum over its units
        dalphas = tuple((p.sum(0) if a.numel() > 1 else p.sum()).reshape(a.shape).to(a.dtype)
                        for p, a in zip(partials, alphas))
    return dquery.to(query.dtype), dkeys, dweights, dalphas
