"""LoRA for unmodified Flax NNX models: module surgery in place, and merging back."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import core
from jaxlora.config import LoRAConfig
from jaxlora.nnx.layer import LoRALinear, _placeholder
from jaxlora.tree import ParamCount

SUPPORTED = "flax.nnx.Linear"


def inject(
    model: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs, *, param_dtype: Any = jnp.float32
) -> nnx.Module:
    """Replaces, in place, each ``nnx.Linear`` whose '.'-joined path matches ``config.targets``
    by a ``LoRALinear`` sharing its kernel and bias variables.

    All matches are checked before the model is touched; the config is remembered as
    ``model.lora_config``. Train with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.
    Returns ``model``.

    Raises:
        ValueError: no layer matches (the message lists the layer paths), the root module is
            matched, or a layer's rank exceeds its ``min(in, out)``.
        TypeError: a matched module is not an ``nnx.Linear`` (or is already a ``LoRALinear``).
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
        if not isinstance(module, nnx.Linear):
            raise TypeError(
                f"layer '{name}' is a {type(module).__name__}, which cannot be "
                f"adapted; supported: {SUPPORTED}"
            )
        core.check_hparams(
            r=config.rank_for(name),
            alpha=config.alpha_for(name),
            dropout=config.dropout,
            in_features=module.in_features,
            out_features=module.out_features,
            where=f"inject: layer '{name}'",
        )
    for name in chosen:
        path, linear = modules[name]
        layer = LoRALinear.from_linear(
            linear,
            r=config.rank_for(name),
            alpha=config.alpha_for(name),
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        _replace(model, path, layer)
    model.lora_config = config
    return model


def merge(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every ``LoRALinear`` by an ``nnx.Linear`` holding the merged kernel.

    ``kernel + scaling · lora_a @ lora_b`` is computed in fp32 and rounded once to the kernel's
    dtype; non-finite results are refused before any layer is replaced. Returns ``model``.
    """
    plain = []
    for path, layer in nnx.iter_modules(model):
        if not isinstance(layer, LoRALinear):
            continue
        kernel = layer.kernel[...]
        merged = (
            kernel.astype(jnp.float32)
            + core.delta(layer.lora_a[...], layer.lora_b[...], layer.scaling)
        ).astype(kernel.dtype)
        if not np.isfinite(np.asarray(merged, np.float32)).all():
            raise ValueError(
                f"merge: layer '{'.'.join(map(str, path))}': the merged kernel has "
                "non-finite values; the model was left unchanged"
            )
        linear = nnx.Linear(
            layer.in_features,
            layer.out_features,
            use_bias=layer.bias is not None,
            dtype=layer.dtype,
            param_dtype=kernel.dtype,
            precision=layer.precision,
            kernel_init=_placeholder,
            bias_init=_placeholder,
            rngs=nnx.Rngs(0),
        )
        linear.kernel = layer.kernel.replace(merged)  # keeps the variable's metadata
        linear.bias = layer.bias
        plain.append((path, linear))
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
