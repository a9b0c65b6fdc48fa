"""Op-level LoRA: an adapter on any weight that enters the model through one product.

A weight W reaches ``jax.lax.dot_general`` (``jnp.einsum``, ``jnp.dot``, ``jnp.matmul`` and
``@`` all lower to it), possibly through ``transpose``, a reshape that merges whole axes, or a
dtype conversion (``FlaxConv1D``'s ``x @ kernel.T``). W's axes are then contracted C, batch B
(shared with the other operand x, not summed) or free F. The adapter is ``lora_a`` over
(B…, C…, r) and ``lora_b`` over (B…, r, F…), C and F in W's own axis order, and the branch is
the same product with W replaced by ``scaling · lora_a ⋅ lora_b``, computed factored:
``dot_general(dot_general(x, a), b)``; the delta is built only to merge (``delta``).

How the product is found and changed (the choice): the module's call is traced once
(``jax.make_jaxpr``) with the weight as an explicit input, and the product is located by
data flow from that input (``find_product``). At call time the same jaxpr is evaluated
equation by equation (``evaluate``) under whatever transformation is running (jit, grad,
vmap), and the one ``dot_general`` consuming the weight returns the base product plus the
branch, whose x is that equation's other operand. The alternative, qwix's, swaps
``jax.lax.dot_general``/``jnp.einsum`` while the module runs and matches operands by
identity; in jax 0.10.2 ``jnp.einsum`` holds ``lax.dot_general`` as a default argument and
``x @ w.T`` hands the product a new array, so identity cannot see through a transpose. The
jaxpr sees every route and every view of the weight.

Limits (each refused with the reason, never computed wrongly): the weight must reach exactly
one ``dot_general`` and nothing else (a bias-like use, a second product, a module called twice
in one forward, or a weight also used outside its module are refused); only ``transpose``,
``convert_element_type``, ``copy``, whole-axis-merging ``reshape`` and nested ``jit`` may lie
between; a product inside ``scan``/``while``/``cond``/``remat``/custom derivatives of the call
evaluated is refused. Nested ``jit`` calls on the way to the product are inlined when evaluated.
Finding a weight's roles in a whole model's trace (``find_product(..., through=True)``, NNX's
``inject``) also looks into ``remat`` and into a ``scan`` that slices the weight per iteration
(a stack of layers run by ``nnx.scan``): the product found there is one layer's
(``Product.sliced`` names the weight's layer axes; ``per_layer`` gives one layer's roles), and
that layer's own call is what is evaluated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxlora import core

# Primitives a weight may pass through on its way to the product: each keeps its values
# (a view, or a cast), so the product still multiplies the weight linearly.
_VIEWS = ("transpose", "reshape", "convert_element_type", "copy", "copy_p")
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr"}
# Looked into only to find roles (``through=True``), never inlined by ``evaluate``.
_REMATS = {"remat2": "jaxpr", "checkpoint": "jaxpr"}


@dataclasses.dataclass(frozen=True)
class Roles:
    """W's axes by role, each in W's own order: batch, contracted, free."""

    shape: tuple[int, ...]
    batch: tuple[int, ...]
    contracted: tuple[int, ...]
    free: tuple[int, ...]

    def lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        pick = lambda axes: tuple(self.shape[i] for i in axes)  # noqa: E731
        return (*pick(self.batch), *pick(self.contracted), r), (
            *pick(self.batch),
            r,
            *pick(self.free),
        )

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[i] for i in self.contracted)

    @property
    def out_features(self) -> int:
        return math.prod(self.shape[i] for i in self.free)


@dataclasses.dataclass(frozen=True)
class Product:
    """The one ``dot_general`` a weight enters: ``path`` gives the equation indices from the
    top jaxpr through nested jit calls; ``side`` is the weight's operand (0 lhs, 1 rhs);
    ``groups`` gives, per axis of that operand, the W axes it holds (a merging reshape
    puts several)."""

    path: tuple[int, ...]
    side: int
    dims: Any
    groups: tuple[tuple[int, ...], ...]
    roles: Roles
    sliced: tuple[int, ...] = ()  # W's axes a scan slices on the way (its layer axes)


class NotAProduct(ValueError):
    """The weight reaches no product at all (a bias, a norm scale): not adaptable."""


def find_product(
    jaxpr: jcore.Jaxpr,
    index: int,
    shape: tuple[int, ...],
    *,
    where: str,
    returned: int | None = None,
    through: bool = False,
) -> Product:
    """The one product that ``jaxpr``'s input ``index`` (a weight of ``shape``) enters.

    ``returned`` is the output position where the weight may come back unchanged (a traced
    module returning its own state). ``through``: also look into ``remat`` and into a ``scan``
    slicing the weight per iteration (for roles only: such a path cannot be evaluated).
    Raises ``NotAProduct`` if the weight enters no product, and ``ValueError`` naming
    ``where`` and the reason if it is used otherwise.
    """
    products: list[Product] = []
    others: list[str] = []
    identity = tuple((i,) for i in range(len(shape)))
    state = _Walk(products, others, through)
    _follow(jaxpr, jaxpr.invars[index], identity, (), state, returned, ())
    if not products:
        if others:
            raise NotAProduct(f"{where}: used only by {', '.join(sorted(set(others)))}")
        raise NotAProduct(f"{where}: not used by the call")
    if others:
        raise ValueError(
            f"{where}: used by {', '.join(sorted(set(others)))} besides its product "
            "(dot_general): only a weight used linearly in one product can be adapted"
        )
    if len(products) > 1:
        raise ValueError(
            f"{where}: used by {len(products)} products (dot_general); a weight shared by "
            "several products (or a module called more than once per call) is not supported"
        )
    dtype = getattr(jaxpr.invars[index].aval, "dtype", None)  # a ShapedArray's, for an array
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        # merge (W + delta) and the PiSSA/OLoRA residual are stored in the weight's dtype: an
        # integer weight would round them silently.
        raise ValueError(
            f"{where}: its dtype {dtype} is not floating point; only a float weight can hold "
            "W + delta once merged (store it as float, or quantize it with jaxlora.quant)"
        )
    return products[0]


@dataclasses.dataclass
class _Walk:
    products: list[Product]
    others: list[str]
    through: bool


def _follow(jaxpr, var, groups, path, walk: _Walk, returned, sliced, inner=False) -> list[int]:
    """Follows ``var`` (W's axes per its axis: ``groups``) through ``jaxpr``; returns the
    outputs where an ``inner`` jaxpr (a call's, remat's or scan's body) gives it back
    unchanged (``nnx.remat`` returns the module's state), which the caller follows on."""
    outs = [i for i, v in enumerate(jaxpr.outvars) if v is var]
    identity = groups == tuple((i,) for i in range(len(groups)))
    allowed = [returned] if path == () and identity else []
    through = outs if inner else []
    for i in outs:
        if i not in allowed and i not in through:
            walk.others.append("an output of the traced call (it escapes its product)")
    for i, eqn in enumerate(jaxpr.eqns):
        for pos, v in enumerate(eqn.invars):
            if v is not var:
                continue
            name = eqn.primitive.name
            if name == "dot_general":
                walk.products.append(_product((*path, i), pos, eqn, groups, sliced))
            elif name in _VIEWS:
                view = _view(eqn, groups)
                if view is None:
                    walk.others.append(f"a {name} that splits one of its axes")
                else:
                    _follow(jaxpr, eqn.outvars[0], view, path, walk, None, sliced)
            elif name in _CALLS or (walk.through and name in _REMATS):
                body = eqn.params[_CALLS.get(name) or _REMATS[name]]
                body = getattr(body, "jaxpr", body)
                back = _follow(body, body.invars[pos], groups, (*path, i), walk, None, sliced, True)
                for k in back:
                    _follow(jaxpr, eqn.outvars[k], groups, path, walk, None, sliced, inner)
            elif walk.through and name == "scan" and _scanned(eqn, pos, groups):
                # one layer's slice per iteration: the body sees the weight without axis 0
                body = eqn.params["jaxpr"].jaxpr
                layer = (*sliced, groups[0][0])
                back = _follow(
                    body, body.invars[pos], groups[1:], (*path, i), walk, None, layer, True
                )
                for k in back:  # returned per iteration as a scanned output: the stack again
                    if k < eqn.params["num_carry"]:
                        walk.others.append("a scan carry (it would change per layer)")
                    else:
                        _follow(jaxpr, eqn.outvars[k], groups, path, walk, None, sliced, inner)
            elif walk.through and name == "scan":
                walk.others.append("a scan that does not slice it into one layer per iteration")
            else:
                walk.others.append(name)
    return through


def _scanned(eqn, pos: int, groups) -> bool:
    """Whether a ``scan``'s operand ``pos`` is scanned over (not a constant or carry) on an
    axis that is one whole axis of W (a layer axis)."""
    first = eqn.params["num_consts"] + eqn.params["num_carry"]
    return pos >= first and len(groups[0]) == 1


def per_layer(product: Product) -> Product:
    """A product found through a scan (``product.sliced``: the weight's layer axes) as one
    layer's: its roles and groups over the weight without those axes, in the same order."""
    if not product.sliced:
        return product
    keep = [a for a in range(len(product.roles.shape)) if a not in product.sliced]
    new = {a: k for k, a in enumerate(keep)}
    renumber = lambda axes: tuple(new[a] for a in axes)  # noqa: E731
    roles = product.roles
    roles = Roles(
        tuple(roles.shape[a] for a in keep),
        renumber(roles.batch),
        renumber(roles.contracted),
        renumber(roles.free),
    )
    groups = tuple(renumber(g) for g in product.groups)
    return dataclasses.replace(product, groups=groups, roles=roles, sliced=())


def _view(eqn, groups):
    """The W axes per output axis of a view equation, or None for a reshape that splits."""
    name = eqn.primitive.name
    if name == "transpose":
        return tuple(groups[p] for p in eqn.params["permutation"])
    if name != "reshape":
        return groups
    old = eqn.invars[0].aval.shape
    new = eqn.outvars[0].aval.shape
    out, k = [], 0
    for n in new:
        taken, size = [], 1
        while k < len(old) and (size < n or (size == n and old[k] == 1 and n != 1)):
            taken.append(k)
            size *= old[k]
            k += 1
        if size != n:
            return None
        out.append(tuple(w for j in taken for w in groups[j]))
    return tuple(out) if k == len(old) else None


def _product(path, side, eqn, groups, sliced) -> Product:
    (contract, batch) = eqn.params["dimension_numbers"]
    mine_c, mine_b = contract[side], batch[side]
    of = lambda axes: tuple(sorted(w for a in axes for w in groups[a]))  # noqa: E731
    free_axes = [a for a in range(len(groups)) if a not in mine_c and a not in mine_b]
    roles = Roles((), of(mine_b), of(mine_c), of(free_axes))
    return Product(path, side, eqn.params["dimension_numbers"], groups, roles, tuple(sliced))


def split_args(args: tuple, kwargs: dict):
    """Array leaves are traced; every other leaf (None, flags, Python numbers) is static."""
    arg_leaves, arg_def = jax.tree.flatten((args, kwargs))
    arrays = jax.Array | np.ndarray | jax.ShapeDtypeStruct  # the last: a shape-only probe
    dynamic = [a if isinstance(a, arrays) else None for a in arg_leaves]
    static = tuple(None if d is not None else a for a, d in zip(arg_leaves, dynamic, strict=True))
    return dynamic, static, arg_def


def join_args(arg_def, dynamic, static, dyn):
    """The (args, kwargs) ``split_args`` took apart, with ``dyn`` as the array leaves."""
    it = iter(dyn)
    leaves = [next(it) if d is not None else s for d, s in zip(dynamic, static, strict=True)]
    return jax.tree.unflatten(arg_def, leaves)


def with_shape(product: Product, shape: tuple[int, ...]) -> Product:
    """``product`` with its roles' ``shape`` filled in (the weight's)."""
    roles = dataclasses.replace(product.roles, shape=tuple(shape))
    return dataclasses.replace(product, roles=roles)


def evaluate(
    closed: jcore.ClosedJaxpr,
    args: Sequence[Any],
    at: Mapping[tuple[int, ...], Callable[[Any, list], Any]],
) -> list:
    """Evaluates ``closed`` on ``args`` under the current trace, each equation at a path of
    ``at`` (a ``Product``'s) computed by ``at[path](eqn, operands)`` and the nested calls on
    the way inlined (a module with several adapted weights has one product per weight)."""
    return _eval(closed.jaxpr, closed.consts, args, dict(at))


def _eval(jaxpr, consts, args, at) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for i, eqn in enumerate(jaxpr.eqns):
        operands = [read(v) for v in eqn.invars]
        inner_at = {p[1:]: f for p, f in at.items() if p[0] == i and len(p) > 1}
        if (i,) in at:
            outs = [at[(i,)](eqn, operands)]
        elif inner_at:
            inner = eqn.params[_CALLS[eqn.primitive.name]]
            consts_in = getattr(inner, "consts", ())
            outs = _eval(getattr(inner, "jaxpr", inner), consts_in, operands, inner_at)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)  # as jax.core.eval_jaxpr does
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*operands, **params)
            outs = ans if eqn.primitive.multiple_results else [ans]
        for v, value in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = value
    return [read(v) for v in jaxpr.outvars]


def branch(
    product: Product, eqn, operands: list, lora_a, lora_b, scale: float, x: jax.Array | None = None
) -> jax.Array:
    """The factored branch for the product equation ``eqn`` (its ``operands`` as evaluated),
    laid out as ``eqn``'s output. ``x`` replaces the other operand (dropout on it)."""
    side = product.side
    x = operands[1 - side] if x is None else x
    (contract, batch) = product.dims
    a_op, b_op = operand_factors(product, lora_a, lora_b)
    dtype = operands[side].dtype
    a_op, b_op = a_op.astype(dtype), b_op.astype(dtype)
    nb, nc = len(batch[side]), len(contract[side])
    options = dict(
        precision=eqn.params["precision"],
        preferred_element_type=eqn.params["preferred_element_type"],
    )
    h = jax.lax.dot_general(
        x,
        a_op,
        (
            (tuple(contract[1 - side]), tuple(range(nb, nb + nc))),
            (tuple(batch[1 - side]), tuple(range(nb))),
        ),
        **options,
    )
    h = core.scale_once(h, scale).astype(dtype)
    y = jax.lax.dot_general(
        h, b_op, (((h.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))), **options
    )
    return as_output(product, y)


def eqn_at(jaxpr: jcore.Jaxpr, path: tuple[int, ...]):
    """The equation at ``path`` (a ``Product``'s), through the nested calls on the way."""
    for i in path[:-1]:
        eqn = jaxpr.eqns[i]
        inner = eqn.params[_CALLS[eqn.primitive.name]]
        jaxpr = getattr(inner, "jaxpr", inner)
    return jaxpr.eqns[path[-1]]


def operand_factors(product: Product, lora_a, lora_b) -> tuple[jax.Array, jax.Array]:
    """``lora_a`` and ``lora_b`` as the product's weight operand sees W's axes: ``a`` (batch…,
    contracted…, r) and ``b`` (batch…, r, free…), each operand axis merging its W axes, in the
    operand's order (``dot_general`` pairs them with the other operand's axes)."""
    side, roles, groups = product.side, product.roles, product.groups
    (contract, batch) = product.dims
    free_axes = [a for a in range(len(groups)) if a not in contract[side] and a not in batch[side]]
    a_op = _operand_view(
        lora_a, roles.batch + roles.contracted, groups, [*batch[side], *contract[side]], None
    )
    b_op = _operand_view(
        lora_b, roles.batch + roles.free, groups, [*batch[side], *free_axes], len(roles.batch)
    )
    return a_op, b_op


def as_output(product: Product, y: jax.Array) -> jax.Array:
    """``y`` (batch, x's free, W's free) in the product's output order: the weight as the
    left operand puts its free axes first (batch, W's free, x's free)."""
    if product.side == 1:
        return y
    nb = len(product.dims[1][0])
    n_free = len(product.groups) - nb - len(product.dims[0][0])
    x_free = y.ndim - nb - n_free
    return jnp.transpose(y, [*range(nb), *range(nb + x_free, y.ndim), *range(nb, nb + x_free)])


def _operand_view(factor, w_axes: tuple[int, ...], groups, op_axes: list[int], rank_at):
    """``factor`` (its non-rank axes are ``w_axes`` of W, in that order) as the product's
    operand sees those axes: ``op_axes`` in order, each merging its group of W axes; the rank
    goes last (``rank_at=None``) or at position ``rank_at``."""
    rank_axis = len(w_axes) if rank_at is None else rank_at
    position = [i for i in range(factor.ndim) if i != rank_axis]
    where = dict(zip(w_axes, position, strict=True))
    order = [where[w] for a in op_axes for w in groups[a]]
    sizes = [math.prod(factor.shape[where[w]] for w in groups[a]) for a in op_axes]
    r = factor.shape[rank_axis]
    if rank_at is None:
        return jnp.transpose(factor, [*order, rank_axis]).reshape(*sizes, r)
    head, tail = order[:rank_at], order[rank_at:]
    moved = jnp.transpose(factor, [*head, rank_axis, *tail])
    return moved.reshape(*sizes[:rank_at], r, *sizes[rank_at:])


def as_linear(weight: jax.Array, roles: Roles) -> jax.Array:
    """``weight`` (of ``roles.shape``) as the (out, in) = (prod F, prod C) Linear weight: the
    layout ``jaxlora.quant._layout`` stores and PiSSA/OLoRA factor (``product.init_factors``)."""
    order = (*roles.free, *roles.contracted)
    return jnp.transpose(weight, order).reshape(roles.out_features, roles.in_features)


def from_linear(matrix: jax.Array, roles: Roles) -> jax.Array:
    """The inverse of ``as_linear``: the (out, in) matrix in the weight's own shape."""
    order = (*roles.free, *roles.contracted)
    shaped = matrix.reshape(tuple(roles.shape[i] for i in order))
    return jnp.transpose(shaped, [order.index(i) for i in range(len(order))])


def delta(roles: Roles, lora_a, lora_b, scale: float) -> jax.Array:
    """``scale · lora_a ⋅ lora_b`` contracted over r in fp32 at full precision, in W's own
    axis order."""
    nb, nc, nf = len(roles.batch), len(roles.contracted), len(roles.free)
    letters = "abcdefghijklmnopqstuvwxyz"
    bat, con, fre = letters[:nb], letters[nb : nb + nc], letters[nb + nc : nb + nc + nf]
    dtype = jnp.promote_types(lora_a.dtype, jnp.float32)
    d = jnp.einsum(
        f"{bat}{con}r,{bat}r{fre}->{bat}{con}{fre}",
        lora_a.astype(dtype),
        lora_b.astype(dtype),
        precision=jax.lax.Precision.HIGHEST,
    ) * jnp.asarray(scale, dtype)
    order = roles.batch + roles.contracted + roles.free
    return jnp.transpose(d, [order.index(w) for w in range(len(order))])
