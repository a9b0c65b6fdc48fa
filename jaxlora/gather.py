"""Traced indices into a weight (``jaxlora.oplevel``): ``jnp.take(w, idx, axis=0)``, ``w[idx]``
or ``w[i]`` with ``idx``/``i`` traced, as an MoE layer that routes by gathering its experts does.

The weight W's indexed axes (the experts E) each take one index per entry of the index array
(a ``gather``: its batch dims T…) or one traced index (a ``dynamic_slice``); every other axis
is taken whole. The product then sees the gathered weight V: the gather's batch dims T… first,
then W's other axes in W's order (its view of them as before). LoRA on W with E a batch axis
(``lora_a`` (E, C…, r), ``lora_b`` (E, r, F…), one adapter per expert) gives V the factors
gathered by the same indices, ``lora_a[idx]``, ``lora_b[idx]``: the branch is
``x·A[idx]·B[idx]``, computed by the same primitive with the same indices and mode, so an
out-of-range index does to the branch what it does to the weight (clamped, or filled).

Required (else refused with the reason): the indexed axes are whole axes of W taken one index
wide; the other axes are taken whole; the gather's batch dims T… are batch axes of the product
(each row of x meets its own expert), not contracted or free; no static slice of W before or
after, no second gather.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Gather:
    """The ``gather``/``dynamic_slice`` equation at ``path`` that indexes W's ``axes`` (in the
    index vector's order); ``batch`` is the number of its batch dims (V's leading axes, 0 for
    a ``dynamic_slice``), ``kept`` W's other axes in W's order (V's following axes);
    ``starts``: a ``dynamic_slice``'s operand positions of the indexed axes' starts;
    ``params``: a ``gather``'s mode, fill value and index flags; ``roles``: (batch,
    contracted, free) over V's axes in the product, set once the product is found."""

    path: tuple[int, ...]
    primitive: str
    axes: tuple[int, ...]
    batch: int
    kept: tuple[int, ...]
    starts: tuple[int, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()
    roles: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] = ((), (), ())

    def to_weight(self, axes: tuple[int, ...]) -> tuple[int, ...]:
        """V's ``axes`` as W's: a batch dim of the gather stands for the indexed axes."""
        out = {
            w for v in axes for w in (self.axes if v < self.batch else (self.kept[v - self.batch],))
        }
        return tuple(sorted(out))


def follow(eqn, path, groups) -> tuple[tuple, Gather | None] | str:
    """(groups over V, the ``Gather``) after the weight (seen as ``groups``: per operand axis
    its W axes) enters ``eqn`` (a ``gather`` or ``dynamic_slice`` as its operand 0; one that
    takes every axis whole is no index: ``groups`` again and ``None``), or a str saying why
    it is refused."""
    shape = eqn.invars[0].aval.shape
    if eqn.primitive.name == "dynamic_slice":
        sizes = eqn.params["slice_sizes"]
        axes = [a for a in range(len(shape)) if sizes[a] != shape[a]]
        batch, order, starts = 0, axes, tuple(1 + a for a in axes)
        params: tuple = ()
        out_axes: list[int | None] = list(range(len(shape)))  # output axis o: operand axis o
    else:
        dims = eqn.params["dimension_numbers"]
        if dims.operand_batching_dims:
            return "a gather with operand batching dims (a traced index per batch entry)"
        sizes, order = eqn.params["slice_sizes"], list(dims.start_index_map)
        axes, starts = order, ()
        kept_ops = [a for a in range(len(shape)) if a not in dims.collapsed_slice_dims]
        batch = len(eqn.outvars[0].aval.shape) - len(dims.offset_dims)
        params = tuple(
            (k, eqn.params[k])
            for k in ("mode", "fill_value", "indices_are_sorted", "unique_indices")
        )
        out_axes = _gather_out_axes(dims, kept_ops, batch)
    for a in range(len(shape)):
        if a in axes and (sizes[a] != 1 or len(groups[a]) != 1):
            return (
                f"taking {sizes[a]} entries of its axis {a} (W axes {groups[a]}); only whole "
                "axes of the weight indexed one entry wide (W[idx]) are supported"
            )
        if a not in axes and sizes[a] != shape[a]:
            return (
                f"taking {sizes[a]} of {shape[a]} entries of its axis {a} (a partial slice); "
                "only W[idx] with the other axes whole is supported"
            )
    if not axes:  # every axis taken whole (an expert axis of size 1): the weight itself
        return groups, None
    indexed = tuple(groups[a][0] for a in order)
    kept = tuple(sorted(w for a, g in enumerate(groups) if a not in axes for w in g))
    v_of = {w: batch + k for k, w in enumerate(kept)}
    batch_dims = [o for o, op in enumerate(out_axes) if op is None]
    new = tuple(
        (batch_dims.index(o),)
        if op is None
        else ()
        if op in axes
        else tuple(v_of[w] for w in groups[op])
        for o, op in enumerate(out_axes)
    )
    return new, Gather(path, eqn.primitive.name, indexed, batch, kept, starts, params)


def _gather_out_axes(dims, kept_ops: list[int], batch: int) -> list[int | None]:
    """Per output axis of a gather: the operand axis it holds (an offset dim), or ``None`` for
    a batch dim (one per axis of the index array but the last)."""
    offsets = list(dims.offset_dims)
    return [
        kept_ops[offsets.index(o)] if o in offsets else None for o in range(batch + len(offsets))
    ]


def factors(gather: Gather, w_roles, lora_a, lora_b, operands) -> tuple[jax.Array, jax.Array]:
    """``lora_a`` (W batch…, C…, r) and ``lora_b`` (W batch…, r, F…) gathered by the indices of
    the gather's ``operands`` as the weight was: (T…, other batch…, C…, r) and (T…, other
    batch…, r, F…), the factors of V over its roles (``gather.roles``)."""
    at = [w_roles.batch.index(w) for w in gather.axes]  # batch axes lead both factors
    front = list(range(len(at)))
    a, b = jnp.moveaxis(lora_a, at, front), jnp.moveaxis(lora_b, at, front)
    return _take(gather, a, operands), _take(gather, b, operands)


def _take(gather: Gather, factor: jax.Array, operands) -> jax.Array:
    """``factor`` (the indexed axes first) indexed as the weight was, by the same primitive."""
    k = len(gather.axes)
    rest = factor.shape[k:]
    if gather.primitive == "dynamic_slice":
        starts = [operands[s] for s in gather.starts]
        zeros = [jnp.zeros((), jnp.result_type(starts[0]))] * len(rest)
        taken = jax.lax.dynamic_slice(factor, [*starts, *zeros], (1,) * k + rest)
        return taken.reshape(rest)
    params = dict(gather.params)
    numbers = jax.lax.GatherDimensionNumbers(
        offset_dims=tuple(range(gather.batch, gather.batch + len(rest))),
        collapsed_slice_dims=tuple(range(k)),
        start_index_map=tuple(range(k)),
    )
    return jax.lax.gather(
        factor,
        operands[1],
        numbers,
        (1,) * k + rest,
        indices_are_sorted=params["indices_are_sorted"],
        unique_indices=params["unique_indices"],
        mode=params["mode"],
        fill_value=params["fill_value"],
    )
