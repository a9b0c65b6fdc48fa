"""Adapter stacks refuse a module adapted at its weight's product that contains another adapted
layer, up front, naming both paths (NNX ``to_multi``, Linen ``stack_adapters``), and change
nothing; adapting either the module or its submodule alone is served, each row equal to its
own adapter alone (1e-6 of the output's scale, fp32).

Before: ``to_multi`` accepted the nesting and then refused every call with "cannot be traced
with 4 examples ... the examples' axis is contracted"; ``stack_adapters`` accepted it and
``intercept_stack`` computed the forward without the inner layer's adapters, refusing only on
leaving the context ("never called").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxlora
import jaxlora.nnx as jnnx
from tests.test_multi_oplevel import _nnx_forward

jax.config.update("jax_default_matmul_precision", "highest")

D, F, OUT = 4, 5, 3
INDEX = [0, -1, 1, 0]
X = jax.random.normal(jax.random.key(7), (len(INDEX), D))
NESTED = "layer 'blk' is adapted at its weight's product and contains the adapted layers"
# Adapting the module or its submodule alone is served; both at once is refused.
ALONE = {"module": ["blk"], "submodule": ["blk.proj"], "sibling": ["blk", "blk_out"]}


class NNXBlock(nnx.Module):
    """A module using its own weight in an einsum, with a child layer (a Linear, or another
    such module) applied to the product."""

    def __init__(self, rngs: nnx.Rngs, child: str):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, F)) / np.sqrt(D))
        self.proj = nnx.Linear(F, OUT, rngs=rngs) if child == "linear" else NNXEinsum(rngs)

    def __call__(self, x):
        return self.proj(jnp.einsum("bd,df->bf", x, self.w[...]))


class NNXEinsum(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (F, OUT)) / np.sqrt(F))

    def __call__(self, x):
        return jnp.einsum("bf,fo->bo", x, self.w[...])


class NNXNet(nnx.Module):
    """``blk_out`` is a sibling whose path starts with ``blk`` without being inside it."""

    def __init__(self, rngs: nnx.Rngs, child: str = "linear"):
        self.blk = NNXBlock(rngs, child)
        self.blk_out = nnx.Linear(OUT, 2, rngs=rngs)

    def __call__(self, x):
        return self.blk_out(self.blk(x))


def _nnx_adapter(base: nnx.Module, targets: list[str], seed: int) -> nnx.Module:
    """A copy of ``base`` with a LoRA adapter on ``targets``, B drawn (B = 0 is the base)."""
    model = nnx.clone(base)
    config = jaxlora.LoRAConfig(r=2, alpha=3.0, targets=targets)
    jnnx.inject(model, config, nnx.Rngs(seed), inputs=(X,))
    nnx.update(model, _drawn_b(nnx.state(model, nnx.LoRAParam), seed))
    return model


def _drawn_b(tree, seed: int):
    """``tree`` with every ``lora_b`` leaf drawn from a normal (B = 0 would be the base)."""
    keys = iter(jax.random.split(jax.random.key(seed + 100), 8))
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jax.random.normal(next(keys), v.shape) if "lora_b" in str(p) else v, tree
    )


@pytest.mark.parametrize("child", ["linear", "einsum"])
def test_nnx_nested_adapted_layers_are_refused_up_front(child):
    base = NNXNet(nnx.Rngs(0), child)
    model = _nnx_adapter(base, ["blk", "blk.proj"], 1)
    assert isinstance(model.blk, jnnx.OpAdapter)  # inject accepts the nesting
    before = nnx.state(model, nnx.Param)
    with pytest.raises(ValueError, match=rf"to_multi: {NESTED} \['blk.proj'\]") as err:
        jnnx.to_multi(model, capacity=2)
    assert "blk_out" not in str(err.value)  # a sibling named alike is not inside 'blk'
    # Nothing changed: the layers are the same kinds, every value the same.
    assert isinstance(model.blk, jnnx.OpAdapter) and not isinstance(model.blk, jnnx.MultiOpAdapter)
    assert not any(isinstance(m, jnnx.MultiLoRALinear) for _, m in nnx.iter_modules(model))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), before)


@pytest.mark.parametrize("kind", sorted(ALONE))
def test_nnx_the_module_or_its_submodule_alone_is_served(kind):
    base = NNXNet(nnx.Rngs(0))
    sources = [_nnx_adapter(base, ALONE[kind], seed) for seed in (1, 2)]
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=2)
    for slot, source in enumerate(sources):
        jnnx.set_adapter(serving, slot, source)
    forward, _ = _nnx_forward()
    y = np.asarray(forward(serving, X, jnp.array(INDEX)))
    alone = {i: np.asarray((base if i == -1 else sources[i])(X)) for i in set(INDEX)}
    assert np.abs(alone[0] - alone[1]).max() > 1e-2  # a wrong gather would show
    scale = max(np.abs(y).max(), 1.0)
    for row, i in enumerate(INDEX):
        np.testing.assert_allclose(y[row], alone[i][row], rtol=0, atol=1e-6 * scale)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.5), (D, F))
        return nn.Dense(OUT, name="proj")(jnp.einsum("bd,df->bf", x, w))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="blk_out")(LinenBlock(name="blk")(x))


@pytest.fixture(scope="module")
def linen_setup():
    model = LinenNet()
    base = model.init(jax.random.key(0), X)["params"]
    return model, base, jaxlora.layouts(model, X)


def _linen_adapter(base, layouts, targets: list[str], seed: int):
    config = jaxlora.LoRAConfig(r=2, alpha=3.0, targets=targets)
    params = jaxlora.inject(base, config, jax.random.key(seed), layouts=layouts)
    return _drawn_b(params, seed), config


def test_linen_nested_adapted_layers_are_refused_up_front(linen_setup):
    _, base, layouts = linen_setup
    outer, _ = _linen_adapter(base, layouts, ["blk"], 1)  # inject refuses both in one call
    inner = jaxlora.LoRAConfig(r=2, alpha=3.0, targets=["blk.proj"])
    nested = jaxlora.inject(outer, inner, jax.random.key(2), layouts=layouts)
    adapter = (nested, jaxlora.LoRAConfig(r=2, alpha=3.0, targets=["blk", "blk.proj"]))
    with pytest.raises(ValueError, match=rf"stack_adapters: {NESTED} \['blk.proj'\]") as err:
        jaxlora.stack_adapters([adapter], capacity=2)
    assert "blk_out" not in str(err.value)


@pytest.mark.parametrize("kind", sorted(ALONE))
def test_linen_the_module_or_its_submodule_alone_is_served(linen_setup, kind):
    model, base, layouts = linen_setup
    adapters = [_linen_adapter(base, layouts, ALONE[kind], seed) for seed in (1, 2)]
    stack = jaxlora.stack_adapters(adapters, capacity=2)

    @jax.jit
    def forward(stack, base, x, index):
        with jaxlora.intercept_stack(stack, index):
            return model.apply({"params": base}, x)

    y = np.asarray(forward(stack, base, X, jnp.array(INDEX)))
    alone = {-1: np.asarray(model.apply({"params": base}, X))}
    for i, (params, config) in enumerate(adapters):
        with jaxlora.intercept(config):
            alone[i] = np.asarray(model.apply({"params": params}, X))
    assert np.abs(alone[0] - alone[1]).max() > 1e-2
    scale = max(np.abs(y).max(), 1.0)
    for row, i in enumerate(INDEX):
        np.testing.assert_allclose(y[row], alone[i][row], rtol=0, atol=1e-6 * scale)


def test_linen_inject_refuses_nested_adapted_layers_up_front(linen_setup):
    """One adapter: ``inject`` refuses the nesting before building anything; a tree nested by
    two inject calls is refused by ``intercept`` when called (the module's call is evaluated
    from its own trace, where the inner layer's branch would not run)."""
    model, base, layouts = linen_setup
    config = jaxlora.LoRAConfig(r=2, alpha=3.0, targets=["blk", "blk.proj"])
    with pytest.raises(ValueError, match=rf"inject: {NESTED} \['blk.proj'\]"):
        jaxlora.inject(base, config, jax.random.key(1), layouts=layouts)
    outer, _ = _linen_adapter(base, layouts, ["blk"], 1)
    inner = jaxlora.LoRAConfig(r=2, alpha=3.0, targets=["blk.proj"])
    nested = jaxlora.inject(outer, inner, jax.random.key(2), layouts=layouts)
    match = r"layer 'blk' is adapted at its weight's product and its submodules \['proj'\]"
    with pytest.raises(ValueError, match=match), jaxlora.intercept(config):
        model.apply({"params": nested}, X)
