"""The one stored layout of a quantized weight: the torch ``nn.Linear`` weight it is.

A weight enters its product with contracted axes C, free axes F and perhaps batch axes B
(``jaxlora.oplevel.Roles``). The Linear it computes has ``weight`` (out, in) = (prod F,
prod C), F and C each in the weight's own axis order: that matrix is what is quantized, so
its blocks and packed bytes are those bitsandbytes' ``Linear4bit`` holds for the Hugging Face
module (an einsum q-projection (D, N, H) is stored as q_proj's (N·H, D); a ``FlaxConv1D``
kernel (out, in) as itself). An ``nn.Dense`` / ``nnx.Linear`` kernel (in, out) is the case
C = (0,), F = (1,): stored as ``kernel.T``.

A weight with batch axes B (MoE experts: 'EBD,EDF->EBF', or one static slice ``W[i]`` per
product) is one torch Linear per expert, as Hugging Face stores experts (``experts.{e}.proj``):
its E = prod B experts (the batch axes' indices in C order) are each quantized alone as the
Linear (prod F, prod C) of that expert's weight, so an expert's blocks never straddle two
experts and its bytes are bitsandbytes' for that Linear; their arrays are stacked in front
(the mechanism of a stack of layers, below, with the experts as the stacked axis). The
``QuantizedWeight``'s metadata is one expert's Linear and its arrays lead with E.

A stack of such weights (``nn.scan`` / ``nnx.vmap`` layers: one weight with a layer axis L at
position ``axis``) is stored as its L layers, each quantized alone as above (its blocks never
straddle two layers), their arrays stacked on a leading axis: a ``QuantizedWeight`` whose
metadata is one layer's and whose arrays have L in front, so that a scan slicing them on
axis 0 hands each layer its own quantized weight. A stack of layers of experts (a scanned MoE,
(L, E, …)) is the two at once: its arrays lead with (L, E), each (layer, expert) its own
Linear. The ``*_stack`` functions take the stacked weight with its layer axis where the
params hold it (``axis``, None for an unstacked one).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlora import kinds

# as_linear/from_linear live beside Roles (the PiSSA/OLoRA init of jaxlora.product uses them too).
from jaxlora.oplevel import Roles, as_linear, from_linear
from jaxlora.quant._api import QuantizedWeight, dequantize, leading_axes, quantize, requantize


def linear_roles(shape: tuple[int, ...]) -> Roles:
    """The roles of a Dense kernel of ``shape`` (in, out): axis 0 contracted, axis 1 free
    (``Roles.linear``, the known linear layers' roles everywhere)."""
    return Roles.linear(shape, 1)


def expert_roles(roles: Roles) -> Roles:
    """One expert's roles: the weight without its batch axes, the other axes renumbered in
    the same order (``roles`` itself when it has none)."""
    if not roles.batch:
        return roles
    keep = [a for a in range(len(roles.shape)) if a not in roles.batch]
    new = {a: k for k, a in enumerate(keep)}
    return Roles(
        tuple(roles.shape[a] for a in keep),
        (),
        tuple(new[a] for a in roles.contracted),
        tuple(new[a] for a in roles.free),
    )


def expert_count(roles: Roles) -> int:
    """E: how many Linears (experts) the weight is, 1 without batch axes."""
    return math.prod(roles.shape[a] for a in roles.batch)


def _experts(weight: jax.Array, roles: Roles) -> jax.Array:
    """The weight as (E, one expert's weight…): its batch axes in front, merged in C order."""
    front = jnp.moveaxis(weight, roles.batch, tuple(range(len(roles.batch))))
    return front.reshape(expert_count(roles), *expert_roles(roles).shape)


def _from_experts(experts: jax.Array, roles: Roles) -> jax.Array:
    """The inverse of ``_experts``: (E, one expert's weight…) in the weight's own shape."""
    sizes = tuple(roles.shape[a] for a in roles.batch)
    front = experts.reshape(*sizes, *experts.shape[1:])
    return jnp.moveaxis(front, tuple(range(len(roles.batch))), roles.batch)


def quantize_weight(weight: jax.Array, roles: Roles, **options) -> QuantizedWeight:
    """``quantize`` (with ``options``) of ``weight`` in its Linear layout; a weight with
    batch axes expert by expert, the experts' arrays stacked in front."""
    if tuple(jnp.shape(weight)) != roles.shape:
        raise ValueError(f"quantize: weight shape {jnp.shape(weight)} != roles' {roles.shape}")
    if not roles.batch:
        return quantize(as_linear(weight, roles), **options)
    one = expert_roles(roles)
    experts = _experts(weight, roles)
    return _stacked([quantize(as_linear(w, one), **options) for w in experts])


def dequantize_weight(q: QuantizedWeight, roles: Roles, dtype=None) -> jax.Array:
    """The weight ``q`` stands for, in its own shape (``roles.shape``) and dtype; with batch
    axes each expert dequantized from its own arrays."""
    one = expert_roles(roles)
    linear = (one.out_features, one.in_features)
    if not isinstance(q, QuantizedWeight) or tuple(q.shape) != linear:
        got = tuple(q.shape) if isinstance(q, QuantizedWeight) else type(q).__name__
        per = f" per expert (batch axes {roles.batch})" if roles.batch else ""
        raise ValueError(
            f"a quantized weight of shape {roles.shape} must be a QuantizedWeight of its "
            f"Linear shape (out, in) = {linear}{per}, got {got}"
        )
    if not roles.batch:
        return from_linear(dequantize(q, dtype), roles)
    _one_layer(q, roles, "dequantize")  # E experts' arrays, not a stack of layers' too
    experts = jax.vmap(lambda e: from_linear(dequantize(e, dtype), one))(q)
    return _from_experts(experts, roles)


def requantize_weight(q: QuantizedWeight, roles: Roles, weight: jax.Array) -> QuantizedWeight:
    """``weight`` (a merged one, of ``roles.shape``) quantized in ``q``'s format and layout
    (expert by expert with batch axes)."""
    if not roles.batch:
        return requantize(q, as_linear(weight, roles))
    _one_layer(q, roles, "requantize")
    if tuple(jnp.shape(weight)) != roles.shape:
        raise ValueError(f"requantize: weight shape {jnp.shape(weight)} != roles' {roles.shape}")
    one, first = expert_roles(roles), _layer(q, 0)
    return _stacked([requantize(first, as_linear(w, one)) for w in _experts(weight, roles)])


def layer_length(q: QuantizedWeight, roles: Roles, where: str) -> int | None:
    """L when ``q`` is a stack of L layers' quantized weights (``nn.scan``/``nnx.vmap``),
    None for one layer's. A weight with batch axes holds E experts' arrays (a leading axis E)
    for one layer, (L, E) in front for a stack of L layers of experts; anything else is a
    ``ValueError`` naming ``where``."""
    lead = leading_axes(q, where)
    count = expert_count(roles)
    one: tuple[int, ...] = (count,) if roles.batch else ()
    if lead == one or lead[1:] == one:
        return lead[0] if len(lead) > len(one) else None
    held = lead[0] if len(lead) == 1 else lead or 1  # Linears, or the (L, E) in front
    if roles.batch:
        raise ValueError(
            f"{where}: a quantized weight of shape {roles.shape} with batch axes {roles.batch} "
            f"(MoE experts) holds one quantized Linear per expert, {count} stacked in front "
            f"((L, {count}) in front for a stack of L layers of them); its arrays hold {held}"
        )
    raise ValueError(
        f"{where}: a quantized weight of shape {roles.shape} (no batch axes) holds one Linear, "
        f"or a stack of L layers' (L in front); its arrays hold {lead} in front"
    )


def _one_layer(q: QuantizedWeight, roles: Roles, where: str) -> None:
    """A ``ValueError`` unless ``q`` holds one layer's arrays (its experts' with batch axes)."""
    length = layer_length(q, roles, where)
    if length is not None:
        raise ValueError(
            f"{where}: the quantized weight of shape {roles.shape} is a stack of {length} "
            "layers' (a leading layer axis); slice one layer (jax.tree.map(lambda x: x[i], q))"
        )


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
    # with batch axes each layer's arrays lead with E: the stack's with (L, E)
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
    where = f"a stacked quantized weight of per-layer shape {roles.shape}"
    length = layer_length(q, roles, where)
    if length is None:
        raise ValueError(
            f"{where} must hold arrays with a leading layer axis; it holds one layer's"
        )
    return length
