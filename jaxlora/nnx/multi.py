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

Op-level layers (``OpAdapter``, adapted at a weight's product) become stacked op-level layers
(``jaxlora.nnx.multi_op``) the same way, with stacks in the weight's product layout; their
product's activation must hold the examples on its axis 0 alone (``jaxlora.multi_oplevel``).
A module with several adapted weights gets a stack per weight (``<weight>_lora_a``/``_b``, as
its ``OpAdapter`` names its factors), each served at its own product by the same branch, and
one ``scale``/``occupied`` (its weights share the module's r and alpha).

A layer of an ``nnx.vmap`` stack (a ``LoRALinear`` kernel (L, in, out), an ``OpAdapter``
whose weights carry a leading layer axis) gets stacks with that layer axis in front: e.g.
``lora_a`` (L, N, in, R), ``lora_b`` (L, N, R, out), ``scale`` and ``occupied`` (L, N);
``set_adapter`` writes slot ``i`` of every layer from the source's stacked adapter. The
``nnx.scan`` over axis 0 that slices the weights per layer slices the stacks alike, so each
layer's call is a one-layer stacked layer (the layout Linen's ``AdapterStack.params`` gives
an ``nn.scan``). Under the scan ``occupied`` is traced, so an index naming an empty slot
gives NaN rows rather than an error. Layers stacked over several axes are refused.

Serving only: there is no dropout on the branch. Only ``LoRALinear`` and ``OpAdapter`` layers
are stacked; a model holding other LoRA layers (``LoRALinearGeneral``, ``LoRAConv``,
``LoRAEmbed``) is refused, as they would apply one adapter to every example. So is an
``OpAdapter`` containing another adapted layer (adapt the module or its submodules, not both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import core, multi
from jaxlora.nnx import multi_op
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.inject import _module_paths, _replace, stack_of
from jaxlora.nnx.layer import LoRALinear
from jaxlora.nnx.multi_op import MultiOpAdapter
from jaxlora.nnx.oplevel import OpAdapter
from jaxlora.nnx.quant import kernel_value
from jaxlora.nnx.serving import (
    FACTORS,
    StackedAdapter,
    active_index,
    adapter_index,
    check_sliced,
    new_stack,
    write,
)

__all__ = [
    "MultiLoRALinear",
    "MultiOpAdapter",
    "StackedAdapter",
    "adapter_index",
    "clear_adapter",
    "set_adapter",
    "to_multi",
]


class MultiLoRALinear(nnx.Module):
    """An ``nnx.Linear`` (sharing a ``LoRALinear``'s kernel and bias) plus, per example, the
    branch of the adapter the active ``adapter_index`` picks (``jaxlora.multi.gathered_branch``).
    """

    lora_a: StackedAdapter
    lora_b: StackedAdapter
    scale: StackedAdapter
    occupied: StackedAdapter

    def __init__(
        self, layer: LoRALinear, *, capacity: int, rank: int, layers: tuple[int, ...] = ()
    ) -> None:
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.dtype, self.precision = layer.dtype, layer.precision
        self.kernel, self.bias = layer.kernel, layer.bias
        shapes = {FACTORS: ((layer.in_features, rank), (rank, layer.out_features))}
        new_stack(self, shapes, layer.lora_a.dtype, capacity, layers)

    @property
    def capacity(self) -> int:
        return self.occupied.shape[-1]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        where = f"jaxlora.nnx.MultiLoRALinear({self.in_features}, {self.out_features})"
        check_sliced(self, where)
        core.check_input(x, self.in_features, where)
        index = active_index(where)
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
    """Replaces every ``LoRALinear`` of ``model`` in place by a ``MultiLoRALinear``, and every
    ``OpAdapter`` by a stacked op-level layer (``jaxlora.nnx.multi_op``), each with an empty
    stack of ``capacity`` slots and rank ``rank`` (default: the largest layer's r); returns
    ``model``. The layers' own adapters are not kept: put them in a slot with ``set_adapter``
    (from a copy made before). Everything is checked before the model is changed; an
    ``OpAdapter`` that contains another adapted layer is refused, naming both."""
    paths = _module_paths(model)
    kinds = LoRALinear | OpAdapter
    layers = {p: (path, m) for p, (path, m) in paths.items() if isinstance(m, kinds)}
    others = sorted(p for p, (_, m) in paths.items() if isinstance(m, Adapter))
    if others:
        raise ValueError(
            f"to_multi: layers {others} are LoRA layers that cannot be stacked (only "
            "LoRALinear and OpAdapter): they would apply one adapter to every example"
        )
    if not layers:
        raise ValueError("to_multi: the model has no jaxlora.nnx.LoRALinear or OpAdapter layer")
    products = [p for p, (_, m) in layers.items() if isinstance(m, OpAdapter)]
    multi.check_not_nested(products, list(layers), "to_multi")
    for p, (_, m) in layers.items():
        if isinstance(m, OpAdapter):  # each weight of several (its own stack) alike
            multi_op.check_untied(m, f"to_multi: layer '{p}'")
            several = len(m.lora_products) > 1
            for weight, roles in m.lora_products:
                at = f"to_multi: layer '{p}'" + (f", weight '{weight}'" if several else "")
                multi.check_no_batch(roles, at)
    dora = sorted(p for p, (_, m) in layers.items() if getattr(m, "use_dora", False))
    if dora:  # a stack's branch has no magnitude: it would be silently dropped
        raise ValueError(
            f"to_multi: layers {dora} are DoRA (use_dora): stacks serve plain LoRA only"
        )
    # A layer of an nnx.vmap stack keeps its layer axis in front of its stacks (what slices
    # the layers slices them alike); a stack over several layer axes is not served.
    stacked = sorted(p for p, (_, m) in layers.items() if stack_of(m) > 1)
    if stacked:
        raise ValueError(
            f"to_multi: layers {stacked} are stacked over several layer axes (nested "
            "nnx.vmap): adapter stacks are supported for layers of one layer axis only"
        )
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"to_multi: capacity must be a positive int, got {capacity!r}")
    rank = max(m.r for _, m in layers.values()) if rank is None else rank
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"to_multi: rank must be a positive int, got {rank!r}")
    for name, (path, module) in layers.items():
        lengths = _layer_lengths(module)
        if isinstance(module, OpAdapter):
            new = multi_op.stacked(module, path=name, capacity=capacity, rank=rank, layers=lengths)
        else:
            new = MultiLoRALinear(module, capacity=capacity, rank=rank, layers=lengths)
        _replace(model, path, new)
    return model


def _layer_lengths(module: LoRALinear | OpAdapter) -> tuple[int, ...]:
    """(L,) for a layer of an ``nnx.vmap`` stack (its weights' leading layer axis), else ()."""
    if isinstance(module, OpAdapter):  # the weights of one module are stacked alike
        weight = getattr(module, module.lora_products[0][0])
    else:
        weight = module.kernel
    return tuple(kernel_value(weight).shape[: stack_of(module)])


def _stacked(model: nnx.Module) -> dict[str, MultiLoRALinear | MultiOpAdapter]:
    kinds = MultiLoRALinear | MultiOpAdapter
    found: dict[str, MultiLoRALinear | MultiOpAdapter] = {
        p: m for p, (_, m) in _module_paths(model).items() if isinstance(m, kinds)
    }
    if not found:
        raise ValueError("the model has no stacked layer: call jaxlora.nnx.to_multi")
    return found


def _weights(layer, src: nnx.Module, path: str) -> list[tuple[str, tuple, tuple, tuple]]:
    """[(where, (name_a, name_b), (the source's, the stack's) base weight, the source's
    (lora_a, lora_b))] of a layer: one entry, or one per weight of a module with several
    adapted weights (each its own stack); a ``ValueError`` if the source's layer is of another
    kind (or, op-level, made for other weights or roles)."""
    where = f"set_adapter: layer '{path}'"
    if isinstance(layer, MultiOpAdapter):
        op = multi_op.check_source(layer, src, where)
        several = len(op.lora_products) > 1
        return [
            (
                f"{where}, weight '{w}'" if several else where,
                layer.factor_names(w),
                (getattr(op, w), getattr(layer, w)),
                tuple(f[...] for f in op.factors(w)),
            )
            for w in op.lora_weights
        ]
    if not isinstance(src, LoRALinear):
        raise ValueError(f"{where} is a LoRALinear in the stack, the adapter's a {type(src)}")
    return [(where, FACTORS, (src.kernel, layer.kernel), (src.lora_a[...], src.lora_b[...]))]


def set_adapter(model: nnx.Module, slot: int, source: nnx.Module) -> None:
    """Puts the adapters of ``source`` (a model with ``LoRALinear``/``OpAdapter`` layers at the
    same paths, e.g. one trained or loaded with ``jaxlora.nnx.load_adapter``) into ``slot`` of
    ``model``'s stacks (each weight's own, for a module with several adapted weights), in
    place; checked completely before anything is written. The source's kernels must equal the
    serving model's (same shapes and values, compared once here): an adapter trained on
    another base, or a PiSSA/OLoRA one (whose kernel is a residual), is refused."""
    stacks = _stacked(model)
    capacity = next(iter(stacks.values())).capacity
    multi._check_slot(slot, capacity)
    kinds = LoRALinear | OpAdapter
    found = {p: m for p, (_, m) in _module_paths(source).items() if isinstance(m, kinds)}
    missing, extra = sorted(set(stacks) - set(found)), sorted(set(found) - set(stacks))
    if missing or extra:
        raise ValueError(
            f"set_adapter: the adapter targets other layers than the stack's: missing {missing}, "
            f"unexpected {extra} (every adapter in a stack must adapt the same layers)"
        )
    new = {}
    for path, layer in stacks.items():
        src = found[path]
        if getattr(src, "use_dora", False):
            raise ValueError(
                f"set_adapter: layer '{path}' is a DoRA adapter (use_dora): a stack serves plain "
                "LoRA adapters only; its magnitude would be ignored"
            )
        weights = _weights(layer, src, path)
        for where, _, (mine, theirs), _ in weights:
            _check_weight(where, mine, theirs, getattr(src, "init", None))
        if src.r > layer.rank:
            raise ValueError(
                f"set_adapter: layer '{path}' has r={src.r}, above the stack's rank "
                f"{layer.rank}: build the stack with a larger rank (to_multi(..., rank=...))"
            )
        factors = {}
        for where, names, _, (a, b) in weights:
            if not (jnp.isfinite(a).all() and jnp.isfinite(b).all()):
                raise ValueError(f"{where}: the adapter has non-finite values")
            pad = lambda a, b, rank=layer.rank: multi.pad_rank(a, b, rank)  # noqa: E731
            for _ in range(layer.occupied.ndim - 1):  # each layer of a stack padded alike
                pad = jax.vmap(pad)
            factors[names] = pad(a, b)
        new[path] = (factors, src.scaling)
    for path, (factors, scale) in new.items():
        write(stacks[path], slot, factors, scale, True)


def _check_weight(where: str, mine: nnx.Variable, theirs: nnx.Variable, init) -> None:
    """A ``ValueError`` unless the source's base weight is the stack's (shape and values)."""
    if kernel_value(mine).shape != kernel_value(theirs).shape:
        raise ValueError(
            f"{where}: the adapter's base kernel has shape {kernel_value(mine).shape}, the "
            f"stack's base has {kernel_value(theirs).shape}: it was made for another base model"
        )
    if not _same_values(mine, theirs):
        raise ValueError(
            f"{where}: the adapter's base kernel differs from the stack's base (init={init!r}; "
            "PiSSA/OLoRA kernels are residuals): it was made for another base model (load it "
            "into a copy of the serving base)"
        )


def _same_values(a: nnx.Variable, b: nnx.Variable) -> bool:
    """Whether two kernels are the same variable or hold equal values (one pass over them)."""
    return a is b or bool(jnp.array_equal(kernel_value(a), kernel_value(b)))


def clear_adapter(model: nnx.Module, slot: int) -> None:
    """Empties ``slot`` of ``model``'s stacks in place; indexing it is then an error."""
    stacks = _stacked(model)
    multi._check_slot(slot, next(iter(stacks.values())).capacity)
    for layer in stacks.values():
        write(layer, slot, {names: (0.0, 0.0) for names in _factor_names(layer)}, 0.0, False)


def _factor_names(layer: MultiLoRALinear | MultiOpAdapter) -> list[tuple[str, str]]:
    """The (name_a, name_b) of each of a stacked layer's factor stacks."""
    if isinstance(layer, MultiOpAdapter):
        return [layer.factor_names(w) for w in layer.lora_weights]
    return [FACTORS]
