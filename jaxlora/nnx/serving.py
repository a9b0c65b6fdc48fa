"""What the NNX stacked layers (``jaxlora.nnx.to_multi``) share: the stack variables
(``StackedAdapter``), the per-example adapter index (``adapter_index``), and the slot writes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol

import jax
from flax import nnx

from jaxlora import multi


class StackedAdapter(nnx.Variable):
    """An adapter stack of a ``MultiLoRALinear`` or a stacked op-level layer (served, never
    trained)."""


class Stacked(Protocol):
    """What a stacked layer holds (``MultiLoRALinear``, a stacked op-level layer)."""

    lora_a: StackedAdapter
    lora_b: StackedAdapter
    scale: StackedAdapter
    occupied: StackedAdapter


class _Index(threading.local):
    def __init__(self) -> None:
        self.stack: list[jax.Array] = []


_INDEX = _Index()


@contextlib.contextmanager
def adapter_index(index: jax.Array) -> Iterator[None]:
    """Within this context, the stacked layers of ``to_multi`` run example ``i`` with adapter
    ``index[i]`` (``-1``: the base alone). Enter it inside the jitted function."""
    multi.check_index(index, "adapter_index")
    _INDEX.stack.append(index)
    try:
        yield
    finally:
        _INDEX.stack.pop()


def active_index(where: str) -> jax.Array:
    """The innermost ``adapter_index``'s index; a ``ValueError`` naming ``where`` outside one."""
    if not _INDEX.stack:
        raise ValueError(
            f"{where} was called outside jaxlora.nnx.adapter_index(index): it needs each "
            "example's adapter index (-1 for the base alone)"
        )
    return _INDEX.stack[-1]


def new_stack(layer: Stacked, shape_a, shape_b, dtype, capacity: int) -> None:
    """Gives ``layer`` an empty stack: ``lora_a`` (capacity, *shape_a), ``lora_b`` (capacity,
    *shape_b), ``scale`` and ``occupied`` (capacity,)."""
    layer.lora_a = StackedAdapter(jax.numpy.zeros((capacity, *shape_a), dtype))
    layer.lora_b = StackedAdapter(jax.numpy.zeros((capacity, *shape_b), dtype))
    layer.scale = StackedAdapter(jax.numpy.zeros((capacity,), jax.numpy.float32))
    layer.occupied = StackedAdapter(jax.numpy.zeros((capacity,), bool))


def write(layer: Stacked, slot: int, a, b, scale, occupied: bool) -> None:
    """Puts one adapter (or zeros) in ``slot`` of ``layer``'s stack, in place."""
    layer.lora_a[...] = layer.lora_a[...].at[slot].set(a)
    layer.lora_b[...] = layer.lora_b[...].at[slot].set(b)
    layer.scale[...] = layer.scale[...].at[slot].set(scale)
    layer.occupied[...] = layer.occupied[...].at[slot].set(occupied)
