"""What the NNX stacked layers (``jaxlora.nnx.to_multi``) share: the stack variables
(``StackedAdapter``), the per-example adapter index (``adapter_index``), and the slot writes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Protocol

import jax
from flax import nnx

from jaxlora import multi


class StackedAdapter(nnx.Variable):
    """An adapter stack of a ``MultiLoRALinear`` or a stacked op-level layer (served, never
    trained)."""


class Stacked(Protocol):
    """What a stacked layer holds (``MultiLoRALinear``, a stacked op-level layer) beside its
    factors' stacks (``lora_a``/``lora_b``, or ``<weight>_lora_a``/``_b`` per weight)."""

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


FACTORS = ("lora_a", "lora_b")  # the factors' names of a layer with one adapted weight


def new_stack(
    layer: Stacked,
    shapes: Mapping[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]],
    dtype,
    capacity: int,
    layers: tuple[int, ...] = (),
) -> None:
    """Gives ``layer`` an empty stack: for each (name_a, name_b) of ``shapes`` (``FACTORS``
    for one adapted weight, ``<weight>_lora_a``/``<weight>_lora_b`` per weight of several),
    stacks (capacity, *shape_a) and (capacity, *shape_b); and ``scale`` and ``occupied``
    (capacity,), one for the layer (its weights share the module's r and alpha). A layer of an
    ``nnx.vmap`` stack (``layers`` = (L,), its weights' leading layer axis) has every stack
    with that axis in front, (L, capacity, …): what slices its weights per layer (``nnx.scan``
    over axis 0) slices the stacks alike, so each layer's call sees one layer's stacks."""
    lead = (*layers, capacity)
    for (name_a, name_b), (shape_a, shape_b) in shapes.items():
        setattr(layer, name_a, StackedAdapter(jax.numpy.zeros((*lead, *shape_a), dtype)))
        setattr(layer, name_b, StackedAdapter(jax.numpy.zeros((*lead, *shape_b), dtype)))
    layer.scale = StackedAdapter(jax.numpy.zeros(lead, jax.numpy.float32))
    layer.occupied = StackedAdapter(jax.numpy.zeros(lead, bool))


def write(
    layer: Stacked, slot: int, factors: Mapping[tuple[str, str], tuple], scale, occupied: bool
) -> None:
    """Puts one adapter (or zeros) in ``slot`` of ``layer``'s stacks, in place: ``factors``
    maps each (name_a, name_b) of the layer's stacks to its (a, b) (with the layer axis in
    front for a layer of an ``nnx.vmap`` stack: the slot axis follows it)."""
    at = (slice(None),) * (layer.occupied.ndim - 1) + (slot,)
    for names, values in factors.items():
        for name, value in zip(names, values, strict=True):
            var = getattr(layer, name)
            var[...] = var[...].at[at].set(value)
    layer.scale[...] = layer.scale[...].at[at].set(scale)
    layer.occupied[...] = layer.occupied[...].at[at].set(occupied)


def check_sliced(layer: Stacked, where: str) -> None:
    """A ``ValueError`` for a stacked layer of an ``nnx.vmap`` stack called with its layer
    axis (its stacks are (L, N, …)): only one layer's slice is served."""
    if layer.occupied.ndim != 1:
        raise ValueError(
            f"{where} holds the stacks of {layer.occupied.shape[0]} stacked layers (an "
            "nnx.vmap stack): call it per layer, as nnx.scan over axis 0 slices it"
        )
