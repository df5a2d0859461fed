"""Property tests (hypothesis) of the public ops on every path: random shapes (B, T, D including 0 and 1),
random lengths, forms, activations, normalisations, non-contiguous inputs; results equal
``din_kernels/reference.py``; bad lengths and ids raise the documented error and leave the inputs as they
were (issue 14, item 5). Example counts are small: the Triton path runs under the interpreter here."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import din_kernels as dk
from din_kernels import reference

from conftest import BACKENDS
from problems import Case, build
from test_attention_triton import assert_matches_reference

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _on_every_backend(check):
    previous = dk.get_backend()
    try:
        for name in BACKENDS:
            dk.set_backend(name)
            check(name)
    finally:
        dk.set_backend(previous)


@SETTINGS
@given(batch=st.integers(0, 5), seq_len=st.integers(0, 8), dim=st.integers(1, 7),
       hidden=st.sampled_from([(5,), (6, 3)]), form=st.sampled_from(["concat", "outer"]),
       activation=st.sampled_from(["sigmoid", "relu", "prelu", "dice"]),
       normalize=st.sampled_from(["none", "softmax"]), strided=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_attention_equals_the_reference(batch, seq_len, dim, hidden, form, activation, normalize, strided, seed):
    torch.manual_seed(seed)  # (grad_out)
    problem = build(Case(batch, seq_len, dim, hidden, form=form, activation=activation), seed=seed)
    if strided:  # keys as a transposed view of a [B, D, T] tensor: not contiguous
        problem.keys = problem.keys.transpose(1, 2).contiguous().transpose(1, 2)
    _on_every_backend(lambda name: assert_matches_reference(problem, form=form, activation=activation,
                                                            normalize=normalize))


@SETTINGS
@given(batch=st.integers(1, 4), seq_len=st.integers(1, 6), bad=st.sampled_from([-1, 1]),
       seed=st.integers(0, 2 ** 16))
def test_attention_refuses_lengths_out_of_range_and_changes_nothing(batch, seq_len, bad, seed):
    problem = build(Case(batch, seq_len, 3, (4,)), seed=seed)
    lengths = problem.lengths.clone()
    lengths[-1] = -1 if bad < 0 else seq_len + 1
    before = {k: getattr(problem, k).clone() for k in ("query", "keys")}

    def check(name):
        with pytest.raises(ValueError, match="lengths"):
            dk.din_attention(problem.query, problem.keys, lengths, problem.weights)
        for key, value in before.items():
            assert torch.equal(getattr(problem, key), value), (name, key)
    _on_every_backend(check)


@SETTINGS
@given(rows=st.integers(0, 20), channels=st.integers(1, 9), training=st.booleans(), masked=st.booleans(),
       per_channel=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_dice_equals_the_reference(rows, channels, training, masked, per_channel, seed):
    torch.manual_seed(seed)
    x = torch.randn(rows, channels)
    alpha = torch.rand(channels if per_channel else 1)
    mask = torch.rand(1, rows) < 0.7 if masked else None
    x3 = x[None] if masked else x  # the mask goes with the [B, T, C] form

    def check(name):
        got_stats = (0.1 * torch.ones(channels), torch.ones(channels))
        want_stats = tuple(t.clone() for t in got_stats)
        xg, xw = x3.clone().requires_grad_(), x3.clone().requires_grad_()
        got = dk.dice(xg, alpha, *got_stats, training=training, mask=mask)
        want = reference.dice(xw, alpha, *want_stats, training=training, mask=mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        for g, w in zip(got_stats, want_stats):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
        if rows:
            probe = torch.randn_like(got)
            (gx,) = torch.autograd.grad(got, xg, probe)
            (wx,) = torch.autograd.grad(want, xw, probe)
            torch.testing.assert_close(gx, wx, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} dx: {m}")
    _on_every_backend(check)


@SETTINGS
@given(num_rows=st.integers(1, 30), dim=st.integers(1, 9), ids=st.lists(st.integers(0, 29), max_size=40),
       adagrad=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_mba_steps_equal_the_reference_and_refuse_bad_ids(num_rows, dim, ids, adagrad, seed):
    torch.manual_seed(seed)
    ids = torch.tensor([i % num_rows for i in ids], dtype=torch.long)
    weight = torch.randn(num_rows, dim)
    grad_rows = torch.randn(len(ids), dim)
    inv_freq = torch.rand(num_rows) + 0.1
    state = torch.rand(num_rows)

    def check(name):
        got, want = weight.clone(), weight.clone()
        if adagrad:
            got_state, want_state = state.clone(), state.clone()
            dk.mba_adagrad_(got, got_state, ids, grad_rows, inv_freq, 0.1, 0.5)
            reference.mba_adagrad_(want, want_state, ids, grad_rows, inv_freq, 0.1, 0.5)
            torch.testing.assert_close(got_state, want_state, atol=1e-6, rtol=1e-5)
        else:
            dk.mba_sgd_(got, ids, grad_rows, inv_freq, 0.1, 0.5)
            reference.mba_sgd_(want, ids, grad_rows, inv_freq, 0.1, 0.5)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        bad = torch.cat([ids, torch.tensor([num_rows])])
        untouched = weight.clone()
        with pytest.raises(IndexError, match="ids"):
            dk.mba_sgd_(untouched, bad, torch.randn(len(bad), dim), inv_freq, 0.1, 0.5)
        assert torch.equal(untouched, weight), name
    _on_every_backend(check)


def test_expanded_states_and_tables_are_refused_before_any_write():
    """Tensors an op writes must own their elements: an expanded view is refused up front, on every path,
    and nothing (the other statistic included) has been written."""
    x = torch.randn(6, 4)
    running_var = torch.ones(4)
    expanded_mean = torch.zeros(1).expand(4)

    def check(name):
        with pytest.raises(ValueError, match="running_mean is updated in place"):
            dk.dice(x, torch.rand(4), expanded_mean, running_var, training=True)
        assert torch.equal(running_var, torch.ones(4)), name
        table = torch.randn(1, 3).expand(5, 3)
        with pytest.raises(ValueError, match="weight is updated in place"):
            dk.mba_sgd_(table, torch.tensor([0, 2]), torch.randn(2, 3), torch.ones(5), 0.1, 0.5)
        with pytest.raises(ValueError, match="state is updated in place"):
            dk.mba_adagrad_(torch.randn(5, 3), torch.zeros(1).expand(5), torch.tensor([1]), torch.randn(1, 3),
                            torch.ones(5), 0.1, 0.5)
    _on_every_backend(check)


@SETTINGS
@given(batch=st.integers(1, 4), seq_len=st.integers(1, 8), dim=st.integers(1, 6),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       poison=st.sampled_from([float("nan"), float("inf"), -float("inf")]), candidates=st.integers(0, 3),
       normalize=st.sampled_from(["none", "softmax"]), seed=st.integers(0, 2 ** 16))
def test_poisoned_padding_dtypes_and_candidates(batch, seq_len, dim, dtype, poison, candidates, normalize, seed):
    """NaN or inf stored in the padded key positions never reaches an output or a gradient, in every dtype,
    one candidate per history or several (query [B, C, D]), on every path; the valid part equals the
    reference (computed in fp64 from the same values)."""
    problem = build(Case(batch, seq_len, dim, (5,), normalize=normalize, candidates=candidates or None,
                         dtype=dtype), seed=seed)
    unit, query, keys, lengths = problem.unit(), problem.query, problem.keys, problem.lengths
    padded = torch.arange(seq_len)[None, :] >= lengths[:, None]  # [B, T]
    keys[padded] = poison
    want = reference.din_attention(query.double(), torch.where(padded[..., None], 0.0, keys.double()), lengths,
                                   [w.double() for w in unit.weights()], normalize=normalize)
    tol = dict(atol=5e-2, rtol=5e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)

    def check(name):
        q, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
        out = unit(q, k, lengths)
        out.float().sum().backward()
        assert torch.isfinite(out.float()).all(), name
        assert torch.isfinite(q.grad.float()).all() and torch.isfinite(k.grad.float()).all(), name
        assert torch.all(k.grad[padded] == 0), name  # padding gets no gradient
        torch.testing.assert_close(out.double(), want, **tol, msg=lambda m: f"{name}: {m}")

    _on_every_backend(check)


@SETTINGS
@given(num_rows=st.integers(2, 30), dim=st.integers(1, 9), shape=st.sampled_from([(0,), (7,), (3, 4), (2, 0, 3)]),
       optimizer=st.sampled_from([None, "sgd", "adagrad"]), seed=st.integers(0, 2 ** 16))
def test_the_mba_module_steps_as_the_reference(num_rows, dim, shape, optimizer, seed):
    """``MBAEmbedding`` (random ids of any shape, padding row 0): the lookup is the table's rows; its sparse
    gradient (no optimizer) is ``reference.mba_embedding``'s, and a fused step equals the reference step on
    the summed gradient of each id."""
    torch.manual_seed(seed)
    ids = torch.randint(0, num_rows, shape)
    frequencies = torch.randint(1, 5, (num_rows,))

    def check(name):
        torch.manual_seed(seed)
        table = dk.MBAEmbedding(num_rows, dim, frequencies, lam=0.3, optimizer=optimizer, lr=0.1)
        start = table.weight.detach().clone()
        out = table(ids)
        torch.testing.assert_close(out.detach(), start[ids], msg=lambda m: f"{name} lookup: {m}")
        probe = torch.randn_like(out)
        out.backward(probe)
        keep = ids.reshape(-1) != 0  # the padding row steps nothing and gets no gradient
        flat_ids, flat_grads = ids.reshape(-1)[keep], probe.reshape(-1, dim)[keep]
        inv_freq = dk.inverse_frequencies(frequencies)
        if optimizer is None:
            weight = start.clone().requires_grad_()
            reference.mba_embedding(flat_ids, weight, inv_freq, 0.3).backward(flat_grads)
            dense = lambda g: torch.zeros(num_rows, dim) if g is None else g.to_dense()  # noqa: E731
            torch.testing.assert_close(dense(table.weight.grad), dense(weight.grad), atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"{name} gradient: {m}")
            return
        want = start.clone()
        if optimizer == "sgd":
            reference.mba_sgd_(want, flat_ids, flat_grads, inv_freq, 0.1, 0.3)
        else:
            reference.mba_adagrad_(want, torch.zeros(num_rows), flat_ids, flat_grads, inv_freq, 0.1, 0.3, 1e-10)
        torch.testing.assert_close(table.weight.detach(), want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    _on_every_backend(check)


@SETTINGS
@given(rows=st.integers(4, 24), channels=st.integers(1, 9), affine=st.booleans(), steps=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_the_dice_module_trains_and_evaluates_as_the_reference(rows, channels, affine, steps, seed):
    """``dk.Dice``: a few training steps (batch statistics, running statistics updated, gradients to x and
    every parameter), then eval mode (running statistics), as ``reference.dice`` with the same state. (Zero and
    one rows: ``test_dice_equals_the_reference``.)"""
    torch.manual_seed(seed)
    xs = [torch.randn(rows, channels) for _ in range(steps + 1)]

    def check(name):
        torch.manual_seed(seed)
        layer = dk.Dice(channels, affine=affine)
        with torch.no_grad():
            layer.alpha.uniform_(-0.5, 0.5)
        params = [layer.alpha] + ([layer.weight, layer.bias] if affine else [])
        mean, var = layer.running_mean.clone(), layer.running_var.clone()
        for x in xs[:-1]:
            xg, xw = x.clone().requires_grad_(), x.clone().requires_grad_()
            got = layer(xg)
            want = reference.dice(xw, *params[:1], mean, var, training=True, momentum=layer.momentum, eps=layer.eps,
                                  **({"weight": params[1], "bias": params[2]} if affine else {}))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
            probe = torch.randn_like(got)
            for a, b in zip(torch.autograd.grad(got, [xg, *params], probe),
                            torch.autograd.grad(want, [xw, *params], probe)):
                # (batch statistics of a few rows: rstd up to 1/sqrt(eps) amplifies rounding in the gradients)
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name} gradient: {m}")
        torch.testing.assert_close(layer.running_mean, mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.running_var, var, atol=1e-6, rtol=1e-5)
        layer.eval()
        with torch.no_grad():
            want = reference.dice(xs[-1], *params[:1], mean, var, training=False, eps=layer.eps,
                                  **({"weight": params[1], "bias": params[2]} if affine else {}))
            torch.testing.assert_close(layer(xs[-1]), want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} eval: {m}")
    _on_every_backend(check)


@SETTINGS
@given(num_rows=st.integers(1, 20), ids=st.lists(st.integers(-3, 25), max_size=30), seed=st.integers(0, 99))
def test_row_frequencies_count_or_refuse(num_rows, ids, seed):
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
        with pytest.raises(IndexError, match="ids"):
            dk.row_frequencies(ids, num_rows)
        return
    counts = dk.row_frequencies(ids, num_rows)
    assert torch.equal(counts, reference.row_frequencies(ids, num_rows))
    inverse = dk.inverse_frequencies(counts)
    assert torch.equal(inverse == 0, counts == 0)
    torch.testing.assert_close(inverse[counts > 0], 1.0 / counts[counts > 0].float())
