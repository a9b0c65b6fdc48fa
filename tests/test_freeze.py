"""lora_mask, freeze_base (optimizer state and frozen base), split/combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.core import FrozenDict

import jaxlora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(jaxlora.LoRADense(64, 4, name="fc1")(x))
        x = jax.nn.relu(nn.Dense(64, name="plain")(x))
        return jaxlora.LoRADense(8, 2, name="fc2")(x)


X = jnp.ones((5, 32))


def _params():
    return MLP().init(jax.random.key(0), X)["params"]


def _nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree) if hasattr(leaf, "nbytes"))


def test_lora_mask():
    mask = jaxlora.lora_mask(_params())
    flat = {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert {k for k, v in flat.items() if v} == {
        "fc1/lora_a",
        "fc1/lora_b",
        "fc2/lora_a",
        "fc2/lora_b",
    }
    assert len(flat) == 10


def test_freeze_base_state_holds_only_adapter_moments():
    params = _params()
    adapter, _ = jaxlora.split(params)
    state = jaxlora.freeze_base(optax.adam(1e-3)).init(params)
    moments = [leaf for leaf in jax.tree.leaves(state) if getattr(leaf, "ndim", 0) > 0]
    # Adam keeps mu and nu per trained leaf, plus one int32 step count: nothing for the base.
    assert sum(m.nbytes for m in moments) == 2 * _nbytes(adapter)
    assert _nbytes(state) == 2 * _nbytes(adapter) + 4
    assert sorted(m.shape for m in moments) == sorted(
        2 * [v.shape for v in jax.tree.leaves(adapter)]
    )


def _loss(params):
    return jnp.sum(MLP().apply({"params": params}, X) ** 2)


def _one_step(tx, params):
    for name in ("fc1", "fc2"):  # B = 0 would give A a zero gradient
        params[name]["lora_b"] = jnp.full_like(params[name]["lora_b"], 0.1)
    grads = jax.grad(_loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return params, optax.apply_updates(params, updates)


def test_freeze_base_keeps_base_bit_identical():
    before, after = _one_step(jaxlora.freeze_base(optax.adam(1e-2)), _params())
    mask = jaxlora.lora_mask(before)
    moved = jax.tree.map(
        lambda a, b: (
            not np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
        ),
        before,
        after,
    )
    assert jax.tree.map(lambda m, v: v and not m, mask, moved) == jax.tree.map(
        lambda _: False, mask
    )
    assert moved["fc1"]["lora_a"] and moved["fc2"]["lora_b"]


def test_optax_masked_alone_moves_the_base():
    """The pitfall, kept visible: optax.masked passes the frozen leaves' raw gradients through."""
    params = _params()
    before, after = _one_step(optax.masked(optax.adam(1e-2), jaxlora.lora_mask(params)), params)
    assert not np.array_equal(before["plain"]["kernel"], after["plain"]["kernel"])
    assert not np.array_equal(before["fc1"]["kernel"], after["fc1"]["kernel"])


def test_freeze_base_custom_mask_and_empty_mask():
    params = _params()
    mask = jax.tree.map(lambda _: False, params)
    mask["plain"]["bias"] = True
    before, after = _one_step(jaxlora.freeze_base(optax.sgd(1.0), mask), params)
    assert not np.array_equal(before["plain"]["bias"], after["plain"]["bias"])
    assert np.array_equal(before["fc1"]["lora_a"], after["fc1"]["lora_a"])
    with pytest.raises(ValueError, match="selects no leaf to train"):
        jaxlora.freeze_base(optax.adam(1e-3)).init({"dense": {"kernel": jnp.ones((2, 2))}})


def test_split_combine_roundtrip():
    params = _params()
    adapter, base = jaxlora.split(params)
    assert set(adapter) == {"fc1", "fc2"} and set(adapter["fc1"]) == {"lora_a", "lora_b"}
    assert set(base) == {"fc1", "fc2", "plain"} and set(base["fc1"]) == {"kernel", "bias"}
    assert jax.tree.structure(jaxlora.combine(adapter, base)) == jax.tree.structure(params)
    frozen = FrozenDict(params)
    adapter_f, base_f = jaxlora.split(frozen)
    assert isinstance(adapter_f, FrozenDict) and isinstance(base_f, FrozenDict)
    with pytest.raises(ValueError, match="'fc1.kernel' is in both trees"):
        jaxlora.combine(base, base)
    with pytest.raises(TypeError, match="nested dict"):
        jaxlora.split([1, 2])


def test_adapter_only_gradient_matches_full_gradient():
    params = _params()
    params["fc2"]["lora_b"] = jnp.ones_like(params["fc2"]["lora_b"])
    adapter, base = jaxlora.split(params)
    g_adapter = jax.grad(lambda a: _loss(jaxlora.combine(a, base)))(adapter)
    g_full = jaxlora.split(jax.grad(_loss)(params))[0]
    jax.tree.map(np.testing.assert_array_equal, g_adapter, g_full)
