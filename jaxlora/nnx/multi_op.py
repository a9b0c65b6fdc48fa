"""Stacked op-level layers for ``jaxlora.nnx.to_multi``: many adapters at a weight's product.

``stacked(layer, …)`` turns an ``OpAdapter`` into an instance of a subclass of the module's own
type (``MultiLoRA<Type>``, mixing in ``MultiOpAdapter``) holding the same base variables and,
instead of one adapter, a stack: ``lora_a`` (N, C…, R), ``lora_b`` (N, R, F…), ``scale`` and
``occupied`` (N,) as ``StackedAdapter`` variables (``jaxlora.multi_oplevel``'s layout). Its call
is the original call's jaxpr with each example's branch added at the product
(``jaxlora.multi_oplevel.gathered``), after checking that the product's activation holds the
examples on its axis 0 alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flax import nnx

from jaxlora import multi, multi_oplevel, oplevel
from jaxlora.nnx import serving
from jaxlora.nnx.oplevel import LORA_ATTRIBUTES, OpAdapter, call, traced_call

_CLASSES: dict[type, type] = {}


if TYPE_CHECKING:
    _Module = nnx.Module  # MultiOpAdapter is only ever mixed into an NNX module (stacked)
else:
    _Module = object


class MultiOpAdapter(_Module):
    """The mixin of every stacked op-level layer (see the module docstring)."""

    __slots__ = ()
    lora_base_type: type[nnx.Module]
    lora_weight: str
    lora_roles: oplevel.Roles
    lora_products: tuple[tuple[str, oplevel.Roles], ...]  # its one weight's, as OpAdapter's
    lora_path: str
    lora_a: serving.StackedAdapter
    lora_b: serving.StackedAdapter
    scale: serving.StackedAdapter
    occupied: serving.StackedAdapter

    def __init__(self, layer: OpAdapter, *, path: str, capacity: int, rank: int) -> None:
        for name, value in vars(layer).items():
            if not name.startswith("_pytree__") and name not in LORA_ATTRIBUTES:
                setattr(self, name, value)
        self.lora_base_type = layer.lora_base_type
        self.lora_weight, self.lora_roles = layer.lora_weight, layer.lora_roles
        self.lora_products = layer.lora_products
        self.lora_path = path
        shape_a, shape_b = layer.lora_roles.lora_shapes(rank)
        serving.new_stack(self, shape_a, shape_b, layer.lora_a.dtype, capacity)

    @property
    def capacity(self) -> int:
        return self.occupied.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    def __call__(self, *args, **kwargs):
        where = f"layer '{self.lora_path}'"
        index = serving.active_index(where)
        closed, products = traced_call(self, args, kwargs)
        product = products[self.lora_weight]
        retrace = lambda a, k: traced_call(self, a, k)[0]  # noqa: E731
        multi_oplevel.check_call(product, closed, retrace, args, kwargs, index.shape[0], where)
        multi.check_index_values(index, self.occupied[...], where)
        stack = (self.lora_a[...], self.lora_b[...], self.scale[...], self.occupied[...])

        def extra(weight, product, eqn, operands, _index):  # batch axes are refused (to_multi)
            return multi_oplevel.gathered(product, eqn, operands, stack, index)

        return call(self, args, kwargs, extra)


def check_untied(layer: OpAdapter, where: str) -> None:
    """A ``ValueError`` for a tied op-level adapter (``inject(..., tied_products=...)``): a
    stack's layers compute their branch in ``__call__`` only."""
    if layer.lora_lookups or layer.lora_method != "__call__":
        raise ValueError(
            f"{where} is a tied op-level adapter (inject(..., tied_products=...)), its product "
            f"in its method '{layer.lora_method}': adapter stacks do not support it"
        )


def stacked(layer: OpAdapter, *, path: str, capacity: int, rank: int) -> Any:
    """``layer``'s base with an empty stack of ``capacity`` adapters of rank ``rank``."""
    base_type: type = layer.lora_base_type
    if base_type not in _CLASSES:
        name = f"MultiLoRA{base_type.__name__}"
        _CLASSES[base_type] = type(base_type)(
            name, (MultiOpAdapter, base_type), {"__module__": __name__, "__qualname__": name}
        )
    return _CLASSES[base_type](layer, path=path, capacity=capacity, rank=rank)


def check_source(layer: MultiOpAdapter, src: nnx.Module, where: str) -> OpAdapter:
    """``src``, checked to be an op-level adapter of the same weight and roles (a
    ``ValueError`` otherwise)."""
    if not isinstance(src, OpAdapter):
        raise ValueError(
            f"{where} is adapted at its weight's product in the stack, but the adapter's layer "
            f"is a {type(src).__name__}"
        )
    if (src.lora_weight, src.lora_roles) != (layer.lora_weight, layer.lora_roles):
        raise ValueError(
            f"{where}: the adapter was made for weight '{src.lora_weight}' as {src.lora_roles}, "
            f"the stack's for '{layer.lora_weight}' as {layer.lora_roles}"
        )
    return src
