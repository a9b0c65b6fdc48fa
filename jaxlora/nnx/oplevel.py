"""Op-level LoRA for NNX: any module whose weight enters one product (``jaxlora.oplevel``).

``adapt(module, …)`` returns an instance of a subclass of the module's own type holding the
same variables plus ``lora_a``/``lora_b`` (``nnx.LoRAParam``) and ``lora_dropout``, so the
weight keeps its name and place (``q_proj.w`` beside ``q_proj.lora_a``), as the Dense-family
LoRA layers keep ``kernel``. Its ``__call__`` evaluates the original ``__call__``'s jaxpr with
the branch added at the weight's product (traced once per input shapes and static
arguments, cached); ``to_base`` returns a module of the original type holding the merged
weight. Dropout on the branch input follows ``nnx``'s ``train()``/``eval()`` (the wrapped call
keeps the original signature, so it has no ``deterministic`` argument of its own).

A stack of such modules made by ``nnx.vmap`` and run by ``nnx.scan`` (a weight with a leading
layer axis) is found through the scan (``find_weights``: one layer's roles) and adapted as
stacked ``nnx.Linear`` layers are, by ``nnx.vmap`` over the layers (``jaxlora.nnx.inject``):
the same ``OpAdapter`` per layer, its factors stacked on axis 0, each layer's slice called
inside the scan.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import HashableMapping
from jax.extend import core as jcore

from _loracore.config import WEIGHT_INITS
from jaxlora import core, oplevel, product
from jaxlora.nnx.layer import lora_params, merged_weight
from jaxlora.nnx.quant import QuantizedKernel, kernel_value, requantized_kernel
from jaxlora.tree import factor_names

LORA_ATTRIBUTES = (
    "r",
    "alpha",
    "use_rslora",
    "lora_a",
    "lora_b",
    "lora_dropout",
    "lora_products",
    "lora_base_type",
    "lora_init",
    "lora_method",
    "lora_lookups",
)
_CLASSES: dict[tuple[type, str], type] = {}
_TRACES: dict[Any, tuple] = {}
_MAX_TRACES = 256


if TYPE_CHECKING:
    from jaxlora.nnx.multi_op import MultiOpAdapter

    _Module = nnx.Module  # OpAdapter is only ever mixed into an NNX module (adapted_class)
else:
    _Module = object


class Products(_Module):
    """What an op-level adapted module (``OpAdapter``) and its stacked serving twin
    (``jaxlora.nnx.multi_op.MultiOpAdapter``) share: ``lora_products``, per adapted weight its
    name and its roles in its product, and the one naming rule of their factors (``lora_a`` /
    ``lora_b`` for one weight, ``<weight>_lora_a`` / ``<weight>_lora_b`` for each of several:
    ``jaxlora.tree.factor_names``)."""

    __slots__ = ()
    lora_products: tuple[tuple[str, oplevel.Roles], ...]

    @property
    def lora_weights(self) -> tuple[str, ...]:
        """The adapted weights' names, sorted."""
        return tuple(w for w, _ in self.lora_products)

    @property
    def lora_weight(self) -> str:
        """The adapted weight's name (a module with one adapted weight)."""
        return self._single()[0]

    @property
    def lora_roles(self) -> oplevel.Roles:
        """The adapted weight's roles in its product (a module with one adapted weight)."""
        return self._single()[1]

    def _single(self) -> tuple[str, oplevel.Roles]:
        if len(self.lora_products) != 1:
            raise ValueError(
                f"{type(self).__name__} has several adapted weights {list(self.lora_weights)}: "
                "this operation supports modules with one adapted weight only"
            )
        return self.lora_products[0]

    def factor_names(self, weight: str) -> tuple[str, str]:
        """The attribute names of ``weight``'s factors (``jaxlora.tree.factor_names``)."""
        return factor_names(weight if len(self.lora_products) > 1 else None)

    def factors(self, weight: str) -> tuple[Any, Any]:
        """``weight``'s (lora_a, lora_b) variables (``nnx.LoRAParam``; stacks of adapters,
        ``StackedAdapter``, in a ``MultiOpAdapter``)."""
        name_a, name_b = self.factor_names(weight)
        return getattr(self, name_a), getattr(self, name_b)

    def roles_of(self, weight: str) -> oplevel.Roles:
        return dict(self.lora_products)[weight]


class OpAdapter(Products):
    """The mixin of every op-level adapted module (see the module docstring).

    ``lora_products`` records, per adapted weight, its name and its roles in its product. A
    module with one adapted weight holds its factors as ``lora_a``/``lora_b``; one with several
    holds ``<weight>_lora_a``/``<weight>_lora_b`` per weight (``jaxlora.tree.factor_names``),
    all ``nnx.LoRAParam``, with one r, alpha and dropout rate for the module."""

    __slots__ = ()
    lora_base_type: type[nnx.Module]
    lora_init: str
    lora_method: str
    lora_lookups: bool
    # A single-weight module's factors (set by name in __init__; several weights: factors()).
    lora_a: nnx.LoRAParam
    lora_b: nnx.LoRAParam

    def __init__(
        self,
        base: nnx.Module,
        *,
        products: Mapping[str, oplevel.Roles],
        r: int,
        alpha: float | None,
        dropout: float,
        use_rslora: bool,
        param_dtype: Any,
        rngs: nnx.Rngs,
        init: str = "kaiming",
        method: str = "__call__",
        lookups: bool = False,
    ) -> None:
        for name, value in vars(base).items():
            if not name.startswith("_pytree__"):
                setattr(self, name, value)
        self.lora_base_type = type(base)
        # The method whose product is adapted; ``lookups``: the weights' row lookups (a tied
        # embedding's, in any method) are left reading the unadapted weights (see ``tied``).
        self.lora_method, self.lora_lookups = method, lookups
        self.lora_products = tuple(sorted(products.items()))
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        # The one rule of Linen's product adapters (jaxlora.product.init_factors); PiSSA/OLoRA
        # also give the residual, written into the (shared) weight as the Dense layers do.
        self.lora_init = init
        for weight, roles in self.lora_products:
            held = getattr(base, weight)
            a, b, residual = product.init_factors(
                roles,
                r,
                init,
                rngs.params(),
                param_dtype,
                weight=held[...] if init in WEIGHT_INITS else None,
                scale=self.scaling,
                where=f"{type(base).__name__}: weight '{weight}'",
            )
            if residual is not None:
                held[...] = residual
            name_a, name_b = self.factor_names(weight)
            # Sharded along the weight's axes: each factor axis takes its weight axis' name.
            var_a, var_b = lora_params(held, a, b, functools.partial(product.axis_names, roles))
            setattr(self, name_a, var_a)
            setattr(self, name_b, var_b)
        self.lora_dropout = nnx.Dropout(dropout, rngs=rngs)

    @property
    def scaling(self) -> float:
        return core.scaling(self.r, self.alpha, use_rslora=self.use_rslora)

    def __call__(self, *args, **kwargs):
        return self.lora_run("__call__", args, kwargs)

    def lora_run(self, method: str, args: tuple, kwargs: dict):
        """The base class's ``method`` on these arguments, with the branches added at the
        adapted products if it is the adapted method (``lora_method``)."""
        if method != self.lora_method:
            return getattr(self.lora_base_type, method)(self, *args, **kwargs)

        def extra(weight, product, eqn, operands, index, factors):
            x = self.lora_dropout(operands[1 - product.side])
            a, b = factors
            return oplevel.branch(product, eqn, operands, a, b, self.scaling, x=x, index=index)

        return call(self, args, kwargs, extra, lambda w: tuple(f[...] for f in self.factors(w)))

    def check_mergeable(self) -> None:
        """A ``ValueError`` for a tied weight (``lora_lookups``): merged into the one weight,
        the delta would reach its row lookups too, which the unmerged model leaves unadapted."""
        if self.lora_lookups:
            raise ValueError(
                f"weights {list(self.lora_weights)} are tied: also read by row lookups that the "
                "adapter leaves unadapted (inject(..., tied_products=...)); merged into the "
                "shared weight, the delta would change the lookups too, so the merged model would "
                "differ from the unmerged one (PEFT's merge_and_unload on a tied lm_head does "
                "that, with a warning). Keep this adapter unmerged (serve it as an adapter), or "
                "untie the weight in the model first"
            )

    def delta(self, weight: str | None = None) -> jax.Array:
        """``scaling · lora_a ⋅ lora_b`` of ``weight`` (default: the one adapted weight) in fp32,
        in the weight's own axis order; of each layer, stacked in front, for an ``nnx.vmap``
        stack (outside ``nnx.scan``)."""
        weight = self.lora_weight if weight is None else weight
        a, b = (f[...] for f in self.factors(weight))
        roles = self.roles_of(weight)
        stacked = getattr(self, weight).ndim > len(roles.shape)
        return product.layer_deltas(roles, a, b, self.scaling, 0 if stacked else None)

    @property
    def is_quantized(self) -> bool:
        return any(isinstance(getattr(self, w), QuantizedKernel) for w in self.lora_weights)

    def merged_weight(self, weight: str | None = None) -> jax.Array:
        """``weight + delta`` (the weight dequantized if quantized; fp32, rounded once to the
        weight's dtype); a ``ValueError`` if non-finite. ``weight`` defaults to the one
        adapted weight."""
        weight = self.lora_weight if weight is None else weight
        value = kernel_value(getattr(self, weight))
        return merged_weight(value, self.delta(weight), name=weight)

    def to_base(self) -> nnx.Module:
        """A module of the original type sharing every variable but the adapted weights, which
        hold ``weight + delta`` each (fp32, rounded once; a quantized weight is dequantized
        first and merges into a float ``nnx.Param``); a non-finite result is a ``ValueError``
        (raised before anything is built)."""
        self.check_mergeable()
        merged = {w: self.merged_weight(w) for w in self.lora_weights}
        lora = {*LORA_ATTRIBUTES, *(n for w in self.lora_weights for n in self.factor_names(w))}
        state = {k: v for k, v in self.__getstate__().items() if k not in lora}
        nodes = self._pytree__nodes
        state["_pytree__nodes"] = HashableMapping({k: v for k, v in nodes.items() if k not in lora})
        state["_pytree__state"] = type(self._pytree__state)()
        for name, value in merged.items():
            weight = getattr(self, name)
            if isinstance(weight, QuantizedKernel):
                state[name] = nnx.Param(value)
            else:
                state[name] = weight.replace(value)  # keeps the variable's metadata
        base_type = self.lora_base_type
        plain = base_type.__new__(base_type)
        plain.__setstate__(state)
        return plain

    def requantized(self) -> dict[str, nnx.Variable]:
        """{weight name: new variable} of the merged weights ``to_base`` computes, each
        quantized weight quantized again in its own format and layout (per expert for batch
        axes), a float one (never quantized) holding its merge; for
        ``jaxlora.nnx.merge(model, requantize=True)``. All computed before any is set."""
        if not self.is_quantized:
            raise ValueError("requantized: the weight is not quantized")
        self.check_mergeable()
        new: dict[str, nnx.Variable] = {}
        for name in self.lora_weights:
            weight, merged = getattr(self, name), self.merged_weight(name)
            if isinstance(weight, QuantizedKernel):
                new[name] = requantized_kernel(weight, merged)
            else:
                new[name] = weight.replace(merged)
        return new


def adapted_class(base_type: type, method: str = "__call__") -> type:
    """The subclass of ``base_type`` that ``adapt`` makes (one per type and adapted method):
    its ``method`` (``__call__`` by default) computes the base's with the branches added."""
    if (base_type, method) not in _CLASSES:
        name = f"LoRA{base_type.__name__}"
        body: dict[str, Any] = {"__module__": __name__, "__qualname__": name}
        if method != "__call__":
            body[method] = _adapted_method(getattr(base_type, method), method)
        _CLASSES[base_type, method] = type(base_type)(name, (OpAdapter, base_type), body)
    return _CLASSES[base_type, method]


def _adapted_method(original, method: str):
    @functools.wraps(original)
    def run(self, *args, **kwargs):
        return self.lora_run(method, args, kwargs)

    return run


def adapt(base: nnx.Module, **options) -> nnx.Module:
    """``base`` adapted at its weights ``options['products']`` (see ``OpAdapter.__init__``)."""
    return adapted_class(type(base), options.get("method", "__call__"))(base, **options)


def find_weights(
    model: nnx.Module,
    modules: dict[str, nnx.Module],
    inputs: Sequence[Any],
    orders: dict[tuple[str, str], tuple[int, ...]] | None = None,
    *,
    only: Mapping[str, Sequence[str]] | None = None,
    tied: Mapping[str, str] | None = None,
    traced: tuple | None = None,
) -> dict[str, dict[str, oplevel.Roles]]:
    """{path: {weight name: roles}} for each of ``modules`` (paths into ``model``): every
    ``nnx.Param`` of it that enters a product, or only the weights ``only[path]`` names (a
    module chosen by ``LoRAConfig.target_parameters``), found by tracing ``model(*inputs)``
    once with every variable an input. A ``ValueError`` names the path, the weight and the
    reason for a module with no weight in a product, a weight used by two products or also
    used otherwise (anywhere in the model), or a weight ``only`` names that is not a product
    weight of the module. ``orders``, if given, receives per (path, weight) the weight's axes
    in the order the product's operand holds them (after transposes). ``tied``: {path: the
    method computing its product} of the modules whose weights may also be read by row
    lookups (``inject(..., tied_products=)``); any other module's looked-up weight is refused
    with a message naming that option. ``traced``: what ``traced_model(model, inputs)``
    returned, where the caller has traced it already."""
    closed, index_of, where_of = traced or traced_model(model, inputs)
    found = {}
    for name, module in modules.items():
        found[name] = _weights_of(
            closed.jaxpr, name, module, index_of, where_of, orders, only, tied or {}
        )
    return found


def traced_model(model: nnx.Module, inputs: Sequence[Any]):
    """(closed jaxpr of ``model(*inputs)`` with every variable an input, {variable path:
    input index}, {id(variable): its path}): traced abstractly, nothing runs."""
    graphdef, state = nnx.split(model)
    paths, state_def = jax.tree_util.tree_flatten_with_path(state)
    leaves = [leaf for _, leaf in paths]
    index_of = {_key(path): i for i, (path, _) in enumerate(paths)}
    where_of = {id(v): p for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    dynamic, static, arg_def = oplevel.split_args(tuple(inputs), {})

    def run(state_leaves, dyn):
        args, _ = oplevel.join_args(arg_def, dynamic, static, dyn)
        return nnx.merge(graphdef, jax.tree.unflatten(state_def, state_leaves))(*args)

    try:
        closed = jax.make_jaxpr(run)(leaves, [d for d in dynamic if d is not None])
    except Exception as err:  # any failure of the user's model: say where it came from
        raise ValueError(
            f"inject: the model could not be traced on the inputs given "
            f"({type(err).__name__}: {err})"
        ) from err
    return closed, index_of, where_of


def unused_products(
    model: nnx.Module, layers: Mapping[str, OpAdapter], inputs: Sequence[Any]
) -> list[str]:
    """The paths of ``layers`` (op-level adapters in ``model``) whose adapted method computes
    no branch in ``model(*inputs)``: their ``lora_b`` is never read (traced once)."""
    closed, index_of, where_of = traced_model(model, inputs)
    read = {v for eqn in closed.jaxpr.eqns for v in eqn.invars if isinstance(v, jcore.Var)}
    unused = []
    for name, layer in layers.items():
        for weight in layer.lora_weights:
            index = index_of[tuple(map(str, where_of[id(layer.factors(weight)[1])]))]
            if closed.jaxpr.invars[index] not in read:
                unused.append(name)
                break
    return unused


def _weights_of(
    jaxpr, name, module, index_of, where_of, orders, only, tied
) -> dict[str, oplevel.Roles]:
    """``find_weights``' answer for one module (see there)."""
    wanted = None if only is None or name not in only else set(only[name])
    weights, unused = {}, []
    for attr, var in vars(module).items():
        if type(var) is not nnx.Param or (wanted is not None and attr not in wanted):
            continue
        where = f"inject: layer '{name}', weight '{attr}' {tuple(var.shape)}"
        index = index_of[tuple(map(str, where_of[id(var)]))]
        try:
            product = oplevel.find_product(
                jaxpr, index, var.shape, where=where, through=True, lookups=name in tied
            )
        except oplevel.RowLookups as err:
            raise ValueError(
                f"{err}; to adapt only its product, the lookups reading the unadapted weight "
                f"(PEFT's LoRA on a tied lm_head), ask for it: inject(..., tied_products="
                f"{{'{name}': '<the method of {type(module).__name__} computing the product, "
                "e.g. decode>'})"
            ) from None
        except oplevel.NotAProduct as err:
            if wanted is not None:  # named by target_parameters: it must be adaptable
                raise ValueError(f"{err}; target_parameters names it") from None
            unused.append(str(err).removeprefix(f"inject: layer '{name}', "))
            continue
        if name in tied and product.layers:
            raise TypeError(
                f"{where}: tied_products names a stacked (scanned) layer; a tied weight with row "
                "lookups is adapted in an unstacked module only"
            )
        product = _one_layer(oplevel.with_shape(product, tuple(var.shape)), where)
        weights[attr] = product.roles
        if orders is not None:
            orders[name, attr] = weight_order(product)
    missing = sorted((wanted or set()) - set(weights))
    if missing:
        raise ValueError(
            f"inject: layer '{name}' ({type(module).__name__}): target_parameters names "
            f"{missing}, which are not nnx.Param attributes of it"
        )
    if not weights:
        raise ValueError(
            f"inject: layer '{name}' ({type(module).__name__}): no nnx.Param of it is used "
            "by a product (dot_general): " + ("; ".join(unused) or "it holds none")
        )
    return weights


def weight_order(product: oplevel.Product) -> tuple[int, ...]:
    """The weight's axes in the order its product's operand holds them (after transposes); a
    gathered weight's indexed axes where the gather's batch dims are."""
    return tuple(w for group in oplevel.weight_groups(oplevel.sites(product)[0]) for w in group)


def _one_layer(product: oplevel.Product, where: str) -> oplevel.Product:
    """The product as one layer's (``oplevel.per_layer``) when the weight is a stack that an
    ``nnx.scan`` slices per layer: its axis 0, where ``inject`` stacks the adapter (as for
    ``nnx.Linear`` stacks); a ``TypeError`` for any other layer axis or for nested scans."""
    if product.layers in ((), (0,)):
        return oplevel.per_layer(product)
    raise TypeError(
        f"{where} is a stack that scans slice on its axes {product.layers}: jaxlora.nnx adapts "
        "stacks with one layer axis in front only (nnx.vmap(..., out_axes=0), run with "
        "nnx.scan(in_axes=0 ...)); restack the layers on axis 0"
    )


def _key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path[:-1])


def _aval(x) -> tuple:
    return (tuple(jnp.shape(x)), jnp.result_type(x), getattr(x, "weak_type", False))


def _trace(module: OpAdapter | MultiOpAdapter, graphdef, state_def, leaves, args, kwargs):
    """(closed jaxpr, output treedef, {weight: product}, static parts) of the base call,
    cached."""
    dynamic, static, arg_def = oplevel.split_args(args, kwargs)
    dyn = [d for d in dynamic if d is not None]
    key: tuple | None = (
        type(module),
        graphdef,
        state_def,
        tuple(map(_aval, leaves)),
        arg_def,
        tuple(d is None for d in dynamic),
        static,
        tuple(map(_aval, dyn)),
        _meshes(),
    )
    try:
        hash(key)
    except TypeError:  # an unhashable static argument: trace every call
        key = None
    if key is not None and key in _TRACES:
        return (*_TRACES[key], dyn)
    base_call = getattr(module.lora_base_type, getattr(module, "lora_method", "__call__"))
    lookups = getattr(module, "lora_lookups", False)

    def run(state_leaves, dyn_leaves):
        m = nnx.merge(graphdef, jax.tree.unflatten(state_def, state_leaves))
        a, k = oplevel.join_args(arg_def, dynamic, static, dyn_leaves)
        out = base_call(m, *a, **k)
        return out, jax.tree.leaves(nnx.split(m)[1])

    closed, shapes = jax.make_jaxpr(run, return_shape=True)(leaves, dyn)
    out_def = jax.tree.structure(shapes[0])
    products = {}
    for name, roles in module.lora_products:
        index = _weight_index(name, state_def, leaves)
        weight = getattr(module, name)
        where = f"{type(module).__name__}: weight '{name}' {tuple(weight.shape)}"
        # jaxlib ships PyTreeDef without type stubs, so the checker cannot see its attributes.
        returned = out_def.num_leaves + index  # type: ignore[attr-defined]
        try:
            found = oplevel.find_product(
                closed.jaxpr, index, weight.shape, where=where, returned=returned, lookups=lookups
            )
        except oplevel.NotAProduct:
            if not lookups:
                raise
            continue  # a tied weight only looked up by this call: nothing to adapt in it
        found = oplevel.with_shape(found, tuple(weight.shape))
        if not found.roles.matches(roles):
            raise ValueError(
                f"{where}: this call uses the weight as {found.roles}, but the adapter was made "
                f"for {roles} (from the inputs given to inject)"
            )
        products[name] = found
    if key is not None:
        if len(_TRACES) >= _MAX_TRACES:
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[key] = (closed, out_def, products)
    return closed, out_def, products, dyn


def _meshes() -> tuple:
    """The device meshes in context (``jax.set_mesh``'s, and the one ``with mesh:`` sets, which
    tunix's layers read to choose their path): part of a trace's cache key, since a module may
    trace to another computation under a mesh (tunix's Qwen3 MoE runs megablox's gmm in a
    shard_map there), which must be traced (and refused) rather than replaced by the trace
    cached outside the mesh."""
    from jax._src import mesh as mesh_lib  # the only reading of ``with mesh:`` that warns not

    return (jax.sharding.get_abstract_mesh(), mesh_lib.thread_resources.env.physical_mesh)


def _weight_index(name: str, state_def, leaves) -> int:
    paths = jax.tree_util.tree_flatten_with_path(jax.tree.unflatten(state_def, leaves))[0]
    return next(i for i, (p, _) in enumerate(paths) if _key(p) == (name,))


def _split(module: OpAdapter | MultiOpAdapter, weights: Mapping[str, jax.Array]):
    """``nnx.split(module)``, each entry of ``weights`` (the dequantized weights of a quantized
    module) a plain ``nnx.Param`` holding it: the call is traced and evaluated on the
    weights' own shape and dtype, so their products are the module's own."""
    graphdef, state = nnx.split(module)
    for name, value in weights.items():
        state[name] = nnx.Param(value)
    return graphdef, state


def _dequantized(module: OpAdapter | MultiOpAdapter) -> dict[str, jax.Array]:
    held = {name: getattr(module, name) for name, _ in module.lora_products}
    return {n: kernel_value(h) for n, h in held.items() if isinstance(h, QuantizedKernel)}


def traced_call(module: OpAdapter | MultiOpAdapter, args: tuple, kwargs: dict):
    """(closed jaxpr, {weight: product}) of the base call of an op-level layer (``OpAdapter``,
    or a stacked one of ``to_multi``) on these arguments (cached, as its calls are)."""
    graphdef, state = _split(module, _dequantized(module))
    leaves, state_def = jax.tree.flatten(state)
    closed, _, products, _ = _trace(module, graphdef, state_def, leaves, args, kwargs)
    return closed, products


def call(module: OpAdapter | MultiOpAdapter, args: tuple, kwargs: dict, extra, factors_of=None):
    """The base call of an op-level layer with ``extra(weight, product, eqn, operands, index,
    factors)`` added at each adapted weight's product (the layer's branches), ``factors`` being
    ``factors_of(weight)`` (or their local shards inside a ``shard_map``: ``oplevel.hooks``);
    quantized weights are dequantized first."""
    weights = _dequantized(module)
    graphdef, state = _split(module, weights)
    leaves, state_def = jax.tree.flatten(state)
    closed, out_def, products, dyn = _trace(module, graphdef, state_def, leaves, args, kwargs)

    def at_product(weight, product):
        def add(eqn, operands, index, factors):
            base = oplevel.base_of(eqn, operands)
            branch = extra(weight, product, eqn, operands, index, factors)
            return base + branch.astype(base.dtype)

        return add

    def factors(weight):
        return () if factors_of is None else factors_of(weight)

    at = oplevel.hooks(
        (s, at_product(w, s), factors(w)) for w, p in products.items() for s in oplevel.sites(p)
    )
    outs = oplevel.evaluate(closed, [*leaves, *dyn], at)
    out = jax.tree.unflatten(out_def, outs[: out_def.num_leaves])
    new_leaves = outs[out_def.num_leaves :]
    # Write back only what the call changed (rng counts, statistics): the branch's dropout
    # advanced its own rng stream outside the jaxpr, which the old leaves would undo.
    # Nothing changed (no dropout, no statistics): write nothing, so a module rebuilt by
    # ``nnx.merge`` inside ``jax.jit`` is not asked to mutate variables of an outer trace.
    if any(n is not o for o, n in zip(leaves, new_leaves, strict=True)):
        current, _ = jax.tree.flatten(_split(module, weights)[1])
        merged = [c if n is o else n for o, n, c in zip(leaves, new_leaves, current, strict=True)]
        new_state = jax.tree.unflatten(state_def, merged)
        for name, _ in module.lora_products:
            del new_state[name]  # the weights are never changed by the call
        nnx.update(module, new_state)
    return out
