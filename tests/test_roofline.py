"""benchmarks/roofline.py counts the kernels' work as they do it: padded tiles, the backward's recompute
(twice in the two-pass fp32 backward), and the floors from those counts."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import roofline  # noqa: E402


def test_counts_follow_the_tiles():
    # D=16, hidden (16, 16): the tiles are the widths (no padding); one row of 4 positions
    forward = roofline.estimate(1, 4, 16, (16, 16), 1.0, "tf32", backward=False)
    per_position = 16 * 16 + 16 * 16 + 16 + 16  # k M_b, h1 W2^T, the score, the weighted sum
    assert forward.useful_flop == forward.tile_flop == 2 * 4 * per_position
    backward = roofline.estimate(1, 4, 16, (16, 16), 1.0, "tf32", backward=True)
    assert backward.tile_flop == 2 * 4 * (per_position + 2 * 16 * 16 + 2 * 16 * 16)
    two_pass = roofline.estimate(1, 4, 16, (16, 16), 1.0, "fp32", backward=True)
    assert two_pass.tile_flop == 2 * 4 * (2 * per_position + 2 * 16 * 16 + 2 * 16 * 16)
    # DIN's widths pad: H1=80 -> 128, H2=40 -> 64
    din = roofline.estimate(1, 1, 64, (80, 40), 1.0, "bf16", backward=False)
    assert din.useful_flop == 2 * (64 * 80 + 80 * 40 + 40 + 64)
    assert din.tile_flop == 2 * (64 * 128 + 128 * 64 + 64 + 64)


def test_floors_and_table():
    e = roofline.estimate(2048, 200, 64, (80, 40), 1.0, "bf16", backward=False)
    floors = e.floors_us()
    assert floors["memory"] == pytest.approx(e.bytes / roofline.BANDWIDTH * 1e6)
    assert floors["compute"] == pytest.approx(e.tile_flop / roofline.PEAK["bf16"] * 1e6)
    lines = roofline.table(2048, 200, 64, (80, 40), 0.5)
    assert len(lines) == 2 + 6 and all(line.startswith("| ") for line in lines)
    with pytest.raises(SystemExit):
        roofline.main(["--fill", "0"])


def test_reduction_bytes_after_the_backward(capsys):
    # B=1, D=2, hidden (3, 2): dM 1*2*3 floats; the partials dW2 (6), db2, dw_out (2 each), db_out (1); du read
    # twice (3 each); dq's M part written (2)
    moved = roofline.reduction_bytes(1, 2, (3, 2))
    rest = (6 + 2 + 2 + 1 + 2 * 3 + 2) * 4
    assert moved == {"dm": 24, "now": 24 + rest, "before": 7 * 24 + rest}
    assert roofline.main([]) == 0
    assert "dM 42 MB read once" in capsys.readouterr().out
