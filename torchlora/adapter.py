"""Adapter files in Hugging Face PEFT's format, for torch models. Mirrors ``jaxlora/adapter.py``.

PEFT's ``PeftModel.from_pretrained`` reads what ``save_adapter`` writes, and ``load_adapter``
reads what PEFT's ``save_pretrained`` writes. The format and its safety rules (safetensors
only, atomic writes, strict reading) live in ``_loracore/peft_format.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import safetensors.torch
import torch
from torch import nn

from _loracore import peft_format
from _loracore.peft_format import (
    LayerShapes,
    check_layer_set,
    check_pair,
    file_config,
    magnitude_key,
    magnitude_shape,
    residual_needed,
    tensor_keys,
)
from torchlora import core
from torchlora.base import LoRALayer
from torchlora.config import LoRAConfig
from torchlora.conv import _ConvNd
from torchlora.embedding import Embedding
from torchlora.inject import inject
from torchlora.layer import Linear


def describe(module: nn.Module) -> LayerShapes | None:
    """(kind, description, r -> PEFT's (A, B) shapes) for a layer an adapter can go to."""
    if isinstance(module, nn.Embedding | Embedding):
        n, d = module.num_embeddings, module.embedding_dim
        return "embed", f"Embedding {n} x {d}", lambda r: ((r, n), (d, r))
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | _ConvNd):
        c_in, c_out, k = module.in_channels, module.out_channels, tuple(module.kernel_size)
        ones = (1,) * len(k)
        described = f"{type(module).__name__} {c_in} -> {c_out} {k}"
        return "conv", described, lambda r: ((r, c_in, *k), (c_out, r, *ones))
    if isinstance(module, nn.Linear | Linear):
        n_in, n_out = module.in_features, module.out_features
        return "linear", f"Linear {n_in} -> {n_out}", lambda r: ((r, n_in), (n_out, r))
    return None


def is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def write_adapter(directory, tensors, peft) -> None:
    peft_format.write_adapter(
        directory, tensors, peft, serialize=safetensors.torch.save, is_finite=is_finite
    )


def read_adapter(
    directory: str | os.PathLike,
) -> tuple[LoRAConfig, dict[str, peft_format.LayerTensors]]:
    """The adapter's config and {module path: (A, B)} as torch tensors, checked."""
    return peft_format.read_adapter(directory, framework="pt", is_finite=is_finite)


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, config: LoRAConfig | None = None
) -> Path:
    """Writes the model's adapters (``torchlora.Linear``, ``Embedding``, ``Conv1d/2d/3d``) as a PEFT
    adapter; returns the directory.

    ``config`` defaults to the one ``inject`` remembered (``model.lora_config``). Each layer's
    own rank and alpha are written (via ``rank_pattern``/``alpha_pattern`` where they differ),
    and ``target_modules`` so that PEFT rebuilds exactly these layers. Only the adapter's
    tensors are written, in their own dtype.
    """
    config = config if config is not None else getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("save_adapter: pass a LoRAConfig (the model has no lora_config)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    if not layers:
        raise ValueError("save_adapter: the model has no torchlora layers")
    for flag in ("use_rslora", "use_dora"):
        if len({getattr(m, flag) for m in layers.values()} | {getattr(config, flag)}) != 1:
            raise ValueError(f"save_adapter: the layers' {flag} differs from the config's")
    tensors = {}
    for path, layer in layers.items():
        key_a, key_b = tensor_keys(path, layer.kind)
        tensors[key_a] = layer.lora_a.detach().cpu().contiguous()
        tensors[key_b] = layer.lora_b.detach().cpu().contiguous()
        if layer.use_dora:
            shape = magnitude_shape(
                layer.kind, layer.lora_magnitude.shape[0], layer.weight.ndim - 2
            )
            m = layer.lora_magnitude.detach().cpu().reshape(shape)
            tensors[magnitude_key(path)] = m.contiguous()
    peft = file_config(
        config,
        {p: (m.r, m.alpha) for p, m in layers.items()},
        [n for n, _ in model.named_modules()],
    )
    write_adapter(directory, tensors, peft)
    return Path(directory)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Loads the adapter in ``directory`` into ``model``; returns ``model``.

    Into a plain model the layers selected by the file's ``target_modules`` are injected first
    (as PEFT's ``from_pretrained`` does); into an injected model the existing adapters are
    replaced, and their alpha set to the file's. Strict: a missing, unexpected or wrongly
    shaped tensor, a rank that disagrees with the config, a merged layer, a non-finite value
    or a damaged file is a ``ValueError`` naming the key, and the model is left unchanged.

    PiSSA/OLoRA files are relative to the residual W − scaling·B₀A₀ that PEFT builds from the
    base weight W. Into a plain model, or into a layer injected with "kaiming"/"gaussian"
    (which still holds W), the residual is built here, as PEFT does. A layer injected with
    "pissa"/"olora" already holds its residual: it takes a file of the same init (for OLoRA
    also the same scaling) and refuses any other, whose base W it cannot recover.
    """
    config, tensors = read_adapter(directory)
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if isinstance(m, LoRALayer)}
    expected = set(layers) if layers else set(config.select(modules, strict=False))
    check_layer_set(expected, set(tensors), directory)
    for path, (a, b, kind) in tensors.items():
        module = modules[path]
        shapes = describe(module)
        if shapes is None:
            raise ValueError(
                f"{directory}: layer '{path}' is a {type(module).__name__}, which cannot hold "
                "an adapter"
            )
        check_pair(path, kind, a, b, shapes, directory)
        if isinstance(module, LoRALayer) and module.merged:
            raise ValueError(f"{directory}: layer '{path}' is merged; unmerge() it first")
        if isinstance(module, LoRALayer) and module.use_dora != config.use_dora:
            raise ValueError(
                f"{directory}: layer '{path}' has use_dora={module.use_dora} but the file has "
                f"use_dora={config.use_dora}"
            )
        if isinstance(module, LoRALayer) and module.r != a.shape[0]:
            raise ValueError(
                f"{directory}: layer '{path}' has rank {a.shape[0]} in the file "
                f"but {module.r} in the model"
            )
    residual = [
        path
        for path, (a, _, kind) in tensors.items()
        if path in layers and _needs(config, path, a.shape[0], kind, layers[path], directory)
    ]
    if not layers:  # exactly the file's layers, with their ranks and alphas
        inject(model, config.for_layers(_ranks_alphas(config, tensors)))
    for path in residual:  # a kaiming-injected layer still holds W: build the residual from it
        layer = layers[path]
        layer.init, layer.alpha = config.init, config.alpha_for(path)
        layer.use_rslora = config.use_rslora
        layer.reset_lora_parameters()
    with torch.no_grad():
        for path, (a, b, _) in tensors.items():
            # Every file path is a LoRALayer now: checked above, or just injected.
            layer = cast(LoRALayer, model.get_submodule(path))
            layer.lora_a.copy_(a.to(layer.lora_a.dtype))
            layer.lora_b.copy_(b.to(layer.lora_b.dtype))
            if config.use_dora:
                m = tensors[path].magnitude
                layer.lora_magnitude.copy_(m.to(layer.lora_magnitude.dtype))
            layer.alpha = config.alpha_for(path)
            layer.use_rslora = config.use_rslora
    # torch types Module.__setattr__'s value as Tensor | Module; it stores any attribute.
    model.lora_config = config  # type: ignore[assignment]
    return model


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    """The ``LoRAConfig`` stored in an adapter directory."""
    return read_adapter(directory)[0]


def _needs(config: LoRAConfig, path: str, r: int, kind: str, layer: LoRALayer, directory) -> bool:
    scale = core.scaling(r, config.alpha_for(path), use_rslora=config.use_rslora)
    return residual_needed(path, kind, (config.init, scale), (layer.init, layer.scaling), directory)


def _ranks_alphas(config: LoRAConfig, tensors) -> dict[str, tuple[int, float]]:
    return {p: (a.shape[0], config.alpha_for(p)) for p, (a, _, _) in tensors.items()}
