"""Dice: the fused op and module against reference.py, and the module against DeepCTR-Torch's Dice.

Every kernel test runs on every path (``backend`` fixture: Triton under the interpreter, the C++ op, torch
composite):
forward, the gradients of x, alpha, weight and bias, and the running statistics, in training and eval,
2-D [N, C] and masked 3-D [B, T, C] inputs, nominal and weird shapes. Running statistics live inside a
larger buffer between sentinels: the interpreter does not bounds-check, so a stray store would show.
"""
import math

import pytest
import torch

import din_kernels as dk
from din_kernels import reference

DICE = __import__("din_kernels.dice", fromlist=["dice"])  # the module (din_kernels.dice is the function)

# name -> (shape, kind of mask). Masks: "none"; "lengths" (random lengths incl. 0 and T); "empty" (all False)
CASES = {
    "2d": ((100, 7), "none"),  # several row chunks and tiles on the Triton path
    "2d_wide": ((9, 200), "none"),  # C = 200: two channel blocks
    "2d_single_row": ((1, 37), "none"),  # one row: variance 0
    "3d_masked": ((4, 13, 37), "lengths"),
    "3d_unmasked": ((3, 5, 8), "none"),
    "3d_b1_t1": ((1, 1, 7), "lengths"),
    "3d_all_masked": ((2, 6, 5), "empty"),
}


# One valid row: var = 0, so rstd = 1 / sqrt(eps) = 1e4 and dx = dy * gate + rstd * (dxhat - mean(dxhat)) is
# the difference of two terms ~1e4 * |dxhat|. Any fp32 implementation (the reference included: ~2e-4 off the
# fp64 one) keeps only ~1e4 * ulp(|dxhat|) ~ 1e-4 of absolute accuracy there.
DEGENERATE = ("2d_single_row", "3d_b1_t1")
DEGENERATE_ATOL = 1e-3


# sigmoid of |z| > 88 (rstd = 1e4 with no valid row; x ~ 1e4 against unit running statistics) is exactly
# 0 or 1, as in torch; only numpy, under the interpreter, warns about exp overflowing on the way.
EXP_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _mask(shape, kind):
    if kind == "none":
        return None
    batch, seq_len = shape[:2]
    if kind == "empty":
        return torch.zeros(batch, seq_len, dtype=torch.bool)
    lengths = torch.randint(0, seq_len + 1, (batch,))
    lengths[0] = seq_len  # never all padding (the "empty" case covers that)
    if batch > 2:
        lengths[1] = 0
    return torch.arange(seq_len)[None, :] < lengths[:, None]


def _stats(channels, dtype=torch.float32):
    """Running statistics as views between sentinels: (base, running_mean, running_var)."""
    base = torch.full((2, channels + 2), -7.0, dtype=dtype)
    base[0, 1:-1] = torch.randn(channels)
    base[1, 1:-1] = torch.rand(channels) + 0.5
    return base, base[0, 1:-1], base[1, 1:-1]


def _inputs(shape, kind, *, affine, dtype=torch.float32, offset=0.0, scale=1.0):
    channels = shape[-1]
    x = (torch.randn(shape) * 2.0 * scale + 0.3 * scale + offset).to(dtype)
    alpha = (torch.rand(channels) - 0.3).to(dtype)
    weight = (torch.rand(channels) + 0.5).to(dtype) if affine else None
    bias = (torch.randn(channels) * 0.3).to(dtype) if affine else None
    return x, alpha, weight, bias, _mask(shape, kind), torch.randn(shape).to(dtype)


def _run(fn, x, alpha, weight, bias, mask, grad, *, training, stats, dtype=None, momentum=0.1):
    """One forward and backward; returns the output, the gradients and the running statistics."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t.clone())
    x = cast(x).requires_grad_()
    alpha = cast(alpha).requires_grad_()
    weight = cast(weight).requires_grad_() if weight is not None else None
    bias = cast(bias).requires_grad_() if bias is not None else None
    base = stats[0].clone() if stats is not None else None
    running = (base[0, 1:-1], base[1, 1:-1]) if base is not None else (None, None)
    y = fn(x, alpha, *running, training=training, momentum=momentum, mask=mask, weight=weight, bias=bias)
    y.backward(cast(grad).to(y.dtype))
    out = {"y": y.detach(), "dx": x.grad, "dalpha": alpha.grad}
    if weight is not None:
        out.update(dweight=weight.grad, dbias=bias.grad)
    if base is not None:
        out["stats"] = base
    return out


def _assert_close(actual, expected, atol, rtol):
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
        assert torch.isfinite(a).all(), name
        # sums over many rows (dalpha, dweight, ...) scale with their size: tolerance relative to the largest
        torch.testing.assert_close(a, e, atol=atol * max(1.0, e.abs().max().item()), rtol=rtol, msg=name)


def _assert_within_reference_error(actual, lowp, exact, atol):
    """flash-attention's rule: |kernel - exact| <= 2 * |reference in the same precision - exact| + atol
    (atol relative to the largest exact value, at least 1)."""
    assert actual.keys() == exact.keys()
    for name in exact:
        assert actual[name].dtype == lowp[name].dtype and actual[name].shape == lowp[name].shape, name
        a, l, e = actual[name].double(), lowp[name].double(), exact[name].double()
        assert torch.isfinite(a).all(), name
        scale = max(1.0, e.abs().max().item())
        err, ref_err = (a - e).abs().max().item(), (l - e).abs().max().item()
        assert err <= 2 * ref_err + atol * scale, f"{name}: error {err:.3g} vs reference's {ref_err:.3g}"


def _check(*args, training, stats, atol=1e-5, **kwargs):
    """dk.dice against the reference: within twice the fp32 reference's own distance to the fp64 one (plus
    atol). A plain tolerance on the fp32 reference would not do: with a constant channel or a single row,
    rstd = 1 / sqrt(eps) = 1e4 amplifies the reference's own rounding to ~1e-4."""
    got = _run(dk.dice, *args, training=training, stats=stats, **kwargs)
    ref32 = _run(reference.dice, *args, training=training, stats=stats, **kwargs)
    exact = _run(reference.dice, *args, training=training, stats=stats, dtype=torch.float64, **kwargs)
    _assert_within_reference_error(got, ref32, exact, atol)
    return got


# ----------------------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------------------

@EXP_OVERFLOW
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case, training, affine):
    shape, kind = CASES[case]
    x, alpha, weight, bias, mask, grad = _inputs(shape, kind, affine=affine)
    got = _check(x, alpha, weight, bias, mask, grad, training=training, stats=_stats(shape[-1]),
                 atol=DEGENERATE_ATOL if training and case in DEGENERATE else 1e-5)
    assert (got["stats"][:, [0, -1]] == -7.0).all()  # sentinels around the running statistics


@pytest.mark.parametrize("training", [True, False])
def test_without_running_statistics_and_scalar_alpha(backend, training):
    """Training needs no running statistics; alpha may be a single slope shared by all channels."""
    x, _, weight, bias, mask, grad = _inputs((3, 9, 6), "lengths", affine=True)
    alpha = torch.tensor([0.2])
    _check(x, alpha, weight, bias, mask, grad, training=training, stats=None if training else _stats(6))


def test_running_statistics_over_steps(backend):
    """Three training steps with different batches and momentum 0.3, then eval: like the reference."""
    channels = 11
    stats = _stats(channels)
    ours, theirs = stats[0].clone(), stats[0].clone()
    for step in range(3):
        x, alpha, _, _, mask, _ = _inputs((3, 7 + step, channels), "lengths", affine=False)
        dk.dice(x, alpha, ours[0, 1:-1], ours[1, 1:-1], training=True, momentum=0.3, mask=mask)
        reference.dice(x, alpha, theirs[0, 1:-1], theirs[1, 1:-1], training=True, momentum=0.3, mask=mask)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    x, alpha, _, _, mask, _ = _inputs((2, 5, channels), "lengths", affine=False)
    y = dk.dice(x, alpha, ours[0, 1:-1], ours[1, 1:-1], training=False, mask=mask)
    expected = reference.dice(x, alpha, theirs[0, 1:-1], theirs[1, 1:-1], training=False, mask=mask)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)


@EXP_OVERFLOW
def test_no_valid_row_leaves_running_statistics(backend):
    x, alpha, weight, bias, mask, grad = _inputs((2, 6, 5), "empty", affine=True)
    stats = _stats(5)
    got = _run(dk.dice, x, alpha, weight, bias, mask, grad, training=True, stats=stats)
    assert torch.equal(got["stats"], stats[0])
    for name, value in got.items():
        assert torch.isfinite(value).all(), name


def test_masked_rows_stay_out_of_the_statistics(backend):
    """Changing padded rows changes their own outputs only; the valid rows' outputs and statistics stay."""
    x, alpha, _, _, mask, _ = _inputs((4, 9, 6), "lengths", affine=False)
    base_a = _stats(6)[0]
    base_b = base_a.clone()
    y_a = dk.dice(x, alpha, base_a[0, 1:-1], base_a[1, 1:-1], training=True, mask=mask)
    polluted = torch.where(mask[..., None], x, torch.full_like(x, 1e3))
    y_b = dk.dice(polluted, alpha, base_b[0, 1:-1], base_b[1, 1:-1], training=True, mask=mask)
    torch.testing.assert_close(y_a[mask], y_b[mask], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(base_a, base_b, atol=1e-6, rtol=1e-5)


def test_empty_batch(backend):
    x = torch.zeros(0, 5, requires_grad=True)
    alpha = torch.rand(5, requires_grad=True)
    base, running_mean, running_var = _stats(5)
    before = base.clone()
    y = dk.dice(x, alpha, running_mean, running_var, training=True)
    y.sum().backward()
    assert y.shape == (0, 5)
    assert x.grad.shape == (0, 5) and torch.equal(alpha.grad, torch.zeros(5))
    assert torch.equal(base, before)


def test_only_some_inputs_need_gradients(backend):
    x, alpha, weight, bias, mask, grad = _inputs((3, 8, 6), "lengths", affine=True)
    for needs in ("alpha", "x"):
        xs = x.clone().requires_grad_(needs == "x")
        a = alpha.clone().requires_grad_(needs == "alpha")
        y = dk.dice(xs, a, None, None, training=True, mask=mask, weight=weight, bias=bias)
        y.backward(grad)
        expected = _run(reference.dice, x, alpha, weight, bias, mask, grad, training=True, stats=None)
        got = xs.grad if needs == "x" else a.grad
        torch.testing.assert_close(got, expected["dx" if needs == "x" else "dalpha"], atol=1e-5, rtol=1e-4)


def test_noncontiguous_input(backend):
    x = torch.randn(7, 20)[:, ::2].T  # [10, 7], strided both ways
    alpha = torch.rand(7)
    y = dk.dice(x, alpha, None, None, training=True)
    torch.testing.assert_close(y, reference.dice(x, alpha, None, None, training=True), atol=1e-5, rtol=1e-4)


def test_deterministic(backend):
    x, alpha, weight, bias, mask, grad = _inputs((4, 13, 37), "lengths", affine=True)
    first = _run(dk.dice, x, alpha, weight, bias, mask, grad, training=True, stats=_stats(37))
    second = _run(dk.dice, x, alpha, weight, bias, mask, grad, training=True, stats=_stats(37))
    for name in ("y", "dx", "dalpha", "dweight", "dbias"):
        assert torch.equal(first[name], second[name]), name


def test_torch_path_chunks(monkeypatch):
    """The composite path works on chunks of rows; tiny chunks exercise the merge of chunk statistics."""
    previous = dk.get_backend()
    dk.set_backend("torch")
    try:
        monkeypatch.setattr(DICE, "_chunk_elements", lambda: 40)  # 40 // 7 = 5 rows per chunk
        x, alpha, weight, bias, mask, grad = _inputs((4, 13, 7), "lengths", affine=True)
        for training in (True, False):
            _check(x, alpha, weight, bias, mask, grad, training=training, stats=_stats(7))
    finally:
        dk.set_backend(previous)


def test_cpp_op_runs_and_merges_its_chunks(monkeypatch):
    """Under backend "cpp" the C++ op runs (not the composite path); 4 x 5000 x 7 is 3 chunks of 64K
    elements, whose statistics and gradient sums are merged in order: exact against the reference, and bit
    for bit the same at 1, 2 and 3 threads."""
    previous = dk.get_backend()
    dk.set_backend("cpp")
    calls = []
    forward = DICE._dice_forward_cpp
    monkeypatch.setattr(DICE, "_dice_forward_cpp", lambda *a, **k: calls.append(1) or forward(*a, **k))
    try:
        x, alpha, weight, bias, mask, grad = _inputs((4, 5000, 7), "lengths", affine=True)
        for training in (True, False):
            _check(x, alpha, weight, bias, mask, grad, training=training, stats=_stats(7))
        assert calls
        results, stats = [], _stats(7)
        for threads in (1, 2, 3):
            dk.set_cpu_threads(threads)
            results.append(_run(dk.dice, x, alpha, weight, bias, mask, grad, training=True, stats=stats))
        assert set(results[0]) == {"y", "dx", "dalpha", "dweight", "dbias", "stats"}
        for other in results[1:]:
            for name, value in results[0].items():
                assert torch.equal(value, other[name]), name
    finally:
        dk.set_cpu_threads(0)
        dk.set_backend(previous)


# ----------------------------------------------------------------------------------------------------------
# Numerically hard inputs and low precision: within twice the reference's own error (fp64 is exact)
# ----------------------------------------------------------------------------------------------------------

HARD = {
    "offset_1e4": dict(offset=1e4),  # mean 1e4, std 2: E[x^2] - E[x]^2 would lose every digit
    "scale_1e4": dict(scale=1e4),
}


@EXP_OVERFLOW
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", list(HARD))
def test_large_magnitudes(backend, case, training):
    x, alpha, weight, bias, mask, grad = _inputs((4, 13, 9), "lengths", affine=True, **HARD[case])
    stats = _stats(9)
    if not training and case == "offset_1e4":
        stats[1][:] = 1e4 + torch.randn(9)
    _check(x, alpha, weight, bias, mask, grad, training=training, stats=stats)


@pytest.mark.parametrize("rows", [1, 40])
def test_constant_channels(backend, rows):
    """var = 0: xhat = 0, p = sigmoid(bias), finite gradients equal to the reference's (rstd = 1e4)."""
    x, alpha, weight, bias, _, grad = _inputs((rows, 6), "none", affine=True)
    x[:, 2] = 0.7
    x[:, 4] = -3.0
    got = _check(x, alpha, weight, bias, None, grad, training=True, stats=_stats(6), atol=DEGENERATE_ATOL)
    p = torch.sigmoid(bias[2])
    torch.testing.assert_close(got["y"][:, 2], 0.7 * (p + (1 - p) * alpha[2]).expand(rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision(backend, dtype, atol, training):
    """fp16/bf16 in and out, fp32 statistics inside: closer to fp32 than the reference run in that dtype."""
    x, alpha, weight, bias, mask, grad = _inputs((4, 13, 37), "lengths", affine=True, dtype=dtype)
    stats = _stats(37)
    exact = _run(reference.dice, x, alpha, weight, bias, mask, grad, training=training, stats=stats,
                 dtype=torch.float32)
    lowp = _run(reference.dice, x, alpha, weight, bias, mask, grad, training=training, stats=stats)
    got = _run(dk.dice, x, alpha, weight, bias, mask, grad, training=training, stats=stats)
    for name in got:
        expected_dtype = torch.float32 if name == "stats" else dtype
        assert got[name].dtype == expected_dtype, name
    _assert_within_reference_error(got, lowp, exact, atol=atol)


def test_mixed_dtypes_promote_like_the_reference(backend):
    x = torch.randn(12, 5).to(torch.bfloat16)
    alpha = torch.rand(5)  # fp32 parameters with bf16 activations: the reference promotes to fp32
    y = dk.dice(x, alpha, None, None, training=True)
    expected = reference.dice(x, alpha, None, None, training=True)
    assert y.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(backend, training):
    """fp64 gradients (x, alpha, weight, bias) by finite differences, masked 3-D input with an empty row."""
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(3, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [False] * 4, [True, True, False, False]])
    running = (None, None)
    if not training:
        running = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)

    def fn(x, alpha, weight, bias):
        return dk.dice(x, alpha, *running, training=training, mask=mask, weight=weight, bias=bias)

    assert torch.autograd.gradcheck(fn, (x, alpha, weight, bias), eps=1e-6, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Module and DeepCTR-Torch's Dice
# ----------------------------------------------------------------------------------------------------------

def test_module(backend):
    layer = dk.Dice(6, affine=True)
    assert "6, eps=1e-08, momentum=0.1, affine=True" in repr(layer)
    assert set(dict(layer.named_parameters())) == {"alpha", "weight", "bias"}
    assert set(layer.state_dict()) == {"alpha", "weight", "bias", "running_mean", "running_var"}
    assert set(dict(dk.Dice(6).named_parameters())) == {"alpha"}
    x, _, _, _, mask, _ = _inputs((3, 5, 6), "lengths", affine=False)
    with torch.no_grad():
        layer.alpha.uniform_(-0.5, 0.5)
        layer.bias.normal_()
    y = layer(x, mask)
    expected = reference.dice(x, layer.alpha, torch.zeros(6), torch.ones(6), training=True, mask=mask,
                              weight=layer.weight, bias=layer.bias)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
    assert not torch.equal(layer.running_mean, torch.zeros(6))
    layer.eval()
    moved = layer.running_mean.clone()
    layer(x, mask)
    assert torch.equal(layer.running_mean, moved)
    with pytest.raises(ValueError, match="num_features"):
        dk.Dice(0)
    for kwargs, error, match in ((dict(momentum=float("nan")), ValueError, "momentum"),
                                 (dict(momentum=1.5), ValueError, "momentum"),
                                 (dict(eps=float("inf")), ValueError, "eps"),
                                 (dict(eps=True), TypeError, "eps")):
        with pytest.raises(error, match=match):  # at construction, not at the first call
            dk.Dice(6, **kwargs)


def _deepctr_dice(channels, dim):
    activation = pytest.importorskip("deepctr_torch.layers.activation")
    layer = activation.Dice(channels, dim=dim)
    with torch.no_grad():
        layer.alpha.uniform_(-0.5, 0.5)
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.normal_(0.0, 0.3)
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dim,shape", [(2, (24, 7)), (3, (3, 10, 37))])
def test_deepctr_parity(backend, dim, shape, training):
    """Dice.from_deepctr reproduces DeepCTR-Torch's Dice: forward, every gradient, running statistics."""
    theirs = _deepctr_dice(shape[-1], dim).train(training)
    ours = dk.Dice.from_deepctr(theirs)
    assert ours.training == training and ours.affine and ours.eps == theirs.bn.eps
    x = torch.randn(shape) * 2 + 0.5
    grad = torch.randn(shape)
    outputs = []
    for layer in (ours, theirs):
        xs = x.clone().requires_grad_()
        y = layer(xs)  # no mask: DeepCTR-Torch's statistics cover every row, padding included
        y.backward(grad)
        bn = getattr(layer, "bn", layer)
        outputs.append({"y": y.detach(), "dx": xs.grad, "dalpha": layer.alpha.grad.reshape(-1),
                        "dweight": bn.weight.grad, "dbias": bn.bias.grad,
                        "running_mean": bn.running_mean, "running_var": bn.running_var})
    _assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


def test_from_deepctr_rejects_other_layers():
    with pytest.raises(TypeError, match="deepctr_torch Dice"):
        dk.Dice.from_deepctr(torch.nn.PReLU())
    layer = _deepctr_dice(4, 2)
    layer.bn.momentum = None
    with pytest.raises(ValueError, match="momentum"):
        dk.Dice.from_deepctr(layer)


# ----------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any kernel runs
# ----------------------------------------------------------------------------------------------------------

def _bad_calls():
    x = torch.randn(2, 3, 4)
    alpha = torch.zeros(4)
    stats = (torch.zeros(4), torch.ones(4))
    return [
        (TypeError, "x must be a torch.Tensor", lambda: dk.dice([1.0], alpha, *stats, training=True)),
        (ValueError, r"x must be \[N, C\]", lambda: dk.dice(torch.randn(4), alpha, *stats, training=True)),
        (TypeError, "x must be a floating", lambda: dk.dice(x.long(), alpha, *stats, training=True)),
        (ValueError, "alpha must have 1 or C=4", lambda: dk.dice(x, torch.zeros(3), *stats, training=True)),
        (ValueError, "running_mean is required", lambda: dk.dice(x, alpha, None, None, training=False)),
        (ValueError, "running_var must have C=4", lambda: dk.dice(x, alpha, stats[0], torch.ones(5), training=True)),
        (ValueError, "given together", lambda: dk.dice(x, alpha, stats[0], None, training=True)),
        (ValueError, "weight and bias", lambda: dk.dice(x, alpha, *stats, training=True, weight=torch.ones(4))),
        (ValueError, "bias must have C=4", lambda: dk.dice(x, alpha, *stats, training=True, weight=torch.ones(4),
                                                           bias=torch.ones(2))),
        (ValueError, "momentum must lie in", lambda: dk.dice(x, alpha, *stats, training=True, momentum=1.5)),
        (ValueError, "eps must be finite", lambda: dk.dice(x, alpha, *stats, training=True, eps=math.nan)),
        (TypeError, "mask must be a bool", lambda: dk.dice(x, alpha, *stats, training=True,
                                                           mask=torch.ones(2, 3, dtype=torch.long))),
        (ValueError, r"mask must have shape \[B, T\]", lambda: dk.dice(x, alpha, *stats, training=True,
                                                                      mask=torch.ones(3, 2, dtype=torch.bool))),
        (ValueError, "only accepted with a 3-D x", lambda: dk.dice(x[0], alpha, *stats, training=True,
                                                                   mask=torch.ones(3, dtype=torch.bool))),
        (ValueError, "num_features=5 channels", lambda: dk.Dice(5)(x)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input(backend, index):
    error, message, call = _bad_calls()[index]
    with pytest.raises(error, match=message):
        call()
