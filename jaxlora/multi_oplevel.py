"""Many adapters in one batch at a weight's product (op-level adapters, ``jaxlora.oplevel``).

A stack for an op-level weight holds ``lora_a`` (N, C…, R) and ``lora_b`` (N, R, F…): the
single adapter's layout (contracted axes then r, r then the free axes, in W's own order) with
the adapter axis in front, as ``jaxlora.multi``'s stacks of linear layers. The branch is
``jaxlora.multi.gathered_branch`` on the product's operands: each example's factors gathered,
the product's contraction done batched over the examples.

Which axis holds the examples (the rule): as for every stacked layer, the examples are axis 0
of the layer's inputs (each array argument of the index's length on axis 0); at the product
they must be axis 0 of the activation (the other operand of ``dot_general(x, W)``), and only
it, a free axis of the product. This is checked on the layer's traced call itself, by tracing
it again with axis 0 of those arguments grown by one example (``check_call``): exactly axis
0 of the activation must grow, to the index's length. Refused, naming the layer: a call that
moves the examples off axis 0 before the product (a transpose), merges them into another
axis, sums them away, or contracts them with the weight (then the grown call cannot be traced
at all); and any weight whose product has batch axes (an MoE expert axis: after routing, an
expert's rows are tokens from any example, so there is no per-example adapter to gather).
What happens between layers is the model's contract, as for stacked Dense layers: a model
that transposes its examples off axis 0 before calling a stacked layer gives that layer
another axis 0, refused only where its length differs from the index's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxlora import multi, oplevel


def check_call(
    product: oplevel.Product | Sequence[oplevel.Product],
    closed,
    retrace,
    args: tuple,
    kwargs: dict,
    n: int,
    where: str,
    each: Sequence[str] | None = None,
) -> None:
    """A ``ValueError`` naming ``where`` unless the product's activation holds the ``n``
    examples on its axis 0 alone: ``closed`` is the call traced on ``(args, kwargs)``,
    ``retrace(args, kwargs)`` traces it on other arguments (here: one more example). A module
    with several adapted weights passes their products (``each``: how to name each one): the
    call is traced once more for all of them."""
    products = [product] if isinstance(product, oplevel.Product) else list(product)
    probe = probe_inputs(args, kwargs, n, where)
    try:
        grown = retrace(*probe)
    except Exception as err:  # whatever the user's call raises on one more example
        raise ValueError(
            f"{where}: the call cannot be traced with {n + 1} examples (axis 0 of its inputs "
            f"grown by one), so where its product's activation holds them is unknown "
            f"({type(err).__name__}: {err}); e.g. the examples' axis is contracted with the "
            "weight: adapters cannot be gathered per example there"
        ) from err
    for one, at in zip(products, each or [where] * len(products), strict=True):
        check_examples(one, closed, grown, n, at)


def probe_inputs(args: tuple, kwargs: dict, n: int, where: str) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with every array of ``n`` rows (axis 0) replaced by a shape-only
    one of ``n + 1`` rows, to see which axes of the product's activation follow the batch."""
    grown = []

    def grow(leaf):
        if isinstance(leaf, jax.Array | np.ndarray) and np.ndim(leaf) and np.shape(leaf)[0] == n:
            grown.append(leaf)
            return jax.ShapeDtypeStruct((n + 1, *np.shape(leaf)[1:]), leaf.dtype)
        return leaf

    probe = jax.tree.map(grow, (args, kwargs))
    if not grown:
        raise ValueError(
            f"{where}: no array argument of the call has the {n} examples of the adapter index "
            "on its axis 0"
        )
    return probe


def check_examples(product: oplevel.Product, closed, probe, n: int, where: str) -> None:
    """A ``ValueError`` unless the product's activation has the ``n`` examples on its axis 0
    and there only: ``closed`` and ``probe`` are the call traced on the batch and on the
    batch grown by one example (``probe_inputs``)."""
    multi.check_no_batch(product.roles, where)
    side = 1 - product.side
    shape = _activation(closed.jaxpr, product.path, side)
    grown = _activation(probe.jaxpr, product.path, side)
    moved = [i for i, (s, g) in enumerate(zip(shape, grown, strict=True)) if s != g]
    if moved != [0] or shape[0] != n:
        raise ValueError(
            f"{where}: the product's activation {shape} must hold the {n} examples on its axis "
            f"0 alone, but its axes {moved} follow the batch (examples transposed, merged or "
            "summed before the product): adapters cannot be gathered per example there"
        )
    if 0 in product.dims[0][side]:
        raise ValueError(
            f"{where}: the product contracts its activation's axis 0, the examples' axis: "
            "adapters cannot be gathered per example there"
        )


def _activation(jaxpr, path: tuple[int, ...], side: int) -> tuple[int, ...]:
    return tuple(oplevel.eqn_at(jaxpr, path).invars[side].aval.shape)


def gathered(
    product: oplevel.Product,
    eqn,
    operands: list,
    stack: tuple[Any, Any, Any, Any],
    index: jax.Array,
) -> jax.Array:
    """Each example's branch at the product equation ``eqn`` (``oplevel.branch`` with example
    ``i``'s adapter ``index[i]`` of ``stack`` = (lora_a, lora_b, scale, occupied)), laid out
    as ``eqn``'s output. ``check_examples`` must have passed."""
    lora_a, lora_b, scale, occupied = stack
    a_op, b_op = jax.vmap(lambda a, b: oplevel.operand_factors(product, a, b))(lora_a, lora_b)
    dtype = oplevel.factor_dtype(product, operands)
    side = 1 - product.side
    y = multi.gathered_branch(
        operands[side],
        a_op.astype(dtype),
        b_op.astype(dtype),
        scale,
        occupied,
        index,
        tuple(product.dims[0][side]),
        eqn.params["precision"],
        eqn.params["preferred_element_type"],
    )
    return oplevel.as_output(product, y)
