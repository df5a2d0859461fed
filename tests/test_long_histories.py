"""Lifelong histories: rows longer than a block's position budget are cut into segments in the C++ op (so no
block's workspace grows with T), their softmax and pooling finished per row after the blocks, and the
backward sums the segments' dq: results equal the reference (fp64) with T up to 10,000, forward and every
gradient, beside short rows in the same batch, with and without kept activations, on every path."""
import pytest
import torch

import din_kernels as dk
from din_kernels import reference
from din_kernels.testing import ATTENTION_LAUNCHERS
from problems import Case, build, unit_kwargs


def problem(activation, batch, seq_len, lengths, dtype=torch.float64, candidates=None):
    """The module (D=6, (8, 4), softmax, eval) on a shared-builder problem: unit, query and keys (leaves),
    lengths, and the unit's slopes / Dice statistics as din_attention's keywords."""
    built = build(Case(batch, seq_len, 6, (8, 4), lengths=tuple(lengths), activation=activation,
                       normalize="softmax", candidates=candidates, dtype=dtype), requires_grad=True)
    unit = built.unit()
    return unit, built.query, built.keys, built.lengths, unit_kwargs(unit)


@pytest.mark.parametrize("normalize", ["softmax", "none"])
@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice"])
@pytest.mark.parametrize("batch,seq_len,lengths", [
    (1, 10_000, [10_000]),              # one lifelong history: about a dozen segments
    (3, 5000, [5000, 17, 4097]),        # segmented rows around a short one
    (4, 900, [900, 0, 899, 300]),       # just over the smallest budget (768 positions), an empty row
])
def test_segmented_rows_match_the_reference(backend, activation, normalize, batch, seq_len, lengths):
    if backend == "triton":  # (the interpreter runs the same tiles at T=10,000 for minutes; test_attention_triton
        seq_len, lengths = 300, [min(n, 300) for n in lengths]  # covers its T loop)
    unit, query, keys, lengths, options = problem(activation, batch, seq_len, lengths,
                                                  torch.float32 if backend == "triton" else torch.float64)
    unit.normalize = normalize
    out, attn = unit(query, keys, lengths, return_scores=True)
    grad = torch.randn_like(out)
    params = [*unit.weights(), *options.get("alphas", [])]
    got = torch.autograd.grad(out, [query, keys, *params], grad)
    want_out, want_attn = reference.din_attention(query, keys, lengths, unit.weights(), normalize=normalize,
                                                  activation=activation, return_scores=True, **options)
    want = torch.autograd.grad(want_out, [query, keys, *params], grad)
    tol = dict(atol=1e-5, rtol=1e-4) if query.dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(attn, want_attn.detach(), **tol)
    for index, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=index: f"gradient {i}: {m}")


@pytest.mark.parametrize("kept", [False, True])
def test_the_cpp_launchers_segment_with_and_without_kept_activations(kept):
    unit, query, keys, lengths, _ = problem("sigmoid", 2, 6000, [6000, 40])
    forward, backward = ATTENTION_LAUNCHERS["cpp"]
    args = (query.detach(), keys.detach(), lengths, list(unit.weights()), None, None, 1e-8)
    options = dict(form="concat", activation="sigmoid", normalize="softmax", scale=None)
    extra = dict(kept=[]) if kept else {}
    out, attn, lse = forward(*args, **options, **extra)
    grads = backward(torch.ones_like(out), *args, out, attn, lse, **options, **extra)
    forward_ref, backward_ref = ATTENTION_LAUNCHERS["composite"]
    out_ref, attn_ref, lse_ref = forward_ref(*args, **options)
    grads_ref = backward_ref(torch.ones_like(out), *args, out_ref, attn_ref, lse_ref, **options)
    for a, b in [(out, out_ref), (attn, attn_ref), (lse, lse_ref), (grads[0], grads_ref[0]), (grads[1], grads_ref[1]),
                 *zip(grads[2], grads_ref[2])]:
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("candidates", [1, 3])
@pytest.mark.parametrize("normalize", ["softmax", "none"])
def test_the_composite_path_runs_long_rows_in_segments(monkeypatch, normalize, candidates):
    """The torch composite path's segments (SEGMENT_POSITIONS, made small here): every gradient as the
    reference, several candidates per history too, a segmented row beside short ones."""
    from din_kernels.testing import attention_composite

    monkeypatch.setattr(attention_composite, "SEGMENT_POSITIONS", 700)
    monkeypatch.setattr(attention_composite, "CHUNK_FLOATS", 20_000)  # chunks of one row at T = 1500-2000
    used = []
    segments = attention_composite._segments
    monkeypatch.setattr(attention_composite, "_segments", lambda rows, length: used.append(segments(rows, length))
                        or used[-1])
    unit, query, keys, lengths, _ = problem("sigmoid", 3, 2000, [2000, 5, 1500], candidates=candidates)
    unit.normalize = normalize
    previous = dk.get_backend()
    try:
        dk.set_backend("torch")
        out = unit(query, keys, lengths)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [query, keys, *unit.weights()], grad)
    finally:
        dk.set_backend(previous)
    assert any(used)  # a chunk ran in segments
    want_out = reference.din_attention(query, keys, lengths, unit.weights(), normalize=normalize)
    want = torch.autograd.grad(want_out, [query, keys, *unit.weights()], grad)
    torch.testing.assert_close(out, want_out, atol=1e-9, rtol=1e-9)
    for index, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m, i=index: f"gradient {i}: {m}")


def test_the_triton_kernels_at_ten_thousand_positions():
    """T = 10,000 on the fused kernels (the interpreter here, ~5 s): they loop over the positions in tiles and
    hold nothing of size T but the [T] weights; forward and every gradient as the reference."""
    unit, query, keys, lengths, _ = problem("sigmoid", 1, 10_000, [10_000], dtype=torch.float32)
    previous = dk.get_backend()
    try:
        dk.set_backend("triton")
        assert dk.explain(query, keys, lengths, unit.weights(), normalize="softmax").startswith("triton:")
        out, attn = unit(query, keys, lengths, return_scores=True)
        got = torch.autograd.grad(out.sum(), [query, keys, *unit.weights()])
    finally:
        dk.set_backend(previous)
    want_out, want_attn = reference.din_attention(query, keys, lengths, unit.weights(), normalize="softmax",
                                                  return_scores=True)
    want = torch.autograd.grad(want_out.sum(), [query, keys, *unit.weights()])
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn, want_attn.detach(), atol=1e-6, rtol=1e-4)
    for index, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=lambda m, i=index: f"gradient {i}: {m}")
