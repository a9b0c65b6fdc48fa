"""The layer kinds jaxlora adapts, and how each one's adapter is laid out.

Every kind keeps ``lora_a`` with the base weight's input axes and the rank last, and ``lora_b``
with the rank first and the output axes, so one rule merges them all::

    base + scaling · (lora_a.reshape(-1, r) @ lora_b.reshape(r, -1)).reshape(base.shape)

- ``"linear"`` (``nn.Dense``, ``nn.DenseGeneral``): ``kernel`` (*in_axes, *out_axes), ``lora_a``
  (*in_axes, r), ``lora_b`` (r, *out_axes). On the flattened axes this is a torch ``nn.Linear``.
- ``"conv"`` (``nn.Conv``): ``kernel`` (*window, in, out); ``lora_a`` (*window, in, r) is a conv
  like the base's (same strides, padding, dilation) and ``lora_b`` (1, …, 1, r, out) a 1×1 conv:
  PEFT's layout in Flax's kernel order.
- ``"embed"`` (``nn.Embed``): ``embedding`` (num_embeddings, features), ``lora_a``
  (num_embeddings, r), ``lora_b`` (r, features): PEFT's ``lora_embedding_A/B``, transposed.

The kind of a params node is read from its names and shapes (``kind_of``), so merging and
saving need no model; only injecting a kernel with more than 2 axes needs to know which axes
are inputs (see ``jaxlora.layouts``).

Stacked layers (``nn.scan``/``nnx.vmap``: a weight with ``stack`` leading layer axes, e.g. a
kernel (L, in, out)) keep those axes in front of both factors: ``lora_a`` (L, …, r),
``lora_b`` (L, r, …), so each layer's slice is one of the layouts above. ``stack`` is read
from the shapes: a linear or embedding adapter has ``stack`` more axes than its layout. Conv
layers cannot be stacked (their factors have as many axes as the kernel, so a stack would
be ambiguous), and a linear stack of one layer (L = 1) reads as a 1-D conv. A stack made
with ``variable_axes={"params": k}``, k not 0 (MaxText's ``param_scan_axis=1``: a kernel
(D, L, N, H)), keeps its one layer axis at position k of the weight and of both factors, as
``nn.scan`` slices them: ``lora_a`` (D, L, r), ``lora_b`` (r, L, N, H). A ``lora_stack``
record (``StackRecord``) beside the adapter says k; the functions here see such a layer
through ``to_front`` (the layer axis moved to the front) and move results back with
``from_front``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxlora import core, oplevel
from jaxlora.oplevel import Roles, flax_factors, torch_factors
from jaxlora.tree import LORA_NAMES, ROLES_NAME, STACK_NAME, is_lora_name

BASE_NAMES = ("kernel", "embedding")


def base_name(node: Mapping[str, Any]) -> str | None:
    """The name of the node's base weight ('kernel' or 'embedding'), if it has exactly one."""
    found = [name for name in BASE_NAMES if name in node]
    return found[0] if len(found) == 1 else None


def roles(kind: str, base_shape: tuple[int, ...], in_axes: int = 1, stack: int = 0) -> Roles:
    """The weight's roles in its layer's product (``jaxlora.oplevel``), which give a linear
    or embedding adapter its layout, delta, torch layout and sharding by the one rule of any
    product: a linear kernel's ``in_axes`` leading axes (after its ``stack`` layer axes) are
    contracted with the input (``nn.Dense``: ``'bi,io->bo'``), the rest free; an embedding
    table is the Linear of a one-hot input (its rows contracted, PEFT's
    ``lora_embedding_A`` (r, num_embeddings)). A conv's product is a convolution: no roles."""
    if kind == "conv":
        raise ValueError("a conv kernel's product is a convolution, not a dot_general")
    return Roles.linear(base_shape, 1 if kind == "embed" else in_axes, stack)


def delta(
    kind: str,
    base_shape: tuple[int, ...],
    lora_a: jax.Array,
    lora_b: jax.Array,
    scale: float,
    in_axes: int = 1,
    stack: int = 0,
) -> jax.Array:
    """``scale · a b`` in fp32 in the weight's layout (``stack`` leading layer axes: each
    layer's own): a linear or embedding layer's is the product rule's (``oplevel.delta`` of
    its ``roles``), a conv's the flattened (*window·in, out) product (``core.delta``)."""
    if kind == "conv":
        return core.delta(lora_a, lora_b, scale, tuple(base_shape))
    return oplevel.delta(roles(kind, base_shape, in_axes, stack), lora_a, lora_b, scale)


def lora_shapes(
    kind: str, base_shape: tuple[int, ...], r: int, in_axes: int = 1, stack: int = 0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (lora_a, lora_b) shapes for a base weight; ``in_axes`` counts a linear kernel's
    input axes after its ``stack`` leading layer axes (which both factors keep in front)."""
    if kind == "conv":
        lead, base_shape = tuple(base_shape[:stack]), tuple(base_shape[stack:])
        ones = (1,) * (len(base_shape) - 2)
        return (*lead, *base_shape[:-1], r), (*lead, *ones, r, base_shape[-1])
    return roles(kind, base_shape, in_axes, stack).lora_shapes(r)


def layer_axis(node: Mapping[str, Any]) -> int:
    """Where a stacked layer's layer axis is (``nn.scan``'s ``variable_axes``): its
    ``lora_stack`` record's axis, else 0. Per layer (inside the scan body) it means nothing."""
    record = node.get(STACK_NAME)
    return 0 if record is None else record.axis


def axis_position(ndim: int, axis: int) -> int | None:
    """The position of ``axis`` in a stacked array of ``ndim`` axes (a negative one counts from
    the end, as ``nn.scan`` does), or ``None`` if it has no such axis."""
    position = axis + ndim if axis < 0 else axis
    return position if 0 <= position < ndim else None


def position_of(ndim: int, axis: int) -> int:
    """``axis_position`` where the caller has checked the axis exists (a ``ValueError`` if not)."""
    position = axis_position(ndim, axis)
    if position is None:
        raise ValueError(f"a stacked array of {ndim} axes has no layer axis {axis}")
    return position


def to_front(x: Any, axis: int) -> Any:
    """An array, shape or axis-names tuple with its layer axis ``axis`` moved to the front,
    where the layouts here keep it (the identity for axis 0)."""
    if axis == 0:
        return x
    if isinstance(x, tuple):
        p = position_of(len(x), axis)
        return (x[p], *x[:p], *x[p + 1 :])
    return jnp.moveaxis(x, axis, 0)


def from_front(x: Any, axis: int) -> Any:
    """The inverse of ``to_front``: the leading layer axis moved to ``axis``."""
    if axis == 0:
        return x
    if isinstance(x, tuple):
        p = position_of(len(x), axis)
        return (*x[1 : p + 1], x[0], *x[p + 1 :])
    return jnp.moveaxis(x, 0, axis)


def _front_shapes(shapes: list, axis: int, where: str) -> list:
    """A stacked layer's (weight, lora_a, lora_b) shapes with the layer axis in front; the
    shapes as they are for a layer that carries no layer axis (one layer, inside the scan)."""
    if axis == 0 or len(shapes[1]) + len(shapes[2]) - 3 != len(shapes[0]):
        return shapes
    bad = [s for s in shapes if axis_position(len(s), axis) is None]
    if bad:
        raise ValueError(
            f"{where}: its 'lora_stack' record puts the layer axis at {axis}, which "
            f"{bad[0]} does not have"
        )
    lengths = {s[axis_position(len(s), axis)] for s in shapes}
    if len(lengths) != 1:
        raise ValueError(
            f"{where}: the weight and factors {shapes} differ in length on the layer axis "
            f"{axis} (its 'lora_stack' record): a stacked adapter has the weight's L layers"
        )
    return [to_front(s, axis) for s in shapes]


def front_view(node: Mapping[str, Any], base: Any, a: Any, b: Any) -> tuple[int, Any, Any, Any]:
    """(axis, base, lora_a, lora_b) of a checked layer (``check_layer``) with its layer axis
    in front (``to_front``); ``from_front(x, axis)`` moves a result back (axis is 0 for a
    layer that needs no move)."""
    axis = front_axis(node, base, a, b)
    return axis, to_front(base, axis), to_front(a, axis), to_front(b, axis)


def front_axis(node: Mapping[str, Any], base: Any, a: Any, b: Any) -> int:
    """The layer axis ``front_view`` moves to the front (0: none to move)."""
    axis = layer_axis(node)
    shapes = [tuple(np.shape(x)) for x in (base, a, b)]
    return 0 if _front_shapes(shapes, axis, "") is shapes else axis


def kind_of(base: str, base_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape) -> str:
    """The kind whose layout the shapes follow (``lora_shapes`` checks them exactly)."""
    if base == "embedding":
        return "embed"
    conv = len(a_shape) == len(b_shape) == len(base_shape) >= 3
    if conv and all(n == 1 for n in b_shape[:-2]):
        return "conv"
    return "linear"


def stack_of(kind: str, base_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape) -> int:
    """How many leading layer axes (``nn.scan``/``nnx.vmap``) the layer's shapes carry: the
    axes a linear or embedding adapter has beyond its layout (a conv has none)."""
    if kind == "conv":
        return 0
    return len(a_shape) + len(b_shape) - 2 - len(base_shape)


def in_axes_of(kind: str, a_shape: tuple[int, ...], stack: int = 0) -> int:
    return len(a_shape) - 1 - stack if kind == "linear" else 1


def flat_features(
    kind: str, base_shape: tuple[int, ...], in_axes: int = 1, stack: int = 0
) -> tuple[int, int]:
    """(in, out) of the flattened matrix one layer's adapter factors (the weight's ``stack``
    leading layer axes left out): its rank is at most their min."""
    if kind == "conv":
        base_shape = tuple(base_shape[stack:])
        return math.prod(base_shape[:-1]), base_shape[-1]
    found = roles(kind, base_shape, in_axes, stack)
    return found.in_features, found.out_features


def check_layer(
    node: Mapping[str, Any], where: str, *, stacked: bool = False
) -> tuple[str, str, Any, Any, Any]:
    """(kind, base name, base, lora_a, lora_b) of a node holding an adapter, unboxed and with
    every shape checked; a ``ValueError`` naming the layer otherwise. Stacked layers (leading
    layer axes, see ``stack_of``) are accepted only with ``stacked=True``: a caller that does
    not handle them must refuse them, not misread the layer axis as a feature axis."""
    if ROLES_NAME in node:  # jaxlora.product's adapter: its layout is not one of these
        raise ValueError(
            f"{where} holds an adapter made at its weight's product ('lora_roles': a module "
            "that is no Dense/DenseGeneral/Conv/Embed), which this operation does not handle yet"
        )
    several = sorted(k for k in node if is_lora_name(k) and k not in LORA_NAMES)
    if several:  # '<weight>_lora_a' leaves are laid out by their product's record
        raise ValueError(
            f"{where} holds {several}, factors of one of several weights adapted at their "
            f"products, but no '{ROLES_NAME}' record saying how each weight's axes are used"
        )
    name = base_name(node)
    missing = [n for n in ("lora_a", "lora_b") if n not in node]
    if name is None or missing:
        found = sorted(set(node) & {"lora_a", "lora_b", *BASE_NAMES})
        lacking = missing if name is not None else [*missing, "kernel"]
        raise ValueError(
            f"{where} has {found} but no {lacking}: expected 'lora_a' and 'lora_b' "
            "beside one 'kernel' (or 'embedding')"
        )
    base, a, b = (meta.unbox(node[n]) for n in (name, "lora_a", "lora_b"))
    raw = [tuple(np.shape(v)) for v in (base, a, b)]
    shapes = _front_shapes(raw, layer_axis(node), where)
    if shapes is not raw:  # the messages below show the shapes as they are read
        where += f" (shapes with its layer axis {layer_axis(node)} moved to the front)"
    if len(shapes[0]) < 2 or len(shapes[1]) < 2:
        raise ValueError(
            f"{where}: '{name}' {shapes[0]} and 'lora_a' {shapes[1]} must have 2 or more axes"
        )
    kind = kind_of(name, *shapes)
    r = shapes[1][-1]
    stack = stack_of(kind, *shapes)
    layouts = (
        "linear (*in_axes, r) and (r, *out_axes), conv (*window, in, r) and (1, ..., 1, r, "
        "out), each with the weight's leading layer axes in front if it is stacked"
    )
    if stack < 0 or stack >= len(shapes[0]) - 1 or len(shapes[1]) - stack < 2:
        raise ValueError(
            f"{where}: 'lora_a' {shapes[1]} and 'lora_b' {shapes[2]} fit no layout for "
            f"'{name}' {shapes[0]}: {layouts}"
        )
    if stack and not stacked:
        raise ValueError(
            f"{where}: 'lora_a' {shapes[1]} and 'lora_b' {shapes[2]} are stacked over "
            f"{stack} leading layer axis(es) of '{name}' {shapes[0]} (an nn.scan/nnx.vmap "
            "stack), which this operation does not handle"
        )
    want = lora_shapes(kind, shapes[0], r, in_axes_of(kind, shapes[1], stack), stack)
    for leaf, got, expected in zip(("lora_a", "lora_b"), shapes[1:], want, strict=True):
        if got != expected:
            raise ValueError(
                f"{where}, '{leaf}': expected shape {expected} for a {kind} layer with "
                f"'{name}' {shapes[0]} and r={r}, got {got}"
            )
    return kind, name, base, a, b


DORA_KINDS = "nn.Dense (2-D kernel), nn.Conv and nn.Embed layers (not stacked, not quantized)"


def check_magnitude(node: Mapping[str, Any], kind: str, base: Any, stack: int, where: str):
    """A node's DoRA magnitude ``lora_magnitude`` (out,), unboxed, or ``None`` if it has none;
    a ``ValueError`` where DoRA is not implemented for the layer or the shape is wrong."""
    if "lora_magnitude" not in node:
        return None
    shape = tuple(np.shape(base))
    check_dora_layer(kind, shape, stack, f"{where}: holds 'lora_magnitude' (DoRA), which")
    magnitude = meta.unbox(node["lora_magnitude"])
    if tuple(np.shape(magnitude)) != (shape[-1],):
        raise ValueError(
            f"{where}, 'lora_magnitude': expected shape ({shape[-1]},) (one per output feature "
            f"of the weight {shape}), got {tuple(np.shape(magnitude))}"
        )
    return magnitude


def check_dora_layer(kind: str, shape: tuple[int, ...], stack: int, what: str) -> None:
    """A ``ValueError`` starting with ``what`` unless DoRA is implemented for the layer: not
    stacked, and a linear layer's kernel 2-D (its output features are then the last axis, as
    a conv's and an embedding's are)."""
    if stack or (kind == "linear" and len(shape) != 2):
        raise ValueError(
            f"{what} is implemented for {DORA_KINDS} only; this is a {kind} layer with a "
            f"{shape} weight" + (f" stacked over {stack} layer axis(es)" if stack else "")
        )


def lora_axis_names(kind: str, names: tuple, a_ndim: int, stack: int = 0) -> tuple[tuple, tuple]:
    """Partitioning for an adapter from its base weight's axis names (one per axis): ``lora_a``
    shares the input axes, ``lora_b`` the output axes, both the ``stack`` leading layer axes
    (partitioned as the weight's); the rank axis (and a 1×1 conv's window) is replicated."""
    if kind == "conv":
        lead, names = tuple(names[:stack]), tuple(names[stack:])
        return (*lead, *names[:-1], None), (*lead, *(None,) * (len(names) - 1), names[-1])
    # names follow axis positions only: the axes' sizes play no part
    return roles(kind, (1,) * len(names), a_ndim - 1 - stack, stack).axis_names(names)


def to_torch(kind: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flax-layout (lora_a, lora_b) of one layer as PEFT's (A, B) tensors, contiguous."""
    if kind == "conv":  # (*window, in, r) -> (r, in, *window)
        order = (a.ndim - 1, a.ndim - 2, *range(a.ndim - 2))
        return np.ascontiguousarray(a.transpose(order)), np.ascontiguousarray(b.transpose(order))
    base_shape = (*a.shape[:-1], *b.shape[1:])
    return torch_factors(roles(kind, base_shape, a.ndim - 1), a, b)


def from_torch(
    kind: str, a: np.ndarray, b: np.ndarray, base_shape: tuple[int, ...], in_axes: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's (A, B) in Flax layout for a base weight of ``base_shape`` (shapes checked by the
    caller with ``torch_shapes``)."""
    if kind == "conv":  # (r, in, *window) -> (*window, in, r)
        order = (*range(2, a.ndim), 1, 0)
        return a.transpose(order), b.transpose(order)
    return flax_factors(roles(kind, base_shape, in_axes), a, b)


def torch_shapes(
    kind: str, base_shape: tuple[int, ...], r: int, in_axes: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes PEFT's A and B have for this base weight and rank."""
    if kind == "conv":
        window = base_shape[:-2]
        return (r, base_shape[-2], *window), (base_shape[-1], r, *(1,) * len(window))
    n_in, n_out = flat_features(kind, base_shape, in_axes)
    return (r, n_in), (n_out, r)


def linear_in_axes(base_shape: tuple[int, ...], n_in: int, where: str) -> int:
    """How many leading kernel axes make up ``n_in`` input features (for a file's A (r, n_in));
    a ``ValueError`` if none or several splits do."""
    splits = [k for k in range(1, len(base_shape)) if math.prod(base_shape[:k]) == n_in]
    if len(splits) != 1:
        raise ValueError(
            f"{where}: cannot tell which axes of the kernel {base_shape} are the "
            f"{n_in} input features (candidates: {splits}); inject the layer first"
        )
    return splits[0]
