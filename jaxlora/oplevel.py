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

Slice views (an MoE's per-expert loop, ``W[i]`` then ``einsum``): a weight whose static
slices each enter a product of their own is one adapter whose sliced axes are batch axes
(``lora_a`` (E, C…, r), ``lora_b`` (E, r, F…), the layout of a true batched product), the
branch at slice i's product using ``lora_a[i]``, ``lora_b[i]``. A static slice is a width-1
``slice`` (stride 1) and/or a ``squeeze`` (as ``W[i]``, ``W[-1]``, ``W[:, i]``,
``lax.index_in_dim`` and ``W[i:i+1].reshape`` lower). Required, else refused: every product
indexes the same axes, each index exactly once (no index missing), the slices in the same
roles; no product of the weight without indexing. Partial or strided slices are refused.
Slice views inside a scanned stack (``nnx.scan``) are found per layer as any other product.

Traced indices (routing by a gather: ``jnp.take(W, idx, axis=0)``, ``W[idx]``, ``W[i]`` with
``i`` traced; ``jaxlora.gather``): the indexed axes are batch axes of the adapter, one adapter
per expert as for slice views, and the branch uses the factors gathered by the same indices
with the same primitive, ``x·A[idx]·B[idx]``. The gather's own axes (one per entry of the
index array) must be batch axes of the product. Several products each through a traced index
of their own (a loop over routing slots) are one adapter when W's roles agree in all.

Grouped products and shard_map (an MoE on a device mesh: tunix's Qwen3 ``MoELayer`` runs its
experts as megablox's ``gmm`` in a ``shard_map``): megablox's ``gmm`` (a Pallas kernel under a
``custom_vjp``, recognised by its backward function) with the weight (G, k, n) as its rhs
(``rhs[g].T`` with transpose_rhs) is a product whose group axis is a batch axis (one adapter
per expert, the layout the same einsum over experts gets); its branch is ``ragged_dot(
ragged_dot(x, A, gs)·s, B, gs)`` with gmm's own group sizes (``grouped_branch``). A product
inside a ``shard_map`` is found in its body; ``evaluate`` binds the shard_map again with the
factors as extra inputs, each factor axis sharded on the mesh axes of the weight axis it
stands for (the rank replicated), so each device meets its local shards of both (an
expert-, contracted- or free-sharded weight; the body's own psum adds the contracted shards'
branches as it adds the base's). gmm with a group_offset or an existing output, the weight as
gmm's lhs, any other Pallas kernel, a nested shard_map, or a shard_map axis merging several
axes of the weight is refused; so are several adapters served at once (``to_multi``) inside
a shard_map.

Row lookups (a tied embedding: ``W[tokens]`` then ``* sqrt(D)`` to embed, ``x @ W.T`` for the
logits): a traced index whose rows are used otherwise than in a product is a lookup. A weight
with lookups besides its one product is refused (``RowLookups``) unless the caller asks for
``find_product(..., lookups=True)``: then the product is adapted and the lookups, left as they
are, read the unadapted weight (PEFT's LoRA on a tied ``lm_head``; its ``embed_tokens`` lookups
stay the base's). A weight whose product is itself through a traced index has no lookups left
unadapted (refused).

Limits (each refused with the reason, never computed wrongly): the weight must reach exactly
one ``dot_general`` (or one per slice, above) and nothing else (a bias-like use, a second
product, a module called twice in one forward, or a weight also used outside its module are
refused); only ``transpose``, ``convert_element_type``, ``copy``, whole-axis-merging
``reshape``, static slices, one traced index (above), nested ``jit`` and a ``shard_map``
(above) may lie between; a product inside ``scan``/``while``/``cond``/``remat``/custom
derivatives (but gmm's) of the call evaluated is refused, and a weight reaching a Pallas kernel
is refused (it may be multiplied there), never skipped as "not a product".
Nested ``jit`` calls on the way to the product are inlined when evaluated. Finding a weight's
roles in a whole model's trace (``find_product(..., through=True)``, NNX's ``inject``) also
looks into ``remat`` and into a ``scan`` that slices the weight per iteration (a stack of
layers run by ``nnx.scan``): the product found there is one layer's (``Product.layers`` names
the weight's layer axes; ``per_layer`` gives one layer's roles), and that layer's own call is
what is evaluated.
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

from jaxlora import core, gather

# Primitives a weight may pass through on its way to the product: each keeps its values
# (a view, or a cast), so the product still multiplies the weight linearly.
_VIEWS = ("transpose", "reshape", "convert_element_type", "copy", "copy_p")
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr"}
# Looked into only to find roles (``through=True``), never inlined by ``evaluate``.
_REMATS = {"remat2": "jaxpr", "checkpoint": "jaxpr"}


@dataclasses.dataclass(frozen=True)
class Roles:
    """W's axes by role, each in W's own order: batch, contracted, free.

    ``operands``: the trace's record of how the product holds W, per product (one, or one per
    slice view), per axis of the weight's operand, the W axes it holds in the order it holds
    them (a reshape merging axes puts several); ``()`` where no trace recorded it (a known
    layer's ``Roles.linear``, an old record). Used for PEFT files only (``torch_order``); left
    out of the repr, kept in equality (a jit cache must not hand one record for another)."""

    shape: tuple[int, ...]
    batch: tuple[int, ...]
    contracted: tuple[int, ...]
    free: tuple[int, ...]
    operands: tuple[tuple[tuple[int, ...], ...], ...] = dataclasses.field(default=(), repr=False)

    def matches(self, other: Roles) -> bool:
        """The same axes in the same roles, flattened alike for a torch Linear (``torch_order``)
        unless one of them has no ``operands`` (a record made without them): how a call is
        checked against an adapter's record (a module may compute its product another way in
        another context, megablox's gmm under a mesh, a loop over experts without)."""
        axes = (self.shape, self.batch, self.contracted, self.free)
        if axes != (other.shape, other.batch, other.contracted, other.free):
            return False
        if not self.operands or not other.operands:
            return True
        return all(
            torch_order(self, a) == torch_order(other, a) for a in (self.contracted, self.free)
        )

    def lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        pick = lambda axes: tuple(self.shape[i] for i in axes)  # noqa: E731
        return (*pick(self.batch), *pick(self.contracted), r), (
            *pick(self.batch),
            r,
            *pick(self.free),
        )

    @classmethod
    def linear(cls, shape: Sequence[int], in_axes: int, stack: int = 0) -> Roles:
        """The roles of a Dense-like kernel (*in_axes, *out_axes) in its layer's product
        ``x @ kernel`` (``nn.Dense``: ``'bi,io->bo'``; ``nn.DenseGeneral``/``nnx.LinearGeneral``:
        the leading ``in_axes`` contracted with x's ``axis``): contracted, then free. A stack's
        ``stack`` leading layer axes (``nn.scan``/``nnx.vmap``) are batch axes, one adapter per
        layer, as for slice views. These roles give the known linear layers their adapter's
        layout, delta and torch layout (``jaxlora.kinds``), the same rule as any product's."""
        shape = tuple(shape)
        return cls(
            shape,
            tuple(range(stack)),
            tuple(range(stack, stack + in_axes)),
            tuple(range(stack + in_axes, len(shape))),
        )

    def axis_names(self, names: Sequence) -> tuple[tuple, tuple]:
        """Partitioning of (lora_a, lora_b) from the weight's axis names: each adapter axis
        takes the name of the weight axis it stands for; the rank is replicated."""
        names = tuple(names) + (None,) * (len(self.shape) - len(names))
        pick = lambda axes: tuple(names[i] for i in axes)  # noqa: E731
        return (*pick(self.batch), *pick(self.contracted), None), (
            *pick(self.batch),
            None,
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
    puts several; W axes fixed by static indexing are left out).

    Slice views (``find_product``): a weight whose static slices ``W[i]`` each enter one
    product of their own is found as one ``Product`` whose ``sites`` are those products (each
    with ``sliced``, the indexed W axes, and ``index``, its position on them) and whose
    ``roles`` count the sliced axes as batch axes: one adapter per slice. Its own ``path`` is
    ``()``: use ``sites(product)``, the equations to change. The same for several products
    each through a traced index (``gather``).

    A weight reached through a traced index (``gather``: a ``jaxlora.gather.Gather``) has
    ``groups`` over the gathered weight V (the gather's batch dims, then W's other axes) and
    ``roles`` over W (the indexed axes batch axes); ``gather.roles`` are V's in the product."""

    path: tuple[int, ...]
    side: int
    dims: Any
    groups: tuple[tuple[int, ...], ...]
    roles: Roles
    sliced: tuple[int, ...] = ()  # W's axes fixed by static indexing (slice views)
    index: tuple[int, ...] = ()  # this product's position on them
    sites: tuple[Product, ...] = ()  # a slice-view (or traced-index) adapter's products
    layers: tuple[int, ...] = ()  # W's axes a scan slices on the way (its layer axes)
    gather: gather.Gather | None = None  # the traced index on the way (groups are V's)
    # A grouped product (megablox's ``gmm``): (name, transpose_rhs); ``dims`` are those of
    # the per-group product with the weight's group axis as a batch axis.
    grouped: tuple = ()
    # A product inside a ``shard_map``: (the shard_map equation's path, per W axis the mesh
    # axes that shard it there, or None): the factors enter it sharded alike.
    mapped: tuple = ()


def sites(product: Product) -> tuple[Product, ...]:
    """The product equations to change for ``product``: its slice views' or itself."""
    return product.sites or (product,)


class NotAProduct(ValueError):
    """The weight reaches no product at all (a bias, a norm scale): not adaptable."""


# Primitives whose body multiplies by the weight out of the evaluator's reach: a Pallas kernel
# (``pallas_call``, bare or under a custom derivative), but for megablox's grouped matmul
# ``gmm`` (``_gmm``), whose product is known. A weight reaching one may well be multiplied
# there, so it is refused with the reason, never skipped as "not a product".
_OPAQUE = ("pallas_call",)
_CUSTOM = ("custom_vjp_call", "custom_jvp_call")


def find_product(
    jaxpr: jcore.Jaxpr,
    index: int,
    shape: tuple[int, ...],
    *,
    where: str,
    returned: int | None = None,
    through: bool = False,
    lookups: bool = False,
) -> Product:
    """The one product that ``jaxpr``'s input ``index`` (a weight of ``shape``) enters.

    ``returned`` is the output position where the weight may come back unchanged (a traced
    module returning its own state). ``through``: also look into ``remat`` and into a ``scan``
    slicing the weight per iteration (for roles only: such a path cannot be evaluated).
    ``lookups``: the weight may also be read by row lookups (a tied embedding and lm_head,
    see ``RowLookups``), which are left alone. Raises ``NotAProduct`` if the weight enters no
    product, ``RowLookups`` if it is also looked up and ``lookups`` is false, and
    ``ValueError`` naming ``where`` and the reason if it is used otherwise.
    """
    products: list[Product] = []
    others: list[str] = []
    identity = tuple((i,) for i in range(len(shape)))
    walk = _Walk(products, others, through)
    _follow(jaxpr, jaxpr.invars[index], (identity, (), None), (), walk, returned, ())
    if walk.opaque:
        raise ValueError(
            f"{where}: used {'; and '.join(sorted(set(walk.opaque)))}: jaxlora adds the branch "
            "at a product it can see in the traced call (a dot_general, or megablox's gmm "
            "with the weight as its rhs), never inside a kernel, so this weight cannot be "
            "adapted where it is used (run the module's plain-jnp path, or leave it out)"
        )
    if not products:
        uses = [*others, *(f"a row lookup (then {u})" for u in walk.lookups)]
        if uses:
            raise NotAProduct(f"{where}: used only by {', '.join(sorted(set(uses)))}")
        raise NotAProduct(f"{where}: not used by the call")
    if walk.lookups:
        _check_lookups(products, others, walk.lookups, lookups, where)
    if others:
        raise ValueError(
            f"{where}: used by {', '.join(sorted(set(others)))} besides its product "
            "(dot_general): only a weight used linearly in one product can be adapted"
        )
    dtype = getattr(jaxpr.invars[index].aval, "dtype", None)  # a ShapedArray's, for an array
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        # merge (W + delta) and the PiSSA/OLoRA residual are stored in the weight's dtype: an
        # integer weight would round them silently.
        raise ValueError(
            f"{where}: its dtype {dtype} is not floating point; only a float weight can hold "
            "W + delta once merged (store it as float, or quantize it with jaxlora.quant)"
        )
    return _recorded(_one_adapter(products, shape, where))


def _one_adapter(products: list[Product], shape: tuple[int, ...], where: str) -> Product:
    """The products of one weight as one adapter's (``find_product``): one product, slice
    views or traced-index views; a ``ValueError`` naming ``where`` for anything else."""
    if len(products) == 1 and not products[0].sliced:
        return products[0]
    if all(p.gather is not None for p in products):
        return _gathered_views(products, where)
    if not all(p.sliced for p in products):
        raise ValueError(
            f"{where}: used by {len(products)} products (dot_general)"
            + (
                f", {sum(not p.sliced for p in products)} of them without static indexing"
                if any(p.sliced for p in products)
                else ""
            )
            + "; a weight shared by several products (or a module called more than once per "
            "call) is not supported, only one product per static slice W[i] (slice views)"
        )
    if len({p.layers for p in products}) > 1:
        raise ValueError(
            f"{where}: its slice views lie in scans slicing different layer axes "
            f"{sorted({p.layers for p in products})}; they must lie in one scanned layer"
        )
    return _slice_views(products, shape, where)


def _recorded(product: Product) -> Product:
    """``product`` with its roles' ``operands`` recorded from its sites (``weight_groups``)."""
    held = tuple(weight_groups(site) for site in sites(product))
    roles = dataclasses.replace(product.roles, operands=held)
    views = tuple(dataclasses.replace(p, roles=roles) for p in product.sites)
    return dataclasses.replace(product, roles=roles, sites=views)


def weight_groups(site: Product) -> tuple[tuple[int, ...], ...]:
    """Per axis of the product ``site``'s weight operand, the W axes it holds, in the order
    it holds them (a gathered weight's gather batch dims stand for its indexed axes)."""
    gathered = site.gather
    if gathered is None:
        return site.groups
    return tuple(tuple(w for v in g for w in gathered.to_weight((v,))) for g in site.groups)


class RowLookups(ValueError):
    """The weight enters its product and is also read by row lookups: a traced index
    (``gather``/``dynamic_slice``: ``W[tokens]``, ``jnp.take``) whose rows are used otherwise
    than in a product, as a tied embedding is (the lookup, then the lm_head's ``x @ W.T``).
    Only adapting the product with the lookups reading the unadapted weight (PEFT's LoRA on a
    tied ``lm_head``) is supported, and only when asked for (``find_product(lookups=True)``)."""


def _check_lookups(
    products: list[Product], others: list[str], lookups: list[str], allowed: bool, where: str
) -> None:
    """Refuses a weight with row lookups unless they are ``allowed``, and always when its
    product is itself through a traced index (then a row would be adapted in one use of it
    and not in another)."""
    then = ", ".join(sorted(set(lookups)))
    if not allowed:
        if others:  # refused for those anyway: say so, lookups aside
            return
        raise RowLookups(
            f"{where}: read by row lookups (a traced index into it, then {then}) besides its "
            "product (dot_general), as a tied embedding and lm_head are"
        )
    if any(p.gather is not None for p in products):
        raise ValueError(
            f"{where}: read by row lookups (then {then}) and entering its product through a "
            "traced index too: only a weight whose product takes it whole (or by static "
            "slices) can have row lookups left unadapted"
        )


def _gathered_views(products: list[Product], where: str) -> Product:
    """Several products of the weight, each through a traced index of its own (an MoE loop
    ``W[idx_k]`` per routing slot), as one adapter: W's roles must be the same in each."""
    kinds = {p.roles for p in products}
    if len(kinds) > 1:
        raise ValueError(
            f"{where}: its traced-index views enter their products in different roles "
            f"({sorted(kinds, key=str)}); one adapter needs the same roles in each"
        )
    views = tuple(sorted(products, key=lambda p: p.path))
    first = views[0]
    return Product(
        (), first.side, first.dims, first.groups, first.roles, sites=views, layers=first.layers
    )


@dataclasses.dataclass
class _Walk:
    products: list[Product]
    others: list[str]
    through: bool
    opaque: list[str] = dataclasses.field(default_factory=list)  # reasons to refuse outright
    in_map: bool = False  # following inside a shard_map's body
    lookups: list[str] = dataclasses.field(default_factory=list)

    def refuse(self, view, why: str) -> None:
        """A use of the weight, seen as ``view``, that is no product: a row lookup's (``why``
        happens to rows a traced index took, ``view``'s gather) or another."""
        (self.others if view[2] is None else self.lookups).append(why)


def _slice_views(products: list[Product], shape: tuple[int, ...], where: str) -> Product:
    """The slice views ``products`` (each reached through static indexing) as one adapter,
    or a ``ValueError`` unless they index the same axes, each index exactly once, and use
    their slices in the same roles."""
    axes = {p.sliced for p in products}
    if len(axes) > 1:
        raise ValueError(
            f"{where}: its products index it on different axes {sorted(axes)}; slice views "
            "must index the same axes in every product"
        )
    sliced = products[0].sliced
    counts: dict[tuple[int, ...], int] = {}
    for p in products:
        counts[p.index] = counts.get(p.index, 0) + 1
    twice = sorted(i for i, n in counts.items() if n > 1)
    if twice:
        raise ValueError(
            f"{where}: index {twice[0]} on axes {sliced} enters {counts[twice[0]]} products; "
            "slice views need each index in exactly one product"
        )
    grid = np.ndindex(*(shape[w] for w in sliced))
    missing = [i for i in grid if i not in counts]
    if missing:
        raise ValueError(
            f"{where}: index {missing[0]} on axes {sliced} enters no product "
            f"({len(missing)} of {len(missing) + len(counts)} unused); slice views need every "
            "index in exactly one product (the adapter covers the whole weight)"
        )
    kinds = {(p.roles.batch, p.roles.contracted, p.roles.free) for p in products}
    if len(kinds) > 1:
        raise ValueError(
            f"{where}: its slices enter their products in different roles "
            f"(batch, contracted, free: {sorted(kinds)}); slice views need the same roles"
        )
    local = products[0].roles
    roles = Roles((), tuple(sorted((*sliced, *local.batch))), local.contracted, local.free)
    views = tuple(
        dataclasses.replace(p, roles=roles) for p in sorted(products, key=lambda p: p.index)
    )
    first = views[0]
    return Product((), first.side, first.dims, first.groups, roles, sliced, (), views, first.layers)


def _follow(jaxpr, var, view, path, walk: _Walk, returned, layers, inner=False) -> list:
    """Follows ``var``, the weight seen as ``view`` = (groups, fixed, gathered): per axis of
    ``var`` the W axes it holds (the gathered weight V's, after a traced index), the (W axis,
    index) pairs static indexing has fixed so far, and the ``gather.Gather`` a traced index
    made (or None); ``layers`` are the W axes scans have sliced on the way. Returns the
    (output, view) pairs where an ``inner`` jaxpr (a call's, remat's or scan's body) gives
    it back (``nnx.remat`` returns the module's state; ``jnp.take`` is a jit returning the
    gathered weight), which the caller follows on."""
    groups, fixed, gathered = view
    outs = [i for i, v in enumerate(jaxpr.outvars) if v is var]
    unchanged = not fixed and gathered is None and groups == tuple((i,) for i in range(len(groups)))
    allowed = [returned] if path == () and unchanged else []
    through = [(i, view) for i in outs] if inner else []
    for i in outs:
        if i not in allowed and not inner:
            walk.refuse(view, "an output of the traced call (it escapes its product)")
    for i, eqn in enumerate(jaxpr.eqns):
        for pos, v in enumerate(eqn.invars):
            if v is not var:
                continue
            through += _follow_eqn(jaxpr, eqn, (*path, i), pos, view, walk, layers, inner)
    return through


def _follow_eqn(jaxpr, eqn, at, pos, view, walk: _Walk, layers, inner) -> list:
    """Follows the weight (seen as ``view``) into ``eqn`` (at path ``at``) as its operand
    ``pos``; returns what ``_follow`` returns for the views of it that ``eqn`` makes."""
    groups, fixed, gathered = view
    path, name = at[:-1], eqn.primitive.name

    def on(new_view):
        return _follow(jaxpr, eqn.outvars[0], new_view, path, walk, None, layers, inner)

    if name == "dot_general":
        product = _product(at, pos, eqn, view, layers)
        if isinstance(product, str):
            walk.refuse(view, product)
        else:
            walk.products.append(product)
    elif name in _VIEWS:
        seen = _view(eqn, groups)
        if seen is None:
            walk.refuse(view, f"a {name} that splits one of its axes")
            return []
        return on((seen, fixed, gathered))
    elif name in ("slice", "squeeze") and pos == 0:
        indexed = _indexed(eqn, groups, dict(fixed))
        if not isinstance(indexed, str) and gathered is not None and indexed[1] != fixed:
            indexed = "a static slice of the weight gathered by a traced index"
        if isinstance(indexed, str):
            walk.refuse(view, indexed)
            return []
        return on((*indexed, gathered))
    elif name in ("dynamic_slice", "gather") and pos == 0:
        why = "a second traced index" if gathered is not None else ""
        why = why or ("a traced index into a statically sliced weight" if fixed else "")
        taken = why or gather.follow(eqn, at, groups)
        if isinstance(taken, str):
            walk.refuse(view, f"a {name} ({taken})")
            return []
        return on((taken[0], fixed, taken[1]))
    elif name in _CALLS or (walk.through and name in _REMATS):
        body = eqn.params[_CALLS.get(name) or _REMATS[name]]
        body = getattr(body, "jaxpr", body)
        back = _follow(body, body.invars[pos], view, at, walk, None, layers, True)
        out = []
        for k, seen in back:
            out += _follow(jaxpr, eqn.outvars[k], seen, path, walk, None, layers, inner)
        return out
    elif walk.through and name == "scan" and not fixed and gathered is None:
        if not _scanned(eqn, pos, groups):
            walk.refuse(view, "a scan that does not slice it into one layer per iteration")
            return []
        # one layer's slice per iteration: the body sees the weight without axis 0
        body = eqn.params["jaxpr"].jaxpr
        layer = (*layers, groups[0][0])
        one = (groups[1:], (), None)
        back = _follow(body, body.invars[pos], one, at, walk, None, layer, True)
        out = []
        for k, seen in back:  # returned per iteration as a scanned output: the stack again
            if k < eqn.params["num_carry"]:
                walk.refuse(view, "a scan carry (it would change per layer)")
            elif seen != one:
                walk.refuse(view, "a scan output of a view of it")
            else:
                out += _follow(jaxpr, eqn.outvars[k], view, path, walk, None, layers, inner)
        return out
    elif walk.through and name == "scan":
        walk.refuse(view, "a scan of a sliced or gathered view of it")
    elif name == "shard_map":
        _follow_shard_map(jaxpr, eqn, at, pos, view, walk, layers, inner)
    elif name == "custom_vjp_call" and _gmm(eqn) is not None:
        product = _gmm_product(at, pos, eqn, view, layers)
        if isinstance(product, str):
            walk.opaque.append(product)
        else:
            walk.products.append(product)
    elif name in _OPAQUE or (name in _CUSTOM and _kernel_in(eqn)):
        walk.opaque.append(_opaque(eqn, pos))
    else:
        walk.refuse(view, name)
    return []


def _opaque(eqn, pos: int) -> str:
    """Where the weight goes into ``eqn`` (in ``_OPAQUE``, or a custom-derivative call around
    a Pallas kernel), for the refusal: a ``shard_map`` names what its body does with it."""
    name = eqn.primitive.name
    if name == "pallas_call":
        return "by a Pallas kernel (pallas_call)"
    if name in _CUSTOM:
        called = _called_name(eqn)
        return f"by a Pallas kernel{f' {called!r}' if called else ''} (in a {name})"
    return f"by {name}"


def _follow_shard_map(jaxpr, eqn, at, pos, view, walk: _Walk, layers, inner) -> None:
    """Follows the weight into a ``shard_map``'s body (its per-device computation on local
    shards): each product found there records the shard_map and the mesh axes sharding each
    W axis (``Product.mapped``), so that ``evaluate`` passes the factors in sharded alike."""
    groups, fixed, gathered = view
    spec = eqn.params["in_specs"][pos]
    names = _mesh_names(tuple(spec), groups)
    why = (
        "a nested shard_map"
        if walk.in_map
        else "a shard_map of a sliced or gathered view of it"
        if fixed or gathered is not None
        else names
        if isinstance(names, str)
        else ""
    )
    if why:
        walk.opaque.append(f"in {why}")
        return
    body = eqn.params["jaxpr"]
    body = getattr(body, "jaxpr", body)
    first = len(walk.products)
    walk.in_map = True
    back = _follow(body, body.invars[pos], view, at, walk, None, layers, True)
    walk.in_map = False
    if back:
        walk.others.append("an output of a shard_map (it escapes its product)")
    walk.products[first:] = [
        dataclasses.replace(p, mapped=(at, names)) for p in walk.products[first:]
    ]


def _mesh_names(spec: tuple, groups) -> tuple | str:
    """Per W axis, the mesh axes a shard_map's in-spec ``spec`` shards it on (None where
    replicated), from the operand axes holding W's axes (``groups``); a str saying why not
    when a sharded operand axis merges several W axes."""
    spec = spec + (None,) * (len(groups) - len(spec))
    names: dict[int, Any] = {}
    for axis, held in enumerate(groups):
        if len(held) > 1 and spec[axis] is not None:
            return f"a shard_map sharding its axis {axis}, which merges its axes {held}"
        names.update({w: spec[axis] for w in held})
    return tuple(names.get(w) for w in range(max(names, default=-1) + 1))


def _gmm(eqn) -> tuple | None:
    """(transpose_rhs,) if ``eqn`` (a ``custom_vjp_call``) is megablox's ``gmm`` called on
    (lhs, rhs, group_sizes) alone (no group_offset, no existing_out), else None. Recognised by
    its backward function (``megablox.ops._gmm_bwd``); transpose_rhs is read from the static
    arguments jax binds to it, or from the shapes where they tell."""
    bwd = eqn.params.get("bwd")
    if getattr(bwd, "f", None) is not _gmm_bwd() or len(eqn.invars) != 3:
        return None
    for transform, args in getattr(bwd, "transforms", ()):
        if getattr(transform, "__name__", "") == "_prepend_static_args":
            static = [getattr(a, "val", a) for a in args[0]]
            if len(static) == 4 and isinstance(static[2], bool):
                return (static[2],)  # preferred_element_type, tiling, transpose_rhs, interpret
    k = eqn.invars[0].aval.shape[1]
    p, q = eqn.invars[1].aval.shape[1:]
    n = eqn.outvars[0].aval.shape[1]
    if p != q:
        return ((p, q) == (n, k),)
    return None


def _gmm_bwd():
    try:
        from jax.experimental.pallas.ops.tpu.megablox import ops
    except ImportError:  # pragma: no cover (a jax without Pallas' TPU ops)
        return None
    return getattr(ops, "_gmm_bwd", None)


def _gmm_product(path, pos, eqn, view, layers) -> Product | str:
    """The grouped product megablox's ``gmm`` computes, ``out[rows of group g] = lhs[rows] @
    rhs[g]`` (``rhs[g].T`` with transpose_rhs), with the weight as its rhs: the group axis a
    batch axis (one adapter per expert), k contracted, n free; a str saying why not (the
    weight as lhs, a sliced or gathered view of it, an axis merging several of its axes)."""
    groups, fixed, gathered = view
    if pos != 1:
        return "by megablox's gmm as its lhs (only its rhs, the expert weights, is adapted)"
    if fixed or gathered is not None:
        return "by megablox's gmm through a static slice or traced index of it"
    (transposed,) = _gmm(eqn) or (False,)  # not None: checked by the caller
    k_axis = 2 if transposed else 1
    if len(groups[0]) != 1:
        return f"by megablox's gmm with its group axis merging its axes {groups[0]}"
    of = lambda axes: tuple(sorted(w for a in axes for w in groups[a]))  # noqa: E731
    roles = Roles((), of((0,)), of((k_axis,)), of((3 - k_axis,)))
    dims = (((1,), (k_axis,)), ((), (0,)))  # the per-group product, the group a batch axis
    return Product(path, 1, dims, groups, roles, layers=tuple(layers), grouped=("gmm", transposed))


def _called_name(eqn) -> str | None:
    call = eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
    info = getattr(getattr(call, "jaxpr", call), "debug_info", None)
    return getattr(info, "func_name", None)


def _kernel_in(eqn) -> bool:
    """Whether a Pallas kernel (``pallas_call``) runs anywhere inside ``eqn``'s sub-jaxprs."""
    for value in eqn.params.values():
        for sub in value if isinstance(value, tuple | list) else (value,):
            inner = getattr(sub, "jaxpr", sub)
            if isinstance(inner, jcore.Jaxpr) and any(
                e.primitive.name == "pallas_call" or _kernel_in(e) for e in inner.eqns
            ):
                return True
    return False


def _scanned(eqn, pos: int, groups) -> bool:
    """Whether a ``scan``'s operand ``pos`` is scanned over (not a constant or carry) on an
    axis that is one whole axis of W (a layer axis)."""
    first = eqn.params["num_consts"] + eqn.params["num_carry"]
    return pos >= first and len(groups[0]) == 1


def per_layer(product: Product) -> Product:
    """A product found through a scan (``product.layers``: the weight's layer axes) as one
    layer's: its roles and groups over the weight without those axes, in the same order."""
    if not product.layers:
        return product
    keep = [a for a in range(len(product.roles.shape)) if a not in product.layers]
    new = {a: k for k, a in enumerate(keep)}
    renumber = lambda axes: tuple(new[a] for a in axes)  # noqa: E731
    roles = product.roles
    roles = Roles(
        tuple(roles.shape[a] for a in keep),
        renumber(roles.batch),
        renumber(roles.contracted),
        renumber(roles.free),
        tuple(tuple(renumber(g) for g in held) for held in roles.operands),
    )
    groups = product.groups  # a gathered weight's are V's, whose numbering has no layer axis
    if product.gather is None:
        groups = tuple(renumber(g) for g in groups)
    views = tuple(dataclasses.replace(per_layer(site), roles=roles) for site in product.sites)
    gathered = product.gather
    if gathered is not None:  # V's own numbering has no layer axis: only W's axes change
        gathered = dataclasses.replace(
            gathered, axes=renumber(gathered.axes), kept=renumber(gathered.kept)
        )
    return dataclasses.replace(
        product,
        groups=groups,
        roles=roles,
        layers=(),
        sliced=renumber(product.sliced),
        sites=views,
        gather=gathered,
    )


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


def _indexed(eqn, groups, fixed: dict[int, int]):
    """(groups, fixed) after a static ``slice`` or ``squeeze`` of the weight: a width-1 slice
    fixes its W axis at the start index, a squeeze drops size-1 axes (fixing any W axis not
    yet fixed at 0); a str saying why for anything else (a partial or strided slice)."""
    shape = eqn.invars[0].aval.shape
    if eqn.primitive.name == "squeeze":
        dropped = set(eqn.params["dimensions"])
        for a in dropped:
            fixed.update({w: fixed.get(w, 0) for w in groups[a]})
        kept = tuple(g for a, g in enumerate(groups) if a not in dropped)
        return kept, tuple(sorted(fixed.items()))
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(shape)
    for a, (lo, hi, step) in enumerate(zip(starts, limits, strides, strict=True)):
        if step != 1:  # first: W[::2] spans the whole axis but is not all of it
            return f"a strided slice (stride {step} on axis {a})"
        if hi - lo == shape[a]:
            continue
        if hi - lo != 1:
            return f"a partial slice ({lo}:{hi} of {shape[a]} on axis {a}; only W[i] is a view)"
        if len(groups[a]) != 1:
            return f"a slice of an axis merging several of its axes {groups[a]}"
        fixed[groups[a][0]] = lo
    return groups, tuple(sorted(fixed.items()))


def _product(path, side, eqn, view, layers=()) -> Product | str:
    """The product ``eqn`` (at ``path``) of the weight seen as ``view`` as its operand
    ``side``; a str saying why not for a gathered weight whose gather's batch dims are not
    batch axes of the product."""
    groups, fixed, gathered = view
    (contract, batch) = eqn.params["dimension_numbers"]
    mine_c, mine_b = contract[side], batch[side]
    pinned = dict(fixed)
    # A fixed axis has size 1 in the operand: the slice's product does not see it.
    groups = tuple(tuple(w for w in g if w not in pinned) for g in groups)
    of = lambda axes: tuple(sorted(w for a in axes for w in groups[a]))  # noqa: E731
    free_axes = [a for a in range(len(groups)) if a not in mine_c and a not in mine_b]
    roles = Roles((), of(mine_b), of(mine_c), of(free_axes))
    sliced, index = tuple(pinned), tuple(pinned.values())
    dims = eqn.params["dimension_numbers"]
    if gathered is not None:
        local = (roles.batch, roles.contracted, roles.free)
        if not set(range(gathered.batch)) <= set(roles.batch):
            return (
                "a dot_general where the axes its traced index (gather) adds are contracted or "
                "free, not batch axes (x must carry them: each row meets its own expert)"
            )
        gathered = dataclasses.replace(gathered, roles=local)
        roles = Roles(
            (),
            tuple(sorted({*gathered.axes, *gathered.to_weight(roles.batch)})),
            gathered.to_weight(roles.contracted),
            gathered.to_weight(roles.free),
        )
    return Product(
        path, side, dims, groups, roles, sliced, index, layers=tuple(layers), gather=gathered
    )


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
    views = tuple(dataclasses.replace(p, roles=roles) for p in product.sites)
    return dataclasses.replace(product, roles=roles, sites=views)


def hooks(pairs) -> dict:
    """``evaluate``'s ``at`` for the product equations ``pairs`` = [(site, add, factors)]:
    ``add(eqn, operands, index, factors)`` computes site's equation, ``index`` being the
    operands of the site's traced index (its ``gather``, recorded as it runs, before the
    product; None without), ``factors`` the adapter's arrays it reads: (lora_a, lora_b) as
    given, or their local shards where the site lies in a ``shard_map`` (which they enter as
    inputs, sharded as the weight is there: ``Product.mapped``)."""
    seen: dict[tuple[int, ...], list] = {}

    def record(path):
        def run(eqn, operands):
            seen[path] = operands
            params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                return eqn.primitive.bind(*operands, **params)

        return run

    at: dict = {}
    for site, add, factors in pairs:
        key = None if site.gather is None else site.gather.path
        at[site.path] = _Hook(site, add, tuple(factors), key, seen)
        if site.gather is not None:
            at[site.gather.path] = record(site.gather.path)
    return at


def base_of(eqn, operands: list) -> jax.Array:
    """The product equation ``eqn`` computed as traced (its one output: a ``dot_general``'s,
    or megablox ``gmm``'s ``custom_vjp_call``'s)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*operands, **params)
    return out[0] if eqn.primitive.multiple_results else out


@dataclasses.dataclass(frozen=True)
class _Hook:
    """One product equation's computation (``hooks``), with the arrays it reads."""

    site: Product
    add: Callable
    factors: tuple
    key: tuple[int, ...] | None
    seen: dict

    def __call__(self, eqn, operands):
        index = None if self.key is None else self.seen[self.key]
        return self.add(eqn, operands, index, self.factors)

    def specs(self, where: str) -> tuple:
        """The factors' partition specs where the site lies in a shard_map: each factor axis
        sharded as the weight axis it stands for (``Roles.axis_names``), the rank replicated."""
        roles, names = self.site.roles, self.site.mapped[1]
        shapes = roles.lora_shapes(jnp.shape(self.factors[0])[-1] if self.factors else 0)
        if len(self.factors) != 2 or tuple(map(jnp.shape, self.factors)) != shapes:
            raise ValueError(
                f"{where}: a product inside a shard_map takes one adapter's (lora_a, lora_b) "
                f"of shapes {shapes}, as inputs sharded like the weight; this layer's adapter "
                f"arrays are {[jnp.shape(f) for f in self.factors]} (several adapters served "
                "at once, or a stack, are not supported there)"
            )
        a_names, b_names = roles.axis_names(names)
        return jax.sharding.PartitionSpec(*a_names), jax.sharding.PartitionSpec(*b_names)


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
        elif inner_at and eqn.primitive.name == "shard_map":
            outs = _shard_map(eqn, operands, inner_at)
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


def _shard_map(eqn, operands: list, at: dict) -> list:
    """The ``shard_map`` equation ``eqn`` with the product equations ``at`` of its body
    changed: bound again (the same mesh, specs and options) with each site's factors as extra
    inputs sharded as its weight is there, so each device's body meets its local shards of the
    weight and of the factors alike (an expert-sharded weight, its experts' adapters)."""
    params = eqn.params
    body = params["jaxpr"]
    body = getattr(body, "jaxpr", body)
    hooked = [(path, h) for path, h in at.items() if isinstance(h, _Hook)]
    where = "a product inside a shard_map"
    specs = [spec for _, h in hooked for spec in h.specs(where)]
    extra = [f for _, h in hooked for f in h.factors]
    n = len(operands)

    def run(*args):
        local = iter(args[n:])
        local_at = dict(at)
        for path, h in hooked:
            local_at[path] = dataclasses.replace(h, factors=tuple(next(local) for _ in h.factors))
        return tuple(_eval(body, (), list(args[:n]), local_at))

    mapped = jax.shard_map(
        run,
        mesh=params["mesh"],
        in_specs=(*params["in_specs"], *specs),
        out_specs=tuple(params["out_specs"]),
        axis_names=frozenset(params["newly_manual_axes"]),
        check_vma=params["check_vma"],
    )
    return list(mapped(*operands, *extra))


def branch(
    product: Product,
    eqn,
    operands: list,
    lora_a,
    lora_b,
    scale: float,
    x: jax.Array | None = None,
    index: list | None = None,
) -> jax.Array:
    """The factored branch for the product equation ``eqn`` (its ``operands`` as evaluated),
    laid out as ``eqn``'s output: ``product_branch`` with the equation's precision and
    preferred element type, the factors in the weight operand's dtype. ``x`` replaces the
    other operand (dropout on it); ``index``: a gathered weight's gather operands (``hooks``)."""
    x = operands[1 - product.side] if x is None else x
    if product.grouped:
        return grouped_branch(
            product,
            x,
            lora_a,
            lora_b,
            scale,
            operands[2],
            out_dtype=eqn.outvars[0].aval.dtype,
            dtype=factor_dtype(product, operands),
        )
    return product_branch(
        product,
        x,
        lora_a,
        lora_b,
        scale,
        precision=eqn.params["precision"],
        preferred_element_type=eqn.params["preferred_element_type"],
        dtype=factor_dtype(product, operands),
        index=index,
    )


def factor_dtype(product: Product, operands: list) -> Any:
    """The dtype of the factors at a product: the weight operand's promoted with the other
    operand's. jnp.einsum/jnp.dot pass a bf16 weight and an fp32 activation to dot_general as
    they are (an fp32 product): the weight's dtype alone would round fp32 factors to bf16, a
    branch ~2e-3 off where ``LoRALinear`` (promote_dtype of x, kernel and factors) is exact.
    Where the two have no promotion (8-bit floats), the weight's dtype as before."""
    weight, other = operands[product.side].dtype, operands[1 - product.side].dtype
    try:
        return jnp.promote_types(weight, other)
    except jax.dtypes.TypePromotionError:
        return weight


def product_branch(
    product: Product,
    x: jax.Array,
    lora_a,
    lora_b,
    scale: float,
    *,
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: Any = None,
    dtype: Any = None,
    index: list | None = None,
) -> jax.Array:
    """The LoRA branch of ``product`` for its other operand ``x``, laid out as the product's
    output: the factors as the weight operand sees W's axes (``operand_factors``, cast to
    ``dtype`` if given), then ``core.factored``. A slice view's branch uses its slice's
    factors, ``lora_a[i]`` and ``lora_b[i]``; a gathered weight's (``product.gather``) the
    factors gathered as the weight was, by the operands ``index`` of its gather (``hooks``).
    The one branch of every adapted product: the known linear layers' too
    (``linear_branch``)."""
    if product.sliced:
        product, lora_a, lora_b = _slice_factors(product, lora_a, lora_b)
    if product.gather is not None:
        if index is None:
            raise ValueError("branch: a gathered weight's product needs its gather's operands")
        lora_a, lora_b = gather.factors(product.gather, product.roles, lora_a, lora_b, index)
        product = dataclasses.replace(product, roles=Roles((), *product.gather.roles), gather=None)
    side = product.side
    (contract, batch) = product.dims
    a_op, b_op = operand_factors(product, lora_a, lora_b)
    if dtype is not None:
        a_op, b_op = a_op.astype(dtype), b_op.astype(dtype)
    y = core.factored(
        x,
        a_op,
        b_op,
        scale,
        tuple(contract[1 - side]),
        tuple(batch[1 - side]),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return as_output(product, y)


def grouped_branch(
    product: Product,
    x: jax.Array,
    lora_a,
    lora_b,
    scale: float,
    group_sizes: jax.Array,
    *,
    out_dtype: Any,
    dtype: Any = None,
) -> jax.Array:
    """The branch of a grouped product (megablox's ``gmm``: row block g of ``x`` times the
    weight's group g) as two grouped products with the same groups, ``ragged_dot(
    ragged_dot(x, A, gs)·scale, B, gs)``: each row meets its own expert's factors, the scale on
    the small (m, r) intermediate as ``core.factored`` applies it; rows past the groups get 0,
    as gmm leaves them. ``jax.lax.ragged_dot`` rather than the Pallas kernel: the same
    products on every backend, differentiable without the kernel's tiling constraints."""
    a_op, b_op = operand_factors(product, lora_a, lora_b)  # (G, k, r), (G, r, n)
    if dtype is not None:
        a_op, b_op = a_op.astype(dtype), b_op.astype(dtype)
    h = jax.lax.ragged_dot(x, a_op, group_sizes, preferred_element_type=out_dtype)
    hs = core.scale_once(h, scale).astype(b_op.dtype)
    return jax.lax.ragged_dot(hs, b_op, group_sizes, preferred_element_type=out_dtype)


def linear_product(x_ndim: int, shape: Sequence[int], axis: Sequence[int]) -> Product:
    """The product of a Dense-like layer, ``x @ kernel`` for a kernel of ``shape`` (*in_axes,
    *out_axes): x's ``axis`` (DenseGeneral's; Dense: ``(-1,)``) contracted with the kernel's
    leading axes, paired in increasing order as flax's ``_normalize_axes`` pairs them. Its
    roles are ``Roles.linear``: what a trace of the layer's call would find."""
    contract = tuple(sorted(i % x_ndim for i in axis))
    n = len(contract)
    groups = tuple((i,) for i in range(len(shape)))
    dims = ((contract, tuple(range(n))), ((), ()))
    return Product((), 1, dims, groups, Roles.linear(shape, n))


def linear_branch(
    x: jax.Array,
    lora_a,
    lora_b,
    scale: float,
    axis: Sequence[int] = (-1,),
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """The branch of ``nn.Dense``/``nn.DenseGeneral``/``nnx.Linear``/``nnx.LinearGeneral``
    (contracting x's ``axis``) with ``lora_a`` (*in_axes, r), ``lora_b`` (r, *out_axes): the
    product rule's branch (``product_branch``) of their static product (``linear_product``),
    the output axes last as the layer's are. The caller has promoted x and the factors to the
    layer's compute dtype, as the layer promotes x and its kernel."""
    shape = (*jnp.shape(lora_a)[:-1], *jnp.shape(lora_b)[1:])
    product = linear_product(jnp.ndim(x), shape, axis)
    return product_branch(product, x, lora_a, lora_b, scale, precision=precision)


def _slice_factors(product: Product, lora_a, lora_b):
    """The slice view ``product`` as a product of its own (the sliced axes out of its batch
    axes), with its slice of the factors (batch axes lead both)."""
    roles = product.roles
    at = dict(zip(product.sliced, product.index, strict=True))
    pick = tuple(at.get(w, slice(None)) for w in roles.batch)
    batch = tuple(w for w in roles.batch if w not in at)
    local = dataclasses.replace(roles, batch=batch)
    return (
        dataclasses.replace(product, roles=local, sliced=(), index=()),
        lora_a[pick],
        lora_b[pick],
    )


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
    w_a, w_b = roles.batch + roles.contracted, roles.batch + roles.free
    a_op = _operand_view(lora_a, w_a, groups, [*batch[side], *contract[side]], len(w_a), None)
    b_op = _operand_view(
        lora_b, w_b, groups, [*batch[side], *free_axes], len(roles.batch), len(batch[side])
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


def _operand_view(factor, w_axes: tuple[int, ...], groups, op_axes: list[int], rank, op_rank):
    """``factor`` (its non-rank axes are ``w_axes`` of W, in that order; its rank at position
    ``rank``) as the product's operand sees those axes: ``op_axes`` in order, each merging its
    group of W axes (an empty group, a sliced axis kept by the slice, has size 1); the rank goes
    last (``op_rank=None``) or at position ``op_rank`` of the operand. One transpose (none
    where the factor is laid out as the operand already: a Dense's)."""
    position = [i for i in range(factor.ndim) if i != rank]
    where = dict(zip(w_axes, position, strict=True))
    order = [where[w] for a in op_axes for w in groups[a]]
    sizes = [math.prod(factor.shape[where[w]] for w in groups[a]) for a in op_axes]
    if op_rank is None:
        op_rank = len(op_axes)
    k = sum(len(groups[a]) for a in op_axes[:op_rank])  # W axes before the rank
    perm = [*order[:k], rank, *order[k:]]
    shape = (*sizes[:op_rank], factor.shape[rank], *sizes[op_rank:])
    return jnp.transpose(factor, perm).reshape(shape)


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
    axis order: ``core.delta`` (the one formula; the batch axes lead both factors, as its
    stacked layers' do) on (batch…, contracted…, free…), then put back in W's order."""
    order = roles.batch + roles.contracted + roles.free
    shape = tuple(roles.shape[w] for w in order)
    d = core.delta(lora_a, lora_b, scale, shape, len(roles.batch))
    return jnp.transpose(d, [order.index(w) for w in range(len(order))])


def torch_factors(
    roles: Roles,
    lora_a: np.ndarray,
    lora_b: np.ndarray,
    in_axes: Sequence[int] | None = None,
    out_axes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``lora_a`` (C…, r) and ``lora_b`` (r, F…) (W's own axis orders, no batch axes) as the
    factors of the torch ``nn.Linear`` the weight is, A (r, in) and B (out, r), contiguous:
    the layout ``as_linear`` gives W, with the contracted and free axes flattened in the
    orders ``in_axes`` and ``out_axes`` (default: W's own)."""
    in_axes = roles.contracted if in_axes is None else tuple(in_axes)
    out_axes = roles.free if out_axes is None else tuple(out_axes)
    r = lora_a.shape[-1]
    a_perm = [roles.contracted.index(w) for w in in_axes] + [len(roles.contracted)]
    b_perm = [0] + [roles.free.index(w) + 1 for w in out_axes]
    big_a = np.transpose(lora_a, a_perm).reshape(-1, r).T
    big_b = np.transpose(lora_b, b_perm).reshape(r, -1).T
    return np.ascontiguousarray(big_a), np.ascontiguousarray(big_b)


def flax_factors(
    roles: Roles,
    big_a: np.ndarray,
    big_b: np.ndarray,
    in_axes: Sequence[int] | None = None,
    out_axes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of ``torch_factors``: (lora_a, lora_b) in W's own axis orders from the
    torch Linear's A (r, in) and B (out, r) (shapes checked by the caller)."""
    in_axes = roles.contracted if in_axes is None else tuple(in_axes)
    out_axes = roles.free if out_axes is None else tuple(out_axes)
    shape, r = roles.shape, big_a.shape[0]
    a = big_a.T.reshape(*(shape[w] for w in in_axes), r)
    a = np.transpose(a, [in_axes.index(w) for w in roles.contracted] + [len(in_axes)])
    b = big_b.T.reshape(r, *(shape[w] for w in out_axes))
    return a, np.transpose(b, [0] + [out_axes.index(w) + 1 for w in roles.free])


def torch_order(roles: Roles, axes: tuple[int, ...]) -> tuple[int, ...] | str | None:
    """The order in which the traced computation flattens W's ``axes`` (its contracted, or its
    free, axes) into one, from ``roles.operands``: what a torch port of that computation (an
    ``nn.Linear`` whose weight is the same reshape) flattens them in. A tuple where one
    reshape merges all of them (size-1 axes, which flatten alike in any order, last); ``None``
    where no reshape merges any (or nothing was recorded): W's own order is the documented
    default; a str saying why the evidence is ambiguous (a reshape merging only some of
    them, or products flattening them differently), for the caller to refuse."""
    seen = {_site_order(roles, held, axes) for held in roles.operands}
    if len(seen) > 1:
        shown = [tuple(g for g in held if set(g) & set(axes)) for held in sorted(roles.operands)]
        return f"its products hold its axes {list(axes)} differently ({', '.join(map(str, shown))})"
    return seen.pop() if seen else None


def _site_order(roles: Roles, held, axes: tuple[int, ...]) -> tuple[int, ...] | str | None:
    """``torch_order`` for one product whose weight operand holds W's axes as ``held``."""
    real = [a for a in axes if roles.shape[a] != 1]
    merged = [m for m in (tuple(w for w in g if w in real) for g in held) if m]
    if all(len(m) == 1 for m in merged):
        return None
    if len(merged) > 1:
        shown = tuple(g for g in held if set(g) & set(axes))
        return (
            f"its product's operand holds its axes {list(axes)} as {shown}: a reshape merges "
            "only some of them"
        )
    return (*merged[0], *(a for a in axes if a not in real))
