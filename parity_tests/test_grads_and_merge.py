"""Gradients of the adapter, and merged weights and merged outputs, torch vs Linen vs NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import nnx

import jaxlora
from parity_tests.twins import flax_params, linen_twin, nnx_twin, rel_err, to_np, torch_layer

CASES = [
    pytest.param(dict(n_in=48, n_out=32, r=4, alpha=None), id="alpha-default"),
    pytest.param(dict(n_in=48, n_out=32, r=8, alpha=16), id="alpha16"),
    pytest.param(dict(n_in=20, n_out=70, r=3, alpha=2.5, bias=False), id="nobias-alpha2.5"),
    pytest.param(dict(n_in=64, n_out=64, r=16, alpha=8, use_rslora=True), id="rslora"),
]


def _layer(case):
    case = dict(case)
    return torch_layer(case.pop("n_in"), case.pop("n_out"), case.pop("r"), **case)


def _inputs(layer, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, layer.in_features)).astype("f4")
    cotangent = rng.standard_normal((3, 5, layer.out_features)).astype("f4")
    return x, cotangent


@pytest.mark.parametrize("case", CASES)
def test_adapter_gradients(case):
    """d/dA and d/dB of sum(y · g) for a fixed random g agree across the three frameworks."""
    layer = _layer(case)
    x, g = _inputs(layer)
    (layer(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)

    module, variables = linen_twin(layer)
    adapter, base = jaxlora.split(variables["params"])

    def linen_loss(adapter):
        params = jaxlora.combine(adapter, base)
        return jnp.sum(module.apply({"params": params}, x) * g)

    grads = jax.grad(linen_loss)(adapter)

    model = nnx_twin(layer)

    def nnx_loss(model):
        return jnp.sum(model(jnp.asarray(x)) * g)

    nnx_grads = nnx.grad(nnx_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert set(nnx_grads.keys()) == {"lora_a", "lora_b"}

    # grads of A, B sum over 15 rows of products of O(1) values: fp32 rounding ~1e-6 relative.
    for name in ("lora_a", "lora_b"):
        expected = getattr(layer, name).grad.T
        assert rel_err(grads[name], expected) <= 1e-5, name
        assert rel_err(nnx_grads[name][...], expected) <= 1e-5, name


@pytest.mark.parametrize("case", CASES)
def test_merged_weights_and_outputs(case):
    layer = _layer(case)
    x, _ = _inputs(layer)
    unmerged_out = layer(torch.from_numpy(x)).detach()
    module, variables = linen_twin(layer)
    merged, record = jaxlora.merge(
        variables, alpha=layer.alpha, use_rslora=layer.use_rslora, record=True
    )
    layer.merge()

    # The merged kernel is K0 + scaling·a@b, each entry a sum of r products: fp32-exact to ~1e-7.
    assert rel_err(merged["params"]["kernel"], layer.weight.T) <= 1e-6
    assert set(merged["params"]) == {"kernel"} | ({"bias"} if layer.bias is not None else set())

    plain = nn.Dense(layer.out_features, use_bias=layer.bias is not None)
    y_plain = plain.apply(merged, jnp.asarray(x))
    y_torch = layer(torch.from_numpy(x))
    assert rel_err(y_torch, unmerged_out) <= 1e-5
    assert rel_err(y_plain, y_torch) <= 1e-5
    assert rel_err(y_plain, module.apply(variables, jnp.asarray(x))) <= 1e-5

    layer.unmerge()
    unmerged = jaxlora.unmerge(merged, record)
    original = flax_params(layer)
    for name, value in original.items():
        assert rel_err(unmerged["params"][name], value) <= 1e-6, name


def test_to_linear_matches_jax_merge():
    layer = _layer(CASES[1].values[0])
    linear = layer.to_linear()
    merged = jaxlora.merge({"params": flax_params(layer)}, alpha=layer.alpha)
    np.testing.assert_allclose(
        to_np(linear.weight.T), to_np(merged["params"]["kernel"]), rtol=0, atol=1e-6
    )
