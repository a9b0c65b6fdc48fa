"""The one stored layout of a quantized weight: the torch ``nn.Linear`` weight it is.

A weight enters its product with contracted axes C, free axes F and perhaps batch axes B
(``jaxlora.oplevel.Roles``). The Linear it computes has ``weight`` (out, in) = (prod F,
prod C), F and C each in the weight's own axis order: that matrix is what is quantized, so
its blocks and packed bytes are those bitsandbytes' ``Linear4bit`` holds for the Hugging Face
module (an einsum q-projection (D, N, H) is stored as q_proj's (N·H, D); a ``FlaxConv1D``
kernel (out, in) as itself). An ``nn.Dense`` / ``nnx.Linear`` kernel (in, out) is the case
C = (0,), F = (1,): stored as ``kernel.T``. Batch axes (MoE experts) have no Linear: refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# as_linear/from_linear live beside Roles (the PiSSA/OLoRA init of jaxlora.product uses them too).
from jaxlora.oplevel import Roles, as_linear, from_linear
from jaxlora.quant._api import QuantizedWeight, dequantize, quantize, requantize


def linear_roles(shape: tuple[int, ...]) -> Roles:
    """The roles of a Dense kernel of ``shape`` (in, out): axis 0 contracted, axis 1 free."""
    return Roles(tuple(shape), (), (0,), (1,))


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
