"""The activation registry (``din_kernels.activations``): each entry's three torch formulas agree with the
reference's (values and derivatives, fp64), its flags with what the ops ask for, and the plan sends an
activation without fused kernels to the composite path on every backend."""
import pytest
import torch

import din_kernels as dk
from din_kernels import reference
from din_kernels.activations import ACTIVATION_SPECS, ACTIVATIONS, activation_spec


def layer_inputs(spec, width=7, positions=11):
    torch.manual_seed(0)
    z = torch.randn(positions, width, dtype=torch.float64)
    z[0, :3] = 0.0  # the kinks of relu / prelu sit at 0: both sides' conventions are checked
    alpha = 0.25 + 0.5 * torch.rand(width, dtype=torch.float64) if spec.has_alpha else None
    stats = (0.2 * torch.randn(width, dtype=torch.float64), 0.5 + torch.rand(width, dtype=torch.float64))
    return z, alpha, stats if spec.has_stats else None


def reference_layer(z, name, alpha, stats, eps=1e-8):
    mask = torch.ones(z.shape[:-1], dtype=torch.bool)
    return reference._hidden_activation(z, name, 0, mask, [alpha], [stats] if stats else None, False, 0.1, eps)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_each_entry_matches_the_reference_and_its_derivative(name):
    spec = activation_spec(name)
    z, alpha, stats = layer_inputs(spec)
    mean, rstd = (stats[0], torch.rsqrt(stats[1] + 1e-8)) if stats else (None, None)
    z_ref = z.clone().requires_grad_()
    alpha_ref = alpha.clone().requires_grad_() if alpha is not None else None
    want = reference_layer(z_ref, name, alpha_ref, stats)
    dh = torch.randn_like(want)
    want.backward(dh)

    torch.testing.assert_close(spec.apply(z.clone(), alpha, mean, rstd), want.detach())
    z_in = z.clone()
    h = spec.forward_(z_in, alpha, mean, rstd)
    torch.testing.assert_close(h, want.detach())
    saved = {"output": h, "input": z_in, None: None}[spec.saves]
    if spec.saves == "input":
        torch.testing.assert_close(z_in, z)  # what the backward reads was left intact
    dz, dalpha = spec.backward_(dh.clone(), saved, alpha, mean, rstd)
    torch.testing.assert_close(dz, z_ref.grad)
    assert (dalpha is not None) == spec.has_alpha
    if spec.has_alpha:
        torch.testing.assert_close(dalpha, alpha_ref.grad)


def test_registry_order_codes_and_flags():
    assert ACTIVATIONS == tuple(ACTIVATION_SPECS) == dk.ACTIVATIONS
    codes = [spec.code for spec in ACTIVATION_SPECS.values() if spec.fused]
    assert sorted(codes) == list(range(len(codes)))  # the kernels' ACT branches: 0 .. n-1, each once
    assert {name for name, spec in ACTIVATION_SPECS.items() if spec.has_alpha} == {"prelu", "dice"}
    assert {name for name, spec in ACTIVATION_SPECS.items() if spec.has_stats} == {"dice"}
    with pytest.raises(ValueError, match="activation must be one of"):
        activation_spec("swish")


@pytest.mark.parametrize("backend_name", ["triton", "torch", "cpp"])
def test_an_unfused_activation_runs_composite_on_every_backend(backend_name):
    torch.manual_seed(1)
    unit = dk.LocalActivationUnit(4, (8, 4), activation="tanh")
    query, keys, lengths = torch.randn(40, 4), torch.randn(40, 130, 4), torch.randint(0, 131, (40,))
    previous = dk.get_backend()
    try:
        dk.set_backend(backend_name)
        assert dk.explain(query, keys, lengths, unit.weights(), activation="tanh").startswith(
            "composite: the torch composite path: activation 'tanh' has no fused kernels")
        query.requires_grad_()
        out = unit(query, keys, lengths)
        out.sum().backward()
    finally:
        dk.set_backend(previous)
    q_ref = query.detach().clone().requires_grad_()
    want = reference.din_attention(q_ref, keys, lengths, unit.weights(), activation="tanh")
    want.sum().backward()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(query.grad, q_ref.grad, atol=1e-5, rtol=1e-4)
