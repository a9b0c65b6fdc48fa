"""An einsum adapted at its product costs what the same projection costs as a DenseGeneral
adapter (issue #13 item 7), in compiled FLOPs — deterministic, so asserted here; the times are
in ``benchmarks/oplevel.py``.

The analytic count is matmuls only (2·m·k·n each): the base product, x·A, (xA)·B, and for a
train step the gradients of B ((xA)ᵀ·g) and of A (xᵀ·(g·Bᵀ)); no gradient of x or of the
frozen weight. XLA also counts elementwise work (the loss, Adam's update, the scale), a few
FLOPs per element, so the compiled count may exceed the matmul count by a small margin
(``SLACK``), never fall below it, and a built (D, N·H) delta would add 2·D·r·N·H per call:
far beyond the slack at these shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxlora
from jaxlora import nnx as jnnx

B, T, D, N, H, R = 2, 64, 256, 4, 64, 8
SLACK = 0.02
CONFIG = jaxlora.LoRAConfig(r=R, alpha=16, targets=["proj"])


class LinenEinsum(nn.Module):
    """A custom projection: ``jnp.einsum('BTD,DNH->BTNH', x, w)`` (adapted at its product)."""

    shape: tuple[int, int, int]

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.02), self.shape)
        return jnp.einsum("BTD,DNH->BTNH", x, w)


class LinenNet(nn.Module):
    """The projection x (…, D) → (…, N, H) as an einsum or as Flax's ``DenseGeneral``, named
    ``proj`` either way (also used by ``benchmarks/oplevel.py``)."""

    kind: str
    shape: tuple[int, int, int] = (D, N, H)

    @nn.compact
    def __call__(self, x):
        if self.kind == "einsum":
            return LinenEinsum(self.shape, name="proj")(x)
        return nn.DenseGeneral(self.shape[1:], use_bias=False, name="proj")(x)


class NnxEinsum(nnx.Module):
    def __init__(self, shape: tuple[int, int, int], rngs: nnx.Rngs):
        self.w = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum("BTD,DNH->BTNH", x, self.w[...])


class NnxNet(nnx.Module):
    """``LinenNet``'s NNX twin (an einsum module or ``nnx.LinearGeneral``)."""

    def __init__(self, kind: str, rngs: nnx.Rngs, shape: tuple[int, int, int] = (D, N, H)):
        if kind == "einsum":
            self.proj = NnxEinsum(shape, rngs)
        else:
            self.proj = nnx.LinearGeneral(shape[0], shape[1:], use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def analytic_flops(m: int, shape: tuple[int, int, int], r: int, train: bool) -> float:
    """Matmul FLOPs (2·m·k·n each) for m rows: the base product, x·A and (xA)·B; a train step
    adds the gradients of B ((xA)ᵀ·g) and A (xᵀ·(g·Bᵀ)), and needs no gradient of x or W."""
    d, out = shape[0], shape[1] * shape[2]
    forward = 2 * m * d * out + 2 * m * d * r + 2 * m * r * out
    return float(forward + (2 * m * r * out + 2 * m * out * r + 2 * m * d * r if train else 0))


def _linen(kind: str, x):
    model = LinenNet(kind)
    params = model.init(jax.random.key(0), x)["params"]
    params = jaxlora.inject(params, CONFIG, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    adapter, frozen = jaxlora.split(params)

    def forward(adapter, x):
        with jaxlora.intercept(CONFIG):
            return model.apply({"params": jaxlora.combine(adapter, frozen)}, x)

    return forward, adapter


def _nnx(kind: str, x):
    model = NnxNet(kind, nnx.Rngs(0))
    jnnx.inject(model, CONFIG, nnx.Rngs(1), inputs=(x,))
    graph, adapter, rest = nnx.split(model, nnx.LoRAParam, ...)

    def forward(adapter, x):
        return nnx.merge(graph, adapter, rest)(x)

    return forward, adapter


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def _compiled(build, kind: str, train: bool) -> float:
    x = jax.random.normal(jax.random.key(3), (B, T, D))
    forward, adapter = build(kind, x)
    if not train:
        return _flops(forward, adapter, x)
    tx = optax.adam(1e-3)

    def step(adapter, state, x):
        grads = jax.grad(lambda a: jnp.mean(forward(a, x) ** 2))(adapter)
        updates, state = tx.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state

    return _flops(step, adapter, tx.init(adapter), x)


@pytest.mark.parametrize("train", [False, True], ids=["forward", "train_step"])
@pytest.mark.parametrize("build", [_linen, _nnx], ids=["linen", "nnx"])
def test_einsum_adapter_costs_what_dense_general_costs(build, train):
    einsum = _compiled(build, "einsum", train)
    dense = _compiled(build, "dense", train)
    minimum = analytic_flops(B * T, (D, N, H), R, train)
    assert minimum <= einsum <= minimum * (1 + SLACK), (einsum, minimum)
    assert minimum <= dense <= minimum * (1 + SLACK), (dense, minimum)
    assert abs(einsum - dense) <= SLACK * minimum, (einsum, dense)
    built_delta = 2 * D * R * N * H  # what a materialised delta alone would add
    assert einsum < minimum + built_delta / 2
