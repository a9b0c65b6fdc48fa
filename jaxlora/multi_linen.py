"""``intercept_stack(stack, index)``: unmodified Linen models serve many adapters in one batch.

The same interceptor as ``jaxlora.intercept`` (its layer checks, subclass handling and nn.jit
keying), adding to each layer the stack names the per-example branch of
``jaxlora.multi.gathered_branch`` instead of a branch from LoRA leaves in the params; for a
layer adapted at its weight's product (the stack's ``roles``), at that product
(``jaxlora.multi_oplevel``, which also says where the examples must be).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlora import kinds, multi, multi_oplevel, product
from jaxlora.intercept import (
    _ACTIVE,
    _check_dense_kernel,
    _own_call,
    _State,
    input_axes,
    lora_leaves,
    traced_as,
)
from jaxlora.tree import ROLES_NAME, path_str

__all__ = ["intercept_stack"]


@contextlib.contextmanager
def intercept_stack(stack: multi.AdapterStack, index: jax.Array) -> Iterator[None]:
    """Within this context, each example ``i`` of a Linen model's batch runs with adapter
    ``index[i]`` of ``stack`` (``-1``: the base alone) on the stack's layers.

    The params passed to ``apply`` must be the plain base (no ``lora_a``/``lora_b`` leaves:
    ``jaxlora.split`` them off), the examples on axis 0 of every stacked layer's input (for
    a layer adapted at its weight's product: of the product's activation, and only there). Enter it
    inside the jitted function, with the stack and the index as its arguments: replacing an
    adapter in the stack (same capacity and rank) then reuses the compiled forward. A stack
    with layers inside ``nn.scan`` (``stack.scanned``: ``nn.Dense``/``nn.DenseGeneral`` or
    adapted at their weight's product) needs the params of ``stack.params(base)`` instead,
    which carry those layers' stacks into the scan body.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> import jaxlora
        >>> model = nn.Sequential([nn.Dense(4)])
        >>> base = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
        >>> config = jaxlora.LoRAConfig(r=2, targets=["layers_0"])
        >>> one = jaxlora.inject(base, config, jax.random.key(1))
        >>> stack = jaxlora.stack_adapters([(one, config)], capacity=2)
        >>> with intercept_stack(stack, jnp.array([0, -1])):
        ...     y = model.apply({"params": base}, jnp.ones((2, 8)))
        >>> y.shape
        (2, 4)

    Raises:
        TypeError, ValueError: an index that is not a 1-D integer array, or (when concrete)
            holds a value that is neither -1 nor an occupied slot; a base holding LoRA leaves;
            a stacked layer whose kernel or input does not match the stack; a layer adapted
            at its weight's product whose call uses the weight otherwise than the stack's
            roles, or whose product's activation does not hold the examples on its axis 0
            alone; a layer of ``stack.scanned`` whose stacks are not in the params as
            ``stack.params`` puts them (one layer's slice each); a stack layer the model
            never called (on leaving the context); nesting with ``jaxlora.intercept``.
    """
    if not isinstance(stack, multi.AdapterStack):
        raise TypeError(f"intercept_stack: expected an AdapterStack, got {type(stack).__name__}")
    multi.check_index(index, "intercept_stack")
    multi.check_index_values(index, stack.occupied, "intercept_stack")
    if any(isinstance(k, tuple) and k[0] == "intercept" for k in _ACTIVE.keys):
        raise ValueError(
            "intercept_stack: a jaxlora.intercept or intercept_stack is already active; nesting "
            "them would add branches twice. Enter one, around the outermost call."
        )
    # No LoRAConfig: the stack's layers use the stack's own scales, not _State.config.
    state = _StackState(None, True, stack=stack, index=index)  # type: ignore[arg-type]
    key = (
        "intercept",
        "stack",
        stack.kernels,
        stack.roles,
        stack.modules,
        stack.scanned,
        stack.capacity,
        stack.rank,
    )
    with traced_as(key), nn.intercept_methods(state.interceptor):
        yield
    never = sorted(set(stack.paths) - state.applied)
    if never:
        raise ValueError(
            f"intercept_stack: the stack's layers {never} were never called by the model: "
            "their adapters would be silently skipped (a stack built for another model?)"
        )


@dataclasses.dataclass
class _StackState(_State):
    stack: Any = None
    index: Any = None
    applied: set[str] = dataclasses.field(default_factory=set)

    def adapted(self, module: nn.Module) -> bool:
        own = super().adapted(module)
        return own or path_str(module.path) in self.stack.lora_a or self.at_product(module)

    def at_product(self, module: nn.Module) -> bool:
        name = path_str(module.path)
        return name in dict(self.stack.roles) or name in dict(self.stack.modules)

    def apply_product(self, module: nn.Module, args: tuple, kwargs: dict, quantized):
        name = path_str(module.path)
        where = f"layer '{name}'"
        self._check_plain(module, where)
        roles = dict(self.stack.roles)
        # {stack key: its record}: the module's one weight, or each of its several
        keys = dict(self.stack.modules).get(name, (name,))
        markers = {key: roles[key] for key in keys}
        weights = {marker.weight: key for key, marker in markers.items()}

        def trace(a, k):
            return product.traced_products(module, list(markers.values()), where, a, k, quantized)

        traced, found = trace(args, kwargs)
        several = len(keys) > 1
        multi_oplevel.check_call(
            [found[w] for w in weights],
            traced.closed,
            lambda a, k: trace(a, k)[0].closed,
            args,
            kwargs,
            int(jnp.shape(self.index)[0]),
            where,
            [f"{where}, weight '{w}'" if several else where for w in weights],
        )
        scanned = dict(self.stack.scanned)
        stack = self.stack
        for key, marker in markers.items():  # checked before any branch is computed
            if key in scanned:
                self._served(module, key, marker.weight if several else None, where)
        self.applied.update(keys)

        def factors(weight: str) -> tuple:
            key = weights[weight]
            a, b = stack.lora_a[key], stack.lora_b[key]
            if key in scanned:  # this layer's slice, which the scan took of stack.params
                a, b = self._served(module, key, weight if several else None, where)
            return (a, b, stack.scale[key], stack.occupied)

        return product.evaluate(
            traced,
            found,
            lambda weight, site, eqn, operands, _index, _factors: multi_oplevel.gathered(
                site, eqn, operands, factors(weight), self.index
            ),
        )

    def _served(self, module: nn.Module, key: str, weight: str | None, where: str) -> tuple:
        """The stack's factors of one layer of a layer stacked by nn.scan, as the scan sliced
        them off ``AdapterStack.params``; a ``ValueError`` naming the layer if they are not
        in the params or not one layer's slice of this stack's shapes."""
        at = where if weight is None else f"{where}, weight '{weight}'"
        names = multi.served_names(weight)
        axis = dict(self.stack.scanned)[key]
        missing = [n for n in names if not module.has_variable("params", n)]
        if missing:
            raise ValueError(
                f"{at} is stacked by nn.scan (layer axis {axis}): the stack's adapters reach "
                f"the scan body through the params, which lack {missing}: apply the model on "
                "stack.params(base) within intercept_stack"
            )
        out: tuple[Any, ...] = tuple(module.get_variable("params", n) for n in names)
        for name, value, full in zip(
            names, out, (self.stack.lora_a, self.stack.lora_b), strict=True
        ):
            want = (full[key].shape[0], *full[key].shape[2:])
            if tuple(jnp.shape(value)) != want:
                raise ValueError(
                    f"{at}: '{name}' is {tuple(jnp.shape(value))} in the scan body, one layer "
                    f"of the stack is {want}: the params were not made by this stack's "
                    f"params() or the scan slices another axis than {axis}"
                )
        return out

    def _check_plain(self, module: nn.Module, where: str) -> None:
        held = lora_leaves(module) + [n for n in (ROLES_NAME,) if module.has_variable("params", n)]
        if held:
            raise ValueError(
                f"{where} holds its own {held} in the params: intercept_stack serves the "
                "stack's adapters on the plain base (jaxlora.split the adapter off first)"
            )

    def _apply(self, module: nn.Module, kind: str, method: str, next_fun, args, kwargs, quantized):
        name = path_str(module.path)  # the stack's keys, '<root>' for a root layer
        where = f"layer '{name}'"
        self._check_plain(module, where)
        x = args[0] if args else next(iter(kwargs.values()))
        if quantized:
            _check_dense_kernel(module, quantized, x, where)
            kernel = quantized["kernel"]
            y = _own_call(module, method, quantized, args, kwargs)
        else:
            kernel = module.get_variable("params", "kernel")
            y = next_fun(*args, **kwargs)
        if name not in self.stack.lora_a:  # a quantized base layer the stack does not adapt
            return y
        if kind != "linear":
            raise ValueError(f"{where}: only linear layers can take a stack, this is a {kind}")
        a, b = self.stack.lora_a[name], self.stack.lora_b[name]
        if name in dict(self.stack.scanned):  # this layer's slice, as for a product's
            a, b = self._served(module, name, None, where)
        self._check(module, name, jnp.shape(kernel), x, a)
        x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=module.dtype)
        axis = module.axis if isinstance(module, nn.DenseGeneral) else -1
        axis = tuple(axis) if isinstance(axis, Sequence) else (axis,)
        # the kernel's leading axes pair with ``axis`` sorted, as DenseGeneral contracts them
        axis = tuple(sorted(i % jnp.ndim(x) for i in axis))
        if 0 in axis:
            raise ValueError(f"{where} contracts its input's axis 0, which is the examples' axis")
        self.applied.add(name)
        branch = multi.gathered_branch(
            x,
            a,
            b,
            self.stack.scale[name],
            self.stack.occupied,
            self.index,
            axis,
            module.precision,
        )
        return y + branch

    def _check(self, module: nn.Module, name: str, kernel_shape, x, a) -> None:
        """The layer's kernel, input and the stack's (served) ``a`` (N, *in_axes, R) agree."""
        where = f"layer '{name}'"
        expected = tuple(dict(self.stack.kernels)[name])
        axis = dict(self.stack.scanned).get(name)
        if axis is not None:  # the stack holds every layer's kernel shape; the call sees one
            expected = kinds.to_front(expected, axis)[1:]
        if tuple(kernel_shape) != expected:
            raise ValueError(
                f"{where}: the model's kernel has shape {tuple(kernel_shape)}, the stack was "
                f"built for a base kernel of shape {expected}"
                + ("" if axis is None else f" per layer (nn.scan layer axis {axis})")
            )
        if input_axes(module) != jnp.ndim(a) - 2:
            raise ValueError(
                f"{where}: the layer contracts {input_axes(module)} axis(es), the "
                f"stack's lora_a {jnp.shape(a)} has {jnp.ndim(a) - 2}"
            )
        if jnp.ndim(x) < 2 or jnp.shape(x)[0] != jnp.shape(self.index)[0]:
            raise ValueError(
                f"{where}: the adapter index has shape {tuple(jnp.shape(self.index))} but the "
                f"layer's input {tuple(jnp.shape(x))} has no matching batch axis 0"
            )
