"""Model-level LoRA for unmodified PyTorch models: inject, merge, freeze, adapter state."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from _loracore.config import WEIGHT_INITS
from _loracore.report import ParamCount
from torchlora.base import LoRALayer
from torchlora.config import LoRAConfig
from torchlora.conv import Conv1d, Conv2d, Conv3d, _ConvNd
from torchlora.embedding import Embedding
from torchlora.layer import Linear

LORA_NAMES = ("lora_a", "lora_b")
SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (Linear, Embedding, Conv1d, Conv2d, Conv3d)


def flat_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of the matrix an adapter on ``module`` factors: r is at most their min."""
    if isinstance(module, nn.Embedding | Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | _ConvNd):
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    return module.in_features, module.out_features


def wrap(module: nn.Module, config: LoRAConfig, path: str) -> LoRALayer:
    """The torchlora layer for a pretrained module, sharing its weights, per ``config``."""
    r, alpha = config.rank_for(path), config.alpha_for(path)
    common = {"use_rslora": config.use_rslora, "init": config.init}
    if isinstance(module, nn.Embedding):
        return Embedding.from_embedding(module, r, alpha, **common)
    conv = next((c for c in (Conv1d, Conv2d, Conv3d) if isinstance(module, c.base_type)), None)
    if conv is not None:
        return conv.from_conv(module, r, alpha, dropout=config.dropout, **common)
    return Linear.from_linear(module, r, alpha, dropout=config.dropout, **common)


def inject(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replaces each ``nn.Linear``, ``nn.Embedding`` and ``nn.Conv1d/2d/3d`` whose path matches
    ``config.targets`` by a ``torchlora.Linear``, ``Embedding`` or ``Conv1d/2d/3d``.

    The new layers wrap the same pretrained weight and bias (shared, not copied); every
    parameter that is not ``lora_a``/``lora_b`` is frozen. All matches are checked before the
    model is touched, so a failed call changes nothing. The config is remembered as
    ``model.lora_config``. Returns ``model``.

    Raises:
        ValueError: no layer matches (the message lists the layer paths), a layer is already
            adapted, or a layer's rank exceeds its ``min(in, out)``.
        TypeError: a matched module is not of a supported type (the message names them).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"inject expects a torchlora.LoRAConfig, got {type(config).__name__}")
    modules = dict(model.named_modules())
    chosen = config.select(modules)
    for path in chosen:
        module = modules[path]
        if not path:
            raise ValueError(
                f"targets {config.targets!r} match the root module itself; target its submodules"
            )
        if isinstance(module, LoRALayer):
            raise ValueError(f"layer '{path}' is already a torchlora.{type(module).__name__}")
        if not isinstance(module, SUPPORTED):
            raise TypeError(
                f"layer '{path}' is a {type(module).__name__}, which cannot be "
                f"adapted; supported types: {', '.join(t.__name__ for t in SUPPORTED)}"
            )
        kind = next(k for k in _LAYERS if isinstance(module, k.base_type))
        reason = kind.unsupported(module)
        if config.init in WEIGHT_INITS and kind is not Linear:
            reason = (
                f"init={config.init!r} adapts Linear layers only, not a {type(module).__name__}"
            )
        if reason:
            raise ValueError(f"layer '{path}': {reason}")
        (n_in, n_out), r = flat_features(module), config.rank_for(path)
        if r > min(n_in, n_out):
            raise ValueError(
                f"layer '{path}' ({n_in} -> {n_out}): r must be in [1, {min(n_in, n_out)}], got {r}"
            )
    for path in chosen:
        _set_submodule(model, path, wrap(modules[path], config, path))
    mark_only_lora_as_trainable(model)
    model.lora_config = config
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replaces every torchlora layer by its plain base type holding the merged weight.

    The model is then exactly the original architecture (same module types and state-dict
    keys). Each delta is computed in fp32 and refused if non-finite; all merges are computed
    before any module is replaced. Returns ``model``.
    """
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALayer)]
    plain = [(path, layer.to_base()) for path, layer in layers]
    for path, linear in plain:
        linear.requires_grad_(False)
        _set_submodule(model, path, linear)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only: the state-dict entries named ``lora_a``/``lora_b``."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_NAMES}


def set_adapter(model: nn.Module, adapter: Mapping[str, torch.Tensor]) -> nn.Module:
    """Switches an injected model to another adapter held in memory (a ``lora_state_dict``).

    Copies the tensors into the existing ``lora_a``/``lora_b`` parameters: the base weights are
    not touched or reloaded. Strict: the keys and shapes must be exactly the model's, checked
    before anything is copied. Returns ``model``.
    """
    current = lora_state_dict(model)
    missing, unexpected = sorted(set(current) - set(adapter)), sorted(set(adapter) - set(current))
    if missing or unexpected:
        raise ValueError(f"set_adapter: missing keys {missing}, unexpected keys {unexpected}")
    for key, value in adapter.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise ValueError(
                f"set_adapter: '{key}' has shape {tuple(value.shape)}, expected "
                f"{tuple(current[key].shape)}"
            )
    merged = [n for n, m in model.named_modules() if isinstance(m, LoRALayer) and m.merged]
    if merged:
        raise ValueError(f"set_adapter: layers {merged} are merged; unmerge them first")
    with torch.no_grad():
        for key, value in adapter.items():
            current[key].copy_(value)
    return model


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Sets ``requires_grad`` on exactly the parameters named ``lora_a``/``lora_b``."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1] in LORA_NAMES)
    return model


def trainable_parameters(model: nn.Module) -> ParamCount:
    """Counts parameters that require grad against all parameters (shared ones once)."""
    params = list(model.parameters())
    return ParamCount(
        sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    )


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)
