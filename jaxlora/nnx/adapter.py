"""Adapter files in PEFT's format for NNX models (the format itself is ``jaxlora/adapter.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from _loracore.peft_format import (
    PathMap,
    check_layer_set,
    check_pair,
    check_paths_exist,
    file_config,
    map_path,
    residual_needed,
    tensor_keys,
)
from jaxlora import kinds
from jaxlora.adapter import read_adapter, write_adapter
from jaxlora.config import LoRAConfig
from jaxlora.core import scaling
from jaxlora.inject import init_leaves
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.conv import LoRAConv
from jaxlora.nnx.embed import LoRAEmbed
from jaxlora.nnx.general import LoRALinearGeneral
from jaxlora.nnx.inject import inject
from jaxlora.nnx.layer import LoRALinear

ADAPTED = (LoRALinear, Adapter)


def describe(module: nnx.Module) -> tuple[str, tuple[int, ...], int] | None:
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
    path_map: PathMap = None,
) -> Path:
    """Writes the model's LoRA layers' adapters as a PEFT adapter; returns the directory.

    ``config`` defaults to the one ``inject`` remembered (``model.lora_config``); each layer's
    own rank and alpha are written. ``path_map`` maps a '.'-joined NNX path to the torch module
    path where names differ.
    """
    config = config if config is not None else getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("save_adapter: pass a LoRAConfig (the model has no lora_config)")
    layers = _modules(model, path_map, ADAPTED)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers")
    if any(m.use_rslora != config.use_rslora for m in layers.values()):
        raise ValueError("save_adapter: the layers' use_rslora differs from the config's")
    tensors = {}
    for path, layer in layers.items():
        kind = describe(layer)[0]
        key_a, key_b = tensor_keys(path, kind)
        a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
        tensors[key_a], tensors[key_b] = kinds.to_torch(kind, a, b)
    alphas = {p: float(m.r if m.alpha is None else m.alpha) for p, m in layers.items()}
    peft = file_config(
        config,
        {p: (m.r, alphas[p]) for p, m in layers.items()},
        list(_modules(model, path_map, nnx.Module)),
    )
    write_adapter(directory, tensors, peft)
    return Path(directory)


def load_adapter(
    model: nnx.Module, directory: str | os.PathLike, *, path_map: PathMap = None
) -> nnx.Module:
    """Loads the adapter in ``directory`` into ``model`` in place; returns ``model``.

    Into a plain model the file's ``target_modules`` are injected first; into an injected model
    the adapters are replaced (and their alpha set to the file's). Strict, and the model is left
    unchanged by a failed load (see ``jaxlora.load_adapter``). PiSSA/OLoRA files as in
    ``torchlora.load_adapter``: the residual is built for a plain or kaiming/gaussian-injected
    layer, and a PiSSA/OLoRA-injected layer takes only a file of its own init (and, for OLoRA,
    scaling). A ``LoRALinear`` does not record its init: ``model.lora_config`` (set by
    ``inject`` and by this function) says it, and without one a PiSSA/OLoRA file is refused.
    """
    config, tensors = read_adapter(directory)
    modules = _modules(model, path_map, nnx.Module)
    check_paths_exist(set(tensors), modules, path_map, directory)
    layers = {p: m for p, m in modules.items() if isinstance(m, ADAPTED)}
    expected = set(layers) if layers else set(config.select(modules, strict=False))
    check_layer_set(expected, set(tensors), directory)
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
        layer = (
            layer_kind,
            f"{type(module).__name__} with weight {shape}",
            lambda r, k=layer_kind, s=shape, n=in_axes: kinds.torch_shapes(k, s, r, n),
        )
        check_pair(path, kind, a, b, layer, directory)
        if isinstance(module, ADAPTED) and module.r != a.shape[0]:
            raise ValueError(
                f"{directory}: layer '{path}' has rank {a.shape[0]} in the file "
                f"but {module.r} in the model"
            )
    residual = [
        path
        for path, (a, _, _) in tensors.items()
        if path in layers and _needs(model, config, path, a.shape[0], layers[path], directory)
    ]
    if not layers:
        local = {
            map_path(path_map, ".".join(map(str, p))): ".".join(map(str, p))
            for p, _ in nnx.iter_modules(model)
            if p
        }
        # Inject exactly the file's layers, named by their NNX paths, with their ranks.
        exact = {local[t]: (a.shape[0], config.alpha_for(t)) for t, (a, _, _) in tensors.items()}
        inject(model, config.for_layers(exact), nnx.Rngs(0))
        layers = _modules(model, path_map, ADAPTED)
    for path in residual:  # a kaiming-injected layer still holds W: build the residual from it
        layer, (_, _, in_axes) = layers[path], shapes[path]
        scale = scaling(layer.r, config.alpha_for(path), use_rslora=config.use_rslora)
        kernel = layer.kernel[...]
        make = init_leaves(kernel, layer.r, scale, config.init, None, kernel.dtype, in_axes=in_axes)
        layer.kernel[...] = make["kernel"]
        if isinstance(layer, Adapter):
            layer.init = config.init
    for path, (a, b, _) in tensors.items():
        layer = layers[path]
        kind, shape, in_axes = shapes[path]
        lora_a, lora_b = kinds.from_torch(kind, a, b, shape, in_axes)
        layer.lora_a[...] = jnp.asarray(lora_a, layer.lora_a.dtype)
        layer.lora_b[...] = jnp.asarray(lora_b, layer.lora_b.dtype)
        layer.alpha, layer.use_rslora = config.alpha_for(path), config.use_rslora
    model.lora_config = config
    return model


def _needs(model, config: LoRAConfig, path: str, r: int, layer, directory) -> bool:
    # Adapter layers know their init; LoRALinear does not, so the config inject remembered
    # (model.lora_config, which load_adapter also sets) says it, when there is one.
    remembered = getattr(model, "lora_config", None)
    layer_init = getattr(layer, "init", None) or getattr(remembered, "init", None)
    file_scale = scaling(r, config.alpha_for(path), use_rslora=config.use_rslora)
    return residual_needed(
        path, describe(layer)[0], (config.init, file_scale), (layer_init, layer.scaling), directory
    )


def _modules(model: nnx.Module, path_map: PathMap, kind) -> dict[str, nnx.Module]:
    return {
        map_path(path_map, ".".join(map(str, p))): m
        for p, m in nnx.iter_modules(model)
        if isinstance(m, kind) and p
    }
