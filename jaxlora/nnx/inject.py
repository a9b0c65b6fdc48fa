"""LoRA for unmodified Flax NNX models: module surgery in place, and merging back."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import graph

from _loracore.config import WEIGHT_INITS
from jaxlora import core, kinds, oplevel, reads, stacks
from jaxlora.config import LoRAConfig
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.conv import LoRAConv
from jaxlora.nnx.embed import LoRAEmbed
from jaxlora.nnx.general import LoRALinearGeneral
from jaxlora.nnx.layer import _SHARDING_KEYS, LoRALinear, check_rngs
from jaxlora.nnx.oplevel import (
    LORA_ATTRIBUTES,
    OpAdapter,
    adapt,
    find_weights,
    traced_model,
    unused_products,
)
from jaxlora.nnx.quant import kernel_value
from jaxlora.nnx.serving import StackedAdapter
from jaxlora.tree import ParamCount, factor_names

SUPPORTED = "nnx.Linear, nnx.LinearGeneral (no batch_axis), nnx.Conv (no mask, groups=1), nnx.Embed"
_ADAPTED: dict[type[nnx.Module], type[Adapter]] = {
    nnx.LinearGeneral: LoRALinearGeneral,
    nnx.Conv: LoRAConv,
    nnx.Embed: LoRAEmbed,
}


def stack_of(module: nnx.Module) -> int:
    """How many leading layer axes (``nnx.vmap``-made stacks) a supported layer's weight has
    beyond what its own features say: a stacked ``nnx.Linear(16, 16)`` holds a (L, 16, 16)
    kernel; an op-level layer's weight, beyond one layer's roles."""
    if isinstance(module, OpAdapter):
        name, roles = module.lora_products[0]  # the weights of one module are stacked alike
        return getattr(module, name).ndim - len(roles.shape)
    if isinstance(module, nnx.Linear | LoRALinear):
        return module.kernel.ndim - 2
    if isinstance(module, nnx.LinearGeneral):
        return module.kernel.ndim - len(module.in_features) - len(module.out_features)
    if isinstance(module, nnx.Conv):
        return module.kernel.ndim - len(module.kernel_size) - 2
    if isinstance(module, nnx.Embed):
        return module.embedding.ndim - 2
    return 0


def _per_layer_shapes(
    module: nnx.Linear | nnx.LinearGeneral | nnx.Embed,
) -> dict[str, tuple[int, ...]]:
    """One layer's weight (and bias) shapes, as the module's features say."""
    if isinstance(module, nnx.Embed):
        return {"embedding": (module.num_embeddings, module.features)}
    if isinstance(module, nnx.LinearGeneral):
        kernel, bias = (*module.in_features, *module.out_features), tuple(module.out_features)
    else:
        kernel, bias = (module.in_features, module.out_features), (module.out_features,)
    return {"kernel": kernel, **({"bias": bias} if module.bias is not None else {})}


def _check_layer_axis(module: nnx.Linear | nnx.LinearGeneral | nnx.Embed, where: str) -> None:
    """A ``TypeError`` unless a stacked layer's layer axis is its weights' axis 0, where the
    adapter is stacked and ``nnx.scan(in_axes=0)`` slices it. ``nnx.vmap(..., out_axes=k)``
    puts it at k in every variable, and an NNX module does not record k; the axes that leave
    the shapes the features say are the candidates, and any but 0 (or more than 0: sizes that
    coincide) is refused rather than guessed."""
    shapes = {n: tuple(getattr(module, n).shape) for n in _per_layer_shapes(module)}
    wants = _per_layer_shapes(module)
    widest = max(len(s) for s in shapes.values())

    def fits(axis: int) -> bool:
        lengths = set()
        for name, shape in shapes.items():
            p = kinds.axis_position(len(shape), axis)
            if p is None or (*shape[:p], *shape[p + 1 :]) != wants[name]:
                return False
            lengths.add(shape[p])
        return len(lengths) == 1

    fitting = [a for a in range(-widest, widest) if fits(a)]
    leading = all(kinds.axis_position(len(s), a) == 0 for a in fitting for s in shapes.values())
    if fitting and leading:
        return
    found = ", ".join(f"{n} {s}" for n, s in shapes.items())
    raise TypeError(
        f"{where} is stacked ({found} for one layer's {dict(wants)}), and its layer axis is "
        + (
            f"not axis 0 but one of {fitting} (nnx.vmap(..., out_axes=k) with k != 0)"
            if fitting and 0 not in fitting
            else f"ambiguous: sizes coincide, so axes {fitting} all fit"
            if fitting
            else "at no axis that leaves the shapes its features say"
        )
        + ": jaxlora.nnx adapts stacks made with the layer axis in front only "
        "(nnx.vmap(..., out_axes=0), run with nnx.scan(in_axes=0 ...)); restack the layers "
        "on axis 0"
    )


def _by_product(module: nnx.Module, name: str, inputs: Sequence | None) -> bool:
    """Whether ``module`` is adapted at its weight's product (``jaxlora.oplevel``) rather than
    as one of the known layers; a ``TypeError`` for an adapted module."""
    if isinstance(module, LoRALinear | Adapter | OpAdapter):
        raise TypeError(f"inject: layer '{name}' is a {type(module).__name__}: already adapted")
    known = type(module) in _ADAPTED or (
        isinstance(module, nnx.Linear) and type(module).__call__ is nnx.Linear.__call__
    )
    return not known and inputs is not None


def _check_by_product(
    module: nnx.Module, name: str, config: LoRAConfig, products: Mapping[str, Any]
) -> None:
    where = f"inject: layer '{name}'"
    names = {*LORA_ATTRIBUTES, "lora_weight", "lora_roles", "lora_weights"}
    if len(products) > 1:
        names |= {n for w in products for n in factor_names(w)}
    taken = sorted(names & set(vars(module)))
    if taken:
        raise ValueError(f"{where}: its attributes {taken} would be overwritten by the adapter")
    # init: any; PiSSA/OLoRA on a weight with batch axes is refused by product.init_factors
    # while building (inject writes the weights back on failure).
    if config.use_dora:
        raise ValueError(
            f"{where} ({type(module).__name__}) is adapted at its product, where use_dora=True "
            "is not implemented (DoRA: unstacked nnx.Linear, nnx.Conv and nnx.Embed layers)"
        )
    for weight, roles in products.items():
        core.check_hparams(
            r=config.rank_for(name),
            alpha=config.alpha_for(name),
            dropout=config.dropout,
            in_features=roles.in_features,
            out_features=roles.out_features,
            where=where if len(products) == 1 else f"{where}, weight '{weight}'",
        )


def _check(module: nnx.Module, name: str, config: LoRAConfig, per_layer: list[str]) -> None:
    """Raises if ``module`` cannot take the adapter ``config`` gives it (changes nothing)."""
    where = f"inject: layer '{name}'"
    # nnx.Linear subclasses are accepted as before; the other kinds are wrapped by subclassing
    # their exact type, so a subclass of them (a LoRA layer included) is not.
    if not isinstance(module, nnx.Linear) and type(module) not in _ADAPTED:
        subclass = next((b for b in _ADAPTED if isinstance(module, b)), None)
        why = "" if subclass is None else f" (a subclass of nnx.{subclass.__name__})"
        raise TypeError(
            f"layer '{name}' is a {type(module).__name__}{why}, which cannot be "
            f"adapted; supported: {SUPPORTED}; or pass inject(..., inputs=(…)) to adapt it at "
            "the product (einsum, dot_general, matmul) its weight enters"
        )
    if isinstance(module, nnx.Linear) and type(module).__call__ is not nnx.Linear.__call__:
        # The LoRA layer computes nnx.Linear's forward: replacing a subclass's own forward by
        # it would change the output even with lora_b = 0.
        raise TypeError(
            f"{where} is a {type(module).__name__}, an nnx.Linear subclass with its own "
            "__call__, which the LoRA layer would replace (changing its output); only layers "
            f"that compute their base class's forward can be adapted: {SUPPORTED}"
        )
    if isinstance(module, nnx.Linear):
        kind, n_in, n_out = "linear", module.in_features, module.out_features
    else:
        cls = _ADAPTED[type(module)]
        try:
            cls._arguments(module)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        kind = cls.kind
        weight = getattr(module, "embedding" if kind == "embed" else "kernel")
        in_axes = len(module.in_features) if isinstance(module, nnx.LinearGeneral) else 1
        n_in, n_out = kinds.flat_features(kind, weight.shape, in_axes, stack_of(module))
    stack = stack_of(module)
    if stack == 1 and isinstance(module, nnx.Linear | nnx.LinearGeneral | nnx.Embed):
        _check_layer_axis(module, where)
    if stack:
        weight = getattr(module, "embedding" if kind == "embed" else "kernel")
        if stack != 1 or kind == "conv" or stack < 0:
            why = "conv layers cannot be stacked" if kind == "conv" else "one layer axis only"
            raise TypeError(
                f"{where} is stacked (its weight {tuple(weight.shape)} has {stack} axes more "
                f"than its features say): {why}"
            )
        stacks.check_uniform(config, name, per_layer, where)
    if config.init in WEIGHT_INITS and kind != "linear":
        raise ValueError(
            f"{where}: init={config.init!r} adapts linear layers only, not a {kind} layer"
        )
    if config.use_dora and (isinstance(module, nnx.LinearGeneral) or stack):
        raise ValueError(
            f"{where}: use_dora=True is implemented for unstacked nnx.Linear, nnx.Conv and "
            f"nnx.Embed layers only, not {'a stacked ' if stack else 'a '}{type(module).__name__}"
        )
    core.check_hparams(
        r=config.rank_for(name),
        alpha=config.alpha_for(name),
        dropout=config.dropout,
        in_features=n_in,
        out_features=n_out,
        where=where,
    )


def inject(
    model: nnx.Module,
    config: LoRAConfig,
    rngs: nnx.Rngs,
    *,
    param_dtype: Any = jnp.float32,
    layer_names: Mapping[str, str] | None = None,
    inputs: Sequence[Any] | None = None,
    tied_products: Mapping[str, str] | None = None,
) -> nnx.Module:
    """Replaces, in place, each layer whose '.'-joined path matches ``config.targets`` by its
    LoRA version sharing its weight and bias variables: ``nnx.Linear`` → ``LoRALinear``,
    ``nnx.LinearGeneral`` → ``LoRALinearGeneral``, ``nnx.Conv`` → ``LoRAConv``, ``nnx.Embed`` →
    ``LoRAEmbed``.

    All matches are checked before the model is touched; the config is remembered as
    ``model.lora_config``. Train with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.
    Returns ``model``.

    Layers of a stack made with ``nnx.vmap`` (Flax's "scan over layers": a weight with a
    leading layer axis L, run with ``nnx.scan``) get stacked adapters, ``lora_a`` (L, …, r) and
    ``lora_b`` (L, r, …), made by ``nnx.vmap`` over the layer with split rngs (so each layer
    is drawn alone and its dropout has its own stream); the LoRA layer's ``__call__`` sees one
    layer's slice inside ``nnx.scan``. The stack's per-layer paths put the layer index after
    the outermost module whose adaptable layers are all stacked (``blocks.3.attn.query``), or
    per ``layer_names`` (see ``jaxlora.stacks``); targets and rank/alpha patterns follow the
    Linen rules (all layers of a stack or none; one (r, alpha) per stack).

    Any other matched module (tunix's ``Einsum``, a layer computing ``x @ w.T``, an
    ``nnx.Linear`` subclass with its own ``__call__``) is adapted at the product its weight
    enters when ``inputs`` is given: ``model(*inputs)`` is traced once (abstractly, nothing
    runs) to find, for each such module, its one ``nnx.Param`` used by a ``dot_general`` and
    that weight's contracted, batch and free axes; see ``jaxlora.oplevel`` and
    ``jaxlora.nnx.oplevel``. The module becomes a subclass of its own type with ``lora_a``
    (batch…, contracted…, r) and ``lora_b`` (batch…, r, free…) beside the weight. Such modules
    in an ``nnx.vmap``-made stack run by ``nnx.scan`` (and under ``nnx.remat``) are found
    through the scan, one layer's product, and get stacked adapters as stacked ``nnx.Linear``
    layers do (layer axis 0 only; targeted by the stack path: their per-layer paths are
    known only once traced).

    A weight that a module both multiplies (its product) and reads by row lookups (a traced
    index whose rows are used otherwise: a tied embedding, as tunix Gemma3's ``Embedder``
    whose ``encode`` takes ``input_embedding[tokens]`` and whose ``decode`` computes the logits
    ``x @ input_embedding.T``) is refused, unless ``tied_products`` names the layer's path and
    the method computing the product (``tied_products={"embedder": "decode"}``): then that
    method gets the branch, ``x·Wᵀ + s·(x·lora_a)·lora_b`` (``lora_a`` (D, r), ``lora_b``
    (r, V) by the product rule), and the lookups read the unadapted weight, as PEFT's LoRA on
    a tied ``lm_head`` does (its ``embed_tokens`` stays the base's). Such an adapter cannot be
    merged (``merge`` refuses it: the shared weight would change the lookups too); a traced
    ``model(*inputs)`` must compute its branch in the named method, else the model is put
    back and the call refused.

    With ``inputs``, the same trace (one, abstract) also checks the chosen layers of known
    kinds: one whose weight the model uses outside the layer's own methods (a head tied to an
    embedding by ``x @ self.embed.embedding[...].T``) is refused, naming the layer, the weight
    and the op (``jaxlora.reads``): that use would not see the adapter, and merging would
    change it. Without ``inputs`` nothing is traced and such a use is not seen.

    Raises:
        ValueError: no layer matches (the message lists the layer paths), the root module is
            matched, a layer's rank exceeds its ``min(in, out)``, a module adapted at its
            product has no weight used linearly in exactly one product, or (with ``inputs``)
            a chosen layer's weight is used outside the layer.
        TypeError: a matched module is not of a supported type (or is already adapted).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"inject expects a jaxlora.LoRAConfig, got {type(config).__name__}")
    check_rngs(rngs, "inject")
    paths = _module_paths(model)
    modules = dict(sorted(paths.items(), key=lambda item: item[0]))
    per_layer = per_layer_paths(modules, layer_names)
    # A module adapted at its product is known to be a stack only once traced: until then its
    # per-layer paths are the ones it would have as one (_maybe_stacks), checked after tracing.
    maybe = _maybe_stacks(modules, layer_names, inputs)
    # The modules target_parameters names are adapted too: a rank/alpha pattern key may match
    # them (and must match some adapted layer, also when target_parameters alone chooses).
    named = list(_by_parameter(modules, config, []))
    if config.targets:
        chosen = stacks.select(list(modules), per_layer, config, maybe, also=named)
    else:
        config.check_unmatched(list(modules), named)
        chosen = []
    only = _by_parameter(modules, config, chosen)
    chosen = sorted({*chosen, *only})
    tied = _checked_tied(tied_products, inputs)
    by_product = {}
    for name in chosen:
        path, module = modules[name]
        if not path:
            raise ValueError(
                f"targets {config.targets!r} match the root module itself; target its submodules"
            )
        if _by_product(module, name, inputs):
            by_product[name] = module
        elif name in only:
            raise ValueError(
                f"inject: target_parameters names {[f'{name}.{w}' for w in only[name]]}, but "
                f"layer '{name}' is a {type(module).__name__}, adapted as a layer of its own "
                "kind (its one weight)"
                + ("" if inputs is not None else " or not at all without inputs=")
                + ": target it with targets"
            )
        else:
            _check(module, name, config, per_layer.get(name, []))
    _check_tied_layers(tied, modules, by_product)
    products: dict[str, dict[str, Any]] = {}
    if inputs is not None:
        known = {name: modules[name][1] for name in chosen if name not in by_product}
        with reads.scoped_modules(known):  # so that reads of their weights elsewhere show
            traced = traced_model(model, inputs)
        _check_own_reads(traced, modules, known)
    if by_product and inputs is not None:  # by_product is empty without inputs (_by_product)
        # A module chosen only by the per-layer paths it would have as a stack is traced as
        # any other (a refusal is a refusal); once traced not to be a stack, it is left out.
        products = find_weights(model, by_product, inputs, only=only, tied=tied, traced=traced)
    if maybe:
        chosen = _chosen_stacks(modules, products, config, layer_names, chosen, only)
        products = {n: found for n, found in products.items() if n in chosen}
    for name, found in products.items():
        _check_by_product(modules[name][1], name, config, found)
    _check_product_stacks(modules, products, config, layer_names)
    groups = _tied(modules, chosen, config)
    # Every layer is built before any is put in: a failure leaves the model as it was. PiSSA/
    # OLoRA write the residual into the shared weights while building, so the weights' values
    # (immutable arrays) are kept to be written back.
    weights = [
        w for names in groups for w in _weights(modules[names[0]][1], products.get(names[0]))
    ]
    kept = [(weight, weight[...]) for weight in weights]
    built = []
    try:
        for names in groups:
            name = names[0]
            layer = _build(
                modules[name][1],
                name,
                config,
                param_dtype,
                rngs,
                products.get(name),
                tied.get(name),
            )
            built.append((names, layer))
    except BaseException:
        for weight, value in kept:
            weight[...] = value
        raise
    for names, layer in built:
        for alias in names:  # a tied layer stays tied: one LoRA layer at each of its paths
            _replace(model, modules[alias][0], layer)
    if tied:
        _check_tied_methods(model, modules, built, tied, inputs, kept)
    # flax declares no attributes on nnx.Module; a module takes any.
    model.lora_config = config  # type: ignore[attr-defined]
    return model


def _check_own_reads(traced: tuple, modules, known: Mapping[str, nnx.Module]) -> None:
    """A ``ValueError`` naming the layer, its weight and the reader where the traced model
    reads the weight of a layer of a known kind (``known``, traced in their own scopes)
    outside that layer's calls, as a head tied to an embedding by ``x @ embed.embedding.T``
    does: the read would not see the adapter, and merging would change it."""
    closed, index_of, _ = traced
    first: dict[int, str] = {}  # a module at several paths is scoped by its first
    for name, module in known.items():
        first.setdefault(id(module), name)
    owners = {}
    for name, module in known.items():
        weight = "embedding" if isinstance(module, nnx.Embed) else "kernel"
        key = (*map(str, modules[name][0]), weight)
        if key in index_of:
            owners[closed.jaxpr.invars[index_of[key]]] = (first[id(module)], weight)
    for name, read in sorted(reads.reads_outside(closed.jaxpr, owners).items()):
        raise ValueError(
            f"inject: layer '{name}' (a {type(known[name]).__name__}) cannot be adapted: "
            + reads.refusal(read)
        )


def _checked_tied(tied_products: Any, inputs: Sequence | None) -> dict[str, str]:
    """``inject``'s ``tied_products`` as a dict, checked to be {layer path: method name} and
    given with ``inputs`` (a tied weight is found by tracing)."""
    if tied_products is None:
        return {}
    if not isinstance(tied_products, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in tied_products.items()
    ):
        raise TypeError(
            "inject: tied_products must map layer paths to the name of the method computing "
            f"the tied weight's product (e.g. {{'embedder': 'decode'}}), got {tied_products!r}"
        )
    if tied_products and inputs is None:
        raise ValueError(
            "inject: tied_products needs inputs= (a tied weight's product and lookups are "
            "found by tracing model(*inputs))"
        )
    return dict(tied_products)


def _check_tied_layers(tied: Mapping[str, str], modules, by_product: Mapping[str, Any]) -> None:
    """A ``ValueError`` for a ``tied_products`` entry that names no layer to be adapted at its
    product, or a method its class lacks."""
    for name, method in tied.items():
        if name not in by_product:
            raise ValueError(
                f"inject: tied_products names layer {name!r}, which the targets do not choose "
                f"to adapt at its product (chosen so: {sorted(by_product)}); name a targeted "
                "layer by its path"
            )
        module = modules[name][1]
        if not callable(getattr(type(module), method, None)):
            raise ValueError(
                f"inject: tied_products gives layer {name!r} the method {method!r}, which its "
                f"class {type(module).__name__} does not have"
            )


def _check_tied_methods(model, modules, built, tied: Mapping[str, str], inputs, kept) -> None:
    """Puts the model back as it was and raises unless each tied layer's named method
    computes its branch in ``model(*inputs)``: a method that does not compute the product
    would leave the adapter silently unused."""
    layers = {n: layer for names, layer in built for n in names if n in tied}
    unused = unused_products(model, layers, inputs)
    if not unused:
        return
    for names, _ in built:
        for alias in names:
            _replace(model, modules[alias][0], modules[alias][1])
    for weight, value in kept:
        weight[...] = value
    name = unused[0]
    raise ValueError(
        f"inject: tied_products names method {tied[name]!r} for layer {name!r}, but "
        f"model(*inputs) computes no product of its weight in that method (name the method "
        "that computes it, e.g. decode for a tied lm_head); the model was left unchanged"
    )


def _maybe_stacks(
    modules: dict[str, tuple[tuple, nnx.Module]], layer_names, inputs
) -> dict[str, list[str]]:
    """{path: per-layer paths} that each module to be adapted at its product could have as a
    stack (``nnx.vmap``), its layer index after any of its path's prefixes: it is known to be
    one only once traced, but targets and patterns may name its layers before."""
    if inputs is None:
        return {}
    maybe = {}
    for name, (path, module) in modules.items():
        if not path or isinstance(module, LoRALinear | Adapter | OpAdapter):
            continue
        first = _first_param(module)
        if first is None or not first.ndim or not _by_product(module, name, inputs):
            continue
        parts = name.split(".")
        paths = []
        for k in range(1, len(parts) + 1):
            try:
                paths += stacks.layer_paths(name, ".".join(parts[:k]), first.shape[0], layer_names)
            except ValueError:  # a bad layer_names template: told where it applies
                continue
        maybe[name] = paths
    return maybe


def _first_param(module: nnx.Module) -> nnx.Param | None:
    """The first ``nnx.Param`` attribute (the one a stack's length is read from, ``_length``)."""
    return next((v for v in vars(module).values() if type(v) is nnx.Param), None)


def _chosen_stacks(modules, products, config: LoRAConfig, layer_names, chosen, only) -> list[str]:
    """``chosen`` again, now that tracing has told which modules adapted at their product are
    stacks: targets select with the per-layer paths they really have (a stack in all its
    layers or none; a module chosen only by the per-layer paths it would have as a stack, and
    that is none, is left out). A ``ValueError`` for a module chosen by its real per-layer
    paths that was not traced (its paths as a supposed stack differed)."""
    stacked = {
        name: depth
        for name, found in products.items()
        if (depth := _product_stack(modules[name][1], found, f"inject: layer '{name}'"))
    }
    per_layer = per_layer_paths(modules, layer_names, stacked)
    also = list(only)  # target_parameters' modules, which a pattern key may match
    again = stacks.select(list(modules), per_layer, config, also=also) if config.targets else []
    untraced = [n for n in again if n not in chosen]
    if untraced:
        raise ValueError(
            f"inject: targets {config.targets!r} choose layer '{untraced[0]}' by per-layer "
            "paths known only after tracing; target it by its own (stack) path"
        )
    return sorted({*again, *only})


def _check_product_stacks(modules, products: Mapping, config: LoRAConfig, layer_names) -> None:
    """Stacked modules adapted at their product (found through ``nnx.scan``) get one (r, alpha)
    for all their layers, as stacked ``nnx.Linear`` layers do (``stacks.check_uniform``), and
    all their adapted weights stacked alike."""
    stacked = {}
    for name, found in products.items():
        depth = _product_stack(modules[name][1], found, f"inject: layer '{name}'")
        if depth:
            stacked[name] = depth
    if not stacked:
        return
    per_layer = per_layer_paths(modules, layer_names, stacked)
    for name in stacked:
        stacks.check_uniform(config, name, per_layer[name], f"inject: layer '{name}'")


def _product_stack(module: nnx.Module, found: Mapping[str, Any], where: str) -> int:
    """How many leading layer axes (an ``nnx.vmap`` stack) the weights of a module adapted at
    their products have beyond their roles' shapes: the same for all of them, or a
    ``ValueError``."""
    depths = {w: getattr(module, w).ndim - len(roles.shape) for w, roles in found.items()}
    if len(set(depths.values())) > 1:
        raise ValueError(
            f"{where}: its adapted weights are stacked differently (leading layer axes "
            f"{depths}): the weights of one module must be stacked together"
        )
    return next(iter(depths.values()))


def _weight(module: nnx.Module) -> nnx.Variable:
    """The weight the adapter of a layer of a known kind goes on."""
    return getattr(module, "embedding" if isinstance(module, nnx.Embed) else "kernel")


def _weights(module: nnx.Module, products: Mapping[str, Any] | None) -> list[nnx.Variable]:
    """The weights adapters go on: an op-level module's ``products``' (by weight name)."""
    if products is not None:
        return [getattr(module, w) for w in products]
    return [_weight(module)]


def _by_parameter(
    modules: Mapping[str, tuple[tuple, nnx.Module]], config: LoRAConfig, chosen: list[str]
) -> dict[str, list[str]]:
    """{module path: its weights ``config.target_parameters`` names} for the modules ``targets``
    does not choose (those adapt all their product weights); a ``ValueError`` for an entry
    that names no ``nnx.Param`` of any module (a typo)."""
    if not config.target_parameters:
        return {}
    keys = {
        f"{name}.{attr}": (name, attr)
        for name, (path, module) in modules.items()
        if path
        for attr, var in vars(module).items()
        if isinstance(var, nnx.Param)
    }
    only: dict[str, list[str]] = {}
    for key in config.select_parameters(keys):
        name, attr = keys[key]
        if name not in chosen:
            only.setdefault(name, []).append(attr)
    return only


def _build(
    base: nnx.Module,
    name: str,
    config: LoRAConfig,
    param_dtype: Any,
    rngs: nnx.Rngs,
    product: Mapping[str, Any] | None = None,
    method: str | None = None,
) -> nnx.Module:
    """The LoRA layer for ``base`` (the layer at ``name``), sharing its weights; ``product``
    ({weight name: axis roles}) for a module adapted at the products its weights enter;
    ``method``: a tied one's, computing its product (``inject``'s ``tied_products``)."""
    options = dict(
        r=config.rank_for(name),
        alpha=config.alpha_for(name),
        use_rslora=config.use_rslora,
        init=config.init,
        use_dora=config.use_dora,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    if not isinstance(base, nnx.Embed):
        options["dropout"] = config.dropout
    wrap: Callable[..., nnx.Module]
    if product is not None:
        del options["use_dora"]
        tied: dict[str, Any] = {} if method is None else {"method": method, "lookups": True}
        wrap = functools.partial(adapt, products=product, **tied)
    elif isinstance(base, nnx.Linear):
        wrap = LoRALinear.from_linear
    else:
        wrap = _ADAPTED[type(base)].from_base
    if product is None:
        weight, stack = _weight(base), stack_of(base)
    else:
        weight = getattr(base, next(iter(product)))
        stack = _product_stack(base, product, f"inject: layer '{name}'")
    return _per_layer(wrap, weight, stack, base, **options)


def merge(model: nnx.Module, *, requantize: bool = False) -> nnx.Module:
    """Replaces, in place, every LoRA layer by its plain NNX layer holding the merged weight.

    ``weight + scaling · lora_a @ lora_b`` is computed in fp32 and rounded once to the weight's
    dtype; non-finite results are refused before any layer is replaced. Returns ``model``.

    A ``LoRALinear`` or op-level adapter with a quantized weight (``jaxlora.nnx.quantize_base``)
    is merged from its dequantized weight. By default it becomes its plain layer with that
    float weight (error against merging into the unquantized weight: its quantization error,
    as for ``jaxlora.merge``). With ``requantize=True`` it keeps a quantized base instead: it
    stays the adapted layer (no plain layer runs a quantized weight) whose weight is the float
    merge quantized again in the same format and layout and whose ``lora_b`` is zero, so its
    output is exactly the re-quantized merged base, ready for a new adapter. That adds one
    quantization error, bounded as ``jaxlora.merge`` states. Other LoRA layers merge as
    usual; ``requantize=True`` on a model without a quantized LoRA layer is refused, as is any
    model served with adapter stacks (``to_multi``: many adapters, no one delta to merge).
    """
    _refuse_stacks(model)
    plain, requantized = [], []
    for names in _groups(_module_paths(model)).values():
        path, layer = names[0]
        if isinstance(layer, LoRALinear | Adapter | OpAdapter):
            try:
                if requantize and isinstance(layer, LoRALinear | OpAdapter) and layer.is_quantized:
                    requantized.append((layer, _requantized(layer)))
                else:
                    plain.append(([p for p, _ in names], _merged(layer)))
            except ValueError as err:
                where = ".".join(map(str, path))
                raise ValueError(
                    f"merge: layer '{where}': {err}; the model was left unchanged"
                ) from None
    if requantize and not requantized:
        raise ValueError(
            "merge: requantize=True needs a LoRALinear with a quantized kernel or an op-level "
            "adapter with a quantized weight (jaxlora.nnx.quantize_base) and the model has "
            "none; it was left unchanged"
        )
    for layer, weights in requantized:
        for name, weight in weights.items():
            setattr(layer, name, weight)
            lora_b = layer.factors(name)[1] if isinstance(layer, OpAdapter) else layer.lora_b
            lora_b[...] = jnp.zeros_like(lora_b[...])
    for paths, linear in plain:
        for path in paths:
            _replace(model, path, linear)
    if hasattr(model, "lora_config") and not requantized:
        del model.lora_config
    return model


def _refuse_stacks(model: nnx.Module) -> None:
    """A ``ValueError`` for a model served with adapter stacks (``to_multi``): its layers hold
    many adapters and no one delta, so merging had nothing to fold and returned the base
    weights as if merged."""
    stacked = sorted(
        p
        for p, (_, m) in _module_paths(model).items()
        if isinstance(getattr(m, "occupied", None), StackedAdapter)
    )
    if stacked:
        raise ValueError(
            f"merge: layers {stacked} are adapter stacks (jaxlora.nnx.to_multi), which hold "
            "many adapters and no one delta to merge; merge the single-adapter model that was "
            "put into a slot instead; the model was left unchanged"
        )


def _requantized(layer: LoRALinear | OpAdapter) -> dict[str, nnx.Variable]:
    """{weight name: its merge, re-quantized} of a quantized layer (an op-level one may have
    several adapted weights)."""
    return layer.requantized() if isinstance(layer, OpAdapter) else {"kernel": layer.requantized()}


def _per_layer(
    wrap, weight: nnx.Variable, stack: int, base: nnx.Module, *, rngs: nnx.Rngs, **options
) -> nnx.Module:
    """``wrap(base, rngs=rngs, **options)``, or for a stacked layer (its ``weight`` has
    ``stack`` leading layer axes) ``wrap`` on each layer's slice under ``nnx.vmap`` with the
    rngs split per layer: the new layer's state (the shared weight, the adapter, dropout's
    rng stream) is stacked as the base's was."""
    if not stack:
        return wrap(base, rngs=rngs, **options)
    # A weight whose sharding names cover the layer axis (nnx.vmap(transform_metadata=
    # {nnx.PARTITION_NAME: ...})) is seen per layer only when the same axis name is given here;
    # the adapter then gets it as its leading name too.
    metadata = weight.get_metadata()
    names = next((metadata[k] for k in _SHARDING_KEYS if metadata.get(k) is not None), None)
    extra: dict[str, Any] = {}
    if names is not None and len(names) == weight.ndim:
        if names[0] is None:
            raise ValueError(
                f"inject: the stacked layer's weight has sharding names {tuple(names)} with an "
                "unnamed layer axis; make it with nnx.vmap(..., transform_metadata="
                "{nnx.PARTITION_NAME: 'layers'}) so the adapter can be stacked alike"
            )
        extra["transform_metadata"] = {nnx.PARTITION_NAME: names[0]}

    @nnx.split_rngs(splits=weight.shape[0])
    @nnx.vmap(in_axes=(0, 0), out_axes=0, **extra)
    def each(layer: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        return wrap(layer, rngs=rngs, **options)

    return each(base, rngs)


def _length(module: nnx.Module, product: Any = None) -> int:
    """L of a stacked layer; ``product``: a module to be adapted at its product (its weight
    is found by tracing, so only its length is known: any truthy value)."""
    if isinstance(module, OpAdapter):
        return getattr(module, module.lora_weights[0]).shape[0]
    first = _first_param(module)
    if product and first is not None:
        return first.shape[0]
    return _weight(module).shape[0]


def _merged(layer: LoRALinear | Adapter | OpAdapter) -> nnx.Module:
    """``layer.to_base()``, per layer under ``nnx.vmap`` for a stacked one (checking the
    merged weight is finite once, outside)."""
    if not stack_of(layer):
        return layer.to_base()
    if isinstance(layer, OpAdapter):  # each layer's delta in its weight's own axis order
        pairs = []
        for name, roles in layer.lora_products:
            one = functools.partial(_product_delta, roles, layer.scaling)
            pairs.append(
                (getattr(layer, name), jax.vmap(one)(*(f[...] for f in layer.factors(name))))
            )
    else:
        weight = getattr(layer, "embedding" if isinstance(layer, nnx.Embed) else "kernel")
        kind, in_axes = (
            ("linear", 1) if isinstance(layer, LoRALinear) else (layer.kind, layer.in_axes)
        )
        a, b = layer.lora_a[...], layer.lora_b[...]
        delta = kinds.delta(kind, weight.shape, a, b, layer.scaling, in_axes, stack=1)
        pairs = [(weight, delta)]
    for weight, delta in pairs:
        with_delta = kernel_value(weight).astype(jnp.float32) + delta
        if not bool(jnp.isfinite(with_delta.astype(weight.dtype)).all()):
            raise ValueError("the merged weight has non-finite values")
    return nnx.vmap(lambda one: one.to_base(), in_axes=0, out_axes=0)(layer)


def _product_delta(roles, scale: float, lora_a, lora_b) -> jax.Array:
    return oplevel.delta(roles, lora_a, lora_b, scale)


def per_layer_paths(
    modules: dict[str, tuple[tuple, nnx.Module]],
    layer_names: Mapping[str, str] | None,
    products: Mapping[str, int] | None = None,
) -> dict[str, list[str]]:
    """{path: per-layer paths} of every stacked supported layer. The index goes after the
    outermost module whose adaptable layers are all stacked (where ``nnx.vmap`` made them).
    ``products``: {path: layer axes} of the modules to be adapted at their product."""
    adaptable = {n: stack_of(m) for n, (_, m) in modules.items() if _supported(m)}
    adaptable.update(products or {})
    out = {}
    for name, stack in adaptable.items():
        if stack != 1:
            continue
        parts = name.split(".")
        prefixes = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
        scan = next(
            p
            for p in prefixes
            if all(s for n, s in adaptable.items() if n == p or n.startswith(p + "."))
        )
        try:
            length = _length(modules[name][1], (products or {}).get(name))
            out[name] = stacks.layer_paths(name, scan, length, layer_names)
        except ValueError as err:
            raise ValueError(f"inject: layer '{name}': {err}") from None
    return out


def _supported(module: nnx.Module) -> bool:
    # Adapted layers count too: the adapter files name an injected stack's layers the same way.
    return isinstance(module, nnx.Linear | LoRALinear | Adapter | OpAdapter) or (
        type(module) in _ADAPTED
    )


def trainable_parameters(model: nnx.Module) -> ParamCount:
    """Counts ``nnx.LoRAParam`` elements against all ``nnx.Param`` elements."""

    def count(state) -> int:
        return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))

    return ParamCount(count(nnx.state(model, nnx.LoRAParam)), count(nnx.state(model, nnx.Param)))


def _module_paths(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
    """{'.'-joined path: (path, module)} for every path at which a module can be reached.

    ``nnx.iter_modules`` yields a module reachable under several paths (tied) only once, under
    the first; surgery must see every path, or replacing it under one name breaks the tie.
    """
    found: dict[str, tuple[tuple, nnx.Module]] = {}

    def walk(node, path: tuple, above: frozenset) -> None:
        if isinstance(node, nnx.Module):
            found[".".join(map(str, path))] = (path, node)
        impl = graph.get_node_impl(node)
        if impl is None or id(node) in above:  # a reference cycle: its paths repeat forever
            return
        for key, child in impl.node_dict(node).items():
            if graph.is_node(child):
                walk(child, (*path, key), above | {id(node)})

    walk(model, (), frozenset())
    return found


def _groups(paths: dict[str, tuple[tuple, nnx.Module]]) -> dict[int, list[tuple[tuple, Any]]]:
    """The paths grouped by the module object they reach, in path order."""
    groups: dict[int, list] = {}
    for name in sorted(paths):
        groups.setdefault(id(paths[name][1]), []).append(paths[name])
    return groups


def _tied(modules: dict, chosen: list[str], config: LoRAConfig) -> list[list[str]]:
    """The chosen paths grouped by module; a ``ValueError`` if a tied module is targeted under
    some of its paths only, or with different ranks or alphas (its layers would differ)."""
    names_of: dict[int, list[str]] = {}
    for name in modules:
        names_of.setdefault(id(modules[name][1]), []).append(name)
    groups, targeted = [], set(chosen)
    for name in chosen:
        names = names_of[id(modules[name][1])]
        if name != next(n for n in names if n in targeted):
            continue
        missed = [n for n in names if n not in targeted]
        settings = {(config.rank_for(n), config.alpha_for(n)) for n in names}
        if missed or len(settings) > 1:
            why = (
                f"targets {config.targets!r} match only {[n for n in names if n in targeted]}"
                if missed
                else f"rank_pattern/alpha_pattern give them different (r, alpha): {settings}"
            )
            raise ValueError(
                f"inject: one {type(modules[name][1]).__name__} is reachable (tied) as "
                f"{', '.join(repr(n) for n in names)}, but {why}; adapt all of its paths alike "
                "or none, so that the tie is kept"
            )
        groups.append(names)
    return groups


def _replace(model: nnx.Module, path: tuple, module: nnx.Module) -> None:
    parent: Any = model  # a module, or a list or dict of them
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)
