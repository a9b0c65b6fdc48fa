"""The one stored layout of a quantized weight: the torch ``nn.Linear`` weight it is.

A weight enters its product with contracted axes C, free axes F and perhaps batch axes B
(``jaxlora.oplevel.Roles``). The Linear it computes has ``weight`` (out, in) = (prod F,
prod C), F and C each in the weight's own axis order: that matrix is what is quantized, so
its blocks and packed bytes are those bitsandbytes' ``Linear4bit`` holds for the Hugging Face
module (an einsum q-projection (D, N, H) is stored as q_proj's (N·H, D); a ``FlaxConv1D``
kernel (out, in) as itself). An ``nn.Dense`` / ``nnx.Linear`` kernel (in, out) is the case
C = (0,), F = (1,): stored as ``kernel.T``. Batch axes (MoE experts) have no Linear: refused.

A stack of such weights (``nn.scan`` / ``nnx.vmap`` layers: one weight with a layer axis L at
position ``axis``) is stored as its L layers, each quantized alone as above (its blocks never
straddle two layers), their arrays stacked on a leading axis: a ``QuantizedWeight`` whose
metadata is one layer's and whose arrays have L in front, so that a scan slicing them on
axis 0 hands each layer its own quantized weight. The ``*_stack`` functions take the stacked
weight with its layer axis where the params hold it (``axis``, None for an unstacked one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora import kinds

# as_linear/from_linear live beside Roles (the PiSSA/OLoRA init of jaxlora.product uses them too).
from jaxlora.oplevel import Roles, as_linear, from_linear
from jaxlora.quant._api import QuantizedWeight, dequantize, quantize, requantize, stack_length


def linear_roles(shape: tuple[int, ...]) -> Roles:
    """The roles of a Dense kernel of ``shape`` (in, out): axis 0 contracted, axis 1 free
    (``Roles.linear``, the known linear layers' roles everywhere)."""
    return Roles.linear(shape, 1)


def check_roles(roles: Roles, where: str) -> None:
    """A ``ValueError`` naming ``where`` unless the weight is a Linear (no batch axes)."""
    if roles.batch:
        raise ValueError(
            f"{where}: the weight {roles.shape} has batch axes {roles.batch} (e.g. MoE experts) "
            "in its product; it is no torch Linear (out, in), so it has no bitsandbytes layout "
            "to be stored in: only weights with contracted and free axes can be quantized"
        )


def quantize_weight(weight: jax.Array, roles: Roles, **options) -> QuantizedWeight:
    """``quantize`` (with ``options``) of ``weight`` in its Linear layout."""
    if tuple(jnp.shape(weight)) != roles.shape:
        raise ValueError(f"quantize: weight shape {jnp.shape(weight)} != roles' {roles.shape}")
    return quantize(as_linear(weight, roles), **options)


def dequantize_weight(q: QuantizedWeight, roles: Roles, dtype=None) -> jax.Array:
    """The weight ``q`` stands for, in its own shape (``roles.shape``) and dtype."""
    linear = (roles.out_features, roles.in_features)
    if not isinstance(q, QuantizedWeight) or tuple(q.shape) != linear:
        got = tuple(q.shape) if isinstance(q, QuantizedWeight) else type(q).__name__
        raise ValueError(
            f"a quantized weight of shape {roles.shape} must be a QuantizedWeight of its "
            f"Linear shape (out, in) = {linear}, got {got}"
        )
    return from_linear(dequantize(q, dtype), roles)


def requantize_weight(q: QuantizedWeight, roles: Roles, weight: jax.Array) -> QuantizedWeight:
    """``weight`` (a merged one, of ``roles.shape``) quantized in ``q``'s format and layout."""
    return requantize(q, as_linear(weight, roles))


def _layers(weight: jax.Array, axis: int) -> list[jax.Array]:
    """The layers of a stacked weight: its slices on the layer axis ``axis``."""
    front = kinds.to_front(weight, axis)
    return [front[i] for i in range(front.shape[0])]


def _stacked(layers: list[QuantizedWeight]) -> QuantizedWeight:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def _layer(q: QuantizedWeight, i: int) -> QuantizedWeight:
    return jax.tree.map(lambda x: x[i], q)


def quantize_stack(weight: jax.Array, roles: Roles, axis: int | None, **options):
    """``quantize_weight`` of an unstacked weight (``axis`` None), or of each layer of a
    stacked one, stacked in front: each layer's arrays are its unstacked twin's."""
    if axis is None:
        return quantize_weight(weight, roles, **options)
    return _stacked([quantize_weight(w, roles, **options) for w in _layers(weight, axis)])


def dequantize_stack(q: QuantizedWeight, roles: Roles, axis: int | None, dtype=None):
    """``dequantize_weight``, layer by layer for a stack: the stacked weight with its layer
    axis back at ``axis``."""
    if axis is None:
        return dequantize_weight(q, roles, dtype)
    length = _length(q, roles)
    layers = [dequantize_weight(_layer(q, i), roles, dtype) for i in range(length)]
    return kinds.from_front(jnp.stack(layers), axis)


def requantize_stack(q: QuantizedWeight, roles: Roles, axis: int | None, weight: jax.Array):
    """``requantize_weight``, layer by layer for a stack (``weight`` its layer axis at
    ``axis``)."""
    if axis is None:
        return requantize_weight(q, roles, weight)
    length = _length(q, roles)
    layers = _layers(weight, axis)
    if len(layers) != length:
        raise ValueError(f"requantize: {len(layers)} layers for a stack of {length}")
    return _stacked([requantize_weight(_layer(q, 0), roles, w) for w in layers])


def stacked_shape(q: QuantizedWeight, roles: Roles, axis: int | None) -> tuple[int, ...]:
    """The shape of the (stacked) weight ``q`` stands for, its layer axis at ``axis``."""
    if axis is None:
        return roles.shape
    return kinds.from_front((_length(q, roles), *roles.shape), axis)


def _length(q: QuantizedWeight, roles: Roles) -> int:
    length = stack_length(q, f"a stacked quantized weight of per-layer shape {roles.shape}")
    if length is None:
        raise ValueError(
            f"a stacked quantized weight of per-layer shape {roles.shape} must hold arrays "
            "with a leading layer axis; it holds one layer's"
        )
    return length
