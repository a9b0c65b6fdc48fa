"""LoRA for unmodified Flax NNX models: module surgery in place, and merging back."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from _loracore.config import WEIGHT_INITS
from jaxlora import core, kinds
from jaxlora.config import LoRAConfig
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.conv import LoRAConv
from jaxlora.nnx.embed import LoRAEmbed
from jaxlora.nnx.general import LoRALinearGeneral
from jaxlora.nnx.layer import LoRALinear
from jaxlora.tree import ParamCount

SUPPORTED = "nnx.Linear, nnx.LinearGeneral (no batch_axis), nnx.Conv (no mask, groups=1), nnx.Embed"
_ADAPTED = {nnx.LinearGeneral: LoRALinearGeneral, nnx.Conv: LoRAConv, nnx.Embed: LoRAEmbed}


def _check(module: nnx.Module, name: str, config: LoRAConfig) -> None:
    """Raises if ``module`` cannot take the adapter ``config`` gives it (changes nothing)."""
    where = f"inject: layer '{name}'"
    # nnx.Linear subclasses are accepted as before; the other kinds are wrapped by subclassing
    # their exact type, so a subclass of them (a LoRA layer included) is not.
    if not isinstance(module, nnx.Linear) and type(module) not in _ADAPTED:
        raise TypeError(
            f"layer '{name}' is a {type(module).__name__}, which cannot be "
            f"adapted; supported: {SUPPORTED}"
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
        weight = module.embedding if kind == "embed" else module.kernel
        in_axes = len(module.in_features) if cls is LoRALinearGeneral else 1
        n_in, n_out = kinds.flat_features(kind, weight.shape, in_axes)
    if config.init in WEIGHT_INITS and kind != "linear":
        raise ValueError(
            f"{where}: init={config.init!r} adapts linear layers only, not a {kind} layer"
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
    model: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs, *, param_dtype: Any = jnp.float32
) -> nnx.Module:
    """Replaces, in place, each layer whose '.'-joined path matches ``config.targets`` by its
    LoRA version sharing its weight and bias variables: ``nnx.Linear`` → ``LoRALinear``,
    ``nnx.LinearGeneral`` → ``LoRALinearGeneral``, ``nnx.Conv`` → ``LoRAConv``, ``nnx.Embed`` →
    ``LoRAEmbed``.

    All matches are checked before the model is touched; the config is remembered as
    ``model.lora_config``. Train with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.
    Returns ``model``.

    Raises:
        ValueError: no layer matches (the message lists the layer paths), the root module is
            matched, or a layer's rank exceeds its ``min(in, out)``.
        TypeError: a matched module is not of a supported type (or is already adapted).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"inject expects a jaxlora.LoRAConfig, got {type(config).__name__}")
    modules = {".".join(map(str, p)): (p, m) for p, m in nnx.iter_modules(model)}
    modules = dict(sorted(modules.items(), key=lambda item: item[0]))
    chosen = config.select(modules)
    for name in chosen:
        path, module = modules[name]
        if not path:
            raise ValueError(
                f"targets {config.targets!r} match the root module itself; target its submodules"
            )
        _check(module, name, config)
    for name in chosen:
        path, base = modules[name]
        options = dict(
            r=config.rank_for(name),
            alpha=config.alpha_for(name),
            use_rslora=config.use_rslora,
            init=config.init,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if not isinstance(base, nnx.Embed):
            options["dropout"] = config.dropout
        if isinstance(base, nnx.Linear):
            layer = LoRALinear.from_linear(base, **options)
        else:
            layer = _ADAPTED[type(base)].from_base(base, **options)
        _replace(model, path, layer)
    model.lora_config = config
    return model


def merge(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every LoRA layer by its plain NNX layer holding the merged weight.

    ``weight + scaling · lora_a @ lora_b`` is computed in fp32 and rounded once to the weight's
    dtype; non-finite results are refused before any layer is replaced. Returns ``model``.
    """
    plain = []
    for path, layer in nnx.iter_modules(model):
        if isinstance(layer, LoRALinear | Adapter):
            try:
                plain.append((path, layer.to_base()))
            except ValueError as err:
                where = ".".join(map(str, path))
                raise ValueError(
                    f"merge: layer '{where}': {err}; the model was left unchanged"
                ) from None
    for path, linear in plain:
        _replace(model, path, linear)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def trainable_parameters(model: nnx.Module) -> ParamCount:
    """Counts ``nnx.LoRAParam`` elements against all ``nnx.Param`` elements."""

    def count(state) -> int:
        return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))

    return ParamCount(count(nnx.state(model, nnx.LoRAParam)), count(nnx.state(model, nnx.Param)))


def _replace(model: nnx.Module, path: tuple, module: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)
