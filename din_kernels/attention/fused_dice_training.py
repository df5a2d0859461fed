"""Dice attention in training mode on the Triton path (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``):
``din_attention(activation="dice", training=True)``, one query row per history.

Each hidden layer normalises its pre-activation ``z_l`` with the mean and biased variance of ``z_l`` over
every valid position of the call (padding never enters), so no position can go on to layer ``l + 1`` before
all of them have their ``z_l``: the work runs as one launch ("stage") per hidden layer plus one for the
scores, each a program per batch row looping over that row's valid positions only (``t < lengths[b]``), as
the eval kernels in ``fused.py`` do. Nothing of size ``[B, T, H]`` (or ``[B, T, 4D]``) is stored: every stage
recomputes the layers below it from the keys (``z1 = u_b + k @ M_b``, ``first_layer.py``) with the statistics
already known, which costs a layer's products again per stage but keeps memory at ``O(B * (D * H1 + H))``
whatever T (the C++ op keeps ``z`` and ``p`` of every valid position instead: ``cpu.py``).

Forward (``_dice_train_fwd_kernel``, ``STAGE`` = l for each hidden layer, then the number of layers)::

    stage l < L:  z_l of the row's valid positions -> per-row (mean_b, M2_b) of each unit
                  (tiles merged with Chan et al.'s update); torch merges the rows exactly:
                  mean = sum_b n_b mean_b / N,  var = sum_b (M2_b + n_b (mean_b - mean)^2) / N   (fp64)
    stage L:      h_l = z_l (a + (1 - a) p_l),  p_l = sigmoid((z_l - mean_l) rstd_l),
                  s = (h_L @ w_out + b_out) * scale,  masked, softmax or not,  out_b = sum_t w_t k_t

Backward (``_dice_train_bwd_kernel``; BatchNorm's gradient needs two per-unit sums over the whole call before
any ``dz_l``, so again one stage per layer, from the top)::

    g_l = dL/dh_l  (the top layer: ds w_out;  below: dz_{l+1} @ W_{l+1})
    g_xhat = g z (1 - a) p (1 - p),   xhat = (z - mean) rstd
    stage 0 (top layer):    S1 = sum g_xhat,  S2 = sum g_xhat xhat (per row; torch sums them),
                            dw_out, db_out, dalpha_top = sum g z (1 - p)
    stage 1 (two layers):   dz_2 = g (a + (1 - a) p) + rstd (g_xhat - S1/N - xhat S2/N)
                            dW2 = sum dz_2^T h_1,  db2,  g_1 = dz_2 @ W2,  layer 1's S1, S2, dalpha_1
    stage 2 (first layer):  dz_1 as above;  dk_t = w_t dout_b + dz_1 @ M_b^T,  dM_b = k^T dz_1,  du_b = sum dz_1

Per-row partials are reduced by torch in a fixed order (deterministic, no atomics), in fp64 for the
statistics. Accumulation is fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (which the eval kernels do not
take: here it gives the fp64 tests an exact check of this path's algebra).

Launchers (the contract of ``cpu.attention_cpu_dice_training_forward`` / ``_backward``)::

    attention_triton_dice_training_forward(query, keys, lengths, weights, alphas, dice_eval, eps, *, form,
        activation, normalize, scale, momentum, kept=None) -> (out [B, D], attn [B, T], lse [B] or empty)
    attention_triton_dice_training_backward(grad_out, query, keys, lengths, weights, alphas, dice_eval, eps,
        out, attn, lse, *, form, activation, normalize, scale, kept=None) -> (dquery, dkeys, dweights, dalphas)

The forward appends the call's batch statistics to ``kept``; the backward reads ``kept[-1]`` (not popped: a
graph kept with ``retain_graph=True`` runs it again) or, without it, recomputes them (the forward's stages).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .._backend import interpreter_enabled
from .composite import _check_launcher_args, candidates_per_history
from .first_layer import FirstLayer
from .fused import (_FUSED_DTYPES, _act_fwd, _block_sizes, _device_arch, _dot_precision, _forward_options,
                    _fp32_dot_min_k, _hidden_widths, _pool_tile, _triton_before_3_9, fused_supported, tl, triton)
from .fused_first_layer import dm_reduction

Tensor = torch.Tensor

__all__ = ["attention_triton_dice_training_forward", "attention_triton_dice_training_backward",
           "dice_training_supported"]

_DTYPES = _FUSED_DTYPES + (torch.float64,)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _operand(x, OPERAND: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr):
    """``x`` rounded to the ``tl.dot`` operand dtype (the keys'). Under the interpreter, whose bf16 dot is wrong,
    the rounded values go back to the accumulation dtype (``fused._dot_operand``, which would also round fp64
    to fp32: hence this variant)."""
    y = x.to(OPERAND)
    if INTERPRETED:
        y = y.to(ACC)
    return y


@triton.jit
def _load_row(PTR, offs, mask):
    """A [1, H] row of a per-unit parameter (0 at padded units)."""
    return tl.load(PTR + offs, mask=mask, other=0.0)[None, :]


@triton.jit
def _merge_tile_moments(z, valid, count, mean, m2):
    """Chan et al.'s update of a unit's (count, mean, M2) with the tile z [BT, BH]'s valid rows (at least one):
    ``delta = mean_tile - mean;  mean += delta n_tile / n;  M2 += M2_tile + delta^2 count n_tile / n``."""
    n_tile = tl.sum(valid.to(mean.dtype), axis=0)
    tile_mean = tl.sum(tl.where(valid[:, None], z, 0.0), axis=0) / n_tile  # [BH]
    centred = tl.where(valid[:, None], z - tile_mean[None, :], 0.0)
    tile_m2 = tl.sum(centred * centred, axis=0)
    total = count + n_tile
    delta = tile_mean - mean
    mean += delta * (n_tile / total)
    m2 += tile_m2 + delta * delta * (count * n_tile / total)
    return total, mean, m2


@triton.jit
def _dice_train_bwd_terms(z, g, alpha, mean, rstd, valid):
    """(g_xhat, xhat, p, dalpha elementwise) of a Dice layer in training mode from g = dL/dh:
    ``xhat = (z - mean) rstd,  p = sigmoid(xhat),  g_xhat = g z (1 - a) p (1 - p),  dalpha = g z (1 - p)``;
    zero at invalid positions (their g is zero; the mask keeps NaN-free padding out of the sums for sure)."""
    xhat = (z - mean) * rstd
    p = tl.sigmoid(xhat)
    gz = tl.where(valid[:, None], g * z, 0.0)
    g_xhat = gz * (1.0 - alpha) * p * (1.0 - p)
    return g_xhat, xhat, p, gz * (1.0 - p)


@triton.jit
def _dice_train_dz(g, g_xhat, xhat, p, alpha, rstd, c1, c2, valid):
    """BatchNorm-style ``dz = g (a + (1 - a) p) + rstd (g_xhat - c1 - xhat c2)``, c1 = mean(g_xhat), c2 =
    mean(g_xhat xhat) over the call; zero at invalid positions (where the second term alone is not)."""
    dz = g * (alpha + (1.0 - alpha) * p) + rstd * (g_xhat - c1 - xhat * c2)
    return tl.where(valid[:, None], dz, 0.0)


@triton.jit
def _dice_train_fwd_kernel(
    K,             # [B, T, D] keys
    M,             # [B, D, H1] ACC (fp32, or fp64 for fp64 keys): M_b
    U,             # [B, H1] ACC: u_b (b1 included)
    W2, B2,        # [H2, H1], [H2] ACC (second hidden layer; unused with one layer)
    WO, BO,        # [HL], [1] ACC (output layer)
    A1, MU1, RS1,  # [H1] ACC: alpha, the batch mean and rsqrt(var + eps) (stages after layer 1's)
    A2, MU2, RS2,  # [H2] ACC
    LENGTHS,       # [B] int64
    PMEAN, PM2,    # [B, H_stage] ACC per-row mean and M2 of this stage's layer (stages < L)
    OUT,           # [B, D] pooled output (query dtype; stage L)
    ATTN,          # [B, T] ACC final weights, zero-initialised (stage L)
    LSE,           # [B] ACC (softmax only)
    T, D, H1, H2, scale,
    stride_kb, stride_kt,
    STAGE: tl.constexpr, TWO_LAYERS: tl.constexpr, SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """One program per batch row b, looping over its valid positions t < L_b in tiles:

        z1 = k @ M_b + u_b;  stage 0: moments of z1
        h1 = z1 (a1 + (1 - a1) sigmoid((z1 - mean1) rstd1))
        [z2 = h1 @ W2^T + b2;  stage 1: moments of z2;  h2 = Dice(z2) likewise]
        stage L: s_t = (h_L @ w_out + b_out) * scale, then ``fused._din_attention_fwd_kernel``'s masking,
                 online softmax (base 2) and pooling: ATTN = w (0 at padding), LSE = log sum exp (0 if empty)
    Moments per row: (mean_b, M2_b) [H] with n_b = L_b (zeros for an empty row)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    DICE: tl.constexpr = 4  # ``activations.py``'s code of Dice for ``fused._act_fwd``
    LAYERS: tl.constexpr = 2 if TWO_LAYERS else 1
    b = tl.program_id(0).to(tl.int64)
    # Clamped so that a bad length can never send a load or store outside the row.
    L = tl.minimum(tl.maximum(tl.load(LENGTHS + b), 0), T).to(tl.int32)
    OPERAND: tl.constexpr = K.dtype.element_ty
    ACC: tl.constexpr = U.dtype.element_ty

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h1 = tl.arange(0, BLOCK_H1)
    mask_d = offs_d < D
    mask_h1 = offs_h1 < H1
    # padded hidden units read 0 from M, u and every weight touching them: z = 0 there, and no score sees them
    m1 = tl.load(M + b * D * H1 + offs_d[:, None] * H1 + offs_h1[None, :],
                 mask=mask_d[:, None] & mask_h1[None, :], other=0.0)
    m1 = _operand(m1, OPERAND, ACC, INTERPRETED)  # [BD, BH1]
    u1 = tl.load(U + b * H1 + offs_h1, mask=mask_h1, other=0.0)  # [BH1]
    a1 = _load_row(A1, offs_h1, mask_h1)
    if STAGE > 0:
        mu1 = _load_row(MU1, offs_h1, mask_h1)
        rs1 = _load_row(RS1, offs_h1, mask_h1)
    if TWO_LAYERS:
        offs_h2 = tl.arange(0, BLOCK_H2)
        mask_h2 = offs_h2 < H2
        if STAGE > 0:
            w2t = tl.load(W2 + offs_h2[None, :] * H1 + offs_h1[:, None],
                          mask=mask_h1[:, None] & mask_h2[None, :], other=0.0)
            w2t = _operand(w2t, OPERAND, ACC, INTERPRETED)  # [BH1, BH2]
            b2 = tl.load(B2 + offs_h2, mask=mask_h2, other=0.0)
            a2 = _load_row(A2, offs_h2, mask_h2)
        if STAGE > 1:
            mu2 = _load_row(MU2, offs_h2, mask_h2)
            rs2 = _load_row(RS2, offs_h2, mask_h2)
            wo = tl.load(WO + offs_h2, mask=mask_h2, other=0.0)  # [BH2]
    else:
        if STAGE > 0:
            wo = tl.load(WO + offs_h1, mask=mask_h1, other=0.0)  # [BH1]
    if STAGE == LAYERS:
        bo = tl.load(BO)
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        m_i = tl.full([], float("-inf"), ACC)  # running max of the base-2 scores
        l_i = tl.full([], 0.0, ACC)  # running sum of exp2(s2 - m_i)
    else:
        count = tl.full([], 0.0, ACC)
        if STAGE == 0:
            mean = tl.zeros([BLOCK_H1], dtype=ACC)
            m2 = tl.zeros([BLOCK_H1], dtype=ACC)
        else:
            mean = tl.zeros([BLOCK_H2], dtype=ACC)
            m2 = tl.zeros([BLOCK_H2], dtype=ACC)

    for t0 in range(0, L, BLOCK_T):
        offs = t0 + offs_t
        valid = offs < L
        k_in = tl.load(K + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                       mask=valid[:, None] & mask_d[None, :], other=0.0)  # [BT, BD], keys' dtype
        z1 = tl.dot(_operand(k_in, OPERAND, ACC, INTERPRETED), m1, input_precision=DOT_PRECISION,
                    out_dtype=ACC) + u1[None, :]  # [BT, BH1]
        if STAGE == 0:
            count, mean, m2 = _merge_tile_moments(z1, valid, count, mean, m2)
        else:
            h = _act_fwd(z1, a1, mu1, rs1, DICE)
            if TWO_LAYERS:
                z2 = tl.dot(_operand(h, OPERAND, ACC, INTERPRETED), w2t, input_precision=DOT_PRECISION,
                            out_dtype=ACC) + b2[None, :]  # [BT, BH2]
                if STAGE == 1:
                    count, mean, m2 = _merge_tile_moments(z2, valid, count, mean, m2)
                else:
                    h = _act_fwd(z2, a2, mu2, rs2, DICE)
            if STAGE == LAYERS:
                k = k_in.to(ACC)
                s = (tl.sum(h * wo[None, :], axis=1) + bo) * scale  # [BT]
                m_i, l_i, acc, stored = _pool_tile(s, k, valid, m_i, l_i, acc, SOFTMAX)
                tl.store(ATTN + b * T + offs, stored, mask=valid)  # softmax: raw scores, normalised below

    if STAGE == LAYERS:
        if SOFTMAX:
            has_any = L > 0
            l_safe = tl.where(has_any, l_i, 1.0)
            m_safe = tl.where(has_any, m_i, 0.0)
            acc = acc / l_safe
            tl.store(LSE + b, (m_safe + tl.log2(l_safe)) * LN2)
            tl.debug_barrier()  # the scores written above are re-read by (possibly) other threads
            for t0 in range(0, L, BLOCK_T):
                offs = t0 + offs_t
                valid = offs < L
                s = tl.load(ATTN + b * T + offs, mask=valid, other=0.0)
                tl.store(ATTN + b * T + offs, tl.exp2(s * LOG2E - m_safe) / l_safe, mask=valid)
        tl.store(OUT + b * D + offs_d, acc.to(OUT.dtype.element_ty), mask=mask_d)
    elif STAGE == 0:
        tl.store(PMEAN + b * H1 + offs_h1, mean, mask=mask_h1)
        tl.store(PM2 + b * H1 + offs_h1, m2, mask=mask_h1)
    else:
        tl.store(PMEAN + b * H2 + offs_h2, mean, mask=mask_h2)
        tl.store(PM2 + b * H2 + offs_h2, m2, mask=mask_h2)


@triton.jit
def _dice_train_bwd_kernel(
    K, M, U, W2, B2, WO,
    A1, MU1, RS1,  # [H1] ACC: alpha, the forward's batch mean and rsqrt(var + eps)
    A2, MU2, RS2,  # [H2] ACC
    C1, C2,        # [H_l] ACC: mean(g_xhat), mean(g_xhat xhat) over the call of the layer this stage
                   # differentiates through (stage 1: layer 2's; stage 2: layer 1's)
    C1B, C2B,      # [H2] ACC: layer 2's, for stage 2 with two layers (g_1 is recomputed from dz_2)
    LENGTHS,
    ATTN,          # [B, T] ACC final weights from the forward
    DOUT,          # [B, D] upstream gradient
    DELTA,         # [B] ACC, dout_b . out_b (softmax only)
    DK,            # [B, T, D] keys gradient (keys dtype; stage 2)
    DM, DU,        # [B, D, H1], [B, H1] ACC: gradients of M_b and u_b (stage 2)
    DW2, DB2,      # [B, H2, H1], [B, H2] ACC per-row partials (stage 1)
    DWO, DBO,      # [B, HL], [B] ACC per-row partials (stage 0)
    DA,            # [B, H_l] ACC per-row partials of the alpha of the layer whose sums this stage writes
    S1, S2,        # [B, H_l] ACC per-row sum g_xhat, sum g_xhat xhat of that layer (stages 0, 1)
    T, D, H1, H2, scale,
    stride_kb, stride_kt,
    STAGE: tl.constexpr, TWO_LAYERS: tl.constexpr, SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    INTERPRETED: tl.constexpr, PART: tl.constexpr,
):
    """One program per batch row b; recomputes the forward for t < L_b and backpropagates (module docstring):

        dw_t = dout_b . k_t;   ds_t = scale dw_t (none),  scale w_t (dw_t - delta_b) (softmax);  0 at padding
        g_top = ds w_out
        stage 0: S1, S2, dalpha of the top layer; dw_out = sum ds h_top, db_out = sum ds
        stage 1 (two layers): dz_2, dW2 = sum dz_2^T h_1, db2, g_1 = dz_2 @ W2; layer 1's S1, S2, dalpha
        stage 2: dz_1; dk = w dout + dz_1 @ M_b^T (0 at padding), dM_b = k^T dz_1, du_b = sum dz_1
    ``PART``: 0 all of the stage; stage 1: 1 only dW2, 2 only db2, g_1 and layer 1's sums; stage 2: 1 only
    dM_b and du_b, 2 only dk (``_stage_configs``: where one launch spilled).
    """
    DICE: tl.constexpr = 4
    b = tl.program_id(0).to(tl.int64)
    L = tl.minimum(tl.maximum(tl.load(LENGTHS + b), 0), T).to(tl.int32)
    OPERAND: tl.constexpr = K.dtype.element_ty
    ACC: tl.constexpr = U.dtype.element_ty
    # the stage whose layer is the top one writes its sums without a dz above it
    TOP_SUMS: tl.constexpr = STAGE == 0
    FIRST: tl.constexpr = STAGE == 2

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h1 = tl.arange(0, BLOCK_H1)
    mask_d = offs_d < D
    mask_h1 = offs_h1 < H1
    mask_dh1 = mask_d[:, None] & mask_h1[None, :]
    m1 = tl.load(M + b * D * H1 + offs_d[:, None] * H1 + offs_h1[None, :], mask=mask_dh1, other=0.0)
    m1 = _operand(m1, OPERAND, ACC, INTERPRETED)  # [BD, BH1]
    u1 = tl.load(U + b * H1 + offs_h1, mask=mask_h1, other=0.0)
    a1 = _load_row(A1, offs_h1, mask_h1)
    mu1 = _load_row(MU1, offs_h1, mask_h1)
    rs1 = _load_row(RS1, offs_h1, mask_h1)
    if TWO_LAYERS:
        offs_h2 = tl.arange(0, BLOCK_H2)
        mask_h2 = offs_h2 < H2
        mask_h21 = mask_h2[:, None] & mask_h1[None, :]
        w2 = tl.load(W2 + offs_h2[:, None] * H1 + offs_h1[None, :], mask=mask_h21, other=0.0)
        w2 = _operand(w2, OPERAND, ACC, INTERPRETED)  # [BH2, BH1]
        b2 = tl.load(B2 + offs_h2, mask=mask_h2, other=0.0)
        a2 = _load_row(A2, offs_h2, mask_h2)
        mu2 = _load_row(MU2, offs_h2, mask_h2)
        rs2 = _load_row(RS2, offs_h2, mask_h2)
        wo = tl.load(WO + offs_h2, mask=mask_h2, other=0.0)
        if STAGE == 1:
            c1 = _load_row(C1, offs_h2, mask_h2)
            c2 = _load_row(C2, offs_h2, mask_h2)
            if PART != 2:
                dw2 = tl.zeros([BLOCK_H2, BLOCK_H1], dtype=ACC)
            if PART != 1:
                db2 = tl.zeros([BLOCK_H2], dtype=ACC)
        if FIRST:
            c1b = _load_row(C1B, offs_h2, mask_h2)
            c2b = _load_row(C2B, offs_h2, mask_h2)
        if TOP_SUMS:
            s1 = tl.zeros([BLOCK_H2], dtype=ACC)
            s2 = tl.zeros([BLOCK_H2], dtype=ACC)
            da = tl.zeros([BLOCK_H2], dtype=ACC)
            dwo = tl.zeros([BLOCK_H2], dtype=ACC)
        if STAGE == 1 and PART != 1:
            s1 = tl.zeros([BLOCK_H1], dtype=ACC)
            s2 = tl.zeros([BLOCK_H1], dtype=ACC)
            da = tl.zeros([BLOCK_H1], dtype=ACC)
    else:
        wo = tl.load(WO + offs_h1, mask=mask_h1, other=0.0)
        if TOP_SUMS:
            s1 = tl.zeros([BLOCK_H1], dtype=ACC)
            s2 = tl.zeros([BLOCK_H1], dtype=ACC)
            da = tl.zeros([BLOCK_H1], dtype=ACC)
            dwo = tl.zeros([BLOCK_H1], dtype=ACC)
    if FIRST:
        c1a = _load_row(C1, offs_h1, mask_h1)
        c2a = _load_row(C2, offs_h1, mask_h1)
        if PART != 2:
            dm = tl.zeros([BLOCK_D, BLOCK_H1], dtype=ACC)
            du = tl.zeros([BLOCK_H1], dtype=ACC)
    dbo = tl.full([], 0.0, ACC)
    dout = tl.load(DOUT + b * D + offs_d, mask=mask_d, other=0.0).to(ACC)  # [BD]
    if SOFTMAX:
        delta = tl.load(DELTA + b)

    for t0 in range(0, L, BLOCK_T):
        offs = t0 + offs_t
        valid = offs < L
        mask_k = valid[:, None] & mask_d[None, :]
        k_in = tl.load(K + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                       mask=mask_k, other=0.0)  # [BT, BD], keys' dtype
        k = k_in.to(ACC)
        k_in = _operand(k_in, OPERAND, ACC, INTERPRETED)
        w = tl.load(ATTN + b * T + offs, mask=valid, other=0.0)  # [BT]
        dw = tl.sum(k * dout[None, :], axis=1)
        if SOFTMAX:
            ds = w * (dw - delta)
        else:
            ds = dw
        ds = tl.where(valid, ds, 0.0) * scale  # [BT]

        z1 = tl.dot(k_in, m1, input_precision=DOT_PRECISION, out_dtype=ACC) + u1[None, :]  # [BT, BH1]
        h1 = _act_fwd(z1, a1, mu1, rs1, DICE)
        if TWO_LAYERS:
            h1_in = _operand(h1, OPERAND, ACC, INTERPRETED)
            z2 = tl.dot(h1_in, tl.trans(w2), input_precision=DOT_PRECISION, out_dtype=ACC) + b2[None, :]
            g2 = ds[:, None] * wo[None, :]  # [BT, BH2] dL/dh_2
            g_xhat2, xhat2, p2, dalpha2 = _dice_train_bwd_terms(z2, g2, a2, mu2, rs2, valid)
            if TOP_SUMS:
                h2 = z2 * (a2 + (1.0 - a2) * p2)
                dwo += tl.sum(ds[:, None] * h2, axis=0)
                da += tl.sum(dalpha2, axis=0)
                s1 += tl.sum(g_xhat2, axis=0)
                s2 += tl.sum(g_xhat2 * xhat2, axis=0)
            else:
                if STAGE == 1:
                    dz2 = _dice_train_dz(g2, g_xhat2, xhat2, p2, a2, rs2, c1, c2, valid)
                else:
                    dz2 = _dice_train_dz(g2, g_xhat2, xhat2, p2, a2, rs2, c1b, c2b, valid)
                dz2_in = _operand(dz2, OPERAND, ACC, INTERPRETED)
                if STAGE == 1 and PART != 2:
                    dw2 += tl.dot(tl.trans(dz2_in), h1_in, input_precision=DOT_PRECISION, out_dtype=ACC)
                if STAGE == 1 and PART != 1:
                    db2 += tl.sum(dz2, axis=0)
                if FIRST or PART != 1:
                    g1 = tl.dot(dz2_in, w2, input_precision=DOT_PRECISION, out_dtype=ACC)  # [BT, BH1]
                if STAGE == 1 and PART != 1:
                    g_xhat1, xhat1, p1, dalpha1 = _dice_train_bwd_terms(z1, g1, a1, mu1, rs1, valid)
                    da += tl.sum(dalpha1, axis=0)
                    s1 += tl.sum(g_xhat1, axis=0)
                    s2 += tl.sum(g_xhat1 * xhat1, axis=0)
        else:
            g1 = ds[:, None] * wo[None, :]  # [BT, BH1]
            if TOP_SUMS:
                g_xhat1, xhat1, p1, dalpha1 = _dice_train_bwd_terms(z1, g1, a1, mu1, rs1, valid)
                dwo += tl.sum(ds[:, None] * h1, axis=0)
                da += tl.sum(dalpha1, axis=0)
                s1 += tl.sum(g_xhat1, axis=0)
                s2 += tl.sum(g_xhat1 * xhat1, axis=0)
        if TOP_SUMS:
            dbo += tl.sum(ds, axis=0)
        if FIRST:
            g_xhat1, xhat1, p1, _ = _dice_train_bwd_terms(z1, g1, a1, mu1, rs1, valid)
            dz1 = _dice_train_dz(g1, g_xhat1, xhat1, p1, a1, rs1, c1a, c2a, valid)
            dz1_in = _operand(dz1, OPERAND, ACC, INTERPRETED)
            if PART != 2:
                du += tl.sum(dz1, axis=0)
                dm += tl.dot(tl.trans(k_in), dz1_in, input_precision=DOT_PRECISION, out_dtype=ACC)  # [BD, BH1]
            if PART != 1:
                dk = w[:, None] * dout[None, :] + tl.dot(dz1_in, tl.trans(m1), input_precision=DOT_PRECISION,
                                                         out_dtype=ACC)
                tl.store(DK + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                         dk.to(DK.dtype.element_ty), mask=(offs[:, None] < T) & mask_d[None, :])

    if FIRST:
        if PART != 1:
            # padding past the last tile touched above
            for t0 in range(tl.cdiv(L, BLOCK_T) * BLOCK_T, T, BLOCK_T):
                offs = t0 + offs_t
                tl.store(DK + b * stride_kb + offs[:, None] * stride_kt + offs_d[None, :],
                         tl.zeros([BLOCK_T, BLOCK_D], dtype=DK.dtype.element_ty),
                         mask=(offs[:, None] < T) & mask_d[None, :])
        if PART != 2:
            tl.store(DM + b * D * H1 + offs_d[:, None] * H1 + offs_h1[None, :], dm, mask=mask_dh1)
            tl.store(DU + b * H1 + offs_h1, du, mask=mask_h1)
    elif TOP_SUMS:
        tl.store(DBO + b, dbo)
        if TWO_LAYERS:
            tl.store(DWO + b * H2 + offs_h2, dwo, mask=mask_h2)
            tl.store(S1 + b * H2 + offs_h2, s1, mask=mask_h2)
            tl.store(S2 + b * H2 + offs_h2, s2, mask=mask_h2)
            tl.store(DA + b * H2 + offs_h2, da, mask=mask_h2)
        else:
            tl.store(DWO + b * H1 + offs_h1, dwo, mask=mask_h1)
            tl.store(S1 + b * H1 + offs_h1, s1, mask=mask_h1)
            tl.store(S2 + b * H1 + offs_h1, s2, mask=mask_h1)
            tl.store(DA + b * H1 + offs_h1, da, mask=mask_h1)
    else:
        if PART != 2:
            tl.store(DW2 + b * H2 * H1 + offs_h2[:, None] * H1 + offs_h1[None, :], dw2, mask=mask_h21)
        if PART != 1:
            tl.store(DB2 + b * H2 + offs_h2, db2, mask=mask_h2)
            tl.store(S1 + b * H1 + offs_h1, s1, mask=mask_h1)
            tl.store(S2 + b * H1 + offs_h1, s2, mask=mask_h1)
            tl.store(DA + b * H1 + offs_h1, da, mask=mask_h1)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def dice_training_supported(keys: Tensor, weights: Sequence[Tensor]) -> bool:
    """True when these kernels take the problem: ``fused.fused_supported``'s coverage, fp64 included."""
    return fused_supported(keys, weights, dtypes=_DTYPES)


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp64 products in fp64 ("ieee"), else the eval kernels' rule."""
    return "ieee" if dtype == torch.float64 else _dot_precision(dtype)


def _stage_configs(dtype: torch.dtype, seq_len: int, dim: int, widths: Sequence[int], arch: int):
    """((forward block sizes, forward launch options), backward launches [(STAGE, PART, block sizes, launch
    options)] in order) on a GPU of compute capability ``arch`` (``fused._device_arch``): the eval kernels'
    tile and warp choices (``fused._block_sizes``), each backward stage mapped onto the eval backward's pass it
    resembles; the forward stages capped as the eval forward is (``fused._forward_options``). fp32 without TF32
    (and fp64: FMA products) with two layers runs as the eval backward's two passes do
    (``fused._backward_passes``): stage 0 (M_b, W2 resident) at pass 1's 16 positions a tile, stage 2 (M_b, W2
    and the dM accumulator) at pass 2's 8. Stage 1 in one launch (M_b, W2, the dW2 accumulator and the extra
    g_1 = dz_2 @ W2 product) spilled on sm_90 / sm_80 (Triton 3.9: 444 / 16 bytes at 16 positions, 0 / 72 at
    8), and so did its dW2 half with db2 (sm_90, normalize "none": ptxas settled at 128 registers, 12-28 bytes
    spilled at 8 or 16 positions); dW2 alone (PART 1) at 8 positions and the rest (PART 2: db2, g_1, layer 1's
    sums) at 16 compile without a spill on both (``benchmarks/gpu_compile_report.py``). Otherwise one
    configuration (pass 0) for every stage; stage 2 in two parts where ``_first_layer_parts`` says so.

    Every backward launch runs unpipelined (``num_stages=1``), as the eval backward's passes do on Triton 3.9
    (``fused._backward_stages``, whose reasons hold here). Not its pass 2's pipelining on Triton before 3.9:
    pipelined there, stage 2's PART 1 spilled 240-252 bytes on sm_80 (unpipelined none).

    Triton before 3.9 (``fused._triton_before_3_9``), fp32 without TF32: stage 0 and stage 1's PART 2 at 16
    warps (at 8, ptxas settled at 80 / 128 registers and spilled 12 / 36 bytes on sm_90 with softmax; at 16:
    64-100 registers, none on sm_90 / sm_80, softmax or not)."""
    precision = _precision(dtype)
    forward = _block_sizes(seq_len, dim, widths, dot_precision=precision)
    forward_options = _forward_options(forward[4], precision, arch)
    two = len(widths) == 2
    unpipelined = dict(num_stages=1)

    def config(backward_pass: int, num_warps: Optional[int] = None):
        blocks = _block_sizes(seq_len, dim, widths, backward=True, dot_precision=precision,
                              backward_pass=backward_pass)
        if num_warps is not None:
            blocks = (*blocks[:4], num_warps)
        return blocks, unpipelined

    first_layer = [(2, part, *config(2 if precision == "ieee" and two else 0))
                   for part in _first_layer_parts(dtype, two, arch)]
    # (``_backward_passes``' rule, fp64 counted as fp32 without TF32)
    if precision == "ieee" and two:
        wide = 16 if _triton_before_3_9() else None  # (docstring)
        launches = [(0, 0, *config(1, wide)), (1, 1, *config(2)), (1, 2, *config(1, wide))] + first_layer
    else:
        launches = [(stage, 0, *config(0)) for stage in ((0, 1) if two else (0,))] + first_layer
    return (forward, forward_options), launches


def _first_layer_parts(dtype: torch.dtype, two: bool, arch: int) -> Tuple[int, ...]:
    """The ``PART`` values stage 2 (the first layer: dk, dM_b, du_b) launches, with two hidden layers: (1, 2),
    dM_b and du_b apart from dk, where its one launch spilled; (0,) otherwise.
    - FMA products (fp32 without TF32, fp64) where an fp32 ``tl.dot`` needs K >= 16 (``fused._fp32_dot_min_k``:
      Triton 3.6), so that stage 2 runs 16 positions a tile instead of 8 (dM_b's K): 160-204 bytes spilled at
      255 registers on sm_90 / sm_80, with 8 or 16 warps, 16 or 32 positions, 1-3 stages or a register cap
      (224-255) alike; in two parts 128-255 registers, none.
    - fp32 with TF32 below sm_90 on Triton before 3.9 (``fused._triton_before_3_9``): 16 bytes at 255 registers
      in one launch (16 warps: 248); in two parts 166-255 registers, none.
    The price: the stage's recomputation of the layers (two products and g_1's) runs twice."""
    if two and ((_precision(dtype) == "ieee" and _fp32_dot_min_k() > 8)
                or (_triton_before_3_9() and arch < 90 and dtype == torch.float32 and _precision(dtype) == "tf32")):
        return (1, 2)
    return (0,)


class _Network:
    """The kernels' tensors in the accumulation dtype (fp32, fp64 for fp64 keys): the first layer split
    (``FirstLayer``: u [B, H1], M [B, D, H1]), the later layers, the alphas expanded to their widths."""

    def __init__(self, query: Tensor, keys: Tensor, weights: Sequence[Tensor], alphas: Sequence[Tensor], form: str):
        self.acc = acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
        self.widths = widths = _hidden_widths(weights)
        self.two = len(widths) == 2
        self.first = FirstLayer(weights[0], weights[1], keys.shape[2], form, acc)
        self.q = query.to(acc)
        self.u = self.first.u(self.q).contiguous()  # [B, H1]
        self.m = self.first.m(self.q).contiguous()  # [B, D, H1]
        cast = lambda t: t.to(acc).contiguous()  # noqa: E731
        self.w2, self.b2 = (cast(weights[2]), cast(weights[3])) if self.two else (self.u, self.u)
        self.wo, self.bo = cast(weights[-2].reshape(-1)), cast(weights[-1].reshape(1))
        self.alphas = [cast(a.reshape(-1).expand(h)) for a, h in zip(alphas, widths)]
        self.dummy = self.u.new_zeros(1)


def _checked(query, keys, weights, alphas, activation, form, normalize, who: str):
    if activation != "dice":
        raise ValueError(f"{who}: the Dice-training kernels run activation='dice', got {activation!r}")
    _check_launcher_args(weights, alphas, [(None, None)] * (len(weights) // 2 - 1), form, activation, normalize)
    if candidates_per_history(query, keys) != 1:
        raise ValueError(f"{who}: query must be [B, D], one row per history (several candidates run the "
                         "composite path)")
    if not dice_training_supported(keys, weights):
        raise ValueError(f"{who}: weights/keys outside the kernels' coverage (dice_training_supported)")


def _launch_common(net: _Network, keys: Tensor, softmax: bool, blocks) -> dict:
    block_t, block_d, block_h1, block_h2, num_warps = blocks
    return dict(TWO_LAYERS=net.two, SOFTMAX=softmax, DOT_PRECISION=_precision(keys.dtype), BLOCK_T=block_t,
                BLOCK_D=block_d, BLOCK_H1=block_h1, BLOCK_H2=block_h2, INTERPRETED=interpreter_enabled(),
                num_warps=num_warps)


def _sizes(net: _Network, keys: Tensor, scale: Optional[float]) -> tuple:
    batch, seq_len, dim = keys.shape
    return (seq_len, dim, net.widths[0], net.widths[1] if net.two else 1, 1.0 if scale is None else float(scale),
            keys.stride(0), keys.stride(1))


def _merge_moments(lengths: Tensor, seq_len: int, mean_b: Tensor, m2_b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The call's (mean, biased variance, count) from the rows' (mean_b, M2_b) [B, H] with n_b = L_b, in fp64
    and exactly: ``mean = sum n_b mean_b / N``, ``M2 = sum M2_b + n_b (mean_b - mean)^2``; zeros when N = 0 (the
    reference's finite statistics of an all-padding call)."""
    n = lengths.clamp(0, seq_len).to(torch.float64)[:, None]  # [B, 1]
    count = n.sum()
    denominator = count.clamp(min=1.0)
    mean_b = mean_b.double()
    mean = (n * mean_b).sum(0) / denominator  # [H]
    var = (m2_b.double() + n * (mean_b - mean).square()).sum(0) / denominator
    return mean, var, count


def _statistics(net: _Network, keys: Tensor, lengths: Tensor, eps: float, common: dict, sizes: tuple):
    """The forward's stages below the scores: per hidden layer its batch (mean, var) in fp64, the count N (a
    0-d fp64 tensor: no host read), and the (mean, rstd) rows the next stages read, in the accumulation
    dtype."""
    batch = keys.shape[0]
    stats, rows = [], []
    count = None
    dummy = net.dummy
    for stage, width in enumerate(net.widths):
        mean_b = net.u.new_empty(batch, width)
        m2_b = net.u.new_empty(batch, width)
        (mu1, rs1), (mu2, rs2) = (rows + [(dummy, dummy)] * 2)[:2]
        a2 = net.alphas[1] if net.two else dummy
        _dice_train_fwd_kernel[(batch,)](
            keys, net.m, net.u, net.w2, net.b2, net.wo, net.bo, net.alphas[0], mu1, rs1, a2, mu2, rs2, lengths,
            mean_b, m2_b, dummy, dummy, dummy, *sizes, STAGE=stage, **common)
        mean, var, count = _merge_moments(lengths, keys.shape[1], mean_b, m2_b)
        stats.append((mean, var))
        rows.append(_stat_row(mean, var, eps, net.acc))
    return stats, count, rows


def _stat_row(mean: Tensor, var: Tensor, eps: float, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(mean, rsqrt(var + eps)) in the accumulation dtype, as the reference normalises (its statistics in the
    inputs' dtype, fp32 for 16-bit inputs)."""
    mean, var = mean.to(acc), var.to(acc)
    return mean.contiguous(), torch.rsqrt(var + eps).contiguous()


def _update_running_on_device(dice_eval, stats, count: Tensor, momentum: float) -> None:
    """``nn.BatchNorm1d``'s update with the unbiased variance, nothing when no position is valid, without a
    host read of the count (``dice._update_running`` takes a Python int)."""
    if dice_eval is None:
        return
    with torch.no_grad():
        seen = count > 0
        correction = count / (count - 1.0).clamp(min=1.0)
        for (running_mean, running_var), (mean, var) in zip(dice_eval, stats):
            if running_mean is None:
                continue
            for running, batch_value in ((running_mean, mean), (running_var, var * correction)):
                updated = running * (1.0 - momentum) + momentum * batch_value.to(running.dtype)
                running.copy_(torch.where(seen, updated, running))


class _KeptDiceStats:
    """What a Dice-training forward keeps for its backward: per hidden layer the (mean, rstd) rows the kernels
    read, and the count of valid positions."""

    def __init__(self, rows: List[Tuple[Tensor, Tensor]], count: Tensor):
        self.rows, self.count = rows, count


def attention_triton_dice_training_forward(
    query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    *, form: str, activation: str, normalize: str, scale: Optional[float], momentum: float,
    kept: Optional[list] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Dice attention in training mode, forward: query [B, D], keys [B, T, D], lengths [B] -> (out [B, D]
    query dtype, attn [B, T] and lse [B] (softmax; else [0]) in the accumulation dtype). Batch statistics per
    hidden layer over the valid positions; ``dice_eval``'s running statistics (if given) updated in place with
    ``momentum`` as ``nn.BatchNorm1d`` does. ``kept``: a list that gets what the backward needs."""
    _checked(query, keys, weights, alphas, activation, form, normalize, "attention_triton_dice_training_forward")
    keys, lengths = keys.contiguous(), lengths.to(torch.int64).contiguous()
    batch, seq_len, dim = keys.shape
    net = _Network(query, keys, weights, alphas, form)
    softmax = normalize == "softmax"
    out = torch.zeros(batch, dim, dtype=query.dtype, device=keys.device)
    attn = torch.zeros(batch, seq_len, dtype=net.acc, device=keys.device)
    lse = torch.zeros(batch if softmax else 0, dtype=net.acc, device=keys.device)
    if batch == 0:
        if kept is not None:
            kept.append(_KeptDiceStats([(net.u.new_zeros(h), net.u.new_zeros(h)) for h in net.widths],
                                       net.u.new_zeros((), dtype=torch.float64)))
        return out, attn, lse
    (forward_blocks, forward_options), _ = _stage_configs(keys.dtype, seq_len, dim, net.widths,
                                                          _device_arch(keys.device))
    common = dict(_launch_common(net, keys, softmax, forward_blocks), **forward_options)
    sizes = _sizes(net, keys, scale)
    stats, count, rows = _statistics(net, keys, lengths, eps, common, sizes)
    (mu1, rs1), (mu2, rs2) = (rows + [(net.dummy, net.dummy)])[:2]
    dummy = net.dummy
    _dice_train_fwd_kernel[(batch,)](
        keys, net.m, net.u, net.w2, net.b2, net.wo, net.bo, net.alphas[0], mu1, rs1,
        net.alphas[1] if net.two else dummy, mu2, rs2, lengths, dummy, dummy, out, attn, lse, *sizes,
        STAGE=len(net.widths), **common)
    _update_running_on_device(dice_eval, stats, count, momentum)
    if kept is not None:
        kept.append(_KeptDiceStats(rows, count))
    return out, attn, lse


def attention_triton_dice_training_backward(
    grad_out: Tensor, query: Tensor, keys: Tensor, lengths: Tensor, weights: Sequence[Tensor],
    alphas: Optional[Sequence[Tensor]], dice_eval: Optional[Sequence[Tuple[Tensor, Tensor]]], eps: float,
    out: Tensor, attn: Tensor, lse: Tensor,
    *, form: str, activation: str, normalize: str, scale: Optional[float], kept: Optional[list] = None,
):
    """Dice attention in training mode, backward, through the batch statistics: (dquery [B, D], dkeys
    [B, T, D], dweights like weights, dalphas like alphas). The statistics are the forward's (``kept[-1]``),
    or recomputed as the forward computed them when ``kept`` is empty. ``out`` and ``lse`` are part of the
    shared contract; ``out`` gives the softmax's ``delta``."""
    _checked(query, keys, weights, alphas, activation, form, normalize, "attention_triton_dice_training_backward")
    keys, lengths = keys.contiguous(), lengths.to(torch.int64).contiguous()
    batch, seq_len, dim = keys.shape
    net = _Network(query, keys, weights, alphas, form)
    softmax = normalize == "softmax"
    widths, two, acc, device = net.widths, net.two, net.acc, keys.device
    h1, h2 = widths[0], (widths[1] if two else 1)
    if batch == 0:
        dweights = tuple(torch.zeros_like(w) for w in weights)
        return torch.zeros_like(query), torch.zeros_like(keys), dweights, tuple(torch.zeros_like(a) for a in alphas)
    (forward_blocks, forward_options), backward_launches = _stage_configs(keys.dtype, seq_len, dim, widths,
                                                                          _device_arch(device))
    sizes = _sizes(net, keys, scale)
    if kept:
        state = kept[-1]  # (read, not popped: a graph kept with retain_graph=True runs this backward again)
        rows, count = state.rows, state.count
    else:
        _, count, rows = _statistics(net, keys, lengths, eps,
                                     dict(_launch_common(net, keys, softmax, forward_blocks), **forward_options),
                                     sizes)
    (mu1, rs1), (mu2, rs2) = (rows + [(net.dummy, net.dummy)])[:2]
    dummy = net.dummy
    grad_out = grad_out.contiguous()
    attn = attn.to(acc).contiguous()
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1).contiguous() if softmax else dummy  # [B]
    denominator = count.clamp(min=1.0)
    f = dict(dtype=acc, device=device)
    dkeys = torch.empty_like(keys)
    dm, du = torch.empty(batch, dim, h1, **f), torch.empty(batch, h1, **f)
    dw2 = torch.empty(batch, h2, h1, **f) if two else dummy
    db2 = torch.empty(batch, h2, **f) if two else dummy
    dwo, dbo = torch.empty(batch, widths[-1], **f), torch.empty(batch, **f)

    def means_of(s1, s2):
        """c1 = mean(g_xhat), c2 = mean(g_xhat xhat) over the call from the rows' sums (fp64, in row order)."""
        return tuple((s.double().sum(0) / denominator).to(acc).contiguous() for s in (s1, s2))

    top = len(widths) - 1
    sums = {layer: [torch.empty(batch, widths[layer], **f) for _ in range(3)] for layer in range(len(widths))}
    means = {}  # layer -> (c1, c2), once its sums are in
    for stage, part, blocks, options in backward_launches:
        if stage == 0:  # the top layer's sums, the output layer's gradients
            layer_c, layer_c_top, layer_sums = None, None, top
        elif stage == 1:  # layer 2's dz, its weight gradients (PART != 2), layer 1's sums (PART != 1)
            layer_c, layer_c_top, layer_sums = 1, None, 0
        else:  # the first layer's backward (two layers: g_1 recomputed from layer 2's dz)
            layer_c, layer_c_top, layer_sums = 0, (1 if two else None), None
        c1, c2 = means[layer_c] if layer_c is not None else (dummy, dummy)
        c1b, c2b = means[layer_c_top] if layer_c_top is not None else (dummy, dummy)
        s1, s2, da = sums[layer_sums] if layer_sums is not None else (dummy, dummy, dummy)
        _dice_train_bwd_kernel[(batch,)](
            keys, net.m, net.u, net.w2, net.b2, net.wo, net.alphas[0], mu1, rs1,
            net.alphas[1] if two else dummy, mu2, rs2, c1, c2, c1b, c2b, lengths, attn, grad_out, delta, dkeys,
            dm, du, dw2, db2, dwo, dbo, da, s1, s2, *sizes, STAGE=stage, PART=part,
            **_launch_common(net, keys, softmax, blocks), **options)
        if layer_sums is not None and part != 1:
            means[layer_sums] = means_of(s1, s2)
    dalpha_partials = [sums[layer][2] for layer in range(len(widths))]
    dquery, dw1, db1 = net.first.row_grads(net.q, du, dm, weights[0], weights[1], m_sums=dm_reduction())
    grads = [dw1, db1]
    if two:
        grads += [dw2.sum(0), db2.sum(0)]
    grads += [dwo.sum(0)[None, :], dbo.sum(0, keepdim=True)]
    dweights = tuple(g.to(w.dtype) for g, w in zip(grads, weights))
    # a shared slope (one entry) gets the sum over its units
    dalphas = tuple((p.sum(0) if a.numel() > 1 else p.sum()).reshape(a.shape).to(a.dtype)
                    for p, a in zip(dalpha_partials, alphas))
    return dquery.to(query.dtype), dkeys, dweights, dalphas
