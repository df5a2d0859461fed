"""Roofline ESTIMATE of the fused attention kernels on an H200, from their own FLOP and byte counts.

    python benchmarks/roofline.py [--batch 2048 --seq-len 200 --dim 64 --hidden 80,40 --fill 1.0]

No GPU is involved: the counts follow the kernels in ``din_kernels/attention/fused.py`` (the tiles
``_block_sizes`` picks, padded to powers of two as ``tl.dot`` runs them, and the useful work inside
them; the backward's passes as ``_backward_passes`` launches them, with torch's TF32 switch off for
"fp32"), over ``fill * T`` valid positions per row. Floors: bytes over 4.3 TB/s (an H200's HBM3e is 4.8 TB/s
peak; 4.3 is what a copy reaches), FLOPs over the precision's dense peak (fp32 on CUDA cores 67 TFLOP/s;
TF32 and BF16 tensor cores 495 and 989 TFLOP/s; NVIDIA's H200 SXM datasheet, without sparsity), and the
sigmoids over the special-function units (an exp and a reciprocal each, 16 per SM per clock, 132 SMs at
1.98 GHz). The largest floor bounds the kernel; a measured time is to be compared with it.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from din_kernels.testing import attention_fused as A  # noqa: E402

BANDWIDTH = 4.3e12  # bytes/s
PEAK = {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12}  # FLOP/s, dense
SFU = 16 * 132 * 1.98e9  # special-function results/s
ITEM = {"fp32": 4, "tf32": 4, "bf16": 2}  # bytes per key / key-gradient element


@dataclass
class Estimate:
    kernel: str
    precision: str
    useful_flop: float
    tile_flop: float
    bytes: float
    sfu_ops: float

    def floors_us(self):
        return {"memory": self.bytes / BANDWIDTH * 1e6, "compute": self.tile_flop / PEAK[self.precision] * 1e6,
                "sfu": self.sfu_ops / SFU * 1e6}


def estimate(batch: int, seq_len: int, dim: int, hidden: Sequence[int], fill: float, precision: str,
             backward: bool) -> Estimate:
    h1, h2 = hidden
    positions = batch * seq_len * fill
    _, bd, bh1, bh2, _ = A._block_sizes(seq_len, dim, hidden, backward=backward)
    # forward work per valid position: z1 = k M_b, z2 = h1 W2^T, the score, the weighted sum of k
    fwd_useful, fwd_tile = dim * h1 + h1 * h2 + h2 + dim, bd * bh1 + bh1 * bh2 + bh2 + bd
    item = ITEM[precision]
    m_bytes = batch * dim * h1 * 4  # M_b [B, D, H1] fp32 (u_b, lengths, output rows: small)
    keys = positions * dim * item
    attn = batch * seq_len * 4
    if not backward:
        # keys, M_b read; attn written (softmax: written, read and written again); out
        bytes_ = keys + m_bytes + 3 * attn + batch * dim * item
        sfu = positions * (bh1 + bh2) * 2
        return Estimate("forward", precision, 2 * positions * fwd_useful, 2 * positions * fwd_tile, bytes_, sfu)
    # backward: the forward's products again, then dW2 += dz2^T h1, dh1 = dz2 W2, dM += k^T dz1, dk = dz1 M^T;
    # fp32 without TF32 runs two passes (``_backward_passes``), each recomputing the forward
    passes = len(A._backward_passes(torch.float32, hidden)) if precision == "fp32" else 1
    useful = passes * fwd_useful + 2 * h1 * h2 + 2 * dim * h1
    tile = passes * fwd_tile + 2 * bh1 * bh2 + 2 * bd * bh1
    partials = batch * (h2 * h1 + h2 + h2 + 1) * 4  # per-row dW2, db2, dw_out, db_out
    # keys, attn, M_b read (by each pass); dk written (padding included); dM, du and the partials written
    bytes_ = passes * (keys + attn + m_bytes) + batch * seq_len * dim * item + m_bytes + batch * h1 * 4 + partials
    sfu = passes * positions * (bh1 + bh2) * 2  # the recomputed sigmoids
    return Estimate("backward", precision, 2 * positions * useful, 2 * positions * tile, bytes_, sfu)


def reduction_bytes(batch: int, dim: int, hidden: Sequence[int]) -> dict:
    """Bytes the backward's launcher moves after the kernel ("concat"), reducing the kernel's per-row outputs:
    dM [B, D, H1] read once (``fused_first_layer.first_layer_m_grads``, which writes dq's M part [B, D]), the
    per-row dW2, db2, dw_out, db_out partials read once by torch's sums, du [B, H1] read by dWu's product and
    db1's sum. ``before``: the same with dM reduced by the chunk path's product-and-sum (seven passes over dM:
    three reads, two [B, D, H1] temporaries written and read)."""
    h1, h2 = hidden
    dm = batch * dim * h1 * 4
    rest = batch * (h2 * h1 + h2 + h2 + 1) * 4 + 2 * batch * h1 * 4 + batch * dim * 4
    return {"now": dm + rest, "before": 7 * dm + rest, "dm": dm}


def table(batch: int, seq_len: int, dim: int, hidden: Sequence[int], fill: float) -> List[str]:
    lines = ["| kernel | precision | useful GFLOP | GFLOP in padded tiles | MB moved | memory floor us | "
             "compute floor us | SFU floor us | bound by |", "|" + " --- |" * 9]
    for backward in (False, True):
        for precision in ("fp32", "tf32", "bf16"):
            e = estimate(batch, seq_len, dim, hidden, fill, precision, backward)
            floors = e.floors_us()
            bound = max(floors, key=floors.get)
            lines.append(f"| {e.kernel} | {precision} | {e.useful_flop / 1e9:.2f} | {e.tile_flop / 1e9:.2f} | "
                         f"{e.bytes / 1e6:.0f} | {floors['memory']:.0f} | {floors['compute']:.0f} | "
                         f"{floors['sfu']:.0f} | {bound} ({floors[bound]:.0f} us) |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", default="80,40", help="two hidden widths")
    parser.add_argument("--fill", type=float, default=1.0, help="valid share of the T positions (1: full)")
    args = parser.parse_args(argv)
    hidden = tuple(int(x) for x in args.hidden.split(","))
    if len(hidden) != 2 or min(hidden) <= 0:
        parser.error("--hidden must be two positive widths, e.g. 80,40")
    if not 0 < args.fill <= 1:
        parser.error("--fill must lie in (0, 1]")
    print(f"ESTIMATE, B={args.batch}, T={args.seq_len}, D={args.dim}, hidden {hidden}, "
          f"{args.fill:.0%} of positions valid:\n")
    print("\n".join(table(args.batch, args.seq_len, args.dim, hidden, args.fill)))
    moved = reduction_bytes(args.batch, args.dim, hidden)
    print(f"\nAfter the backward kernel, its per-row outputs reduced (\"concat\"): {moved['now'] / 1e6:.0f} MB, "
          f"{moved['now'] / BANDWIDTH * 1e6:.0f} us at {BANDWIDTH / 1e12:.1f} TB/s (dM {moved['dm'] / 1e6:.0f} MB read "
          f"once); with the chunk path's product-and-sum over dM {moved['before'] / 1e6:.0f} MB "
          f"({moved['before'] / BANDWIDTH * 1e6:.0f} us).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
