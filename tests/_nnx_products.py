"""NNX modules whose weight enters one product, shared by the op-level tests: tunix's
``Einsum`` (and the weight as the left operand), transformers' ``FlaxConv1D`` and a holder
that names the adapted layer ``proj``."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Einsum(nnx.Module):
    """tunix's ``Einsum``: ``jnp.einsum(shape_eqn, x, w)``; the weight is a normal draw over
    ``sqrt(fan_in)`` (``fan_in`` None: the weight's first axis), in ``dtype``."""

    fan_in: ClassVar[int | None] = None

    def __init__(self, eqn: str, shape, rngs: nnx.Rngs, dtype=jnp.float32):
        self.shape_eqn = eqn
        w = jax.random.normal(rngs.params(), shape) / np.sqrt(self.fan_in or shape[0])
        self.w = nnx.Param(w.astype(dtype))

    def __call__(self, x):
        return jnp.einsum(self.shape_eqn, x, self.w[...])


class WeightFirst(Einsum):
    """The weight as the product's left operand."""

    def __call__(self, x):
        return jnp.einsum(self.shape_eqn, self.w[...], x)


class Conv1DLike(nnx.Module):
    """transformers' ``FlaxConv1D``: ``kernel`` (out, in), ``x @ kernel.T + bias``."""

    def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (n_out, n_in)) / np.sqrt(n_in))
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (n_out,)))

    def __call__(self, x):
        return x @ self.kernel[...].T + self.bias[...]


class Holder(nnx.Module):
    def __init__(self, layer: nnx.Module):
        self.proj = layer

    def __call__(self, x):
        return self.proj(x)


def einsum_case(module: type[Einsum], eqn: str, shape, x_shape, delta_eqn: str):
    """One row of the op-level case tables: (module factory, input shape, the delta einsum
    over (A, B), the product in numpy: ``eqn`` again, the operands in the module's order)."""
    weight_first = issubclass(module, WeightFirst)

    def product(x, w):
        return np.einsum(eqn, w, x) if weight_first else np.einsum(eqn, x, w)

    return (lambda r: module(eqn, shape, r), x_shape, delta_eqn, product)
