"""Many adapters of one base in one batch for Flax NNX (the layout of ``jaxlora.multi``).

``to_multi(model, capacity=...)`` replaces every ``LoRALinear`` in place by a
``MultiLoRALinear`` that shares its kernel and bias and holds an adapter stack: ``lora_a``
(N, in, R), ``lora_b`` (N, R, out), each adapter's own ``scale`` (N,) and ``occupied`` (N,), as
``StackedAdapter`` variables (not ``nnx.Param``: optimizers never train them). ``set_adapter``
copies a ``LoRALinear`` model's adapters into a slot (zero-padding a smaller rank, exact);
``clear_adapter`` empties one. Neither changes a shape, so an ``nnx.jit`` forward is not
recompiled. The per-example index is given with ``adapter_index`` around the call::

    @nnx.jit
    def forward(model, x, index):
        with jaxlora.nnx.adapter_index(index):  # (batch,) int, -1: the base alone
            return model(x)

Serving only: there is no dropout on the branch. Only ``LoRALinear`` layers are stacked; a
model holding other LoRA layers (``LoRALinearGeneral``, ``LoRAConv``, ``LoRAEmbed``,
``OpAdapter``) is refused, as they would apply one adapter to every example.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import core, multi
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.inject import _module_paths, _replace, stack_of
from jaxlora.nnx.layer import LoRALinear
from jaxlora.nnx.oplevel import OpAdapter
from jaxlora.nnx.quant import kernel_value

__all__ = [
    "MultiLoRALinear",
    "StackedAdapter",
    "adapter_index",
    "clear_adapter",
    "set_adapter",
    "to_multi",
]


class StackedAdapter(nnx.Variable):
    """The adapter stack of a ``MultiLoRALinear`` (served, never trained)."""


class _Index(threading.local):
    def __init__(self) -> None:
        self.stack: list[jax.Array] = []


_INDEX = _Index()


@contextlib.contextmanager
def adapter_index(index: jax.Array) -> Iterator[None]:
    """Within this context, ``MultiLoRALinear`` layers run example ``i`` with adapter
    ``index[i]`` (``-1``: the base alone). Enter it inside the jitted function."""
    multi.check_index(index, "adapter_index")
    _INDEX.stack.append(index)
    try:
        yield
    finally:
        _INDEX.stack.pop()


class MultiLoRALinear(nnx.Module):
    """An ``nnx.Linear`` (sharing a ``LoRALinear``'s kernel and bias) plus, per example, the
    branch of the adapter the active ``adapter_index`` picks (``jaxlora.multi.gathered_branch``).
    """

    def __init__(self, layer: LoRALinear, *, capacity: int, rank: int) -> None:
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.dtype, self.precision = layer.dtype, layer.precision
        self.kernel, self.bias = layer.kernel, layer.bias
        dtype = layer.lora_a.dtype
        self.lora_a = StackedAdapter(jnp.zeros((capacity, layer.in_features, rank), dtype))
        self.lora_b = StackedAdapter(jnp.zeros((capacity, rank, layer.out_features), dtype))
        self.scale = StackedAdapter(jnp.zeros((capacity,), jnp.float32))
        self.occupied = StackedAdapter(jnp.zeros((capacity,), bool))

    @property
    def capacity(self) -> int:
        return self.occupied.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        where = f"jaxlora.nnx.MultiLoRALinear({self.in_features}, {self.out_features})"
        core.check_input(x, self.in_features, where)
        if not _INDEX.stack:
            raise ValueError(
                f"{where} was called outside jaxlora.nnx.adapter_index(index): it needs each "
                "example's adapter index (-1 for the base alone)"
            )
        index = _INDEX.stack[-1]
        if x.ndim < 2 or x.shape[0] != index.shape[0]:
            raise ValueError(
                f"{where}: the adapter index has shape {tuple(index.shape)} but the input "
                f"{tuple(x.shape)} has no matching batch axis 0"
            )
        multi.check_index_values(index, self.occupied[...], where)
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias, a, b = nnx.nn.dtypes.promote_dtype(
            (x, kernel_value(self.kernel), bias, self.lora_a[...], self.lora_b[...]),
            dtype=self.dtype,
        )
        y = jnp.matmul(x, kernel, precision=self.precision)
        if bias is not None:
            y = y + bias
        return y + multi.gathered_branch(
            x, a, b, self.scale[...], self.occupied[...], index, (-1,), self.precision
        )


def to_multi(model: nnx.Module, *, capacity: int, rank: int | None = None) -> nnx.Module:
    """Replaces every ``LoRALinear`` of ``model`` in place by a ``MultiLoRALinear`` with an
    empty stack of ``capacity`` slots and rank ``rank`` (default: the largest layer's r);
    returns ``model``. The layers' own adapters are not kept: put them in a slot with
    ``set_adapter`` (from a copy made before)."""
    paths = _module_paths(model)
    layers = {p: (path, m) for p, (path, m) in paths.items() if isinstance(m, LoRALinear)}
    others = sorted(p for p, (_, m) in paths.items() if isinstance(m, Adapter | OpAdapter))
    if others:
        raise ValueError(
            f"to_multi: layers {others} are LoRA layers that cannot be stacked (only "
            "LoRALinear): they would apply one adapter to every example"
        )
    if not layers:
        raise ValueError("to_multi: the model has no jaxlora.nnx.LoRALinear layer")
    dora = sorted(p for p, (_, m) in layers.items() if m.use_dora)
    if dora:  # a stack's branch has no magnitude: it would be silently dropped
        raise ValueError(
            f"to_multi: layers {dora} are DoRA (use_dora): stacks serve plain LoRA only"
        )
    stacked = sorted(p for p, (_, m) in layers.items() if stack_of(m))
    if stacked:  # nnx.vmap would slice the adapter axis as if it were the layer axis
        raise ValueError(
            f"to_multi: layers {stacked} are stacked (nnx.vmap/scan, a leading layer axis): "
            "adapter stacks of stacked layers are not supported"
        )
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"to_multi: capacity must be a positive int, got {capacity!r}")
    rank = max(m.r for _, m in layers.values()) if rank is None else rank
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"to_multi: rank must be a positive int, got {rank!r}")
    for path, module in layers.values():
        _replace(model, path, MultiLoRALinear(module, capacity=capacity, rank=rank))
    return model


def _stacked(model: nnx.Module) -> dict[str, MultiLoRALinear]:
    found = {p: m for p, (_, m) in _module_paths(model).items() if isinstance(m, MultiLoRALinear)}
    if not found:
        raise ValueError("the model has no MultiLoRALinear layer: call jaxlora.nnx.to_multi")
    return found


def set_adapter(model: nnx.Module, slot: int, source: nnx.Module) -> None:
    """Puts the adapters of ``source`` (a model with ``LoRALinear`` layers at the same paths,
    e.g. one trained or loaded with ``jaxlora.nnx.load_adapter``) into ``slot`` of ``model``'s
    stacks, in place; checked completely before anything is written. The source's kernels
    must equal the serving model's (same shapes and values, compared once here): an adapter
    trained on another base, or a PiSSA/OLoRA one (whose kernel is a residual), is refused."""
    stacks = _stacked(model)
    capacity = next(iter(stacks.values())).capacity
    multi._check_slot(slot, capacity)
    found = {p: m for p, (_, m) in _module_paths(source).items() if isinstance(m, LoRALinear)}
    missing, extra = sorted(set(stacks) - set(found)), sorted(set(found) - set(stacks))
    if missing or extra:
        raise ValueError(
            f"set_adapter: the adapter targets other layers than the stack's: missing {missing}, "
            f"unexpected {extra} (every adapter in a stack must adapt the same layers)"
        )
    new = {}
    for path, layer in stacks.items():
        src = found[path]
        if src.use_dora:
            raise ValueError(
                f"set_adapter: layer '{path}' is a DoRA adapter (use_dora): a stack serves plain "
                "LoRA adapters only; its magnitude would be ignored"
            )
        if kernel_value(src.kernel).shape != kernel_value(layer.kernel).shape:
            raise ValueError(
                f"set_adapter: layer '{path}': the adapter's base kernel has shape "
                f"{kernel_value(src.kernel).shape}, the stack's base has "
                f"{kernel_value(layer.kernel).shape}: it was made for another base model"
            )
        if not _same_values(src.kernel, layer.kernel):
            raise ValueError(
                f"set_adapter: layer '{path}': the adapter's base kernel differs from the "
                f"stack's base (init={src.init!r}; PiSSA/OLoRA kernels are residuals): it was "
                "made for another base model (load it into a copy of the serving base)"
            )
        if src.r > layer.rank:
            raise ValueError(
                f"set_adapter: layer '{path}' has r={src.r}, above the stack's rank "
                f"{layer.rank}: build the stack with a larger rank (to_multi(..., rank=...))"
            )
        a, b = src.lora_a[...], src.lora_b[...]
        if not (jnp.isfinite(a).all() and jnp.isfinite(b).all()):
            raise ValueError(f"set_adapter: layer '{path}': the adapter has non-finite values")
        new[path] = (*multi.pad_rank(a, b, layer.rank), src.scaling)
    for path, (a, b, scale) in new.items():
        _write(stacks[path], slot, a, b, scale, True)


def _same_values(a: nnx.Variable, b: nnx.Variable) -> bool:
    """Whether two kernels are the same variable or hold equal values (one pass over them)."""
    return a is b or bool(jnp.array_equal(kernel_value(a), kernel_value(b)))


def clear_adapter(model: nnx.Module, slot: int) -> None:
    """Empties ``slot`` of ``model``'s stacks in place; indexing it is then an error."""
    stacks = _stacked(model)
    multi._check_slot(slot, next(iter(stacks.values())).capacity)
    for layer in stacks.values():
        _write(layer, slot, 0.0, 0.0, 0.0, False)


def _write(layer: MultiLoRALinear, slot: int, a, b, scale, occupied: bool) -> None:
    layer.lora_a[...] = layer.lora_a[...].at[slot].set(a)
    layer.lora_b[...] = layer.lora_b[...].at[slot].set(b)
    layer.scale[...] = layer.scale[...].at[slot].set(scale)
    layer.occupied[...] = layer.occupied[...].at[slot].set(occupied)
