"""Op-level LoRA for Linen: a weight of any module that enters one product (``jaxlora.oplevel``).

A targeted module that is not a layer kind jaxlora knows (a custom ``Einsum`` holding ``w``,
``FlaxConv1D``'s ``x @ kernel.T``) is traced by ``jaxlora.layouts``: its call, as a function of
its own params (``Module.unbind`` and ``apply`` on a clone), becomes a jaxpr in which the one
``dot_general`` consuming the weight gives the weight's ``Roles``. ``inject`` then puts beside
the weight ``lora_a`` (B…, C…, r), ``lora_b`` (B…, r, F…) and a leaf ``lora_roles`` (a
``ProductRoles``: a pytree with no arrays, so jit, grad, optax and ``meta.unbox`` carry it
unchanged) that says which weight and which roles the adapter was made for. Tree-only code
(``merge``, ``partition_specs``) reads the layout from it, where shapes alone are ambiguous
(a square ``FlaxConv1D`` kernel (out, in) looks like a Dense (in, out) one). ``intercept``
traces the module's call again and evaluates that jaxpr with the branch added at the product,
after checking that the call uses the weight as recorded.

A module whose several weights each enter their own product (``ProductsLayout``) gets one
adapter per weight, ``<weight>_lora_a`` (B…, C…, r) / ``<weight>_lora_b`` (B…, r, F…)
(``jaxlora.tree.factor_names``), and a ``lora_roles`` leaf holding one ``ProductRoles`` per
weight (a tuple, sorted by weight); ``check_products`` reads either form, ``check_product``
the one-weight form only (an operation not built for several weights refuses them by name).

Inside ``nn.scan`` the module's call sees one layer's weight, so the roles are one layer's;
the params tree holds the weight and both factors stacked on the scan's layer axis (a
``lora_stack`` record beside them when it is not 0), as for a scanned Dense: the stacked
adapter is one layer's with a layer axis (``check_product(stacked=True)``, ``stack_axis``),
each layer's slice applied inside the scan by the same ``apply``. A module with several
weights is stacked weight by weight the same way (all its weights, on one axis).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta

from _loracore.config import WEIGHT_INITS, _pattern_key
from jaxlora import core, kinds, oplevel
from jaxlora.tree import QUANT_NAME, factor_names, is_lora_name, iter_lora_layers
from jaxlora.tree import ROLES_NAME as ROLES


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ProductRoles:
    """The ``lora_roles`` leaf: the adapted weight's name and its roles in its product."""

    weight: str
    roles: oplevel.Roles


@dataclasses.dataclass(frozen=True)
class ProductLayout:
    """``jaxlora.layouts``' entry for a module adapted at a product: which weight, its roles
    in one layer's call (``kind`` is ``"product"``). Inside ``nn.scan`` (a weight stacked on a
    layer axis) ``stack`` is 1, ``scan`` the scanned module's path and ``axis`` the layer axis,
    as for a stacked Dense's ``Layout``."""

    weight: str
    roles: oplevel.Roles
    kind: str = "product"
    stack: int = 0
    scan: str | None = None
    axis: int = 0

    @property
    def ndim(self) -> int:
        return len(self.roles.shape)


@dataclasses.dataclass(frozen=True)
class ProductsLayout:
    """``jaxlora.layouts``' entry for a module whose several weights each enter their own
    product: one ``ProductLayout`` per weight, sorted by name (``kind`` is ``"products"``).
    ``inject`` gives each weight its own adapter, ``<weight>_lora_a``/``<weight>_lora_b``
    (``jaxlora.tree.factor_names``); inside ``nn.scan`` every weight is stacked alike
    (``stack``, ``scan``, ``axis``: its products' and its own), each adapter as a one-weight
    module's."""

    products: tuple[ProductLayout, ...]
    kind: str = "products"
    stack: int = 0
    scan: str | None = None
    axis: int = 0

    @property
    def weights(self) -> tuple[str, ...]:
        return tuple(lay.weight for lay in self.products)


class Adapted(NamedTuple):
    """One adapted weight of a node holding ``lora_roles`` (``check_products``), unboxed: its
    name, value, factors, record, the factors' leaf names (``jaxlora.tree.factor_names``) and
    the layer axis of an ``nn.scan`` stack (``stack_axis``) or ``None``."""

    weight: str
    value: Any
    lora_a: Any
    lora_b: Any
    marker: ProductRoles
    names: tuple[str, str]
    layer: int | None


def records(node: Mapping[str, Any], where: str) -> tuple[ProductRoles, ...]:
    """The ``ProductRoles`` of a node's ``lora_roles`` leaf: one ``ProductRoles``, or for a
    module with several adapted weights a tuple of them, one per weight, sorted by name."""
    marker = node[ROLES]
    if isinstance(marker, ProductRoles):
        return (marker,)
    several = isinstance(marker, tuple) and len(marker) > 1
    if several and all(isinstance(m, ProductRoles) for m in marker):
        weights = [m.weight for m in marker]
        if weights == sorted(set(weights)):
            return marker
    raise ValueError(
        f"{where}: '{ROLES}' must be a ProductRoles, or a tuple of several with distinct "
        f"weights sorted by name, got {marker!r}"
    )


def roles_record(layouts: Sequence[ProductLayout]) -> ProductRoles | tuple[ProductRoles, ...]:
    """The ``lora_roles`` leaf of adapters made for ``layouts`` (one per weight)."""
    markers = tuple(ProductRoles(lay.weight, lay.roles) for lay in layouts)
    return markers[0] if len(markers) == 1 else tuple(sorted(markers, key=lambda m: m.weight))


def check_products(
    node: Mapping[str, Any], where: str, *, stacked: bool = False
) -> tuple[Adapted, ...]:
    """Each adapted weight of a node with ``lora_roles``, every shape checked against its
    roles: ``lora_a``/``lora_b`` for one weight, ``<weight>_lora_a``/``<weight>_lora_b`` for
    each of several (``jaxlora.tree.factor_names``); a ``ValueError`` naming the layer for a
    missing or stray factor (one the records do not name), shapes that differ from the roles,
    several weights with different ranks (one module has one r), or several weights of which
    only some are stacked by ``nn.scan``. A layer stacked by ``nn.scan`` (one layer's shapes with a
    layer axis at its ``lora_stack`` record's position, 0 without one) is accepted only with
    ``stacked=True`` (see ``stack_axis``): a caller that does not handle it must refuse it."""
    markers = records(node, where)
    several = len(markers) > 1
    names = {m.weight: factor_names(m.weight if several else None) for m in markers}
    held = {n for pair in names.values() for n in pair}
    stray = sorted(k for k, v in node.items() if is_lora_name(k) and k not in held)
    stray = [k for k in stray if k != "lora_magnitude" or several]
    if stray:
        raise ValueError(
            f"{where}: its '{ROLES}' record names the weights {sorted(names)}, whose factors "
            f"are {sorted(held)}, but it also holds {stray}"
        )
    out = tuple(
        _check_one(node, m, names[m.weight], f"{where}, weight '{m.weight}'" if several else where)
        for m in markers
    )
    ranks = sorted({rank(one.lora_a, one.layer) for one in out})
    if len(ranks) > 1:
        raise ValueError(f"{where}: its weights' adapters have ranks {ranks}; one module has one r")
    stacked_weights = [one.weight for one in out if one.layer is not None]
    if stacked_weights and len(stacked_weights) < len(out):
        raise ValueError(
            f"{where}: of its several adapted weights {sorted(names)}, only {stacked_weights} "
            "are stacked (nn.scan, one layer axis more than its roles): a module's weights are "
            "stacked together or not at all"
        )
    layer = out[0].layer
    if layer is not None and not stacked:
        one = out[0]
        raise ValueError(
            f"{where}: '{one.weight}' {tuple(jnp.shape(one.value))} and its adapter are stacked "
            f"(nn.scan, layer axis {layer}) over one layer's {one.marker.roles.shape}, which "
            "this operation does not handle (adapter files: pass layer_names; a forward: run "
            "it in the nn.scan that stacks it)"
        )
    return out


def _check_one(
    node: Mapping[str, Any], marker: ProductRoles, names: tuple[str, str], where: str
) -> Adapted:
    missing = [n for n in (marker.weight, *names) if n not in node]
    if missing:
        raise ValueError(f"{where}: an op-level adapter (lora_roles) without {missing}")
    w, a, b = (meta.unbox(node[n]) for n in (marker.weight, *names))
    roles = marker.roles
    layer = _stack_axis(node, roles, w)
    r = rank(a, layer)
    want: tuple[tuple[int, ...], ...] = (roles.shape, *roles.lora_shapes(r))
    if layer is not None:
        want = tuple(_with_layer(s, layer, jnp.shape(w)[_at(w, layer)]) for s in want)
    for name, value, expected in zip((marker.weight, *names), (w, a, b), want, strict=True):
        if tuple(jnp.shape(value)) != tuple(expected):
            raise ValueError(
                f"{where}, '{name}': expected shape {tuple(expected)} for the product roles "
                f"{roles} and r={r}"
                + (f", stacked on layer axis {layer}" if layer is not None else "")
                + f", got {tuple(jnp.shape(value))}"
            )
    return Adapted(marker.weight, w, a, b, marker, names, layer)


def check_product(
    node: Mapping[str, Any], where: str, *, stacked: bool = False
) -> tuple[str, Any, Any, Any, ProductRoles]:
    """(weight name, weight, lora_a, lora_b, marker) of a node with ``lora_roles`` and one
    adapted weight, checked as ``check_products`` does; a ``ValueError`` naming the layer for
    a module with several (an operation that calls this one handles one weight only)."""
    adapted = check_products(node, where, stacked=stacked)
    if len(adapted) > 1:
        raise ValueError(
            f"{where} has several adapted weights {[one.weight for one in adapted]} "
            "('<weight>_lora_a'/'<weight>_lora_b'), which this operation does not handle yet: "
            "it supports a module with one adapted weight"
        )
    one = adapted[0]
    return one.weight, one.value, one.lora_a, one.lora_b, one.marker


def stack_axis(node: Mapping[str, Any], w, a, b) -> int | None:
    """The layer axis of a product adapter with one adapted weight stacked by ``nn.scan`` (its
    ``lora_stack`` record's, else 0), or ``None`` for one layer's: the roles record one layer's
    weight, so a weight with one axis more is a stack."""
    return _stack_axis(node, node[ROLES].roles, w)


def _stack_axis(node: Mapping[str, Any], roles: oplevel.Roles, w) -> int | None:
    if jnp.ndim(w) != len(roles.shape) + 1:
        return None
    return kinds.layer_axis(node)


def rank(lora_a, axis: int | None) -> int:
    """r of ``lora_a`` (its last axis, once a stack's layer axis ``axis`` is in front)."""
    shape = tuple(jnp.shape(lora_a))
    if axis is not None and kinds.axis_position(len(shape), axis) is not None:
        shape = kinds.to_front(shape, axis)
    return shape[-1] if shape else 0


def _at(x, axis: int) -> int:
    return kinds.position_of(jnp.ndim(x), axis)


def _with_layer(shape: tuple, axis: int, length: int) -> tuple:
    """One layer's ``shape`` with the layer axis (``length``) at ``axis``, as nn.scan puts it
    (a negative axis counts from the end of the stacked array)."""
    return kinds.from_front((length, *shape), axis)


def stacked_axis_names(
    roles: oplevel.Roles, names: tuple, stack: int, axis: int
) -> tuple[tuple, tuple]:
    """``axis_names`` of a weight stacked on ``axis`` (``stack`` is 1) or not (0): the layer
    axis's name goes to the factors' layer axis."""
    if not stack:
        return axis_names(roles, names)
    front = kinds.to_front(tuple(names), axis)
    names_a, names_b = axis_names(roles, front[1:])
    return (
        kinds.from_front((front[0], *names_a), axis),
        kinds.from_front((front[0], *names_b), axis),
    )


def layer_deltas(roles: oplevel.Roles, lora_a, lora_b, scale: float, axis: int | None):
    """``oplevel.delta`` of one layer's factors, or of each layer of a stack (layer axis
    ``axis``) stacked on that axis, in the weight's layout."""
    if axis is None:
        return oplevel.delta(roles, lora_a, lora_b, scale)
    one = lambda a, b: oplevel.delta(roles, a, b, scale)  # noqa: E731
    front = jax.vmap(one)(kinds.to_front(lora_a, axis), kinds.to_front(lora_b, axis))
    return kinds.from_front(front, axis)


def axis_names(roles: oplevel.Roles, names: tuple) -> tuple[tuple, tuple]:
    """Partitioning of (lora_a, lora_b) from the weight's axis names (``Roles.axis_names``)."""
    return roles.axis_names(names)


def init_leaves(
    layout: ProductLayout,
    r: int,
    init: str,
    key,
    param_dtype,
    *,
    weight=None,
    scale: float = 1.0,
    where: str = "inject",
) -> dict[str, Any]:
    """The ``lora_roles`` leaf and the factors ``init_factors`` makes; for PiSSA/OLoRA also the
    residual under the weight's own name."""
    lora_a, lora_b, residual = init_factors(
        layout.roles, r, init, key, param_dtype, weight=weight, scale=scale, where=where
    )
    leaves = {"lora_a": lora_a, "lora_b": lora_b, ROLES: ProductRoles(layout.weight, layout.roles)}
    if residual is not None:
        leaves[layout.weight] = residual
    return leaves


def init_factors(
    roles: oplevel.Roles,
    r: int,
    init: str,
    key,
    param_dtype,
    *,
    weight=None,
    scale: float = 1.0,
    where: str = "inject",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(lora_a, lora_b, residual) of an adapter at a weight's product, so that the adapted
    module starts equal to the base; the one rule for NNX op-level layers and Linen product
    adapters. kaiming: torch's U(±1/√in), in = prod(C); gaussian: N(0, 1/r) (PEFT's); both
    with ``lora_b`` zero and no residual. "pissa"/"olora": the Dense math
    (``core.pissa``/``core.olora``) on the weight as the torch Linear it is, (out, in) =
    (prod F, prod C) in role order (``quant.oplevel.as_linear``): A (r, in) → ``lora_a``
    (C…, r), B (out, r) → ``lora_b`` (r, F…), and the residual W − scale·B·A in the weight's
    own layout and dtype. A weight with batch axes (MoE experts) has no such Linear: refused."""
    shape_a, shape_b = roles.lora_shapes(r)
    if init in WEIGHT_INITS:
        return weight_factors(roles, r, init, weight, scale, param_dtype, where)
    if init == "gaussian":
        lora_a = jax.random.normal(key, shape_a, param_dtype) / r
    else:
        bound = 1.0 / math.sqrt(roles.in_features)
        lora_a = jax.random.uniform(key, shape_a, param_dtype, -bound, bound)
    return lora_a, jnp.zeros(shape_b, param_dtype), None


def weight_factors(roles: oplevel.Roles, r: int, init: str, weight, scale, param_dtype, where):
    """(lora_a, lora_b, residual) of PiSSA/OLoRA (``init``) for ``weight`` in its ``roles``
    (``init_factors``); the known linear layers' too, with their ``kinds.roles``."""
    if roles.batch:
        raise ValueError(
            f"{where}: init={init!r} factors the weight as a torch Linear (out, in), but the "
            f"weight {roles.shape} has batch axes {roles.batch} in its product (e.g. MoE "
            "experts): it is one Linear per expert, which jaxlora does not factor yet; use "
            "'kaiming' or 'gaussian'"
        )
    if weight is None or tuple(jnp.shape(weight)) != roles.shape:
        got = None if weight is None else tuple(jnp.shape(weight))
        raise ValueError(f"{where}: init={init!r} needs the weight {roles.shape}, got {got}")
    # core's PiSSA/OLoRA take a Flax kernel (in, out): the Linear's weight transposed.
    kernel = oplevel.as_linear(weight, roles).T
    lora_a, lora_b, residual = core.weight_init(init)(kernel, r, scale)
    shape_a, shape_b = roles.lora_shapes(r)
    return (
        lora_a.reshape(shape_a).astype(param_dtype),
        lora_b.reshape(shape_b).astype(param_dtype),
        oplevel.from_linear(residual.T, roles).astype(jnp.result_type(weight)),
    )


class _Tracing(threading.local):
    def __init__(self) -> None:
        self.depth = 0


_TRACING = _Tracing()


def tracing() -> bool:
    """True while a module call is being traced here: jaxlora's interceptors pass through."""
    return _TRACING.depth > 0


@contextlib.contextmanager
def _passthrough() -> Iterator[None]:
    _TRACING.depth += 1
    try:
        yield
    finally:
        _TRACING.depth -= 1


@dataclasses.dataclass
class Traced:
    """A bound module's call as a jaxpr of (its variables' leaves, the array arguments)."""

    closed: Any
    out_def: Any
    leaves: list
    dyn: list
    weights: dict[str, int]  # weight name -> its input index


def with_weights(variables: Mapping, weights: Mapping[str, Any]) -> dict:
    """A module's variables with ``weights`` (its dequantized weights, by name) in ``params``
    and its own entries of the ``'quant'`` collection left out (its submodules' kept)."""
    variables = dict(variables)
    if weights:
        variables["params"] = {**variables.get("params", {}), **weights}
        quant = {k: v for k, v in variables.get(QUANT_NAME, {}).items() if isinstance(v, Mapping)}
        variables[QUANT_NAME] = quant
    return variables


def call(module: nn.Module, method, weights: Mapping[str, Any], args: tuple, kwargs: dict):
    """``method`` (a name, or a function of the module) of the bound ``module`` run on its own
    variables with ``weights`` (dequantized quantized weights) as its params: the module's own
    product on each weight's own shape and dtype (Flax checks the shapes against its init)."""
    unbound, variables = module.unbind()
    with _passthrough():
        return unbound.apply(with_weights(variables, weights), *args, method=method, **kwargs)


def trace(
    module: nn.Module, method: str, args: tuple, kwargs: dict, weights: Mapping[str, Any]
) -> Traced:
    """Traces ``module.<method>(*args, **kwargs)`` with the module's own variables (LoRA leaves
    left out; ``weights``, dequantized, in place of its quantized ones) as inputs; the direct
    array params are the candidate weights."""
    unbound, variables = module.unbind()
    variables = with_weights(variables, weights)
    params = {
        k: v for k, v in variables.get("params", {}).items() if not is_lora_name(k) and k != ROLES
    }
    variables["params"] = params
    paths, tree_def = jax.tree_util.tree_flatten_with_path(variables)
    leaves = [leaf for _, leaf in paths]
    weights = {}
    for i, (path, _) in enumerate(paths):
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] == "params" and keys[1] in params and not isinstance(params[keys[1]], Mapping):
            weights[str(keys[1])] = i
    dynamic, static, arg_def = oplevel.split_args(args, kwargs)
    dyn = [d for d in dynamic if d is not None]

    def run(var_leaves, dyn_leaves):
        a, k = oplevel.join_args(arg_def, dynamic, static, dyn_leaves)
        with _passthrough():
            return unbound.apply(jax.tree.unflatten(tree_def, var_leaves), *a, method=method, **k)

    closed, shapes = jax.make_jaxpr(run, return_shape=True)(leaves, dyn)
    return Traced(closed, jax.tree.structure(shapes), leaves, dyn, weights)


def products_of(traced: Traced, where: str) -> tuple[dict[str, oplevel.Product], dict[str, str]]:
    """({weight: its product} for each weight of the traced module that enters one product,
    {weight: why not} for the others (used non-linearly, by two products, ...))."""
    found, unused = {}, {}
    for name, index in traced.weights.items():
        shape = tuple(jnp.shape(traced.leaves[index]))
        at = f"{where}, weight '{name}' {shape}"
        try:
            product = oplevel.find_product(traced.closed.jaxpr, index, shape, where=at)
        except oplevel.NotAProduct as err:
            unused[name] = str(err).removeprefix(f"{where}, ")
            continue
        found[name] = oplevel.with_shape(product, shape)
    return found, unused


def find(module: nn.Module, traced: Traced, where: str) -> dict[str, oplevel.Product]:
    """{weight: its product} for every weight of ``module`` that enters one product (a module
    with several gets an adapter per weight); a ``ValueError`` saying why if none does."""
    found, unused = products_of(traced, where)
    if not found:
        raise ValueError(
            f"{where} ({type(module).__name__}): no param of it is used by a product "
            "(dot_general): " + ("; ".join(unused.values()) or "it holds none")
        )
    return found


def apply(
    module: nn.Module,
    config,
    deterministic: bool,
    args: tuple,
    kwargs: dict,
    weights: Mapping[str, Any],
):
    """``module.__call__(*args, **kwargs)`` with the LoRA branch added at each adapted weight's
    product (what ``intercept`` does for a node holding ``lora_roles``); ``weights``: its
    quantized weights, dequantized (the base product runs on them)."""
    name = ".".join(module.path)
    where = f"layer '{name or '<root>'}'"
    node: dict[str, Any] = {
        n: module.get_variable("params", n) for n in module.variables.get("params", {})
    }
    node.update(weights)
    adapted = {one.weight: one for one in check_products(node, where)}
    inner = [
        ".".join(p)
        for p, _ in iter_lora_layers({k: v for k, v in node.items() if isinstance(v, Mapping)})
    ]
    if inner:  # the call is evaluated from its trace: their own branches would never run
        raise ValueError(
            f"{where} is adapted at its weight's product and its submodules {inner} hold LoRA "
            "leaves too; adapt either the module or its submodules, not both"
        )
    markers = [one.marker for one in adapted.values()]
    traced, products = traced_products(module, markers, where, args, kwargs, weights)
    r = jnp.shape(next(iter(adapted.values())).lora_a)[-1]
    if r != config.rank_for(name):
        raise ValueError(
            f"{where} has r={r} (from its shapes) but the config gives it "
            f"r={config.rank_for(name)}: the scale would be wrong"
        )
    if len(adapted) > 1:
        check_module_patterns(config, name, adapted, where)
    scale = core.scaling(r, config.alpha_for(name), use_rslora=config.use_rslora)
    rate = 0.0 if deterministic else config.dropout

    def extra(weight, site, eqn, operands, index, factors):
        x = operands[1 - site.side]
        if rate > 0:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, jnp.shape(x))
            x = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
        a, b = factors
        return oplevel.branch(site, eqn, operands, a, b, scale, x=x, index=index)

    return evaluate(traced, products, extra, lambda w: (adapted[w].lora_a, adapted[w].lora_b))


def check_module_patterns(config, name: str, adapted: Iterable[str], where: str) -> None:
    """A ``ValueError`` where the config's rank/alpha patterns name a weight of a module with
    several adapted weights (``'<path>.<weight>'``, as a ``path_map`` keys them) with another
    value than the module's: its weights share the module's r and alpha, so that pattern would
    be silently ignored (``read_adapter_config(..., params=tree)`` keys them by the module)."""
    for weight in adapted:  # the weights' names
        key = f"{name}.{weight}"
        for field, of in (("rank_pattern", config.rank_for), ("alpha_pattern", config.alpha_for)):
            if _pattern_key(getattr(config, field), key) is not None and of(key) != of(name):
                raise ValueError(
                    f"{where}: the config's {field} gives weight '{key}' {of(key)}, but its "
                    f"module's weights share the module's {of(name)} (config.{field} for "
                    f"'{name}'); key it by the module (read_adapter_config(directory, "
                    "path_map=..., params=tree) does)"
                )


def traced_product(
    module: nn.Module,
    marker: ProductRoles,
    where: str,
    args: tuple,
    kwargs: dict,
    weights: Mapping[str, Any],
) -> tuple[Traced, oplevel.Product]:
    """``traced_products`` for one adapted weight: the traced call and its weight's product."""
    traced, products = traced_products(module, [marker], where, args, kwargs, weights)
    return traced, products[marker.weight]


def traced_products(
    module: nn.Module,
    markers: Sequence[ProductRoles],
    where: str,
    args: tuple,
    kwargs: dict,
    weights: Mapping[str, Any],
) -> tuple[Traced, dict[str, oplevel.Product]]:
    """The module's call traced (``weights``: its quantized weights, dequantized), and
    {weight: product} of the weights ``markers`` record, each checked to be used as recorded
    (the weight and its roles the adapter was made for)."""
    traced = trace(module, "__call__", args, kwargs, weights)
    found, unused = products_of(traced, where)
    products = {}
    for marker in markers:
        product = found.get(marker.weight)
        if product is None or not product.roles.matches(marker.roles):
            used = (
                unused.get(marker.weight, "it is not a param of the module")
                if product is None
                else f"it is used as {product.roles}"
            )
            raise ValueError(
                f"{where}: the adapter was made for weight '{marker.weight}' as "
                f"{marker.roles} (from the inputs given to layouts), but in this call {used}"
            )
        products[marker.weight] = product
    return traced, products


def evaluate(
    traced: Traced, products: Mapping[str, oplevel.Product], extra, factors_of=None
) -> Any:
    """The traced call's outputs with ``extra(weight, site, eqn, operands, index, factors)``
    added at each site of each weight's product (``oplevel.sites``: itself, or its slice
    views; ``index``: the operands of a gathered weight's gather; ``factors``:
    ``factors_of(weight)``, or their shards inside a shard_map; ``oplevel.hooks``)."""

    def at_product(weight, site):
        def add(eqn, operands, index, factors):
            base = oplevel.base_of(eqn, operands)
            return base + extra(weight, site, eqn, operands, index, factors).astype(base.dtype)

        return add

    at = oplevel.hooks(
        (site, at_product(weight, site), () if factors_of is None else factors_of(weight))
        for weight, product in products.items()
        for site in oplevel.sites(product)
    )
    outs = oplevel.evaluate(traced.closed, [*traced.leaves, *traced.dyn], at)
    return jax.tree.unflatten(traced.out_def, outs)
