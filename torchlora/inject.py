"""Model-level LoRA for unmodified PyTorch models: inject, merge, freeze, adapter state."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from _loracore.config import LORA_NAMES, WEIGHT_INITS
from _loracore.report import ParamCount
from torchlora import checks
from torchlora.base import LoRALayer
from torchlora.config import LoRAConfig
from torchlora.conv import Conv1d, Conv2d, Conv3d, TorchConv, _ConvNd
from torchlora.embedding import Embedding
from torchlora.layer import Linear

SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (Linear, Embedding, Conv1d, Conv2d, Conv3d)


def flat_features(
    module: nn.Linear | nn.Embedding | TorchConv | Linear | Embedding | _ConvNd,
) -> tuple[int, int]:
    """(in, out) of the matrix an adapter on ``module`` factors: r is at most their min."""
    if isinstance(module, nn.Embedding | Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | _ConvNd):
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    return module.in_features, module.out_features


def wrap(module: nn.Module, config: LoRAConfig, path: str) -> LoRALayer:
    """The torchlora layer for a pretrained module, sharing its weights, per ``config``."""
    r, alpha = config.rank_for(path), config.alpha_for(path)
    common: dict[str, Any] = {
        "use_rslora": config.use_rslora,
        "init": config.init,
        "use_dora": config.use_dora,
    }
    if isinstance(module, nn.Embedding):
        return Embedding.from_embedding(module, r, alpha, **common)
    if isinstance(module, TorchConv):
        conv = next(c for c in (Conv1d, Conv2d, Conv3d) if isinstance(module, c.base_type))
        return conv.from_conv(module, r, alpha, dropout=config.dropout, **common)
    if isinstance(module, nn.Linear):
        return Linear.from_linear(module, r, alpha, dropout=config.dropout, **common)
    # _check_target refused every other type before any module was wrapped.
    raise TypeError(f"layer '{path}' is a {type(module).__name__}, which cannot be adapted")


def inject(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replaces each ``nn.Linear``, ``nn.Embedding`` and ``nn.Conv1d/2d/3d`` whose path matches
    ``config.targets`` by a ``torchlora.Linear``, ``Embedding`` or ``Conv1d/2d/3d``.

    The new layers wrap the same pretrained weight and bias (shared, not copied); every
    parameter that is not ``lora_a``/``lora_b`` (or DoRA's ``lora_magnitude``) is frozen. A
    module registered under several paths (the same object) gets one LoRA layer, put at every
    one of them, named by its first path (``named_modules()``'s). All matches are checked
    before the model is touched, so a failed call changes nothing. The config is remembered as
    ``model.lora_config``. Returns ``model``.

    Raises:
        ValueError: no layer matches (the message lists the layer paths), a layer is already
            adapted, a layer's rank exceeds its ``min(in, out)``, its parent reads its weight
            instead of calling it (``checks.WEIGHT_READERS``: ``nn.MultiheadAttention``,
            ``nn.TransformerEncoderLayer``), it has hooks, parametrizations or extra state the
            replacement would drop, its paths get different ranks or alphas, or ``init``
            would rewrite a weight that another module shares.
        TypeError: a matched module is not of a supported type, or its class overrides the
            base type's forward (the message names them).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"inject expects a torchlora.LoRAConfig, got {type(config).__name__}")
    if config.target_parameters:  # would be ignored: the named weights left unadapted
        raise ValueError(
            f"inject: target_parameters={list(config.target_parameters)!r} is not supported by "
            "torchlora (jaxlora.nnx.inject adapts weights by name); use targets"
        )
    modules = dict(model.named_modules(remove_duplicate=False))
    all_paths = checks.module_paths(model)
    chosen = config.select(modules, strict=False)
    # One entry per module object, under its canonical path, with every path it has.
    targets = {all_paths[id(modules[p])][0]: all_paths[id(modules[p])] for p in chosen}
    for path, paths in targets.items():
        _check_target(model, config, path, paths)
    config.check_unmatched(modules, [p for paths in targets.values() for p in paths])
    layers = [(wrap(modules[path], config, path), paths) for path, paths in targets.items()]
    for layer, paths in layers:
        for path in paths:
            _set_submodule(model, path, layer)
    for layer, paths in layers:
        layer.weight_ties = tuple(checks.weight_ties(model, paths, layer.weight))
    mark_only_lora_as_trainable(model)
    # torch types Module.__setattr__'s value as Tensor | Module; it stores any attribute.
    model.lora_config = config  # type: ignore[assignment]
    return model


def _check_target(model: nn.Module, config: LoRAConfig, path: str, paths: list[str]) -> None:
    """Raises unless the module at ``path`` (also registered at ``paths``) can be adapted."""
    module = model.get_submodule(path)
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
    where = f"layer '{path}' ({type(module).__name__}) cannot be adapted"
    reason = checks.overridden(module, kind.base_type)
    if reason:
        raise TypeError(f"{where}: {reason}")
    reason = checks.not_plain(module)
    if reason:
        raise ValueError(f"{where}: {reason}")
    reason = kind.unsupported(module)
    if config.init in WEIGHT_INITS and kind is not Linear:
        reason = f"init={config.init!r} adapts Linear layers only, not a {type(module).__name__}"
    if reason:
        raise ValueError(f"layer '{path}': {reason}")
    for alias in paths:
        why = checks.read_by_parent(model, alias)
        if why:
            raise ValueError(
                f"layer '{alias}' cannot be adapted: {why}, so its adapter would be silently "
                "skipped; target other layers"
            )
    (n_in, n_out), r = flat_features(module), config.rank_for(path)
    if r > min(n_in, n_out):
        raise ValueError(
            f"layer '{path}' ({n_in} -> {n_out}): r must be in [1, {min(n_in, n_out)}], got {r}"
        )
    _check_aliases(config, path, paths)
    ties = checks.weight_ties(model, paths, module.weight)
    if ties and config.init in WEIGHT_INITS:
        raise ValueError(
            f"layer '{path}': its weight is also '{ties[0][0]}' (tied), and init="
            f"{config.init!r} rewrites the weight, which would change that module too; untie "
            "them or use init='kaiming' or 'gaussian'"
        )


def _check_aliases(config: LoRAConfig, path: str, paths: list[str]) -> None:
    """One module under several paths gets one layer: the config must agree on all of them."""
    mine = (config.rank_for(path), config.alpha_for(path))
    for alias in paths[1:]:
        theirs = (config.rank_for(alias), config.alpha_for(alias))
        if theirs != mine:
            raise ValueError(
                f"layer '{path}' is also registered as '{alias}' (the same module), but the "
                f"config gives them different (r, alpha): {mine} and {theirs}; one module gets "
                "one adapter, so make rank_pattern/alpha_pattern agree on both paths"
            )


def merge(model: nn.Module) -> nn.Module:
    """Replaces every torchlora layer by its plain base type holding the merged weight.

    The model is then exactly the original architecture (same module types and state-dict
    keys; a layer registered under several paths is replaced at all of them). Each delta is
    computed in fp32 and refused if non-finite; all merges are computed before any module is
    replaced. A layer whose weight another module also holds (tied) is refused, naming both:
    the merged copy would silently untie them. Returns ``model``.
    """
    all_paths = checks.module_paths(model)
    layers = [(m, all_paths[id(m)]) for _, m in model.named_modules() if isinstance(m, LoRALayer)]
    for layer, paths in layers:
        ties = checks.weight_ties(model, paths, layer.weight)
        if ties:
            raise ValueError(
                f"merge: layer '{paths[0]}' has its weight tied to '{ties[0][0]}'; merging "
                "would give it a weight of its own and break the tie (or, in place, change "
                f"'{ties[0][0]}' too); untie them first. Nothing was merged"
            )
    plain = [(paths, layer.to_base()) for layer, paths in layers]
    for paths, base in plain:
        base.requires_grad_(False)
        for path in paths:
            _set_submodule(model, path, base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only: the state-dict entries named ``lora_a``/``lora_b`` (and
    ``lora_magnitude``), once
    per layer (under its ``named_modules()`` path, also for a layer registered twice)."""
    layers = {path for path, m in model.named_modules() if isinstance(m, LoRALayer)}
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.rsplit(".", 1)[-1] in LORA_NAMES and k.rsplit(".", 1)[0] in layers
    }


def set_adapter(model: nn.Module, adapter: Mapping[str, torch.Tensor]) -> nn.Module:
    """Switches an injected model to another adapter held in memory (a ``lora_state_dict``).

    Copies the tensors into the existing ``lora_a``/``lora_b`` parameters: the base weights are
    not touched or reloaded. Strict: the keys and shapes must be exactly the model's, and the
    values floating-point tensors that stay finite in the parameter's dtype, all checked before
    anything is copied. Returns ``model``.
    """
    if not isinstance(adapter, Mapping):
        raise TypeError(f"set_adapter: expected a mapping of tensors, got {type(adapter).__name__}")
    current = lora_state_dict(model)
    missing, unexpected = sorted(set(current) - set(adapter)), sorted(set(adapter) - set(current))
    if missing or unexpected:
        raise ValueError(f"set_adapter: missing keys {missing}, unexpected keys {unexpected}")
    for key, value in adapter.items():
        _check_adapter_tensor(key, value, current[key])
    merged = [n for n, m in model.named_modules() if isinstance(m, LoRALayer) and m.merged]
    if merged:
        raise ValueError(f"set_adapter: layers {merged} are merged; unmerge them first")
    with torch.no_grad():
        for key, value in adapter.items():
            current[key].copy_(value)
    return model


def _check_adapter_tensor(key: str, value: object, current: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"set_adapter: '{key}' is a {type(value).__name__}, expected a torch.Tensor"
        )
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(
            f"set_adapter: '{key}' has shape {tuple(value.shape)}, expected {tuple(current.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(
            f"set_adapter: '{key}' has dtype {value.dtype}, expected a floating-point tensor "
            f"(the parameter is {current.dtype})"
        )
    # Checked in the parameter's dtype: a finite float64 can overflow to inf in bfloat16.
    bad = int((~torch.isfinite(value.detach().to(current.dtype))).sum())
    if bad:
        raise ValueError(
            f"set_adapter: '{key}' has {bad} non-finite value(s) in {current.dtype}; "
            "nothing was copied"
        )


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Sets ``requires_grad`` on exactly the adapter's parameters (``lora_a``/``lora_b``, and
    DoRA's ``lora_magnitude``)."""
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
