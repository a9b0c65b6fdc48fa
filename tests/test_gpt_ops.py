"""The twin GPT's hand-written ops (their backward passes are written out for speed) against
independent references: Flax's LayerNorm, a float64 closed form of GELU, and autodiff of the
textbook attention formula."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxlora.models import gpt as jgpt


def _grads(f, *args):
    weights = jax.random.normal(jax.random.key(9), jnp.shape(f(*args)))
    return jax.grad(lambda *a: (f(*a) * weights).sum(), argnums=tuple(range(len(args))))(*args)


def _close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(actual - expected).max() <= tol * scale


def test_layer_norm_matches_flax_values_and_gradients():
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (4, 7, 96)) * 3 + 1
    scale, bias = jax.random.normal(keys[1], (96,)), jax.random.normal(keys[2], (96,))

    def flax_ln(x, scale, bias):
        module = nn.LayerNorm(1e-5, use_fast_variance=False)
        return module.apply({"params": {"scale": scale, "bias": bias}}, x)

    def ours(x, scale, bias):
        return jgpt.layer_norm(x, scale, bias, 1e-5)

    # fp32, values of order 10: a few ulps of the output scale.
    _close(ours(x, scale, bias), flax_ln(x, scale, bias), 1e-6)
    mine_all, ref_all = _grads(ours, x, scale, bias), _grads(flax_ln, x, scale, bias)
    for mine, ref in zip(mine_all, ref_all, strict=True):
        _close(mine, ref, 1e-6)


def test_layer_norm_dtypes_follow_flax():
    x = jnp.ones((2, 8), jnp.bfloat16) * jnp.arange(8, dtype=jnp.bfloat16)
    scale, bias = jnp.ones(8), jnp.zeros(8)
    y = jgpt.layer_norm(x, scale, bias, 1e-5)
    assert y.dtype == jnp.float32  # promoted with the fp32 params, as nn.LayerNorm
    dx, dscale, dbias = jax.grad(lambda *a: jgpt.layer_norm(*a, 1e-5).sum(), argnums=(0, 1, 2))(
        x, scale, bias
    )
    assert (dx.dtype, dscale.dtype, dbias.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)


def test_gelu_and_its_derivative_match_the_float64_closed_form():
    x = np.linspace(-9, 9, 2001).astype(np.float32)
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    pdf = np.exp(-0.5 * x64**2) / math.sqrt(2 * math.pi)
    value = jgpt.gelu(jnp.asarray(x))
    slope = jax.vmap(jax.grad(jgpt.gelu))(jnp.asarray(x))
    # fp32 against float64: |error| within a few ulps of the magnitudes involved.
    assert np.abs(np.asarray(value) - x64 * cdf).max() <= 4e-6
    assert np.abs(np.asarray(slope) - (cdf + x64 * pdf)).max() <= 4e-6


@pytest.mark.parametrize("t", [1, 5, 32])
def test_attention_matches_autodiff_of_the_textbook_formula(t):
    keys = jax.random.split(jax.random.key(t), 3)
    q, k, v = (jax.random.normal(key, (2, 3, t, 8)) for key in keys)

    def textbook(q, k, v):
        scores = q @ jnp.swapaxes(k, -1, -2)
        causal = jnp.tril(jnp.ones((t, t), bool))
        return jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1) @ v

    _close(jgpt._attention(q, k, v), textbook(q, k, v), 1e-6)
    mine_all, ref_all = _grads(jgpt._attention, q, k, v), _grads(textbook, q, k, v)
    for mine, ref in zip(mine_all, ref_all, strict=True):
        _close(mine, ref, 1e-5)


def _erf_kept(gelu) -> list[str]:
    """The fusions of a jitted MLP gradient's optimized HLO that write ``erf`` out as an
    array (a fusion whose root is the ``erf``), rather than computing it inside a fused pass."""
    shapes = [(64, 8), (8, 32), (32, 8)]
    x, w1, w2 = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes))

    def loss(x, w1, w2):
        return jnp.sum(gelu(x @ w1) @ w2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w1, w2).compile().as_text()
    assert " erf(" in hlo  # the test reads the HLO it checks
    roots = [line for line in hlo.splitlines() if line.lstrip().startswith("ROOT")]
    return [line for line in roots if " erf(" in line]


def test_gelu_backward_recomputes_erf_instead_of_keeping_it():
    """Kept from the forward pass, ``erf`` costs XLA:CPU a write and two reads of the MLP's
    widest activation (twin GPT LoRA step: −5% CPU time when it is recomputed)."""
    assert _erf_kept(jgpt.gelu) == []


def test_gelu_supports_forward_mode():
    x = jnp.linspace(-4, 4, 9)
    value, tangent = jax.jvp(jgpt.gelu, (x,), (jnp.ones_like(x),))
    _close(value, jgpt.gelu(x), 0)
    _close(tangent, jax.vmap(jax.grad(jgpt.gelu))(x), 0)
