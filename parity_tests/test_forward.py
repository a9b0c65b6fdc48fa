"""Forward outputs: torch reference vs Linen vs NNX vs a float64 numpy reference."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from parity_tests.twins import (
    linen_twin,
    nnx_twin,
    reference_forward,
    reference_magnitude,
    rel_err,
    torch_layer,
)

# fp32 matmuls accumulate rounding error ~ eps·sqrt(in) ≈ 1e-6 (in ≤ 300) of the size of the
# terms they sum (``reference_magnitude``); 1e-5 of it leaves room for the different summation
# orders of torch's and XLA's kernels. (Relative to the output itself the error is unbounded:
# hypothesis found a single output of -0.004 summing terms of ~1 with error 1.2e-5 of it.)
FP32_TOL = 1e-5

SHAPES = [(1, 1, 1), (7, 3, 2), (64, 64, 8), (300, 17, 17), (16, 128, 1)]
BATCH = [(), (5,), (2, 3)]
ALPHA = [None, 4, 2.5]


def _check_all(layer, batch, seed=0):
    x = np.random.default_rng(seed).standard_normal((*batch, layer.in_features)).astype("f4")
    y_torch = layer(torch.from_numpy(x))
    module, params = linen_twin(layer)
    y_linen = module.apply(params, jnp.asarray(x))
    y_nnx = nnx_twin(layer)(jnp.asarray(x))
    y_ref = reference_forward(layer, x.astype(np.float64))
    scale = reference_magnitude(layer, x.astype(np.float64))
    assert y_torch.shape == (*batch, layer.out_features)
    for name, y in [("torch", y_torch), ("linen", y_linen), ("nnx", y_nnx)]:
        assert rel_err(y, y_ref, scale) <= FP32_TOL, f"{name} vs float64 reference"
    assert rel_err(y_linen, y_torch, scale) <= FP32_TOL
    assert rel_err(y_nnx, y_torch, scale) <= FP32_TOL


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"in{s[0]}-out{s[1]}-r{s[2]}")
@pytest.mark.parametrize("batch", BATCH, ids=lambda b: "batch" + "x".join(map(str, b)))
def test_forward_grid(shape, batch):
    n_in, n_out, r = shape
    for alpha, bias, rslora in itertools.product(ALPHA, (True, False), (False, True)):
        layer = torch_layer(n_in, n_out, r, alpha=alpha, bias=bias, use_rslora=rslora)
        _check_all(layer, batch)


@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(1, 300),
    n_out=st.integers(1, 300),
    r_frac=st.floats(0.0, 1.0),
    batch=st.lists(st.integers(1, 4), max_size=3).map(tuple),
    alpha=st.one_of(st.none(), st.integers(1, 64), st.floats(0.1, 64.0)),
    bias=st.booleans(),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
# A single output near 0 that sums much larger terms (see FP32_TOL).
@example(n_in=234, n_out=1, r_frac=0.0, batch=(), alpha=1.5, bias=True, rslora=False, seed=12043)
def test_forward_search(n_in, n_out, r_frac, batch, alpha, bias, rslora, seed):
    r = 1 + int(r_frac * (min(n_in, n_out) - 1))
    layer = torch_layer(n_in, n_out, r, alpha=alpha, bias=bias, use_rslora=rslora, seed=seed)
    _check_all(layer, batch, seed)


def test_forward_bf16():
    """bf16 weights and inputs in all three; each compared with a float64 reference on the
    same bf16 values.

    bf16 keeps 8 significant bits (unit roundoff u = 2**-8 ≈ 3.9e-3). The output is rounded after
    the base matmul, the LoRA matmuls and the sum: ~4 roundings of u of the output scale, so
    1.5e-2 bounds it (measured: 5.0e-3 against the
    reference, 2.7e-3 between torch and JAX).
    """
    tol = 1.5e-2
    layer = torch_layer(96, 48, 8, alpha=16, dtype=torch.bfloat16)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y_ref = reference_forward(layer, x.double().numpy())
    y_torch = layer(x)
    module, params = linen_twin(layer)
    x_jax = jnp.asarray(x.float().numpy(), jnp.bfloat16)
    y_linen = module.apply(params, x_jax)
    y_nnx = nnx_twin(layer)(x_jax)
    assert y_torch.dtype == torch.bfloat16 and y_linen.dtype == y_nnx.dtype == jnp.bfloat16
    for y in (y_torch, y_linen, y_nnx):
        assert rel_err(y, y_ref) <= tol
    assert rel_err(y_linen, y_torch) <= tol
    assert rel_err(y_nnx, y_torch) <= tol
