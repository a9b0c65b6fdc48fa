"""jaxlora.LoRADense (Flax Linen) against nn.Dense and closed-form references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxlora

X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 24)), jnp.float32)


def test_drop_in_for_dense():
    """Same kernel/bias names, shapes and init values as nn.Dense at the same rng."""
    key = jax.random.key(0)
    lora = jaxlora.LoRADense(16, 4).init(key, X)["params"]
    dense = nn.Dense(16).init(key, X)["params"]
    assert set(lora) == {"kernel", "bias", "lora_a", "lora_b"}
    assert lora["kernel"].shape == (24, 16) and lora["lora_a"].shape == (24, 4)
    assert lora["lora_b"].shape == (4, 16)
    np.testing.assert_array_equal(lora["kernel"], dense["kernel"])
    np.testing.assert_array_equal(lora["bias"], dense["bias"])
    # A pretrained Dense tree plus a fresh adapter runs, and starts equal to the Dense model.
    y = jaxlora.LoRADense(16, 4).apply(
        {"params": {**dense, "lora_a": lora["lora_a"], "lora_b": lora["lora_b"]}}, X
    )
    np.testing.assert_array_equal(y, nn.Dense(16).apply({"params": dense}, X))


def test_lora_a_init_matches_torch_kaiming_uniform():
    n_in = 512
    params = jaxlora.LoRADense(256, 64).init(jax.random.key(1), jnp.ones((1, n_in)))["params"]
    a = np.asarray(params["lora_a"])
    bound = 1 / math.sqrt(n_in)  # kaiming_uniform(a=√5) on the (r, in) torch tensor
    assert np.abs(a).max() <= bound
    assert abs(a.var() - bound**2 / 3) < 0.05 * bound**2 / 3
    assert abs(np.mean(np.abs(a) < bound / 2) - 0.5) < 0.02  # flat, not bell-shaped
    assert not np.asarray(params["lora_b"]).any()


@pytest.mark.parametrize("alpha,rslora", [(None, False), (12, False), (12, True)])
def test_forward_matches_formula(alpha, rslora):
    module = jaxlora.LoRADense(16, 4, alpha, use_rslora=rslora)
    params = module.init(jax.random.key(0), X)
    params["params"]["lora_b"] = jax.random.normal(jax.random.key(2), (4, 16))
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params["params"])
    scale = (4 if alpha is None else alpha) / (2.0 if rslora else 4.0)
    x = np.asarray(X, np.float64)
    expected = x @ p["kernel"] + p["bias"] + scale * (x @ p["lora_a"] @ p["lora_b"])
    np.testing.assert_allclose(module.apply(params, X), expected, rtol=1e-5, atol=1e-5)
    assert module.scaling == scale


def test_forward_mode_and_batching_through_the_branch():
    """jvp, vmap and grad all pass the branch's layout barrier: the output is bilinear in
    (a, b), so its derivative along (da, db) is s·(x @ da @ b + x @ a @ db) exactly."""
    module = jaxlora.LoRADense(16, 4, 8)
    params = module.init(jax.random.key(0), X)["params"]
    params["lora_b"] = jax.random.normal(jax.random.key(2), (4, 16))
    da = jax.random.normal(jax.random.key(3), params["lora_a"].shape)
    db = jax.random.normal(jax.random.key(4), params["lora_b"].shape)

    def out(a, b):
        return module.apply({"params": {**params, "lora_a": a, "lora_b": b}}, X)

    _, tangent = jax.jvp(out, (params["lora_a"], params["lora_b"]), (da, db))
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x, s = np.asarray(X, np.float64), module.scaling
    expected = s * (x @ np.asarray(da, np.float64) @ p["lora_b"])
    expected += s * (x @ p["lora_a"] @ np.asarray(db, np.float64))
    np.testing.assert_allclose(tangent, expected, rtol=1e-5, atol=1e-5)
    # A batch of adapters under vmap gives each adapter's own output and gradient.
    a_batch = jnp.stack([params["lora_a"], da])
    outs = jax.vmap(out, in_axes=(0, None))(a_batch, params["lora_b"])
    np.testing.assert_allclose(outs[1], out(da, params["lora_b"]), rtol=1e-6, atol=1e-6)
    grads = jax.vmap(jax.grad(lambda a, b: jnp.sum(out(a, b))), in_axes=(0, None))(
        a_batch, params["lora_b"]
    )
    # d sum(out)/da = s · xᵀ 1 (b 1)ᵀ: the same for every a.
    g = s * np.outer(x.reshape(-1, x.shape[-1]).sum(0), p["lora_b"].sum(1))
    np.testing.assert_allclose(grads, np.stack([g, g]), rtol=1e-5, atol=1e-4)


def test_dtype_and_param_dtype():
    module = jaxlora.LoRADense(8, 2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = module.init(jax.random.key(0), X)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    assert module.apply(params, X).dtype == jnp.bfloat16
    no_bias = jaxlora.LoRADense(8, 2, use_bias=False).init(jax.random.key(0), X)["params"]
    assert "bias" not in no_bias


def test_dropout_needs_rng_only_in_train_mode():
    module = jaxlora.LoRADense(8, 2, dropout=0.5)
    params = module.init(jax.random.key(0), X)
    module.apply(params, X)  # deterministic by default
    with pytest.raises(Exception, match="dropout"):
        module.apply(params, X, deterministic=False)


def test_jit_and_layer_path_in_errors():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jaxlora.LoRADense(8, 9, name="proj")(nn.Dense(8, name="inp")(x))

    with pytest.raises(ValueError, match=r"LoRADense at 'proj': r must be in \[1, min"):
        Net().init(jax.random.key(0), X)
    module = jaxlora.LoRADense(8, 2)
    params = module.init(jax.random.key(0), X)
    assert jax.jit(module.apply)(params, X).shape == (4, 3, 8)


@pytest.mark.parametrize(
    "r,error,match",
    [
        (0, ValueError, r"\[1, 8\], got 0"),
        (2.5, TypeError, "r must be an int"),
    ],
)
def test_bad_rank(r, error, match):
    with pytest.raises(error, match=match):
        jaxlora.LoRADense(8, r).init(jax.random.key(0), X)


def test_bad_dropout():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        jaxlora.LoRADense(8, 2, dropout=1.5).init(jax.random.key(0), X)


def test_bad_input_and_params():
    module = jaxlora.LoRADense(8, 2)
    params = module.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"in_features=24, got shape \(2, 23\)"):
        module.apply(params, jnp.ones((2, 23)))
    bad = {"params": {**params["params"], "lora_b": jnp.zeros((3, 8))}}
    with pytest.raises(ValueError, match=r"'lora_b': expected shape \(2, 8\), got \(3, 8\)"):
        module.apply(bad, X)
