"""Local activation unit (DIN's attention): fused Triton kernels, launchers, custom op and autograd.Function,
functional, module.

``out_b = sum_t w[b, t] * k[b, t]``, with ``w`` scored by a small MLP over features of the candidate
``q_b`` and each behaviour ``k[b, t]`` (``reference.din_attention`` fixes the semantics).

The first layer is split by input block (DESIGN.md, "Kernel design"), so the ``[B, T, 4D]`` (or
``[B, T, 2D + D^2]``) feature tensor never exists::

    concat, W1 = [Wa | Wb | Wc | Wd]:  z1[b, t] = u_b + k[b, t] @ M_b
        u_b = q_b @ (Wa + Wc)^T + b1                      # [H1]
        M_b = (Wb - Wc)^T + diag(q_b) @ Wd^T              # [D, H1]
    outer,  W1 = [Wq | Wk | Wo], Wo[h, a, c] at a*D + c:
        u_b = q_b @ Wq^T + b1,  M_b = Wk^T + sum_a q_b[a] * Wo[:, a, :]^T

``u`` and ``M`` (``O(B*D*H1)``) come from torch; the kernels do the ``O(B*T*D*H)`` work: one program per
batch row loops over its valid positions in tiles, recomputes the MLP, and never stores anything of size
``[B, T, H]``. The backward kernel recomputes the activations and returns per-row ``dM_b``/``du_b`` and
per-row weight-gradient partials that torch reduces afterwards (deterministic, no atomics).

Paths (``_launchers``): the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``) for 1 or
2 hidden layers of width <= 256 and ``D <= 256`` whose resident tiles fit (``fused_supported``), in
fp32/fp16/bf16; on CPU otherwise the C++ op (``attention_cpu.py``: one parallel region per call, robust
when other processes share the cores) where it is built, else the torch composite path (same algebra,
hand-written backward, ``attention_torch.py``), or for small problems in eager mode its autograd variant
``attention_torch_small``, which with ``din_kernels.dice`` also runs Dice in training mode.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import reference
from ._backend import get_backend, interpreter_enabled, select_path, use_cpu_extension
from . import attention_torch
from .attention_cpu import attention_cpu_backward, attention_cpu_forward
from .attention_torch import attention_torch_backward, attention_torch_forward, attention_torch_small
from ._checks import ACTIVATIONS, FORMS, NORMALIZATIONS, check_attention_args, check_choice
from .activations import activation_spec
from ._dtypes import accumulation_dtype
from .dice import Dice

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional (setup.py): without it only the composite path runs
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = None

Tensor = torch.Tensor
_log = logging.getLogger("din_kernels")

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
        dz = dh
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
    M,            # [B, D, H1] fp32, M_b
    U,            # [B, H1] fp32, u_b (b1 included)
    W2, B2,       # [H2, H1], [H2] (second hidden layer; unused with one layer)
    WO, BO,       # [HL] (output layer row), [1]
    A1, MU1, RS1,  # [H1] alpha, dice running mean, dice rsqrt(running var + eps)
    A2, MU2, RS2,  # [H2]
    LENGTHS,      # [B] int64
    OUT,          # [B, D] pooled output (query dtype)
    ATTN,         # [B, T] fp32 final weights, zero-initialised
    LSE,          # [B] fp32 (softmax only)
    T, D, H1, H2, scale,
    stride_kb, stride_kt,
    ACT: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_STATS: tl.constexpr, TWO_LAYERS: tl.constexpr, SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """One program per batch row b, looping over its valid positions t < L_b in tiles:

        z1 = k @ M_b + u_b,  h1 = act(z1),  [z2 = h1 @ W2^T + b2,  h2 = act(z2)],
        s_t = (h_last @ w_out + b_out) * scale
        none:    w_t = s_t,                        out_b = sum_t w_t k_t
        softmax: w_t = exp(s_t - lse_b),           out_b = sum_t w_t k_t   (online softmax, base 2)
    ATTN holds w (0 at padding); LSE holds lse_b = log sum_{t < L_b} exp(s_t) (0 for an empty row).
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    b = tl.program_id(0).to(tl.int64)
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
    m1 = tl.load(M + b * D * H1 + offs_d[:, None] * H1 + offs_h1[None, :],
                 mask=mask_d[:, None] & mask_h1[None, :], other=0.0)
    m1 = _dot_operand(m1, OPERAND, INTERPRETED)  # [BD, BH1]
    u1 = tl.load(U + b * H1 + offs_h1, mask=mask_h1, other=0.0)  # [BH1]
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
    for t0 in range(0, L, BLOCK_T):
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
        if SOFTMAX:
            s2 = tl.where(valid, s * LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s2, axis=0))
            p = tl.exp2(s2 - m_new)
            correction = tl.exp2(m_i - m_new)
            l_i = l_i * correction + tl.sum(p, axis=0)
            acc = acc * correction + tl.sum(p[:, None] * k, axis=0)
            m_i = m_new
            # raw scores for now; normalised by the second pass below
            tl.store(ATTN + b * T + offs, s, mask=valid)
        else:
            w = tl.where(valid, s, 0.0)
            acc += tl.sum(w[:, None] * k, axis=0)
            tl.store(ATTN + b * T + offs, w, mask=valid)

    if SOFTMAX:
        has_any = L > 0
        l_safe = tl.where(has_any, l_i, 1.0)
        m_safe = tl.where(has_any, m_i, 0.0)
        acc = acc / l_safe
        tl.store(LSE + b, (m_safe + tl.log2(l_safe)) * LN2)
        # the scores written above are re-read by (possibly) other threads of this program
        tl.debug_barrier()
        for t0 in range(0, L, BLOCK_T):
            offs = t0 + offs_t
            valid = offs < L
            s = tl.load(ATTN + b * T + offs, mask=valid, other=0.0)
            tl.store(ATTN + b * T + offs, tl.exp2(s * LOG2E - m_safe) / l_safe, mask=valid)
    tl.store(OUT + b * D + offs_d, acc.to(OUT.dtype.element_ty), mask=mask_d)


@triton.jit
def _din_attention_bwd_kernel(
    K, M, U, W2, B2, WO, A1, MU1, RS1, A2, MU2, RS2, LENGTHS,
    ATTN,         # [B, T] fp32 final weights from the forward
    DOUT,         # [B, D] upstream gradient
    DELTA,        # [B] fp32, dout_b . out_b (softmax only)
    DK,           # [B, T, D] keys gradient (keys dtype)
    DM, DU,       # [B, D, H1], [B, H1] fp32: gradients of M_b and u_b
    DW2, DB2,     # [B, H2, H1], [B, H2] fp32 per-row partials
    DWO, DBO,     # [B, HL], [B] fp32 per-row partials
    DA1, DA2,     # [B, H1], [B, H2] fp32 per-row partials of the prelu / dice alphas
    T, D, H1, H2, scale,
    stride_kb, stride_kt,
    ACT: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_STATS: tl.constexpr, TWO_LAYERS: tl.constexpr, SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    INTERPRETED: tl.constexpr, PASS: tl.constexpr,
):
    """Recompute the tile's activations and backpropagate, for t < L_b:

        dw_t = dout_b . k_t
        ds_t = scale * dw_t                          (none)
        ds_t = scale * w_t (dw_t - delta_b)          (softmax; delta_b = dout_b . out_b = sum_t w_t dw_t)
        dh_last = ds_t w_out,  [dz2 = act'(z2) dh2,  dW2 += dz2^T h1,  dh1 = dz2 @ W2],  dz1 = act'(z1) dh1
        dk_t = w_t dout_b + dz1_t @ M_b^T,   dM_b = sum_t k_t^T dz1_t,   du_b = sum_t dz1_t
    dk is 0 at padding. Weight and alpha gradients are written per row and summed by the launcher.
    ``PASS`` 0 does all of it; with two layers, 1 only the second layer's and the output layer's gradients
    (dW2, db2, dalpha2, dw_out, db_out) and 2 only the rest (dk, dM, du, dalpha1), so that each holds three
    [64, 128]-sized tiles instead of four (resident M_b and W2, one accumulator): fp32 without TF32 runs
    its products on FMA units, whose operand layouts spilled 2-3 KB per thread in one pass.
    """
    b = tl.program_id(0).to(tl.int64)
    L = tl.minimum(tl.maximum(tl.load(LENGTHS + b), 0), T).to(tl.int32)

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
    for t0 in range(0, L, BLOCK_T):
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
            tl.store(DK + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                     dk.to(DK.dtype.element_ty), mask=(offs[:, None] < T) & mask_d[None, :])
    if PASS != 1:
        # padding past the last tile touched above
        for t0 in range(tl.cdiv(L, BLOCK_T) * BLOCK_T, T, BLOCK_T):
            offs = t0 + offs_t
            tl.store(DK + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                     tl.zeros([BLOCK_T, BLOCK_D], dtype=DK.dtype.element_ty),
                     mask=(offs[:, None] < T) & mask_d[None, :])
        tl.store(DM + b * D * H1 + offs_d[:, None] * H1 + offs_h1[None, :], dm, mask=mask_dh1)
        tl.store(DU + b * H1 + offs_h1, du, mask=mask_h1)
        if HAS_ALPHA:
            tl.store(DA1 + b * H1 + offs_h1, da1, mask=mask_h1)
    if PASS != 2:
        tl.store(DBO + b, dbo)
        if TWO_LAYERS:
            tl.store(DW2 + b * H2 * H1 + offs_h2[:, None] * H1 + offs_h1[None, :], dw2, mask=mask_h21)
            tl.store(DB2 + b * H2 + offs_h2, db2, mask=mask_h2)
            tl.store(DWO + b * H2 + offs_h2, dwo, mask=mask_h2)
            if HAS_ALPHA:
                tl.store(DA2 + b * H2 + offs_h2, da2, mask=mask_h2)
        else:
            tl.store(DWO + b * H1 + offs_h1, dwo, mask=mask_h1)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _hidden_widths(weights: Sequence[Tensor]) -> List[int]:
    return [weights[i].shape[0] for i in range(0, len(weights) - 2, 2)]


def _block(n: int) -> int:
    """Padded tile extent: a power of two >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def fused_supported(keys: Tensor, weights: Sequence[Tensor]) -> bool:
    """True when the Triton kernels cover this problem: 1 or 2 hidden layers of width <= 256, D <= 256,
    fp32/fp16/bf16 keys, and padded resident tiles ``D x H1 + H1 x H2`` of at most 20480 elements (DIN's
    D=36, (80, 40): 64x128 + 128x64 = 16384). Everything else runs the composite path (same API and results)."""
    widths = _hidden_widths(weights)
    dim = keys.shape[2]
    if len(widths) not in (1, 2) or max(widths) > _MAX_FUSED_WIDTH or keys.dtype not in _FUSED_DTYPES:
        return False
    if not 0 < dim <= _MAX_FUSED_WIDTH:
        return False
    resident = _block(dim) * _block(widths[0])
    if len(widths) == 2:
        resident += _block(widths[0]) * _block(widths[1])
    return resident <= _MAX_RESIDENT_ELEMENTS


def _block_sizes(seq_len: int, dim: int, widths: Sequence[int], backward: bool = False,
                 dot_precision: str = "tf32"):
    """(BLOCK_T, BLOCK_D, BLOCK_H1, BLOCK_H2, num_warps). One config per problem, chosen from compiles for
    sm_90 / sm_80 (``benchmarks/gpu_compile_report.py``): autotuning needs a GPU to measure."""
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
    # 8 warps from DIN's 64 x 128 tiles up: compiled for sm_90 / sm_80 (benchmarks/gpu_compile_report.py,
    # RESULTS.md section 9), 4 warps there left ptxas at 32 registers with 35-68 KB spilled for fp32 without
    # TF32 and at 255 registers with 0.3-1.8 KB spilled in every backward; 8 warps spill nothing in the
    # forward, nor in the backward with TF32 or 16-bit inputs (fp32 without TF32: 2.3-2.8 KB)
    num_warps = 4 if block_d * block_h1 < 64 * 128 else 8
    return block_t, block_d, block_h1, block_h2, num_warps


def _backward_passes(dtype: torch.dtype, widths: Sequence[int]) -> Tuple[int, ...]:
    """The backward kernel's ``PASS`` values, launched in order: two passes over the positions (each
    recomputing the forward) for fp32 without TF32 and two hidden layers, whose one-pass form spilled
    2.2-2.8 KB per thread on sm_90 / sm_80 (``benchmarks/gpu_compile_report.py``); one pass otherwise."""
    return (1, 2) if _dot_precision(dtype) == "ieee" and len(widths) == 2 else (0,)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 problems follow torch's own TF32 switch (off by default): the kernel then matches an fp32
    # reference to 1e-5. 16-bit inputs reach tl.dot as they are (bf16/fp16 MMAs, fp32 accumulation; the
    # fp32 activations are rounded to the keys' dtype before each product), where the setting is moot.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _first_layer(query: Tensor, w1: Tensor, b1: Tensor, form: str) -> Tuple[Tensor, Tensor]:
    """``u`` [B, H1] and ``M`` [B, D, H1] in fp32 (see the module docstring), ``M`` written directly in the
    row-major layout the kernels read (built from transposed weight views it came out [B, D, H1] with
    strides (D H1, 1, D) and took a second full copy: ~210 MB a call at B=2048, T=200, D=64)."""
    batch, dim = query.shape
    first = attention_torch._FirstLayer(w1, b1, dim, form, torch.float32)  # the split, in one home
    q = query.float()
    u = torch.addmm(first.b1, q, first.w_u.t())  # [B, H1]
    if form == "concat":
        m = torch.addcmul(first.m_base, q[:, :, None], first.wd_t)  # (Wb-Wc)^T + diag(q_b) Wd^T
    else:
        m = torch.addmm(first.m_base.reshape(1, -1), q, first.wo_p).view(batch, dim, first.hidden)
    return u, m


def _first_layer_backward(query: Tensor, w1: Tensor, du: Tensor, dm: Tensor, form: str):
    """(dquery fp32, dw1 fp32, db1 fp32) from du [B, H1] and dM [B, D, H1]."""
    dim = query.shape[1]
    q, w1 = query.float(), w1.float()
    dm_sum_t = dm.sum(0).t()  # [H1, D]
    if form == "concat":
        wa, wb, wc, wd = w1.split(dim, dim=1)
        dwa = du.t() @ q  # also dWc's u part: u depends on Wa + Wc
        dwd = torch.einsum("bdh,bd->hd", dm, q)
        dw1 = torch.cat([dwa, dm_sum_t, dwa - dm_sum_t, dwd], dim=1)
        dq = du @ (wa + wc) + torch.einsum("bdh,hd->bd", dm, wd)
    else:
        wq = w1[:, :dim]
        wo = w1[:, 2 * dim:].reshape(-1, dim, dim)
        dwo = torch.einsum("ba,bch->hac", q, dm).reshape(w1.shape[0], dim * dim)
        dw1 = torch.cat([du.t() @ q, dm_sum_t, dwo], dim=1)
        dq = du @ wq + torch.einsum("bch,hac->ba", dm, wo)
    return dq, dw1, du.sum(0)


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
    """Fused forward. query [B, D], keys [B, T, D], lengths [B], validated arguments (``fused_supported``).
    Returns (out [B, D] query dtype, attn [B, T] fp32, lse [B] fp32 or empty)."""
    if not fused_supported(keys, weights):
        raise ValueError("attention_forward: problem outside the fused kernels' coverage (fused_supported)")
    keys, lengths = keys.contiguous(), lengths.to(torch.int64).contiguous()  # no-ops from din_attention
    batch, seq_len, dim = keys.shape
    widths = _hidden_widths(weights)
    softmax = normalize == "softmax"
    out = torch.empty(batch, dim, dtype=query.dtype, device=keys.device)
    attn = torch.zeros(batch, seq_len, dtype=torch.float32, device=keys.device)
    lse = torch.zeros(batch if softmax else 0, dtype=torch.float32, device=keys.device)
    if batch == 0:
        return out, attn, lse
    u, m = _first_layer(query, weights[0], weights[1], form)
    weights = [w.contiguous() for w in weights]
    (a1, mu1, rs1), (a2, mu2, rs2) = _act_params(alphas, dice_eval, eps, widths, u)
    two = len(widths) == 2
    w2, b2 = (weights[2], weights[3]) if two else (u, u)
    block_t, block_d, block_h1, block_h2, num_warps = _block_sizes(seq_len, dim, widths,
                                                                   dot_precision=_dot_precision(keys.dtype))
    _din_attention_fwd_kernel[(batch,)](
        keys, m, u, w2, b2, weights[-2], weights[-1], a1, mu1, rs1, a2, mu2, rs2, lengths,
        out, attn, lse,
        seq_len, dim, widths[0], widths[1] if two else 1, 1.0 if scale is None else float(scale),
        keys.stride(0), keys.stride(1),
        **_activation_constexprs(activation), TWO_LAYERS=two, SOFTMAX=softmax,
        DOT_PRECISION=_dot_precision(keys.dtype),
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H1=block_h1, BLOCK_H2=block_h2,
        INTERPRETED=interpreter_enabled(), num_warps=num_warps,
    )
    return out, attn, lse


def attention_backward(grad_out: Tensor, query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
                       alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]],
                       eps: float, out: Tensor, attn: Tensor, lse: Tensor, *, form: str, activation: str,
                       normalize: str, scale: Optional[float]):
    """Fused backward: (dquery [B, D], dkeys [B, T, D], dweights like weights, dalphas like alphas or None)."""
    if not fused_supported(keys, weights):
        raise ValueError("attention_backward: problem outside the fused kernels' coverage (fused_supported)")
    keys, lengths = keys.contiguous(), lengths.to(torch.int64).contiguous()
    batch, seq_len, dim = keys.shape
    widths = _hidden_widths(weights)
    two = len(widths) == 2
    softmax = normalize == "softmax"
    device, f32 = keys.device, torch.float32
    h1, h2 = widths[0], (widths[1] if two else 1)
    width_last = widths[-1]
    dkeys = torch.empty_like(keys)
    dm = torch.empty(batch, dim, h1, dtype=f32, device=device)
    du = torch.empty(batch, h1, dtype=f32, device=device)
    dw2 = torch.empty(batch, h2, h1, dtype=f32, device=device) if two else du
    db2 = torch.empty(batch, h2, dtype=f32, device=device) if two else du
    dwo = torch.empty(batch, width_last, dtype=f32, device=device)
    dbo = torch.empty(batch, dtype=f32, device=device)
    has_alpha = activation_spec(activation).has_alpha
    da1 = torch.empty(batch, h1, dtype=f32, device=device) if has_alpha else du
    da2 = torch.empty(batch, h2, dtype=f32, device=device) if has_alpha and two else du
    if batch > 0:
        grad_out = grad_out.contiguous()
        u, m = _first_layer(query, weights[0], weights[1], form)
        weights = [w.contiguous() for w in weights]
        (a1, mu1, rs1), (a2, mu2, rs2) = _act_params(alphas, dice_eval, eps, widths, u)
        w2, b2 = (weights[2], weights[3]) if two else (u, u)
        delta = (grad_out.float() * out.float()).sum(-1) if softmax else u  # [B]
        block_t, block_d, block_h1, block_h2, num_warps = _block_sizes(seq_len, dim, widths, backward=True,
                                                                       dot_precision=_dot_precision(keys.dtype))
        for backward_pass in _backward_passes(keys.dtype, widths):
            _din_attention_bwd_kernel[(batch,)](
                keys, m, u, w2, b2, weights[-2], a1, mu1, rs1, a2, mu2, rs2, lengths,
                attn, grad_out, delta, dkeys, dm, du, dw2, db2, dwo, dbo, da1, da2,
                seq_len, dim, h1, h2, 1.0 if scale is None else float(scale),
                keys.stride(0), keys.stride(1),
                **_activation_constexprs(activation), TWO_LAYERS=two, SOFTMAX=softmax,
                DOT_PRECISION=_dot_precision(keys.dtype),
                BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H1=block_h1, BLOCK_H2=block_h2,
                INTERPRETED=interpreter_enabled(), PASS=backward_pass, num_warps=num_warps,
            )
    else:
        for buffer in (dm, du, dw2, db2, dwo, dbo, da1, da2):
            buffer.zero_()
    dquery, dw1, db1 = _first_layer_backward(query, weights[0], du, dm, form)
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


# ----------------------------------------------------------------------------------------------------------
# Custom op: picks the Triton or the composite launchers; autograd through the matching backward
# ----------------------------------------------------------------------------------------------------------

def _launchers_and_reason(keys: Tensor, weights: Sequence[Tensor], activation: str = "sigmoid"):
    """(forward, backward, path, reason) for this problem; every path honours one contract. CPU problems the
    Triton kernels do not take (under the interpreter: shapes beyond ``fused_supported``) run the C++ op;
    an activation without fused kernels (``ActivationSpec.fused``) the composite path."""
    if not activation_spec(activation).fused:
        return (attention_torch_forward, attention_torch_backward, "composite",
                f"the torch composite path: activation {activation!r} has no fused kernels")
    path = select_path(keys, cpp=True)
    triton_wanted = path == "triton"
    if triton_wanted and fused_supported(keys, weights):
        where = "CUDA" if keys.is_cuda else "the Triton interpreter"
        return attention_forward, attention_backward, "triton", f"fused Triton kernels on {where}"
    outside = (" (outside the fused kernels' coverage: 1-2 hidden layers of width <= 256, D <= 256, "
               "fp32/fp16/bf16, resident tiles <= 20480 elements)" if triton_wanted else "")
    if path == "cpp" or (triton_wanted and use_cpu_extension(keys)):  # (Triton outside its coverage)
        return attention_cpu_forward, attention_cpu_backward, "cpp", "the C++ CPU op" + outside
    why = ("backend 'torch'" if get_backend() == "torch" else
           "CUDA tensors" + outside if keys.is_cuda else "the C++ CPU op is not available or switched off")
    return attention_torch_forward, attention_torch_backward, "composite", f"the torch composite path: {why}"


def _launchers(keys: Tensor, weights: Sequence[Tensor], activation: str = "sigmoid"):
    """(forward, backward) launchers for this problem (``_launchers_and_reason``)."""
    return _launchers_and_reason(keys, weights, activation)[:2]


@dataclass
class AttentionPlan:
    """How one call runs, decided once (``plan_attention``) and kept for its backward: the path ("triton",
    "cpp", "composite", "composite-small", "composite-autograd" or "reference"), why, the launchers, and their
    arguments."""
    path: str
    reason: str
    forward: Optional[Callable]
    backward: Optional[Callable]
    weights: List[Tensor]
    alphas: Optional[List[Tensor]]
    dice_eval: Optional[List[Tuple[Tensor, Tensor]]]
    activation: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def plan_attention(keys, weights, alphas, dice_means, dice_vars, activation, *, training: bool = False,
                   eager: bool = False) -> AttentionPlan:
    """The plan of one call. An MLP without a hidden layer (``weights = (w_out, b_out)``: a linear score)
    runs as one identity hidden layer of width 1 followed by ``1 * z + 0``, which is exact. ``eager``: the
    call runs outside ``torch.compile``, where small composite problems take ``attention_torch_small`` and
    Dice in training mode its autograd pass through ``din_kernels.dice`` (under compilation: the reference,
    whose ops all trace)."""
    if activation_spec(activation).has_stats and training and len(weights) > 2:
        dice_pairs = list(zip(dice_means, dice_vars)) if dice_means else None
        if eager:
            return AttentionPlan("composite-autograd", "Dice in training mode: one autograd pass of the composite, "
                                 "batch statistics over the valid positions (din_kernels.dice)", None, None,
                                 list(weights), alphas or None, dice_pairs, activation)
        return AttentionPlan("reference", "Dice in training mode under torch.compile: reference.din_attention",
                             None, None, list(weights), alphas or None, dice_pairs, activation)
    weights = list(weights)
    if len(weights) == 2:
        weights += [keys.new_ones(1, 1, dtype=weights[0].dtype), keys.new_zeros(1, dtype=weights[1].dtype)]
        activation, alphas, dice_means = "identity", [], []
    dice_eval = list(zip(dice_means, dice_vars)) if dice_means else None
    forward, backward, path, reason = _launchers_and_reason(keys, weights, activation)
    if eager and path == "composite" and keys.shape[0] * keys.shape[1] <= attention_torch.SMALL_POSITIONS:
        path, reason = "composite-small", reason + f"; B x T <= {attention_torch.SMALL_POSITIONS}: one autograd pass"
    return AttentionPlan(path, reason, forward, backward, weights, alphas or None, dice_eval, activation)


def _plan(keys, weights, alphas, dice_means, dice_vars, activation):
    """(forward, backward, weights, alphas, dice_eval, activation) of ``plan_attention`` (the custom ops)."""
    p = plan_attention(keys, weights, alphas, dice_means, dice_vars, activation)
    return p.forward, p.backward, p.weights, p.alphas, p.dice_eval, p.activation


@torch.library.custom_op("din_kernels::din_attention", mutates_args=())
def _din_attention_op(
    query: Tensor, keys: Tensor, lengths: Tensor, weights: List[Tensor], alphas: List[Tensor],
    dice_means: List[Tensor], dice_vars: List[Tensor], eps: float, form: str, activation: str, normalize: str,
    scale: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor]:
    # The schema has no optional tensor lists: an empty list stands for "none".
    forward, _, weights, alphas, dice_eval, activation = _plan(keys, weights, alphas, dice_means, dice_vars,
                                                               activation)
    return forward(query, keys, lengths, weights, alphas, dice_eval, eps, form=form, activation=activation,
                   normalize=normalize, scale=scale)


@_din_attention_op.register_fake
def _(query, keys, lengths, weights, alphas, dice_means, dice_vars, eps, form, activation, normalize, scale):
    batch, seq_len, dim = keys.shape
    out = query.new_empty(batch, dim)
    attn = keys.new_empty(batch, seq_len, dtype=accumulation_dtype(keys.dtype))
    lse = keys.new_empty(batch if normalize == "softmax" else 0, dtype=accumulation_dtype(keys.dtype))
    return out, attn, lse


def _setup_context(ctx, inputs, output):
    query, keys, lengths, weights, alphas, dice_means, dice_vars, eps, form, activation, normalize, scale = inputs
    out, attn, lse = output
    ctx.counts = (len(weights), len(alphas), len(dice_means))
    ctx.options = dict(form=form, activation=activation, normalize=normalize, scale=scale)
    ctx.eps = eps
    ctx.save_for_backward(query, keys, lengths, out, attn, lse, *weights, *alphas, *dice_means, *dice_vars)
    ctx.mark_non_differentiable(attn, lse)


def _attention_grads(grad_out, query, keys, lengths, weights, alphas, dice_means, dice_vars, out, attn, lse, eps,
                     form, activation, normalize, scale, kept: Optional[list] = None,
                     plan: Optional[AttentionPlan] = None) -> List[Tensor]:
    """``[dquery, dkeys, *dweights, *dalphas]`` from the forward's ``plan`` (the Function keeps it), or one
    made here (the custom op, which can carry only tensors). ``kept``: the activations the composite or C++
    forward kept (``attention_torch_forward(kept=)``), if any."""
    n_weights = len(weights)
    if plan is None:
        plan = plan_attention(keys, weights, alphas, dice_means, dice_vars, activation)
    backward, weights, alphas, dice_eval, activation = (plan.backward, plan.weights, plan.alphas, plan.dice_eval,
                                                        plan.activation)
    options = dict(form=form, activation=activation, normalize=normalize, scale=scale)
    if kept is not None:
        options["kept"] = kept
    dquery, dkeys, dweights, dalphas = backward(
        grad_out, query, keys, lengths, weights, alphas, dice_eval, eps, out, attn, lse, **options)
    return [dquery, dkeys, *dweights[:n_weights], *(dalphas or ())]


@torch.library.custom_op("din_kernels::din_attention_backward", mutates_args=())
def _din_attention_backward_op(
    grad_out: Tensor, query: Tensor, keys: Tensor, lengths: Tensor, weights: List[Tensor], alphas: List[Tensor],
    dice_means: List[Tensor], dice_vars: List[Tensor], out: Tensor, attn: Tensor, lse: Tensor, eps: float,
    form: str, activation: str, normalize: str, scale: Optional[float],
) -> List[Tensor]:
    """``[dquery, dkeys, *dweights, *dalphas]``. An op of its own so that AOTAutograd (torch.compile) traces
    the backward through ``register_fake`` instead of running a kernel launch on fake tensors."""
    return _attention_grads(grad_out, query, keys, lengths, weights, alphas, dice_means, dice_vars, out, attn,
                            lse, eps, form, activation, normalize, scale)


@_din_attention_backward_op.register_fake
def _(grad_out, query, keys, lengths, weights, alphas, dice_means, dice_vars, out, attn, lse, eps, form,
      activation, normalize, scale):
    return [torch.empty_like(t) for t in (query, keys, *weights, *alphas)]


def _backward(ctx, grad_out, grad_attn, grad_lse):
    query, keys, lengths, out, attn, lse, *rest = ctx.saved_tensors
    n_w, n_a, n_d = ctx.counts
    weights, alphas = rest[:n_w], rest[n_w:n_w + n_a]
    means, variances = rest[n_w + n_a:n_w + n_a + n_d], rest[n_w + n_a + n_d:]
    grads = _din_attention_backward_op(grad_out, query, keys, lengths, list(weights), list(alphas), list(means),
                                       list(variances), out, attn, lse, ctx.eps, **ctx.options)
    # the return mirrors the inputs' structure: a list per list input (running statistics get no gradient)
    return (grads[0], grads[1], None, grads[2:2 + n_w], grads[2 + n_w:], [None] * n_d, [None] * n_d,
            None, None, None, None, None)


_din_attention_op.register_autograd(_backward, setup_context=_setup_context)


class DinAttentionFunction(torch.autograd.Function):
    """Eager autograd for the local activation unit: the launchers of the custom op above, without its Python
    dispatch (measured on the 2-core CPU: ~0.2 ms less per forward + backward, 8-12 % of a call at B=16-64,
    T=10-20), and, on the C++ and composite paths, with the forward's activations kept for the backward up
    to ``attention_cpu.KEEP_FLOATS`` / ``attention_torch.KEEP_FLOATS`` (a custom op can only pass tensors of
    fixed schema): the backward skips the recompute of those blocks (composite: 12-25 % faster forward +
    backward at B=64-256, T=20-50).
    ``din_attention`` uses it outside ``torch.compile``; under compilation it calls the custom op, which
    stays one graph node. The tensor lists travel flattened: ``*weights, *alphas, *dice_means, *dice_vars``.
    Returns ``(out [B, D], attn [B, T])``; ``attn`` carries no gradient.
    """

    @staticmethod
    def forward(ctx, query, keys, lengths, counts, eps, form, plan, normalize, scale, keep, *tensors):
        # ``plan``: ``din_attention``'s, made once for the forward and kept for the backward
        forward = plan.forward
        options = dict(form=form, activation=plan.activation, normalize=normalize, scale=scale)
        # attn never has a gradient: without this autograd would zero-fill a [B, T] cotangent for it before
        # every backward, a parallel fill that wakes torch's OpenMP workers, which then spin on the cores
        # the C++ op's helper threads need (measured: 9% of the CPU in a B=1024, T=100 forward + backward)
        ctx.set_materialize_grads(False)
        ctx.kept = None
        if keep and forward in (attention_torch_forward, attention_cpu_forward):  # a backward will follow
            ctx.kept = options["kept"] = []
        out, attn, lse = forward(query, keys, lengths, plan.weights, plan.alphas, plan.dice_eval, eps, **options)
        ctx.counts, ctx.plan = counts, plan
        ctx.options = dict(eps=eps, form=form, activation=plan.activation, normalize=normalize, scale=scale)
        ctx.save_for_backward(query, keys, lengths, out, attn, lse, *tensors)
        ctx.mark_non_differentiable(attn)
        return out, attn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_attn):
        if grad_out is None:  # no gradient reached ``out`` (grads are not materialised: see forward)
            return (None,) * (10 + len(ctx.saved_tensors) - 6)
        query, keys, lengths, out, attn, lse, *tensors = ctx.saved_tensors
        n_w, n_a, n_d = ctx.counts
        o = ctx.options
        grads = _attention_grads(grad_out, query, keys, lengths, tensors[:n_w],
                                 tensors[n_w:n_w + n_a], tensors[n_w + n_a:n_w + n_a + n_d],
                                 tensors[n_w + n_a + n_d:], out, attn, lse, o["eps"], o["form"], o["activation"],
                                 o["normalize"], o["scale"], kept=ctx.kept, plan=ctx.plan)
        # query, keys, lengths, counts, eps, form, plan, normalize, scale, keep, *weights, *alphas, *stats
        return (grads[0], grads[1], None, None, None, None, None, None, None, None, *grads[2:],
                *([None] * (2 * n_d)))


# ----------------------------------------------------------------------------------------------------------
# Functional and module
# ----------------------------------------------------------------------------------------------------------

def _checked(query, keys, lengths, weights, form, activation, normalize, scale, alphas, dice_stats, training):
    """Validated arguments: (lengths [B] int64, weights, alphas, dice means, dice variances) as lists."""
    lengths, weights = check_attention_args(query, keys, lengths, weights, form, activation, normalize,
                                            scale, alphas, dice_stats)
    spec = activation_spec(activation)
    if not (spec.has_stats and training):
        for name, group in (("alphas", alphas or ()), ("dice_stats", [t for p in dice_stats or () for t in p])):
            if any(t.device != keys.device for t in group):
                raise ValueError(f"{name} must be on {keys.device} like keys")
        if spec.has_stats and dice_stats is None and len(weights) > 2:
            raise ValueError("activation='dice' in eval mode (training=False) needs dice_stats: one "
                             "(running_mean, running_var) pair per hidden layer")
    alpha_list = list(alphas) if spec.has_alpha and alphas is not None else []
    means = [s[0] for s in dice_stats] if spec.has_stats and dice_stats is not None else []
    variances = [s[1] for s in dice_stats] if spec.has_stats and dice_stats is not None else []
    return lengths.to(torch.int64).contiguous(), weights, alpha_list, means, variances


def explain(query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor], *, form: str = "concat",
            activation: str = "sigmoid", normalize: str = "none", scale: Optional[float] = None,
            alphas: Optional[Sequence[Tensor]] = None,
            dice_stats: Optional[Sequence[Tuple[Tensor, Tensor]]] = None, training: bool = False) -> str:
    """Which path ``din_attention`` takes for these arguments in eager mode, and why: ``"path: reason"``
    (path: triton, cpp, composite, composite-small, composite-autograd or reference). Validates like
    ``din_attention``; runs
    nothing. The same line is logged at DEBUG level by every call (logger ``din_kernels``)."""
    lengths, weights, alpha_list, means, variances = _checked(query, keys, lengths, weights, form, activation,
                                                              normalize, scale, alphas, dice_stats, training)
    return str(plan_attention(keys, weights, alpha_list, means, variances, activation, training=training,
                              eager=True))


def din_attention(
    query: Tensor,
    keys: Tensor,
    lengths: Tensor,
    weights: Sequence[Tensor],
    *,
    form: str = "concat",
    activation: str = "sigmoid",
    normalize: str = "none",
    scale: Optional[float] = None,
    return_scores: bool = False,
    alphas: Optional[Sequence[Tensor]] = None,
    dice_stats: Optional[Sequence[Tuple[Tensor, Tensor]]] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-8,
):
    """Local activation unit. query [B, D], keys [B, T, D], lengths [B] (or [B, 1]) -> pooled [B, D]
    (and the [B, T] weights with ``return_scores=True``). Semantics: ``reference.din_attention``.

    ``weights = (w1, b1, ..., w_out, b_out)`` in ``nn.Linear`` layout; ``alphas``: one [H] (or [1]) tensor
    per hidden layer for prelu / dice; ``dice_stats``: one (running_mean, running_var) pair per hidden layer
    (required for dice in eval mode). Gradients flow to query, keys, every weight and bias, and the alphas.

    Paths: the fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``) for 1 or 2 hidden layers of
    width <= 256 and D <= 256 (padded D x H1 and H1 x H2 tiles up to 128 x 128; ``fused_supported``) in
    fp32/fp16/bf16; on CPU the C++ op (``attention_cpu``) where it is built, else the torch composite path
    (same results). An MLP without hidden layer (``weights = (w_out, b_out)``) is supported too.
    ``activation="dice"`` with ``training=True`` runs one autograd pass of the composite through
    ``din_kernels.dice`` (batch statistics over the valid positions, running statistics updated in place;
    the reference under ``torch.compile``); every other mode runs the launchers through
    ``DinAttentionFunction`` in eager mode and through the custom op ``torch.ops.din_kernels.din_attention``
    under ``torch.compile`` (``fullgraph=True`` keeps it as one node), except that small problems on the
    composite path (B x T <= ``attention_torch.SMALL_POSITIONS``) run ``attention_torch_small`` eagerly.
    The weights returned with ``return_scores=True`` carry no gradient (they are detached).
    """
    lengths, weights, alpha_list, means, variances = _checked(query, keys, lengths, weights, form, activation,
                                                              normalize, scale, alphas, dice_stats, training)
    if torch.compiler.is_compiling():
        if activation_spec(activation).has_stats and training:
            plan = plan_attention(keys, weights, alpha_list, means, variances, activation, training=True)
        else:
            scale = None if scale is None else float(scale)
            out, attn, _ = _din_attention_op(query.contiguous(), keys.contiguous(), lengths, list(weights),
                                             alpha_list, means, variances, float(eps), form, activation,
                                             normalize, scale)
            return (out, attn) if return_scores else out
    else:
        plan = plan_attention(keys, weights, alpha_list, means, variances, activation, training=training,
                              eager=True)
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("din_attention B=%d T=%d D=%d: %s", *keys.shape, plan)
    if plan.path == "reference":
        out, attn = reference.din_attention(
            query, keys, lengths, weights, form=form, activation=activation, normalize=normalize, scale=scale,
            return_scores=True, alphas=alphas, dice_stats=dice_stats, training=True, momentum=momentum, eps=eps)
        return (out, attn.detach()) if return_scores else out
    query, keys = query.contiguous(), keys.contiguous()
    scale = None if scale is None else float(scale)
    if plan.path in ("composite-small", "composite-autograd"):
        out, attn = attention_torch_small(query, keys, lengths, plan.weights, plan.alphas, plan.dice_eval,
                                          float(eps), form=form, activation=plan.activation, normalize=normalize,
                                          scale=scale,
                                          dice_training=momentum if plan.path == "composite-autograd" else None)
        attn = attn.detach()
    else:
        differentiable = [query, keys, *weights, *alpha_list]
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
        out, attn = DinAttentionFunction.apply(
            query, keys, lengths, (len(weights), len(alpha_list), len(means)), float(eps), form, plan, normalize,
            scale, keep, *weights, *alpha_list, *means, *variances)
    return (out, attn) if return_scores else out


class LocalActivationUnit(nn.Module):
    """DIN's local activation unit: an MLP ``features(q, k) -> hidden_units -> 1`` and a weighted sum.

    forward(query [B, D], keys [B, T, D], lengths [B]) -> [B, D]. ``activation`` applies to the hidden
    layers (prelu: a learnable slope per unit, initialised to 0.25; dice: a ``Dice`` per layer whose
    statistics come from the valid positions only).
    """

    def __init__(self, embedding_dim: int, hidden_units: Sequence[int] = (80, 40), activation: str = "sigmoid",
                 form: str = "concat", normalize: str = "none", scale: Optional[float] = None):
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        hidden_units = tuple(hidden_units)
        if not hidden_units or any(not isinstance(h, int) or h <= 0 for h in hidden_units):
            raise ValueError(f"hidden_units must be a non-empty sequence of positive ints, got {hidden_units!r}")
        self.embedding_dim = embedding_dim
        self.hidden_units = hidden_units
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.form = check_choice("form", form, FORMS)
        self.normalize = check_choice("normalize", normalize, NORMALIZATIONS)
        self.scale = scale
        in_features = 4 * embedding_dim if form == "concat" else 2 * embedding_dim + embedding_dim ** 2
        widths = (in_features,) + hidden_units
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.output = nn.Linear(widths[-1], 1)
        self.prelu_alphas = None
        self.dice = None
        if activation == "prelu":
            self.prelu_alphas = nn.ParameterList(nn.Parameter(torch.full((h,), 0.25)) for h in hidden_units)
        elif activation == "dice":
            self.dice = nn.ModuleList(Dice(h) for h in hidden_units)

    def weights(self) -> Tuple[Tensor, ...]:
        """``(w1, b1, ..., w_out, b_out)`` as ``din_attention`` takes them."""
        flat = []
        for layer in list(self.hidden) + [self.output]:
            flat += [layer.weight, layer.bias]
        return tuple(flat)

    def forward(self, query: Tensor, keys: Tensor, lengths: Tensor, return_scores: bool = False):
        if isinstance(keys, Tensor) and keys.dim() == 3 and keys.shape[-1] != self.embedding_dim:
            raise ValueError(f"keys must be [B, T, D] with D=embedding_dim={self.embedding_dim}, "
                             f"got shape {tuple(keys.shape)}")
        alphas = dice_stats = None
        if self.prelu_alphas is not None:
            alphas = list(self.prelu_alphas)
        elif self.dice is not None:
            alphas = [d.alpha for d in self.dice]
            dice_stats = [(d.running_mean, d.running_var) for d in self.dice]
        momentum = self.dice[0].momentum if self.dice is not None else 0.1
        eps = self.dice[0].eps if self.dice is not None else 1e-8
        return din_attention(query, keys, lengths, self.weights(), form=self.form, activation=self.activation,
                             normalize=self.normalize, scale=self.scale, return_scores=return_scores,
                             alphas=alphas, dice_stats=dice_stats, training=self.training,
                             momentum=momentum, eps=eps)

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, hidden_units={self.hidden_units}, "
                f"activation={self.activation!r}, form={self.form!r}, normalize={self.normalize!r}, "
                f"scale={self.scale}")
