"""``inject``: add LoRA leaves to the params of an unmodified Flax Linen model.

``inject(params, config, rng)`` puts ``lora_a``/``lora_b`` beside each matched layer's weight;
``jaxlora.intercept(config)`` (``jaxlora/intercept.py``) makes the model use them. The model's
code and its own ``init``/``apply`` are unchanged; the params tree is the single source of
truth for which layers are adapted. Layers stacked by ``nn.scan`` (a leading layer axis L)
get stacked adapters, ``lora_a`` (L, …, r) and ``lora_b`` (L, r, …), scanned with the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from flax.core import meta

from _loracore.config import WEIGHT_INITS
from jaxlora import core, kinds, product, reads, stacks
from jaxlora.config import LoRAConfig
from jaxlora.intercept import SUPPORTED, input_axes, module_kind, traced_as
from jaxlora.tree import (
    INIT_NAME,
    RECORD_NAMES,
    ROLES_NAME,
    STACK_NAME,
    InitRecord,
    PyTree,
    StackRecord,
    _like,
    _require_mapping,
    factor_names,
    is_lora_name,
)


def inject(
    params: PyTree,
    config: LoRAConfig,
    rng: jax.Array,
    *,
    param_dtype: Any = jnp.float32,
    layouts: Mapping[str, Layout] | None = None,
    layer_names: Mapping[str, str] | None = None,
) -> PyTree:
    """Returns a new params tree with ``lora_a``/``lora_b`` beside each layer whose '.'-joined
    path matches ``config.targets``.

    ``nn.Dense`` kernels (2-D) and ``nn.Embed`` tables are recognised from the tree alone: without
    ``layouts``, any 2-D ``kernel`` is taken as ``nn.Dense``'s (in, out), and ``intercept``
    refuses the call if the module holding it is something else (e.g. a FlaxConv1D, whose
    kernel is (out, in)). For kernels with more axes (``nn.DenseGeneral``, ``nn.Conv``) pass
    ``layouts=jaxlora.layouts(model, *inputs)``, which says which axes are inputs; with
    ``layouts``, a matched layer it does not describe (a module that is not a supported layer,
    or one the traced call does not run) is refused, naming its class and the reason. The shapes
    are in ``jaxlora.kinds``. With ``layouts``, a module that is no known layer (a custom
    einsum projection, transformers' ``FlaxConv1D``) is adapted at the one product its weight
    enters (``jaxlora.product``): ``lora_a`` (B…, C…, r), ``lora_b`` (B…, r, F…) over the
    weight's batch, contracted and free axes in its own order, and a ``lora_roles`` leaf (no
    arrays) recording them. Inside ``nn.scan`` (the weight stacked on the scan's layer axis
    k; ``nn.remat`` inside or outside it changes nothing) the roles are one layer's and the
    factors are stacked as a scanned Dense's are: each layer drawn alone, on axis k, with a
    ``lora_stack`` record for k != 0. A module whose several weights each enter their own
    product (a gated MLP holding ``w_gate``, ``w_up``, ``w_down``) gets one adapter per weight,
    ``<weight>_lora_a``/``<weight>_lora_b`` (``jaxlora.tree.factor_names``; one r and alpha
    for the module), and a ``lora_roles`` record per weight (a tuple of ``ProductRoles``).
    ``config.target_parameters`` (PEFT's: ``'<module>.<weight>'``) adapts only the weights it
    names, in modules ``targets`` does not choose; a module left with one adapted weight keeps
    ``lora_a``/``lora_b``. A weight used non-linearly or by two products, a module called
    twice per forward, a module whose weights are not all stacked alike (some by ``nn.scan``,
    some not), DoRA at a product, or a module under two stacking transforms is refused, naming
    the reason. Several adapted weights inside ``nn.scan`` are each stacked as one weight's.

    ``lora_a`` is drawn from ``rng`` folded with a hash of the layer
    path (so one layer's init does not depend on which others are targeted) per
    ``config.init``: "kaiming" as torch's kaiming_uniform(a=√5), "gaussian" N(0, 1/r) (both with
    ``lora_b`` zero), "pissa"/"olora" from the kernel's SVD/QR (which becomes the residual);
    embeddings follow PEFT (``lora_a`` zero, ``lora_b`` N(0, 1)). The adapted model starts
    equal to the base.

    Layers stacked by ``nn.scan`` (``variable_axes={"params": 0}``: a kernel (L, in, out))
    need ``layouts``, which records the stack; they get ``lora_a`` (L, in, r) and ``lora_b``
    (L, r, out), each layer drawn from the layer's key folded with its index, so that
    ``intercept`` applies each layer's slice inside the scan. A stack on another axis k
    (``variable_axes={"params": k}``: MaxText's ``param_scan_axis=1`` gives a DenseGeneral
    kernel (D, L, N, H)) gets its factors' layer axis at k too (``lora_a`` (D, L, r),
    ``lora_b`` (r, L, N, H)), where ``nn.scan`` slices them, and a ``lora_stack`` record
    (``jaxlora.tree.StackRecord``) saying k, which merge, sharding and the adapter files
    read. The layer's per-layer paths
    (``jaxlora.stacks.layer_path``: ``blocks.3.attn.query``, or per ``layer_names``, e.g.
    ``{"blocks": "blocks_{i}"}``) may be targeted too, all or none of them; all layers of a
    stack must get the (r, alpha) its stack path gets. Accepts the params tree or the
    variables dict holding it under 'params' (other collections, such as 'batch_stats' or
    'cache', are returned untouched).

    Raises:
        ValueError: no layer matches (the message lists the layer paths), a layer already has
            LoRA leaves, a layer's rank exceeds its ``min(in, out)``, targets match only some
            layers of a stack, or rank/alpha patterns give the layers of a stack different
            values.
        TypeError: a matched layer cannot be adapted, or its kernel has more than 2 axes and
            ``layouts`` does not describe it, or ``layouts`` is given and does not describe it,
            or ``rng`` is not a PRNG key.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"inject expects a jaxlora.LoRAConfig, got {type(config).__name__}")
    _require_mapping(params, "inject")
    core.check_key(rng, "inject: rng")
    if "params" in params:  # a variables dict: only 'params' is adapted, the rest passes through
        adapted = _inject(params["params"], config, rng, param_dtype, layouts, layer_names)
        return _like(params, {**params, "params": adapted})
    return _inject(params, config, rng, param_dtype, layouts, layer_names)


def _inject(
    params: Mapping, config: LoRAConfig, rng: jax.Array, param_dtype, layouts, layer_names
) -> Mapping:
    nodes = dict(_iter_nodes(params))
    # The nodes target_parameters names are adapted too: a rank/alpha pattern key may match
    # them (and must match some adapted layer, also when target_parameters alone chooses).
    named = list(_by_parameter(nodes, config, []))
    if config.targets:
        chosen = _select(nodes, config, layouts, layer_names, also=named)
    else:
        config.check_unmatched(list(nodes), named)
        chosen = []
    only = _by_parameter(nodes, config, chosen)
    adapted = [*chosen, *(p for p in only if p not in chosen)]
    _check_not_nested(adapted, layouts)
    new = {}
    for path in adapted:
        node, where = nodes[path], f"inject: layer '{path}'"
        if any(is_lora_name(name) or name in RECORD_NAMES for name in node):
            raise ValueError(f"{where} already has LoRA leaves")
        layout = None if layouts is None else layouts.get(path)
        if path in only:
            layout = _named_weights(layout, only[path], path, layouts, where)
        if isinstance(layout, product.ProductsLayout):
            new[path] = _products_leaves(
                node, layout, config, rng, param_dtype, path, where, layer_names
            )
            continue
        if isinstance(layout, product.ProductLayout):
            new[path] = _product_leaves(
                node, layout, config, rng, param_dtype, path, where, layer_names
            )
            continue
        kind, name, in_axes = _layout(node, path, layouts, where)
        boxed = node[name]
        base = meta.unbox(boxed)
        stack = _stack(layouts, path)
        axis = layouts[path].axis if stack else 0
        if stack:
            per_layer = _per_layer(layouts, path, jnp.shape(base), layer_names, where)
            stacks.check_uniform(config, path, per_layer, where)
        r, alpha = config.rank_for(path), config.alpha_for(path)
        front = kinds.to_front(tuple(jnp.shape(base)), axis)
        n_in, n_out = kinds.flat_features(kind, front, in_axes, stack)
        core.check_hparams(
            r=r,
            alpha=alpha,
            dropout=config.dropout,
            in_features=n_in,
            out_features=n_out,
            where=where,
        )
        key = jax.random.fold_in(rng, zlib.crc32(path.encode()))
        scale = core.scaling(r, alpha, use_rslora=config.use_rslora)

        init_one = functools.partial(
            init_leaves,
            r=r,
            scale=scale,
            init=config.init,
            param_dtype=param_dtype,
            kind=kind,
            in_axes=in_axes,
            where=where,
        )
        if axis:
            _check_axis_fits(kind, front, r, in_axes, axis, where)
        leaves: dict[str, Any] = _stacked_init(base, stack, axis, key, init_one)
        if axis:  # the factors' layer axis is not in front: say where it is
            leaves[STACK_NAME] = StackRecord(axis)
        if config.init in WEIGHT_INITS:  # the kernel is now the residual: say so in the tree
            leaves[INIT_NAME] = InitRecord(config.init)
        if config.use_dora:
            leaves["lora_magnitude"] = dora_magnitude(base, leaves, scale, kind, stack, where)
        if isinstance(boxed, meta.AxisMetadata):
            if name in leaves:
                leaves[name] = boxed.replace_boxed(leaves[name])
            if hasattr(boxed, "names"):
                names = kinds.to_front(tuple(boxed.names), axis)
                ndim_a = jnp.ndim(leaves["lora_a"])
                names_a, names_b = kinds.lora_axis_names(kind, names, ndim_a, stack)
                names_a, names_b = kinds.from_front(names_a, axis), kinds.from_front(names_b, axis)
                # boxed is a flax struct dataclass (nn.Partitioned-like: it has names), which
                # flax's AxisMetadata type does not say.
                leaves["lora_a"] = dataclasses.replace(boxed, value=leaves["lora_a"], names=names_a)  # type: ignore[type-var]
                leaves["lora_b"] = dataclasses.replace(boxed, value=leaves["lora_b"], names=names_b)  # type: ignore[type-var]
        new[path] = leaves
    return _add_leaves(params, (), new)


def _check_not_nested(adapted: list[str], layouts) -> None:
    """A ``ValueError`` for a module adapted at its weight's product that contains another
    adapted layer: ``intercept`` evaluates its call from its own trace, where the inner layer's
    branch would not run (refused there too, when called)."""
    at_product = (product.ProductLayout, product.ProductsLayout)
    for outer in adapted:
        if not isinstance(layouts is not None and layouts.get(outer), at_product):
            continue
        inner = sorted(
            p for p in adapted if p != outer and p.startswith(f"{outer}." if outer else "")
        )
        if inner:
            raise ValueError(
                f"inject: layer '{outer}' is adapted at its weight's product and contains the "
                f"adapted layers {inner}; adapt either the module or its submodules, not both"
            )


def _by_parameter(nodes: Mapping, config: LoRAConfig, chosen: list[str]) -> dict[str, list[str]]:
    """{module path: its weights ``config.target_parameters`` names} for the modules ``targets``
    does not choose (those adapt all their product weights); a ``ValueError`` for an entry
    that names no weight of any module (a typo), listing the weights."""
    if not config.target_parameters:
        return {}
    keys = {
        f"{path}.{name}": (path, name)
        for path, node in nodes.items()
        for name, value in node.items()
        if not isinstance(value, Mapping) and not is_lora_name(name) and name not in RECORD_NAMES
    }
    only: dict[str, list[str]] = {}
    for key in config.select_parameters(keys):
        path, name = keys[key]
        if path not in chosen:
            only.setdefault(path, []).append(name)
    return only


def _named_weights(layout, weights: list[str], path: str, layouts, where: str):
    """The ``ProductLayout`` (one weight) or ``ProductsLayout`` (several) of the weights of the
    module at ``path`` that ``target_parameters`` names; a ``ValueError`` saying why for a
    module without layouts, of a kind jaxlora adapts as a layer (its one weight), that cannot
    be adapted, or a named weight that enters no product."""
    named = [f"{path}.{w}" for w in weights]
    if layouts is None:
        raise ValueError(
            f"{where}: target_parameters names {named}, weights found by tracing: pass "
            "layouts=jaxlora.layouts(model, *inputs)"
        )
    if isinstance(layout, Layout):
        cls = getattr(layouts, "modules", {}).get(path, layout.kind)
        raise ValueError(
            f"{where}: target_parameters names {named}, but layer '{path}' is a {cls}, adapted "
            "as a layer of its own kind (its one weight): target it with targets"
        )
    if layout is None:
        reason = getattr(layouts, "reasons", {}).get(path, "the traced call does not run it")
        raise ValueError(f"{where}: target_parameters names {named}, but {reason}")
    own = {lay.weight: lay for lay in _product_list(layout)}
    for weight in weights:
        if weight not in own:
            # the reason starts with the weight's name and shape
            why = getattr(layouts, "weight_reasons", {}).get(f"{path}.{weight}")
            why = why or f"weight '{weight}': no param of the module by that name"
            raise ValueError(f"{where}, {why}; target_parameters names it")
    picked = tuple(own[w] for w in sorted(set(weights)))
    if len(picked) == 1:
        return picked[0]
    # a stacked module's ProductsLayout keeps its stack for the weights picked
    return dataclasses.replace(layout, products=picked)


def _product_list(layout) -> tuple[product.ProductLayout, ...]:
    return layout.products if isinstance(layout, product.ProductsLayout) else (layout,)


def _products_leaves(
    node,
    layout: product.ProductsLayout,
    config,
    rng,
    param_dtype,
    path: str,
    where: str,
    layer_names,
) -> dict:
    """The adapters of a module whose several weights each enter their own product: one per
    weight (``_product_leaves``, named ``<weight>_lora_a``/``<weight>_lora_b``, drawn from
    ``rng`` folded with ``<path>.<weight>``; inside ``nn.scan`` each stacked as a one-weight
    module's is), and one ``lora_roles`` record naming them all."""
    leaves: dict[str, Any] = {}
    for lay in layout.products:
        at = f"{where}, weight '{lay.weight}'"
        names = factor_names(lay.weight)
        leaves.update(
            _product_leaves(node, lay, config, rng, param_dtype, path, at, layer_names, names=names)
        )
    leaves[ROLES_NAME] = product.roles_record(layout.products)
    return leaves


def _product_leaves(
    node,
    layout,
    config,
    rng,
    param_dtype,
    path: str,
    where: str,
    layer_names,
    *,
    names: tuple[str, str] = ("lora_a", "lora_b"),
) -> dict:
    """The adapter of a module adapted at its weight's product (``jaxlora.product``): one
    layer's (``product.init_leaves``), or for a weight stacked by ``nn.scan`` each layer's
    drawn alone and stacked on the layer axis, as a stacked Dense's (``_stacked_init``).
    ``names``: its factors' leaf names (``factor_names``; a weight of several is drawn from
    ``rng`` folded with ``<path>.<weight>``)."""
    roles, axis = layout.roles, layout.axis
    boxed = node.get(layout.weight)
    shape = None if boxed is None else tuple(jnp.shape(meta.unbox(boxed)))
    one_layer = shape if not layout.stack or shape is None else _drop_axis(shape, axis)
    if shape is None or one_layer != roles.shape:
        stacked = f" (one layer's, stacked on axis {axis})" if layout.stack else ""
        raise TypeError(
            f"{where}: the layouts give weight '{layout.weight}' {roles.shape}{stacked}, but "
            f"the params tree holds {shape if shape is not None else 'no such leaf'} there"
        )
    if config.use_dora:  # would be ignored: a plain adapter under a DoRA config
        raise ValueError(
            f"{where} is adapted at its weight's product, where use_dora=True is not "
            f"implemented (DoRA: {kinds.DORA_KINDS})"
        )
    r, alpha = config.rank_for(path), config.alpha_for(path)
    if layout.stack:
        per_layer = _per_layer({path: layout}, path, shape, layer_names, where)
        stacks.check_uniform(config, path, per_layer, where)
    core.check_hparams(
        r=r,
        alpha=alpha,
        dropout=config.dropout,
        in_features=roles.in_features,
        out_features=roles.out_features,
        where=where,
    )
    if layout.stack and axis:
        _check_factor_axis(roles.lora_shapes(r), axis, where)
    seed = path if names == factor_names(None) else f"{path}.{layout.weight}"
    key = jax.random.fold_in(rng, zlib.crc32(seed.encode()))
    scale = core.scaling(r, alpha, use_rslora=config.use_rslora)
    weights = config.init in WEIGHT_INITS

    def init_one(weight, *, key):
        lora_a, lora_b, residual = product.init_factors(
            roles,
            r,
            config.init,
            key,
            param_dtype,
            weight=weight if weights else None,
            scale=scale,
            where=where,
        )
        leaves = dict(zip(names, (lora_a, lora_b), strict=True))
        return leaves if residual is None else {**leaves, layout.weight: residual}

    leaves: dict[str, Any] = _stacked_init(meta.unbox(boxed), layout.stack, axis, key, init_one)
    leaves[ROLES_NAME] = product.ProductRoles(layout.weight, roles)
    if layout.stack and axis:  # the factors' layer axis is not in front: say where it is
        leaves[STACK_NAME] = StackRecord(axis)
    if layout.weight in leaves:  # PiSSA/OLoRA: the weight is now the residual; say so
        if isinstance(boxed, meta.AxisMetadata):
            leaves[layout.weight] = boxed.replace_boxed(leaves[layout.weight])
        leaves[INIT_NAME] = InitRecord(config.init)
    if isinstance(boxed, meta.AxisMetadata) and hasattr(boxed, "names"):
        axes = tuple(boxed.names) + (None,) * (len(shape) - len(boxed.names))
        names_a, names_b = product.stacked_axis_names(roles, axes, layout.stack, axis)
        name_a, name_b = names
        # boxed is a flax struct dataclass (see _inject).
        leaves[name_a] = dataclasses.replace(boxed, value=leaves[name_a], names=names_a)  # type: ignore[type-var]
        leaves[name_b] = dataclasses.replace(boxed, value=leaves[name_b], names=names_b)  # type: ignore[type-var]
    return leaves


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a layer's weight is laid out: its kind ("linear", "conv" or "embed"), for a linear
    kernel how many leading axes are inputs, and how many axes one layer's weight has. For a
    layer inside ``nn.scan`` (or ``nn.vmap``), ``stack`` is the number of leading layer axes
    the params tree adds to it and ``scan`` the path of the outermost lifted module that adds
    them (where the layer index goes in per-layer paths, see ``jaxlora.stacks``); ``axis`` is
    where that transform puts the layer axis (its ``variable_axes={"params": axis}``; MaxText
    scans with 1), read from the trace."""

    kind: str
    in_axes: int
    ndim: int
    stack: int = 0
    scan: str | None = None
    axis: int = 0


AnyLayout = Layout | product.ProductLayout | product.ProductsLayout


class Layouts(dict[str, AnyLayout]):
    """What ``layouts`` returns: {path: ``Layout``} of the layers jaxlora can adapt, and in
    ``modules`` the class name of every module the trace called, by path (so that ``inject``
    can name the class of a module it refuses). A module that is no known layer kind gets a
    ``jaxlora.product.ProductLayout`` (its weight's roles in its one product), a
    ``jaxlora.product.ProductsLayout`` (several weights, each in its own product) or, in
    ``reasons``, why it has none; ``weight_reasons`` says, by ``<path>.<weight>``, why a
    weight of such a module enters no product (for ``target_parameters``)."""

    def __init__(
        self,
        found: Mapping[str, AnyLayout],
        modules: Mapping[str, str],
        reasons: Mapping[str, str] | None = None,
        weight_reasons: Mapping[str, str] | None = None,
        shared: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__(found)
        self.modules = dict(modules)
        # path -> why a module that is no known layer kind cannot be adapted at a product
        self.reasons = dict(reasons or {})
        self.weight_reasons = dict(weight_reasons or {})
        # path -> {adapted weight: where the model reads it outside the module}: refused
        self.shared = {path: dict(read) for path, read in (shared or {}).items()}


# Each layouts() call traces afresh: an nn.jit trace cached by an earlier call (or by
# model.init) would skip the interceptor that records the layers.
_LAYOUTS_CALLS = itertools.count()


def layouts(model: nn.Module, *args: Any, method: Any = None, **kwargs: Any) -> Layouts:
    """{'.'-joined layer path: ``Layout``} for every layer jaxlora can adapt in ``model``, found
    by tracing ``model.init(key, *args, **kwargs)`` abstractly (``jax.eval_shape``: no FLOPs,
    no memory), for ``inject(..., layouts=...)``. Modules wrapped by ``nn.jit`` are traced
    again, whatever ran before. A layer whose adapted weight the model also reads outside
    the layer's own calls (a head tied to an embedding table reading its params, as
    transformers' ``FlaxGPT2LMHeadModel`` does; found in a trace of ``model.apply``, see
    ``jaxlora.reads``) is left out, with the reason in ``reasons`` and the reads in
    ``shared``: that read would not see the adapter, and merging would change it.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
        >>> layouts(attn, jnp.ones((1, 3, 8)))["query"]
        Layout(kind='linear', in_axes=1, ndim=3, stack=0, scan=None, axis=0)
        >>> layouts(attn, jnp.ones((1, 3, 8)))["out"]
        Layout(kind='linear', in_axes=2, ndim=3, stack=0, scan=None, axis=0)
    """
    found: dict[str, tuple[str, int, tuple]] = {}
    views: dict[str, Any] = {}  # lifted module path -> its params' ndims, as its body sees them
    axes: dict[str, list[int]] = {}  # lifted module path -> the axes transforms added to it
    modules: dict[str, str] = {}  # path -> class name, the innermost (a lifted one wraps it)

    # path -> {scope: [ProductLayout or reason per call]}: a lifted transform (nn.scan) traces
    # its body more than once, each time with new scopes; a module called twice per forward
    # is called twice in one scope
    products: dict[str, dict[Any, list]] = {}
    weight_reasons: dict[str, str] = {}  # '<path>.<weight>' -> why it enters no product
    probing: list[bool] = []  # set for a second trace, which only learns the stacks' axes

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if product.tracing():  # a clone traced for a product: not a module of the model
            return next_fun(*call_args, **call_kwargs)
        if probing:
            return _probe_lifted(next_fun, call_args, call_kwargs, module, axes)
        if module.scope is not None:
            modules[".".join(module.path)] = type(module).__name__
        out = next_fun(*call_args, **call_kwargs)
        if module.scope is None:
            return out
        path = ".".join(module.path)
        if path and not isinstance(module.parent, nn.Module) and path not in views:
            # The root of a lifted transform (nn.scan, nn.vmap, nn.remat, ...): inside it the
            # params are the body's view (one layer's slice under a scan).
            params = meta.unbox(module.variables.get("params", {}))
            views[path] = jax.tree.map(jnp.ndim, params)
        kind = module_kind(module)
        if kind is not None and context.method_name == "__call__":
            in_axes = input_axes(module) if kind == "linear" else 1
            weight = module.get_variable("params", "embedding" if kind == "embed" else "kernel")
            found[path] = (kind, in_axes, tuple(jnp.shape(meta.unbox(weight))))
        elif kind is None and context.method_name == "__call__" and _has_weights(module):
            calls = products.setdefault(path, {}).setdefault(module.scope, [])
            calls.append(_product_layout(module, call_args, call_kwargs, weight_reasons))
        return out

    def init():
        with traced_as(("layouts", next(_LAYOUTS_CALLS))), nn.intercept_methods(record):
            extra = {} if method is None else {"method": method}
            return model.init(jax.random.key(0), *args, **extra, **kwargs)

    variables = jax.eval_shape(init)
    params = meta.unbox(variables.get("params", {}))
    weights = {
        path: _lookup(params, path, "embedding" if kind == "embed" else "kernel")
        for path, (kind, _, _) in found.items()
    }
    stacked_products = [
        path
        for path, calls in products.items()
        for layout in (call[0] for call in calls.values())
        if not isinstance(layout, str)
        for lay in _product_list(layout)
        if jnp.ndim(_lookup(params, path, lay.weight)) > lay.ndim
    ]
    if stacked_products or any(
        w is not None and jnp.ndim(w) > len(found[p][2]) for p, w in weights.items()
    ):
        probing.append(True)  # a stacked layer: trace again to learn where its layer axis is
        jax.eval_shape(lambda: init())  # a new function: eval_shape caches traces by function
    out: dict[str, AnyLayout] = {}
    reasons = {}
    for path, (kind, in_axes, shape) in found.items():
        weight = weights[path]
        stack = jnp.ndim(weight) - len(shape) if weight is not None else 0
        scan = _scan_root(path, views, params) if stack else None
        axis = axes.get(scan, [0])[0] if scan is not None else 0
        if stack == 1 and scan is not None and _drop_axis(jnp.shape(weight), axis) != shape:
            reasons[path] = (
                f"its weight {tuple(jnp.shape(weight))} is stacked by '{scan}' on axis {axis}, "
                f"which does not leave the {shape} its call sees"
            )
            continue
        out[path] = Layout(kind, in_axes, len(shape), stack, scan, axis)
    for path, calls in products.items():
        times = max(len(call) for call in calls.values())
        layout = next(iter(calls.values()))[0]
        if times > 1:
            reasons[path] = f"it is called {times} times in one forward (one product each)"
        elif isinstance(layout, str):
            reasons[path] = layout
        else:
            stacked = _stacked_product(path, layout, params, views, axes)
            if isinstance(stacked, str):
                reasons[path] = stacked
            else:
                out[path] = stacked
    read = _reads(model, args, kwargs, method, variables)
    shared = {
        path: {w: where for w, where in read[path].items() if w in _adapted(out[path])}
        for path in out
        if path in read
    }
    shared = {path: where for path, where in shared.items() if where}
    for path, where in shared.items():
        del out[path]
        reasons[path] = reads.refusal(where)
    return Layouts(out, modules, reasons, weight_reasons, shared)


def _reads(model: nn.Module, args, kwargs, method, variables) -> dict[str, dict[str, str]]:
    """``reads.foreign_reads`` of ``model.apply`` on the (abstract) ``variables`` of its init."""

    def apply(v):
        extra = {} if method is None else {"method": method}
        with traced_as(("reads", next(_LAYOUTS_CALLS))):
            key = jax.random.key(0)
            return model.apply(v, *args, rngs={"params": key}, mutable=True, **extra, **kwargs)

    return reads.foreign_reads(apply, variables)


def _adapted(layout: AnyLayout) -> tuple[str, ...]:
    """The names of the weights an adapter of ``layout`` changes."""
    if isinstance(layout, Layout):
        return ("embedding" if layout.kind == "embed" else "kernel",)
    return tuple(lay.weight for lay in _product_list(layout))


def _stacked_product(path, layout, params, views, axes) -> AnyLayout | str:
    """``layout`` as the params tree holds its weight(s): with the layer axis of the
    ``nn.scan`` (or ``nn.vmap``) around it when stacked (``stack``, ``scan``, ``axis``, as a
    stacked Dense's ``Layout``), or why it cannot be adapted (a string). A module with several
    weights: each weight as a module of its own, all stacked alike."""
    if not isinstance(layout, product.ProductsLayout):
        return _stacked_one(path, layout, params, views, axes)
    each = [_stacked_one(path, lay, params, views, axes) for lay in layout.products]
    why = [w for w in each if isinstance(w, str)]
    if why:
        return "; ".join(why)
    laid = [lay for lay in each if isinstance(lay, product.ProductLayout)]
    stacking = {(lay.stack, lay.scan, lay.axis) for lay in laid}
    if len(stacking) > 1:
        held = {lay.weight: tuple(jnp.shape(_lookup(params, path, lay.weight))) for lay in laid}
        return (
            f"its weights {held} are not all stacked alike (some by nn.scan/nn.vmap, some not, "
            "or on different axes): a module's weights are stacked together or not at all"
        )
    stack, scan, axis = stacking.pop()
    return product.ProductsLayout(tuple(laid), stack=stack, scan=scan, axis=axis)


def _stacked_one(
    path, layout: product.ProductLayout, params, views, axes
) -> product.ProductLayout | str:
    weight = _lookup(params, path, layout.weight)
    stack = 0 if weight is None else jnp.ndim(weight) - layout.ndim
    if not stack:
        return layout
    shape = tuple(jnp.shape(weight))
    scan = _scan_root(path, views, params)
    axis = axes.get(scan, [0])[0] if scan is not None else 0
    if stack != 1 or scan is None or _drop_axis(shape, axis) != layout.roles.shape:
        why = (
            "only one stacking transform (nn.scan/nn.vmap) around a layer is supported"
            if stack != 1
            else "no submodule is the scanned one (scan a module class, e.g. nn.scan(Block, ...))"
            if scan is None
            else f"stacked by '{scan}' on axis {axis}, which does not leave the "
            f"{layout.roles.shape} its call sees"
        )
        return f"its weight '{layout.weight}' {shape} is stacked: {why}"
    return dataclasses.replace(layout, stack=1, scan=scan, axis=axis)


# For a model with stacked layers, layouts() traces once more with a probe variable beside the
# params of each lifted module: nn.scan and nn.vmap call add_axis on every boxed variable they
# stack, with their variable_axes, which is how it learns where the layer axis is (sizes that
# coincide hide it from the shapes, and a negative axis counts from the end of each array: an
# adapter's factors, which have other ndims than the weight, need the axis itself).
_PROBE = "__jaxlora_layer_axis_probe__"


class _AxisSink:  # hashable by identity: a static field of the probe
    def __init__(self, axes: dict[str, list[int]]) -> None:
        self.axes = axes


class _AxisProbe(struct.PyTreeNode, meta.AxisMetadata):
    value: Any
    path: str = struct.field(pytree_node=False)
    sink: _AxisSink = struct.field(pytree_node=False)

    def unbox(self) -> Any:
        return self.value

    def replace_boxed(self, val: Any) -> _AxisProbe:
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict[Any, Any]) -> _AxisProbe:
        self.sink.axes.setdefault(self.path, []).append(index)
        return self

    def remove_axis(self, index: int, params: dict[Any, Any]) -> _AxisProbe:
        return self


def _probe_lifted(next_fun, call_args, call_kwargs, module: nn.Module, axes) -> Any:
    """Runs the call; at the root of a lifted transform, puts a probe beside its params."""
    out = next_fun(*call_args, **call_kwargs)
    scope = module.scope
    if scope is None or not scope.path or isinstance(module.parent, nn.Module):
        return out
    if scope.is_mutable_collection("params") and not scope.has_variable("params", _PROBE):
        # 8 axes of size 1: room for any axis a transform can stack the model's own params on
        probe = _AxisProbe(jnp.zeros((1,) * 8, jnp.int8), ".".join(scope.path), _AxisSink(axes))
        scope.put_variable("params", _PROBE, probe)
    return out


def _drop_axis(shape: tuple, axis: int) -> tuple | None:
    position = kinds.axis_position(len(shape), axis)
    return None if position is None else (*shape[:position], *shape[position + 1 :])


def _has_weights(module: nn.Module) -> bool:
    params = module.variables.get("params", {})
    return any(not isinstance(v, Mapping) for v in params.values())


def _product_layout(module: nn.Module, args: tuple, kwargs: dict, weight_reasons: dict) -> Any:
    """The module's ``ProductLayout`` (one weight in a product) or ``ProductsLayout`` (several),
    or why it has none (a string); why each other weight is in no product goes to
    ``weight_reasons`` by ``<path>.<weight>``."""
    path = ".".join(module.path)
    where = f"layer '{path}'"
    try:
        traced = product.trace(module, "__call__", args, kwargs, {})
    except Exception as err:  # any failure of the user's module: say where it came from
        return f"its call could not be traced on the inputs given ({type(err).__name__}: {err})"
    try:
        found, unused = product.products_of(traced, where)
    except ValueError as err:  # a weight used by two products or also otherwise: refused
        return str(err).removeprefix(f"{where}, ")
    weight_reasons.update({f"{path}.{w}": why for w, why in unused.items()})
    if not found:
        return "no param of it is used by a product (dot_general): " + (
            "; ".join(unused.values()) or "it holds none"
        )
    layouts = tuple(product.ProductLayout(w, found[w].roles) for w in sorted(found))
    return layouts[0] if len(layouts) == 1 else product.ProductsLayout(layouts)


def _lookup(params: Mapping, path: str, leaf: str) -> Any:
    node: Any = params
    for key in (*path.split("."), leaf) if path else (leaf,):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def _scan_root(path: str, views: Mapping[str, Any], params: Mapping) -> str | None:
    """The outermost lifted module above ``path`` whose every param has more axes in the
    params tree than inside it (so a scan/vmap stacks them, not a remat)."""
    for root in sorted(views, key=len):
        if not (path == root or path.startswith(root + ".")):
            continue
        full = _subtree(params, root)
        inner = views[root]
        if not isinstance(full, Mapping) or not inner:
            continue
        outer = jax.tree.map(jnp.ndim, full)
        # jaxlib ships PyTreeDef without type stubs, so the checker cannot see its __ne__.
        if jax.tree.structure(outer) != jax.tree.structure(inner):  # type: ignore[operator]
            continue
        if all(o > i for o, i in zip(jax.tree.leaves(outer), jax.tree.leaves(inner), strict=True)):
            return root
    return None


def _subtree(params: Mapping, path: str) -> Any:
    node: Any = params
    for key in path.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def _layout(node: Mapping, path: str, layouts, where: str) -> tuple[str, str, int]:
    """(kind, base leaf name, input axes) of a node to inject, from the tree or ``layouts``."""
    name = kinds.base_name(node)
    base = meta.unbox(node[name]) if name is not None else None
    ndim = jnp.ndim(base) if base is not None else 0
    layout = None if layouts is None else layouts.get(path)
    found = {
        k: tuple(jnp.shape(meta.unbox(v))) for k, v in node.items() if not isinstance(v, Mapping)
    }
    if layouts is not None and layout is None and name is not None:
        raise TypeError(_refusal(path, layouts, found, where))
    if name == "embedding" and ndim == 2 and (layout is None or not layout.stack):
        return "embed", name, 1
    kinds_of: dict[str | None, tuple[str, ...]] = {
        "kernel": ("linear", "conv"),
        "embedding": ("embed",),
    }
    expected = kinds_of.get(name, ())
    if layout is not None and name is not None and layout.kind in expected:
        if layout.ndim + layout.stack != ndim:
            raise TypeError(
                f"{where}: the layer's {name} has {layout.ndim} axes (and {layout.stack} "
                f"stacked layer axes) but the params tree holds {found[name]}"
            )
        if layout.stack and (layout.kind == "conv" or layout.stack > 1 or layout.scan is None):
            if layout.kind == "conv":
                why = "conv layers cannot be stacked"
            elif layout.stack > 1:
                why = "only one stacking transform (nn.scan/nn.vmap) around a layer is supported"
            else:
                why = (
                    "no submodule is the scanned one (nn.scan of a function over the parent "
                    "module is not supported: scan a module class, e.g. nn.scan(Block, ...))"
                )
            raise TypeError(
                f"{where} is stacked over {layout.stack} leading layer axis(es) of "
                f"{found[name]} (scanned module: {layout.scan}): {why}"
            )
        return layout.kind, name, layout.in_axes
    if name == "kernel" and ndim == 2:
        return "linear", name, 1
    if name in ("kernel", "embedding") and ndim > 2 and layouts is None:
        raise TypeError(
            f"{where} has a {ndim}-D {name} {found[name]}: say which axes are inputs (and "
            "which are nn.scan's layer axes) with inject(..., layouts=jaxlora.layouts(model, "
            "*inputs))"
        )
    raise TypeError(_refusal(path, layouts, found, where))


def _refusal(path: str, layouts: Mapping | None, found: Mapping, where: str) -> str:
    """Why a matched layer is refused: it cannot be adapted, or ``layouts`` is given and does
    not describe it, so its layout would be a guess (a 2-D kernel taken as nn.Dense's (in, out),
    which e.g. FlaxConv1D's (out, in) is not)."""
    cls = None if layouts is None else getattr(layouts, "modules", {}).get(path)
    reason = None if layouts is None else getattr(layouts, "reasons", {}).get(path)
    if cls is not None or layouts is None:
        held = f"{where} holds {found}" + (f" in a {cls}" if cls is not None else "")
        if reason is not None and getattr(layouts, "shared", {}).get(path):
            return f"{held}, which cannot be adapted: {reason}"
        if reason is not None:
            return (
                f"{held}, which cannot be adapted; supported: {SUPPORTED}, or a module whose "
                f"one weight enters one product (here: {reason})"
            )
        if layouts is None:
            return (
                f"{held}, which is no layer jaxlora knows ({SUPPORTED}); a weight of any "
                "other module can be adapted at the product it enters, found by tracing: pass "
                "layouts=jaxlora.layouts(model, *inputs)"
            )
        return f"{held}, which cannot be adapted; supported: {SUPPORTED}"
    return (
        f"{where} holds {found} but the layouts given do not describe it "
        "(jaxlora.layouts(model, *inputs) describes every supported layer the call runs): "
        "its layout would be a guess"
    )


def _stacked_init(
    base: jax.Array, stack: int, axis: int, key: jax.Array, init_one
) -> dict[str, jax.Array]:
    """``init_one(base, key=key)``, or for a stacked layer each layer's alone (its slice of the
    base on the layer axis ``axis``, its own key: ``key`` folded with the layer index), stacked
    on that axis, where ``nn.scan`` slices every param of the layer."""
    if not stack:
        return init_one(base, key=key)
    length = jnp.shape(base)[kinds.position_of(jnp.ndim(base), axis)]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(length))
    one = jax.vmap(lambda b, k: init_one(b, key=k), in_axes=(axis, 0), out_axes=axis)
    return one(base, keys)


def _check_axis_fits(kind: str, front: tuple, r: int, in_axes: int, axis: int, where: str):
    """A ``TypeError`` unless both stacked factors have the layer axis ``axis`` (nn.scan puts
    it there in every param of the layer, and a factor may have fewer axes than the weight)."""
    _check_factor_axis(kinds.lora_shapes(kind, front[1:], r, in_axes), axis, where)


def _check_factor_axis(per_layer: tuple, axis: int, where: str) -> None:
    """``_check_axis_fits`` for one layer's (lora_a, lora_b) shapes."""
    for leaf, shape in zip(("lora_a", "lora_b"), per_layer, strict=True):
        if kinds.axis_position(len(shape) + 1, axis) is None:
            raise TypeError(
                f"{where} is stacked on axis {axis} (nn.scan variable_axes), which its "
                f"'{leaf}' {shape} per layer cannot have when stacked ({len(shape) + 1} axes): "
                "scan the params on an axis that every factor has (e.g. 0 or 1)"
            )


def _stack(layouts, path: str) -> int:
    layout = None if layouts is None else layouts.get(path)
    return 0 if layout is None else layout.stack


def _per_layer(layouts, path: str, shape: tuple, layer_names, where: str) -> list[str]:
    """The per-layer paths of the stacked layer at ``path`` (``jaxlora.stacks``), whose
    layer axis is its layout's ``axis``."""
    length = kinds.to_front(tuple(shape), layouts[path].axis)[0]
    try:
        return stacks.layer_paths(path, layouts[path].scan, length, layer_names)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _select(nodes: Mapping, config: LoRAConfig, layouts, layer_names, also=()) -> list[str]:
    """The tree paths ``config.targets`` choose: a stacked layer is chosen by its stack path
    or by all of its per-layer paths; a ``ValueError`` if only some of them match."""
    names = list(nodes)
    per_layer: dict[str, list[str]] = {}
    for path in nodes:
        node = nodes[path]
        name = kinds.base_name(node) if isinstance(node, Mapping) else None
        layout = None if layouts is None else layouts.get(path)
        if isinstance(layout, product.ProductLayout) and layout.weight in node:
            name = layout.weight
        if isinstance(layout, product.ProductsLayout) and layout.products[0].weight in node:
            name = layout.products[0].weight  # its weights are stacked alike: any one says L
        if name is not None and layout is not None and layout.stack == 1 and layout.scan:
            shape = jnp.shape(meta.unbox(node[name]))
            per_layer[path] = _per_layer(layouts, path, shape, layer_names, f"layer '{path}'")
    return stacks.select(names, per_layer, config, also=also)


def dora_magnitude(
    base: jax.Array, leaves: Mapping, scale: float, kind: str, stack: int, where: str
) -> jax.Array:
    """DoRA's initial magnitude (PEFT's): ``‖K + scale·a b‖`` per output feature, in the
    adapter's dtype; a ``ValueError`` for a layer DoRA is not implemented for."""
    kinds.check_dora_layer(kind, tuple(jnp.shape(base)), stack, f"{where}: use_dora=True")
    a, b = leaves["lora_a"], leaves["lora_b"]
    return core.dora_norm(base, core.delta(a, b, scale)).astype(a.dtype)


def init_leaves(
    base: jax.Array,
    r: int,
    scale: float,
    init: str,
    key: jax.Array | None,
    param_dtype: Any,
    *,
    kind: str = "linear",
    in_axes: int = 1,
    where: str = "inject",
) -> dict[str, jax.Array]:
    """New ``lora_a``/``lora_b`` for a base weight per ``init`` (and, for PiSSA/OLoRA, its residual
    ``kernel`` in the kernel's dtype): the adapted layer's output is unchanged. PiSSA/OLoRA are
    deterministic: ``key`` may be ``None`` for them."""
    if init in WEIGHT_INITS:
        if kind != "linear":
            raise ValueError(
                f"{where}: init={init!r} adapts linear layers only, not a {kind} layer"
            )
        roles = kinds.roles(kind, jnp.shape(base), in_axes)
        lora_a, lora_b, residual = product.weight_factors(
            roles, r, init, base, scale, param_dtype, where
        )
        return {"kernel": residual, "lora_a": lora_a, "lora_b": lora_b}
    if key is None:
        raise ValueError(f"{where}: init={init!r} draws the adapter and needs a random key")
    return lora_init(kind, jnp.shape(base), r, init, key, param_dtype, in_axes)


def lora_init(
    kind: str,
    base_shape: tuple[int, ...],
    r: int,
    init: str,
    key: jax.Array,
    param_dtype: Any,
    in_axes: int = 1,
) -> dict[str, jax.Array]:
    """New ``lora_a``/``lora_b`` that leave the layer's output unchanged, for every init but
    PiSSA (which needs the weight's values: ``init_leaves``)."""
    shape_a, shape_b = kinds.lora_shapes(kind, base_shape, r, in_axes)
    if kind == "embed":  # PEFT's (and loralib's): A zero, B standard normal
        return {
            "lora_a": jnp.zeros(shape_a, param_dtype),
            "lora_b": jax.random.normal(key, shape_b, param_dtype),
        }
    if init == "gaussian":  # PEFT's: std 1/r
        lora_a = jax.random.normal(key, shape_a, param_dtype) / r
    else:  # fan_in is the product of all but the last axis: the flattened input size
        lora_a = core.default_lora_a_init(key, shape_a, param_dtype)
    return {"lora_a": lora_a, "lora_b": core.default_lora_b_init(key, shape_b, param_dtype)}


def _iter_nodes(tree: Mapping, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Mapping]]:
    """Yields ('.'-joined layer path, node) for every sub-dict."""
    if path:
        yield ".".join(path), tree
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _iter_nodes(value, (*path, str(key)))


def _add_leaves(tree: Mapping, path: tuple[str, ...], new: dict[str, dict]) -> Mapping:
    out = {}
    for key, value in tree.items():
        sub = (*path, str(key))
        out[key] = _add_leaves(value, sub, new) if isinstance(value, Mapping) else value
    if path and ".".join(path) in new:
        out.update(new[".".join(path)])
    return _like(tree, out)
