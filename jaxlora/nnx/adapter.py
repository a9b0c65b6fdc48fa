"""Adapter files in PEFT's format for NNX models (the format itself is ``jaxlora/adapter.py``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import jax.numpy as jnp
import numpy as np
from flax import nnx

from _loracore.config import WEIGHT_INITS
from _loracore.peft_format import (
    check_layer_set,
    check_pair,
    check_paths_exist,
    file_config,
    magnitude_key,
    magnitude_shape,
    map_path,
    residual_needed,
    tensor_keys,
)
from jaxlora import hf_maps, kinds
from jaxlora.adapter import read_adapter, write_adapter
from jaxlora.config import LoRAConfig
from jaxlora.core import scaling
from jaxlora.hf_maps import HFLayout, HFLinear
from jaxlora.inject import init_leaves
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.conv import LoRAConv
from jaxlora.nnx.embed import LoRAEmbed
from jaxlora.nnx.general import LoRALinearGeneral
from jaxlora.nnx.inject import inject, per_layer_paths, stack_of
from jaxlora.nnx.layer import LoRALinear
from jaxlora.nnx.oplevel import OpAdapter

ADAPTED = (LoRALinear, Adapter)


def _op_layouts(
    model: nnx.Module, path_map: hf_maps.SpecMap, layer_names: Mapping[str, str] | None = None
) -> dict[str, tuple[OpAdapter, str, HFLayout, int | None]]:
    """{key: (op-level layer, weight name, its torch layout, layer index)} per ``path_map`` (a
    torch path or an ``HFLinear``, see ``jaxlora.hf_maps``); refuses bad specs by layer
    name. The key, which ``path_map`` maps, is the layer's NNX path, or
    ``<path>.<weight>`` for each weight of a layer with several adapted weights (by default its
    own torch path: a torch twin holding one Linear per weight under the weight's name). A
    stacked layer (``nnx.vmap``, run by ``nnx.scan``) appears once per layer, under its
    per-layer path (``jaxlora.stacks``), with its index: PEFT files know no stacks."""
    modules = {".".join(map(str, p)): (p, m) for p, m in nnx.iter_modules(model) if p}
    per_layer = per_layer_paths(modules, layer_names)
    out: dict[str, tuple[OpAdapter, str, HFLayout, int | None]] = {}
    for name, (_, module) in modules.items():
        if not isinstance(module, OpAdapter):
            continue
        layers: list[tuple[str, int | None]] = [(name, None)]
        if stack_of(module):
            layers = list(zip(per_layer[name], range(len(per_layer[name])), strict=True))
        several = len(module.lora_products) > 1
        for path, index in layers:
            for weight_name, roles in module.lora_products:
                key = f"{path}.{weight_name}" if several else path
                weight = getattr(module, weight_name)
                where = f"layer '{path}', weight '{weight_name}' {tuple(weight.shape)}"
                if index is not None:
                    where += f" (layer {index} of the stack '{name}')"
                spec = hf_maps.product_spec(path_map, key)
                out[key] = (module, weight_name, hf_maps.layout(spec, roles, where), index)
    torch_paths = [t for _, _, lay, _ in out.values() for t in lay.paths]
    twice = sorted({t for t in torch_paths if torch_paths.count(t) > 1})
    if twice:
        raise ValueError(f"path_map names the torch module(s) {twice} for several weights")
    return out


# (kind, base weight shape, input axes) of a layer an adapter can go to.
LayerShape = tuple[str, tuple[int, ...], int]


def describe(module: nnx.Module) -> LayerShape | None:
    """(kind, base weight shape, input axes) of a layer an adapter can go to, else ``None``."""
    if isinstance(module, nnx.Linear | LoRALinear):
        return "linear", (module.in_features, module.out_features), 1
    if isinstance(module, nnx.LinearGeneral | LoRALinearGeneral):
        shape = (*module.in_features, *module.out_features)
        return "linear", shape, len(module.in_features)
    if isinstance(module, nnx.Conv | LoRAConv):
        return "conv", tuple(module.kernel_shape), 1
    if isinstance(module, nnx.Embed | LoRAEmbed):
        return "embed", (module.num_embeddings, module.features), 1
    return None


def save_adapter(
    model: nnx.Module,
    directory: str | os.PathLike,
    config: LoRAConfig | None = None,
    *,
    path_map: hf_maps.PathMapArg = None,
    layer_names: Mapping[str, str] | None = None,
) -> Path:
    """Writes the model's LoRA layers' adapters as a PEFT adapter; returns the directory.

    ``config`` defaults to the one ``inject`` remembered (``model.lora_config``); each layer's
    own rank and alpha are written. ``path_map`` maps a '.'-joined NNX path to the torch module
    path where names differ. A stacked (``nnx.vmap``) layer is written as PEFT's per-layer keys,
    its per-layer paths named as ``inject`` names them (``blocks.3.attn.query``, or per
    ``layer_names``; see ``jaxlora.stacks``), before ``path_map`` applies.

    An op-level layer (``inject(..., inputs=)``) is written as the torch ``nn.Linear``
    module(s) its ``path_map`` value names: a torch path, or a ``jaxlora.HFLinear`` giving the
    axis orders or a fused weight's modules (one shared A; see ``jaxlora.hf_maps``). One with
    a batch axis (an adapter per MoE expert) is one torch Linear per expert, named by
    ``HFLinear(experts=...)``; without it, refused.

    ``path_map`` may also name a ready map for a third-party model (``"tunix.llama3"``,
    ``"tunix.qwen3"``, ``"tunix.gemma3"``; see ``jaxlora.hf_maps.NAMED_MAPS``); an unknown
    name is refused, naming the known ones.
    """
    path_map = hf_maps.resolve(path_map)
    config = config if config is not None else getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("save_adapter: pass a LoRAConfig (the model has no lora_config)")
    ops = _op_layouts(model, path_map, layer_names)
    views = _views(model, path_map, layer_names)
    layers = {p: (n, m, i) for p, (n, m, i, _) in views.items() if isinstance(m, ADAPTED)}
    if not layers and not ops:
        raise ValueError("save_adapter: the model has no LoRA layers")
    clash = sorted(set(views) & {t for _, _, lay, _ in ops.values() for t in lay.paths})
    if clash:
        raise ValueError(f"save_adapter: path_map names the torch module(s) {clash} twice")
    modules = [m for _, m, _ in layers.values()] + [m for m, _, _, _ in ops.values()]
    for flag in ("use_rslora", "use_dora"):
        if any(getattr(m, flag, False) != getattr(config, flag) for m in modules):
            raise ValueError(f"save_adapter: the layers' {flag} differs from the config's")
    tensors = {}
    for path, (_, layer, index) in layers.items():
        kind = cast(LayerShape, describe(layer))[0]  # an adapted layer is described
        key_a, key_b = tensor_keys(path, kind)
        a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
        if index is not None:  # one layer of a stack
            a, b = a[index], b[index]
        tensors[key_a], tensors[key_b] = kinds.to_torch(kind, a, b)
        if config.use_dora:  # DoRA layers are never stacked (inject refuses)
            m = np.asarray(layer.lora_magnitude[...])
            window = a.ndim - 2 if kind == "conv" else 0
            tensors[magnitude_key(path)] = m.reshape(magnitude_shape(kind, m.shape[0], window))
    ranks = {
        p: (m.r, float(m.r if m.alpha is None else m.alpha)) for p, (_, m, _) in layers.items()
    }
    for name, (module, weight, lay, index) in ops.items():
        hf_maps.check_op_init(module.lora_init, config, f"save_adapter: layer '{name}'", "save")
        a, b = (np.asarray(f[...]) for f in module.factors(weight))
        if index is not None:  # one layer of a stack
            a, b = a[index], b[index]
        for path, pair in hf_maps.to_peft(lay, a, b).items():
            key_a, key_b = tensor_keys(path, "linear")
            tensors[key_a], tensors[key_b] = pair
            ranks[path] = (module.r, float(module.r if module.alpha is None else module.alpha))
    lays = [lay for _, _, lay, _ in ops.values()]
    peft = file_config(
        config,
        ranks,
        [*views, *(t for lay in lays for t in lay.paths)],
        fan_in_fan_out=hf_maps.fan_in_fan_out(lays, len(ranks)),
    )
    write_adapter(directory, tensors, peft)
    return Path(directory)


def load_adapter(
    model: nnx.Module,
    directory: str | os.PathLike,
    *,
    path_map: hf_maps.PathMapArg = None,
    layer_names: Mapping[str, str] | None = None,
) -> nnx.Module:
    """Loads the adapter in ``directory`` into ``model`` in place; returns ``model``.

    Into a plain model the file's ``target_modules`` are injected first; into an injected model
    the adapters are replaced (and their alpha set to the file's). Strict, and the model is left
    unchanged by a failed load (see ``jaxlora.load_adapter``). PiSSA/OLoRA files as in
    ``torchlora.load_adapter``: the residual is built for a plain or kaiming/gaussian-injected
    layer, and a PiSSA/OLoRA-injected layer takes only a file of its own init (and, for OLoRA,
    scaling); each layer records its ``init``. A stacked (``nnx.vmap``) layer takes the file's
    per-layer adapters (named as in ``save_adapter``), all of its layers, with one rank and
    alpha (PiSSA/OLoRA files are refused for stacked layers).

    Op-level layers are loaded only into a model already injected with ``inputs=`` (the
    product, hence the layout, is found by tracing), from the torch module(s) ``path_map``
    names for them (as in ``save_adapter``): a fused weight's modules must hold the same
    ``lora_A`` and one alpha; PiSSA/OLoRA files are refused for them. ``path_map`` may name a
    ready map, as for ``save_adapter``.
    """
    path_map = hf_maps.resolve(path_map)
    ops = _op_layouts(model, path_map, layer_names)
    specs = (map_path(path_map, ".".join(map(str, p))) for p, _ in nnx.iter_modules(model) if p)
    conv1d = hf_maps.conv1d_of(specs) or any(lay.conv1d for _, _, lay, _ in ops.values())
    config, everything = read_adapter(directory, conv1d=conv1d)
    op_paths = {t for _, _, lay, _ in ops.values() for t in lay.paths}
    views = _views(model, path_map, layer_names)
    modules = {p: v[1] for p, v in views.items()}
    _refuse_unadapted_ops(model, path_map, set(everything), directory)
    check_paths_exist(set(everything), {**modules, **dict.fromkeys(op_paths)}, path_map, directory)
    layers = {p: m for p, m in modules.items() if isinstance(m, ADAPTED)}
    injected = bool(layers or ops)
    expected = set(layers) | op_paths if injected else set(config.select(modules, strict=False))
    check_layer_set(expected, set(everything), directory)
    op_values = _ops_from_file(ops, everything, config, directory)
    tensors = {p: t for p, t in everything.items() if p not in op_paths}
    shapes = {}
    for path, (a, b, kind) in tensors.items():
        module = modules[path]
        found = describe(module)
        if found is None:
            raise ValueError(
                f"{directory}: layer '{path}' is a {type(module).__name__}, which cannot hold "
                "an adapter"
            )
        layer_kind, shape, in_axes = shapes[path] = found
        described = (
            layer_kind,
            f"{type(module).__name__} with weight {shape}",
            lambda r, k=layer_kind, s=shape, n=in_axes: kinds.torch_shapes(k, s, r, n),
        )
        check_pair(path, kind, a, b, described, directory)
        if isinstance(module, ADAPTED) and module.r != a.shape[0]:
            raise ValueError(
                f"{directory}: layer '{path}' has rank {a.shape[0]} in the file "
                f"but {module.r} in the model"
            )
        if isinstance(module, ADAPTED) and getattr(module, "use_dora", False) != config.use_dora:
            raise ValueError(
                f"{directory}: layer '{path}' has use_dora="
                f"{getattr(module, 'use_dora', False)} but the file has use_dora={config.use_dora}"
            )
    if config.use_dora and ops:
        raise ValueError(
            f"{directory}: a DoRA adapter (use_dora=true) cannot be loaded into op-level layers "
            f"({', '.join(sorted(ops))}): DoRA is implemented for unstacked nnx.Linear, nnx.Conv "
            "and nnx.Embed layers only"
        )
    _check_stacks(views, tensors, config, directory)
    residual = [
        path
        for path, (a, _, _) in tensors.items()
        if path in layers and _needs(config, path, a.shape[0], layers[path], directory)
    ]
    if not injected:
        # Inject exactly the file's layers, named by their NNX paths (a stack by its own path
        # and its per-layer paths), with their ranks.
        exact = {}
        for t, (a, _, _) in tensors.items():
            nnx_path, _, index, local = views[t]
            exact[nnx_path] = (a.shape[0], config.alpha_for(t))
            if index is not None:
                exact[local] = exact[nnx_path]
        inject(model, config.for_layers(exact), nnx.Rngs(0), layer_names=layer_names)
        views = _views(model, path_map, layer_names)
        layers = {p: v[1] for p, v in views.items() if isinstance(v[1], ADAPTED)}
    for path in residual:  # a kaiming-injected layer still holds W: build the residual from it
        layer, (_, _, in_axes) = layers[path], shapes[path]
        scale = scaling(layer.r, config.alpha_for(path), use_rslora=config.use_rslora)
        kernel = layer.kernel[...]
        make = init_leaves(kernel, layer.r, scale, config.init, None, kernel.dtype, in_axes=in_axes)
        layer.kernel[...] = make["kernel"]
        layer.init = config.init
    stacked: dict[int, tuple[LoRALinear | Adapter, dict[int, tuple]]] = {}
    for path, (a, b, _) in tensors.items():
        layer, index = layers[path], views[path][2]
        kind, shape, in_axes = shapes[path]
        lora_a, lora_b = kinds.from_torch(kind, a, b, shape, in_axes)
        if index is None:
            layer.lora_a[...] = jnp.asarray(lora_a, layer.lora_a.dtype)
            layer.lora_b[...] = jnp.asarray(lora_b, layer.lora_b.dtype)
            if config.use_dora:
                m = tensors[path].magnitude
                layer.lora_magnitude[...] = jnp.asarray(m, layer.lora_magnitude.dtype)
        else:  # gathered, then written as one stacked array per factor
            stacked.setdefault(id(layer), (layer, {}))[1][index] = (lora_a, lora_b)
        layer.alpha, layer.use_rslora = config.alpha_for(path), config.use_rslora
    for layer, pieces in stacked.values():
        order = [pieces[i] for i in range(len(pieces))]
        layer.lora_a[...] = jnp.asarray(np.stack([a for a, _ in order]), layer.lora_a.dtype)
        layer.lora_b[...] = jnp.asarray(np.stack([b for _, b in order]), layer.lora_b.dtype)
    for layer, weight, lora_a, lora_b, alpha in _stack_ops(op_values):
        var_a, var_b = layer.factors(weight)
        var_a[...] = jnp.asarray(lora_a, var_a.dtype)
        var_b[...] = jnp.asarray(lora_b, var_b.dtype)
        layer.alpha, layer.use_rslora = alpha, config.use_rslora
    # flax declares no attributes on nnx.Module; a module takes any.
    model.lora_config = config  # type: ignore[attr-defined]
    return model


def _ops_from_file(ops: dict, tensors: dict, config: LoRAConfig, directory) -> list[tuple]:
    """[(op-level layer, weight name, lora_a, lora_b, alpha)] from the file, each checked by
    ``hf_maps.read_op`` (the reader shared with Linen's product adapters); the weights of one
    layer must have one alpha (the layer has one scaling)."""
    out = []
    alphas: dict[int, dict[str, float]] = {}
    for name, (layer, weight, lay, index) in ops.items():
        where = f"{directory}: layer '{name}'"
        hf_maps.check_op_init(layer.lora_init, config, where, "load")
        a, b, alpha = hf_maps.read_op(lay, layer.r, tensors, config, where)
        out.append((layer, weight, index, a, b, alpha))
        alphas.setdefault(id(layer), {})[name] = alpha
    for found in alphas.values():
        if len(set(found.values())) > 1:
            raise ValueError(
                f"{directory}: the file gives one op-level layer (its several adapted weights, "
                f"or the layers of its stack) different alphas {found}: it has one scaling"
            )
    return out


def _stack_ops(values: list[tuple]) -> list[tuple]:
    """[(op-level layer, weight name, lora_a, lora_b, alpha)] with a stacked layer's per-layer
    values stacked on its layer axis (all its layers are in ``values``: ``_op_layouts`` lists
    each)."""
    out: list[tuple] = []
    stacked: dict[tuple[int, str], tuple[OpAdapter, dict[int, tuple]]] = {}
    for layer, weight, index, a, b, alpha in values:
        if index is None:
            out.append((layer, weight, a, b, alpha))
        else:
            stacked.setdefault((id(layer), weight), (layer, {}))[1][index] = (a, b, alpha)
    for (_, weight), (layer, pieces) in stacked.items():
        order = [pieces[i] for i in range(len(pieces))]
        a, b = (np.stack([piece[k] for piece in order]) for k in (0, 1))
        out.append((layer, weight, a, b, order[0][2]))
    return out


def _check_stacks(views: dict, tensors: dict, config: LoRAConfig, directory) -> None:
    """A stacked layer takes all of its layers from the file, with one (r, alpha) and a
    kaiming/gaussian init (a PiSSA/OLoRA residual would differ per layer)."""
    by_stack: dict[str, list[str]] = {}
    for path, (nnx_path, _, index, _) in views.items():
        if index is not None:
            by_stack.setdefault(nnx_path, []).append(path)
    for nnx_path, paths in by_stack.items():
        present = [p for p in paths if p in tensors]
        if not present:
            continue
        if len(present) != len(paths):
            missing = sorted(set(paths) - set(present))
            raise ValueError(
                f"{directory}: the stacked layer '{nnx_path}' needs all {len(paths)} layers' "
                f"adapters; the file lacks {', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}"
            )
        settings = {(tensors[p][0].shape[0], config.alpha_for(p)) for p in paths}
        if len(settings) > 1:
            raise ValueError(
                f"{directory}: the file gives the layers of the stacked layer '{nnx_path}' "
                f"different (r, alpha) {sorted(settings)}: a stacked layer has one of each"
            )
        if config.init in WEIGHT_INITS:
            raise ValueError(
                f"{directory}: an init={config.init!r} adapter cannot be loaded into the "
                f"stacked layer '{nnx_path}' (its residual base is per layer); load it into "
                "the unstacked model"
            )


def _needs(config: LoRAConfig, path: str, r: int, layer, directory) -> bool:
    file_scale = scaling(r, config.alpha_for(path), use_rslora=config.use_rslora)
    return residual_needed(
        path,
        cast(LayerShape, describe(layer))[0],
        (config.init, file_scale),
        (layer.init, layer.scaling),
        directory,
    )


def _refuse_unadapted_ops(model: nnx.Module, path_map: hf_maps.SpecMap, found: set[str], directory):
    """A file layer that ``path_map`` gives as (part of) an ``HFLinear`` of a layer not adapted
    at its product: say to inject it first (its layout is found by tracing)."""
    for p, module in nnx.iter_modules(model):
        name = ".".join(map(str, p))
        spec = map_path(path_map, name) if p else None
        if isinstance(spec, HFLinear) and not isinstance(module, OpAdapter):
            paths = {spec.path} if isinstance(spec.path, str) else set(spec.path)
            if paths & found:
                raise ValueError(
                    f"{directory}: path_map gives {spec!r} for layer '{name}' (a "
                    f"{type(module).__name__}), which is not adapted at its product: an "
                    "HFLinear describes an op-level layer; inject it first "
                    "(jaxlora.nnx.inject(..., inputs=...)), then load"
                )


def _views(
    model: nnx.Module, path_map: hf_maps.SpecMap, layer_names: Mapping[str, str] | None
) -> dict[str, tuple[str, nnx.Module, int | None, str]]:
    """{file path: (NNX path, module, layer index, path before path_map)} for every module: a
    stacked layer appears once per layer, under its per-layer path (index set), since PEFT
    files know no stacks."""
    modules = {".".join(map(str, p)): (p, m) for p, m in nnx.iter_modules(model) if p}
    per_layer = per_layer_paths(modules, layer_names)
    out: dict[str, tuple[str, nnx.Module, int | None, str]] = {}
    for name, (_, module) in modules.items():
        if isinstance(module, OpAdapter):  # mapped by _op_layouts (torch path or HFLinear)
            continue
        spec = map_path(path_map, name)
        if isinstance(module, ADAPTED) and not isinstance(spec, str):
            raise ValueError(
                f"path_map gives {spec!r} for layer '{name}' (a {type(module).__name__}), "
                "whose adapter is written as one torch module: give its torch module path (a "
                "str); an HFLinear describes a layer adapted at its product (inject(..., "
                "inputs=...))"
            )
        if not isinstance(spec, str):
            # An HFLinear for a layer not adapted (a ready map names every fused weight,
            # adapted or not) is no layer of the file; load_adapter refuses a file naming it.
            continue
        if name in per_layer and stack_of(module):
            for index, path in enumerate(per_layer[name]):
                layer_spec = map_path(path_map, path)
                if not isinstance(layer_spec, str):
                    raise ValueError(
                        f"path_map gives {layer_spec!r} for layer '{path}' (one layer of the "
                        f"stacked '{name}'): give its torch module path (a str)"
                    )
                out[layer_spec] = (name, module, index, path)
        else:
            out[spec] = (name, module, None, name)
    return out
