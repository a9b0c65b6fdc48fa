"""Stacked op-level layers for ``jaxlora.nnx.to_multi``: many adapters at a weight's product.

``stacked(layer, …)`` turns an ``OpAdapter`` into an instance of a subclass of the module's own
type (``MultiLoRA<Type>``, mixing in ``MultiOpAdapter``) holding the same base variables and,
instead of one adapter, a stack: ``lora_a`` (N, C…, R), ``lora_b`` (N, R, F…), ``scale`` and
``occupied`` (N,) as ``StackedAdapter`` variables (``jaxlora.multi_oplevel``'s layout); a
module with several adapted weights ``<weight>_lora_a``/``<weight>_lora_b`` per weight. Its call
is the original call's jaxpr with each example's branch added
at each weight's product (``jaxlora.multi_oplevel.gathered``), after checking that each
product's activation holds the examples on its axis 0 alone.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxlora import multi, multi_oplevel
from jaxlora.nnx import serving
from jaxlora.nnx.oplevel import LORA_ATTRIBUTES, OpAdapter, Products, call, traced_call

_CLASSES: dict[type, type] = {}


class MultiOpAdapter(Products):
    """The mixin of every stacked op-level layer (see the module docstring). A module with
    several adapted weights holds a stack per weight (``<weight>_lora_a``/``<weight>_lora_b``,
    as its ``OpAdapter`` names its factors) and one ``scale``/``occupied``."""

    __slots__ = ()
    lora_base_type: type[nnx.Module]
    lora_path: str
    scale: serving.StackedAdapter
    occupied: serving.StackedAdapter

    def __init__(
        self, layer: OpAdapter, *, path: str, capacity: int, rank: int, layers: tuple = ()
    ) -> None:
        own = {*LORA_ATTRIBUTES, *(n for w in layer.lora_weights for n in layer.factor_names(w))}
        for name, value in vars(layer).items():
            if not name.startswith("_pytree__") and name not in own:
                setattr(self, name, value)
        self.lora_base_type = layer.lora_base_type
        self.lora_products = layer.lora_products
        self.lora_path = path
        shapes = {layer.factor_names(w): roles.lora_shapes(rank) for w, roles in self.lora_products}
        dtype = layer.factors(self.lora_weights[0])[0].dtype  # one param_dtype per module
        serving.new_stack(self, shapes, dtype, capacity, layers)

    @property
    def capacity(self) -> int:
        return self.occupied.shape[-1]

    @property
    def rank(self) -> int:
        return self.factors(self.lora_weights[0])[0].shape[-1]

    def __call__(self, *args, **kwargs):
        where = f"layer '{self.lora_path}'"
        serving.check_sliced(self, where)
        index = serving.active_index(where)
        closed, products = traced_call(self, args, kwargs)
        weights = self.lora_weights
        several = len(weights) > 1
        retrace = lambda a, k: traced_call(self, a, k)[0]  # noqa: E731
        multi_oplevel.check_call(
            [products[w] for w in weights],
            closed,
            retrace,
            args,
            kwargs,
            index.shape[0],
            where,
            [f"{where}, weight '{w}'" if several else where for w in weights],
        )
        multi.check_index_values(index, self.occupied[...], where)
        scale, occupied = self.scale[...], self.occupied[...]
        stacks = {w: (*(f[...] for f in self.factors(w)), scale, occupied) for w in weights}

        def extra(weight, product, eqn, operands, _index, _factors):  # batch axes: refused
            return multi_oplevel.gathered(product, eqn, operands, stacks[weight], index)

        return call(self, args, kwargs, extra)


def check_untied(layer: OpAdapter, where: str) -> None:
    """A ``ValueError`` for a tied op-level adapter (``inject(..., tied_products=...)``): a
    stack's layers compute their branch in ``__call__`` only."""
    if layer.lora_lookups or layer.lora_method != "__call__":
        raise ValueError(
            f"{where} is a tied op-level adapter (inject(..., tied_products=...)), its product "
            f"in its method '{layer.lora_method}': adapter stacks do not support it"
        )


def stacked(
    layer: OpAdapter, *, path: str, capacity: int, rank: int, layers: tuple[int, ...] = ()
) -> Any:
    """``layer``'s base with an empty stack of ``capacity`` adapters of rank ``rank`` (for a
    layer of an ``nnx.vmap`` stack, ``layers`` = (L,): each stack (L, capacity, …))."""
    base_type: type = layer.lora_base_type
    if base_type not in _CLASSES:
        name = f"MultiLoRA{base_type.__name__}"
        _CLASSES[base_type] = type(base_type)(
            name, (MultiOpAdapter, base_type), {"__module__": __name__, "__qualname__": name}
        )
    return _CLASSES[base_type](layer, path=path, capacity=capacity, rank=rank, layers=layers)


def check_source(layer: MultiOpAdapter, src: nnx.Module, where: str) -> OpAdapter:
    """``src``, checked to be an op-level adapter of the same weights and roles (a
    ``ValueError`` otherwise)."""
    if not isinstance(src, OpAdapter):
        raise ValueError(
            f"{where} is adapted at its weight's product in the stack, but the adapter's layer "
            f"is a {type(src).__name__}"
        )
    if src.lora_products != layer.lora_products:
        raise ValueError(
            f"{where}: the adapter was made for the weights {_described(src)}, the stack's "
            f"for {_described(layer)}"
        )
    return src


def _described(layer: Products) -> str:
    """The adapted weights and their roles, as the single-weight messages name them."""
    return ", ".join(f"'{w}' as {roles}" for w, roles in layer.lora_products)
