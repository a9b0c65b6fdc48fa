"""Where a layer sits in a torch model, as ``inject`` and ``merge`` must know it: whether the
LoRA layer can stand in for it (its class, hooks and state), whether its parent reads its weight
directly instead of calling it, the names it is registered under, and the other modules that
hold its weight.

Replacing a module by a ``torchlora`` layer is only right when the model calls the module and
the module computes exactly its base type's forward; otherwise the adapter would be skipped or
the output changed, silently. These checks refuse those cases with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

# Parents whose forward reads a child's weight instead of calling the child, so that a LoRA
# layer put there would be skipped. (parent type, the children it reads or None for all, why.)
# A module's own code can do the same; only these known cases can be detected.
WEIGHT_READERS: tuple[tuple[type[nn.Module], tuple[str, ...] | None, str], ...] = (
    (
        nn.MultiheadAttention,
        None,
        "nn.MultiheadAttention never calls out_proj: its forward passes out_proj.weight "
        "and out_proj.bias to F.multi_head_attention_forward (and its q/k/v projection is the "
        "raw parameter in_proj_weight)",
    ),
    (
        nn.TransformerEncoderLayer,
        ("linear1", "linear2"),
        "in eval mode nn.TransformerEncoderLayer takes a fused fast path "
        "(torch._transformer_encoder_layer_fwd) that reads linear1.weight and linear2.weight "
        "directly instead of calling them",
    ),
)

# The methods of the base types that compute their forward; a subclass overriding one of them
# computes something else, which the LoRA layer would replace.
_FORWARD_METHODS = ("forward", "_conv_forward")
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def overridden(module: nn.Module, base: type[nn.Module]) -> str | None:
    """Why ``module``'s class does not compute ``base``'s forward, or ``None``."""
    kind = type(module)
    for name in _FORWARD_METHODS:
        if getattr(kind, name, None) is not getattr(base, name, None):
            return (
                f"its class {kind.__qualname__} overrides {base.__name__}.{name}, so replacing it "
                f"by the LoRA layer (which computes {base.__name__}'s forward) would change "
                "its output"
            )
    return None


def not_plain(module: nn.Module) -> str | None:
    """Why replacing ``module`` (of a plain base class) would lose part of what it computes or
    holds, or ``None``."""
    if parametrize.is_parametrized(module):
        # parametrize adds this ModuleDict at run time; torch types the lookup Tensor | Module.
        names = ", ".join(module.parametrizations)  # type: ignore[arg-type]
        return (
            "it is parametrized (torch.nn.utils.parametrize: "
            f"{names}), so its weight is computed at each call, "
            "which the LoRA layer would not do"
        )
    if "forward" in vars(module):
        return "its forward was replaced on the instance (e.g. by a wrapper or an accelerate hook)"
    if isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
        return "it is a lazy module not yet initialised; run one forward pass before inject"
    hooks = [name.strip("_") for name in _HOOKS if getattr(module, name, None)]
    if hooks:
        return f"it has {', '.join(hooks)} registered, which replacing it would drop"
    extra = _extra_state(module)
    if extra:
        return f"it holds {', '.join(extra)} beyond weight and bias, which replacing it would drop"
    return None


def read_by_parent(model: nn.Module, path: str) -> str | None:
    """Why the module at ``path`` is read, not called, by its parent, or ``None``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    for reader, children, why in WEIGHT_READERS:
        if isinstance(parent, reader) and (children is None or name in children):
            return why
    return None


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path each module is registered under, by ``id``; its first path is the one
    ``named_modules()`` gives it (its canonical name)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def weight_ties(
    model: nn.Module, paths: Iterable[str], weight: torch.Tensor
) -> list[tuple[str, nn.Module, str]]:
    """(parameter path, owner module, attribute) of each place other than ``paths`` (the
    layer's own names) where the model holds ``weight``."""
    own = set(paths)
    ties = []
    for name, param in model.named_parameters(remove_duplicate=False):
        owner_path, _, attr = name.rpartition(".")
        if param is weight and owner_path not in own:
            ties.append((name, model.get_submodule(owner_path), attr))
    return ties


def _extra_state(module: nn.Module) -> list[str]:
    params = [f"parameter '{n}'" for n, _ in module.named_parameters(recurse=False)]
    return (
        [p for p in params if p not in ("parameter 'weight'", "parameter 'bias'")]
        + [f"buffer '{n}'" for n, _ in module.named_buffers(recurse=False)]
        + [f"submodule '{n}'" for n, _ in module.named_children()]
    )
