"""jaxlora.nnx.inject / merge: module surgery on unmodified NNX models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
import jaxlora.nnx
from jaxlora.nnx import LoRALinear


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(10, 16, rngs=rngs)
        self.query = nnx.Linear(16, 16, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)])

    def __call__(self, tokens):
        h = self.query(self.embed(tokens))
        return self.layers[1](jax.nn.relu(self.layers[0](h)))


TOKENS = jnp.arange(6).reshape(2, 3)
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def test_inject_shares_kernel_and_starts_equal():
    model = Net(nnx.Rngs(0))
    kernel = model.query.kernel
    before = model(TOKENS)
    config = jaxlora.LoRAConfig(r=4, alpha=8, targets=["query", "layers.1"])
    assert jaxlora.nnx.inject(model, config, nnx.Rngs(1)) is model
    assert isinstance(model.query, LoRALinear) and isinstance(model.layers[1], LoRALinear)
    assert type(model.layers[0]) is nnx.Linear
    assert model.query.kernel is kernel and model.lora_config == config
    np.testing.assert_array_equal(model(TOKENS), before)
    report = jaxlora.nnx.trainable_parameters(model)
    assert report.trainable == 4 * (16 + 16) + 4 * (16 + 4)


def test_training_touches_only_the_adapter_and_merge_restores_linear():
    model = Net(nnx.Rngs(0))
    jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=4, alpha=8, targets=["query"]), nnx.Rngs(1))
    base = {
        k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, FROZEN))
    }
    optimizer = nnx.Optimizer(model, optax.adam(1e-1), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: jnp.mean(m(TOKENS) ** 2)  # noqa: E731
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer)
    after = dict(jax.tree_util.tree_leaves_with_path(nnx.state(model, FROZEN)))
    assert all(np.array_equal(after[k], v) for k, v in base.items())
    assert np.abs(np.asarray(model.query.lora_b[...])).sum() > 0

    adapted = model(TOKENS)
    expected_kernel = np.asarray(model.query.kernel[...]) + 2.0 * np.asarray(
        model.query.lora_a[...]
    ) @ np.asarray(model.query.lora_b[...])
    jaxlora.nnx.merge(model)
    assert type(model.query) is nnx.Linear and not hasattr(model, "lora_config")
    np.testing.assert_allclose(model.query.kernel[...], expected_kernel, atol=1e-6)
    np.testing.assert_allclose(model(TOKENS), adapted, atol=1e-5)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))


def test_failed_inject_changes_nothing():
    model = Net(nnx.Rngs(0))
    with pytest.raises(
        TypeError,
        match=r"layer 'layers' is a List, which cannot be adapted; supported: nnx.Linear, ",
    ):
        jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["query", "layers"]), nnx.Rngs(0))
    assert type(model.query) is nnx.Linear
    # PiSSA would rewrite query's kernel; the embedding it cannot adapt is found first.
    with pytest.raises(ValueError, match=r"'embed': init='pissa' adapts linear layers only"):
        jaxlora.nnx.inject(
            model, jaxlora.LoRAConfig(r=2, targets=["query", "embed"], init="pissa"), nnx.Rngs(0)
        )
    assert type(model.query) is nnx.Linear and type(model.embed) is nnx.Embed
    with pytest.raises(ValueError, match=r"layer 'layers.1': r must be in \[1, min\(in, out\)\]"):
        jaxlora.nnx.inject(
            model, jaxlora.LoRAConfig(r=8, targets=["query", "layers.1"]), nnx.Rngs(0)
        )
    assert type(model.query) is nnx.Linear
    with pytest.raises(
        ValueError, match="the layer paths are: embed, layers, layers.0, layers.1, query"
    ):
        jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["qkv"]), nnx.Rngs(0))
    jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["query"]), nnx.Rngs(0))
    with pytest.raises(TypeError, match="'query' is a LoRALinear"):
        jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["query"]), nnx.Rngs(0))


def test_merge_refuses_non_finite_and_changes_nothing():
    model = Net(nnx.Rngs(0))
    jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["query", "layers.0"]), nnx.Rngs(0))
    model.layers[0].lora_b[...] = jnp.full((2, 16), jnp.inf)
    with pytest.raises(ValueError, match="layer 'layers.0': the merged weight has non-finite"):
        jaxlora.nnx.merge(model)
    assert isinstance(model.query, LoRALinear) and isinstance(model.layers[0], LoRALinear)
