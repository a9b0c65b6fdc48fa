"""jaxlora.nnx.LoRALinear (Flax NNX): params, training only the adapter, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlora.nnx import LoRALinear

X = jnp.asarray(np.random.default_rng(0).standard_normal((6, 12)), jnp.float32)


def _model(**kwargs):
    return LoRALinear(12, 8, r=kwargs.pop("r", 3), rngs=nnx.Rngs(0), **kwargs)


def test_param_types_and_init():
    model = _model()
    assert type(model.kernel) is nnx.Param and type(model.bias) is nnx.Param
    assert type(model.lora_a) is nnx.LoRAParam and type(model.lora_b) is nnx.LoRAParam
    assert model.lora_a.shape == (12, 3) and model.lora_b.shape == (3, 8)
    assert np.abs(np.asarray(model.lora_a[...])).max() <= 1 / np.sqrt(12)
    np.testing.assert_allclose(model(X), X @ model.kernel[...] + model.bias[...], atol=1e-6)
    plain = nnx.Linear(12, 8, rngs=nnx.Rngs(0))
    assert plain.kernel.shape == model.kernel.shape  # same names and layout as nnx.Linear


def test_forward_matches_formula():
    model = _model(alpha=6)
    model.lora_b[...] = jax.random.normal(jax.random.key(1), (3, 8))
    k, b, a, bb = (
        np.asarray(v[...], np.float64)
        for v in (model.kernel, model.bias, model.lora_a, model.lora_b)
    )
    x = np.asarray(X, np.float64)
    np.testing.assert_allclose(model(X), x @ k + b + 2.0 * x @ a @ bb, rtol=1e-5, atol=1e-5)


def _train(model, wrt):
    optimizer = nnx.Optimizer(model, optax.adam(1e-1), wrt=wrt)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(X) ** 2), argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer)


def test_optimizer_with_lora_filter_trains_only_adapter():
    model = _model()
    kernel, bias, lora_b = (np.asarray(v[...]) for v in (model.kernel, model.bias, model.lora_b))
    _train(model, nnx.LoRAParam)
    assert np.array_equal(np.asarray(model.kernel[...]), kernel)
    assert np.array_equal(np.asarray(model.bias[...]), bias)
    assert not np.array_equal(np.asarray(model.lora_b[...]), lora_b)


def test_plain_param_filter_would_train_base():
    """The pitfall, kept visible: LoRAParam subclasses Param, so wrt=nnx.Param trains W too."""
    model = _model()
    kernel = np.asarray(model.kernel[...])
    _train(model, nnx.Param)
    assert not np.array_equal(np.asarray(model.kernel[...]), kernel)


def test_dropout_follows_nnx_train_eval():
    model = _model(dropout=0.5)
    model.lora_b[...] = jnp.ones((3, 8))
    y1, y2 = model(X), model(X)
    assert not np.allclose(y1, y2)  # train mode: fresh masks
    model.eval()
    np.testing.assert_array_equal(model(X), model(X))
    k, b, a, bb = (v[...] for v in (model.kernel, model.bias, model.lora_a, model.lora_b))
    np.testing.assert_allclose(model(X), X @ k + b + X @ a @ bb, rtol=1e-5, atol=1e-5)
    model.train()
    np.testing.assert_allclose(model(X, deterministic=True), model(X, deterministic=True))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(r=9),
            ValueError,
            r"LoRALinear\(12, 8\): r must be in \[1, min\(in, out\)\] = \[1, 8\]",
        ),
        (dict(r=-1), ValueError, "got -1"),
        (dict(r="4"), TypeError, "r must be an int"),
        (dict(dropout=1.0), ValueError, "dropout must be in"),
    ],
    ids=["r-too-big", "r-negative", "r-str", "dropout-1"],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        _model(**kwargs)


def test_bad_input():
    with pytest.raises(ValueError, match=r"in_features=12, got shape \(6, 11\)"):
        _model()(jnp.ones((6, 11)))
