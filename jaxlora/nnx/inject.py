"""LoRA for unmodified Flax NNX models: module surgery in place, and merging back."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import graph

from _loracore.config import WEIGHT_INITS
from jaxlora import core, kinds
from jaxlora.config import LoRAConfig
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.conv import LoRAConv
from jaxlora.nnx.embed import LoRAEmbed
from jaxlora.nnx.general import LoRALinearGeneral
from jaxlora.nnx.layer import LoRALinear, check_rngs
from jaxlora.tree import ParamCount

SUPPORTED = "nnx.Linear, nnx.LinearGeneral (no batch_axis), nnx.Conv (no mask, groups=1), nnx.Embed"
_ADAPTED = {nnx.LinearGeneral: LoRALinearGeneral, nnx.Conv: LoRAConv, nnx.Embed: LoRAEmbed}


def _check(module: nnx.Module, name: str, config: LoRAConfig) -> None:
    """Raises if ``module`` cannot take the adapter ``config`` gives it (changes nothing)."""
    where = f"inject: layer '{name}'"
    # nnx.Linear subclasses are accepted as before; the other kinds are wrapped by subclassing
    # their exact type, so a subclass of them (a LoRA layer included) is not.
    if not isinstance(module, nnx.Linear) and type(module) not in _ADAPTED:
        subclass = next((b for b in _ADAPTED if isinstance(module, b)), None)
        why = "" if subclass is None else f" (a subclass of nnx.{subclass.__name__})"
        raise TypeError(
            f"layer '{name}' is a {type(module).__name__}{why}, which cannot be "
            f"adapted; supported: {SUPPORTED}"
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
    check_rngs(rngs, "inject")
    paths = _module_paths(model)
    modules = dict(sorted(paths.items(), key=lambda item: item[0]))
    chosen = config.select(modules)
    for name in chosen:
        path, module = modules[name]
        if not path:
            raise ValueError(
                f"targets {config.targets!r} match the root module itself; target its submodules"
            )
        _check(module, name, config)
    groups = _tied(modules, chosen, config)
    for names in groups:
        name = names[0]
        base = modules[name][1]
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
        for alias in names:  # a tied layer stays tied: one LoRA layer at each of its paths
            _replace(model, modules[alias][0], layer)
    model.lora_config = config
    return model


def merge(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every LoRA layer by its plain NNX layer holding the merged weight.

    ``weight + scaling · lora_a @ lora_b`` is computed in fp32 and rounded once to the weight's
    dtype; non-finite results are refused before any layer is replaced. Returns ``model``.
    """
    plain = []
    for names in _groups(_module_paths(model)).values():
        path, layer = names[0]
        if isinstance(layer, LoRALinear | Adapter):
            try:
                plain.append(([p for p, _ in names], layer.to_base()))
            except ValueError as err:
                where = ".".join(map(str, path))
                raise ValueError(
                    f"merge: layer '{where}': {err}; the model was left unchanged"
                ) from None
    for paths, linear in plain:
        for path in paths:
            _replace(model, path, linear)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


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
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)
