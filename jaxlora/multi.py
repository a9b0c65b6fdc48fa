"""Many adapters of one base in one batch (multi-tenant serving, PEFT's ``adapter_names=``).

An ``AdapterStack`` holds up to ``capacity`` adapters for the same layers of one base, each
layer's factors stacked on a leading adapter axis: ``lora_a`` (N, *in_axes, R), ``lora_b``
(N, R, *out_axes), with N the capacity and R the stack's rank. Design choices:

- Ranks may differ: an adapter of rank r < R is padded with R − r zero rank components (zero
  columns of A, zero rows of B), which add exactly zero, so the padded branch is the adapter's
  own. The padded rank costs what rank R costs; choose R as the largest rank served.
- Each adapter keeps its own scale (alpha/r, or alpha/√r for rsLoRA) in a per-layer ``scale``
  vector (N,) instead of being folded into B: the scale is then applied as the single-adapter
  path applies it (to the (…, R) intermediate, in fp32, rounded once), B stays the file's B, and
  slot state is plain data. An empty slot has scale 0.
- Each example's index picks its adapter; ``-1`` means the base alone. The branch gathers each
  example's A and B (``jnp.take`` on the adapter axis) and contracts them batched over the
  examples: per example it costs one adapter's branch (never all N computed and selected).
  Base-only rows get scale 0: their branch is exactly zero, so they equal the base model.
- The stack is a pytree whose arrays are its leaves and whose layer paths, shapes and capacity
  are static: putting an adapter in a slot (``set``, a functional ``.at[slot].set``) or
  clearing one changes no shape, so a jitted forward taking the stack as an argument does not
  recompile. A larger capacity or rank is a new shape (a recompile).
- An index that is out of range or names an empty slot is a ``ValueError`` when the index is
  concrete; under ``jax.jit`` (a traced index, which cannot raise) such rows become NaN, never
  a silently plausible number.

Linen models are served with ``jaxlora.intercept_stack`` (the ``jaxlora.intercept``
interceptor, with this branch); NNX models with ``jaxlora.nnx.to_multi``. Linear layers
(``nn.Dense``, ``nn.DenseGeneral``; NNX ``LoRALinear``) and op-level adapters (made at a
weight's product: Linen adapters holding ``lora_roles``, NNX ``OpAdapter``; see
``jaxlora.multi_oplevel`` for which of those can be stacked) are stacked. A Linen module with
several adapted weights (``<weight>_lora_a``) is one layer of the stack per weight, keyed
``<module path>.<weight>`` (as ``path_map`` keys them; ``AdapterStack.modules`` groups them),
each served at its own product; its weights share the module's r and alpha.

Layers inside ``nn.scan`` (linear layers, ``nn.Dense``/``nn.DenseGeneral``, and layers
adapted at their weight's product, one weight or several) are stacked as one layer's are, for
every layer: ``lora_a`` (N, L, C…, R), ``lora_b`` (N, L, R, F…), the layer axis read where the
adapter has it (its ``lora_stack`` record's, MaxText's ``param_scan_axis=1``, else 0). The
scan body sees one layer's call, so these stacks reach it as the weights do, through the
params: ``AdapterStack.params(base)`` puts them beside their weights with the layer axis
where the scan's ``variable_axes`` slices it, and each layer's call reads its own slice (N,
C…, R), the same way for both kinds. A layer stacked over several layer axes (nested scans)
is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from _loracore.config import WEIGHT_INITS
from jaxlora import core, kinds, product
from jaxlora.config import LoRAConfig
from jaxlora.tree import ROLES_NAME, iter_lora_layers, path_str

__all__ = [
    "AdapterStack",
    "check_index",
    "gathered_branch",
    "pad_rank",
    "served_names",
    "stack_adapters",
]


@dataclasses.dataclass(frozen=True)
class AdapterStack:
    """Up to ``capacity`` adapters for the same linear or op-level layers of one base (see the
    module docstring). Build one with ``stack_adapters``; ``set``/``clear`` return a new stack.

    Attributes:
        lora_a: {layer path: (N, *in_axes, R)}; ``lora_b``: {layer path: (N, R, *out_axes)}.
        scale: {layer path: (N,) float32}, each adapter's own scaling (0 for an empty slot).
        occupied: (N,) bool, which slots hold an adapter.
        kernels: static ((layer path, base kernel shape), ...), the base the stack is for.
        roles: static ((layer path, ``ProductRoles``), ...) of the layers adapted at their
            weight's product (``lora_roles``): which weight, and its axes' roles.
        modules: static ((module path, (its keys, ...)), ...) of the modules with several
            adapted weights (``<weight>_lora_a``): each weight is a layer of the stack keyed
            ``<module path>.<weight>`` (as ``path_map`` keys them), served at its own product.
        scanned: static ((layer path, layer axis), ...) of the linear layers and the layers
            adapted at their weight's product inside ``nn.scan``
            (``variable_axes={"params": axis}``): their
            stacks hold every layer, ``lora_a`` (N, L, C…, R), ``lora_b`` (N, L, R, F…), and
            reach the scan body through the params (``AdapterStack.params``).
    """

    lora_a: dict[str, jax.Array]
    lora_b: dict[str, jax.Array]
    scale: dict[str, jax.Array]
    occupied: jax.Array
    kernels: tuple[tuple[str, tuple[int, ...]], ...]
    roles: tuple[tuple[str, product.ProductRoles], ...] = ()
    modules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    scanned: tuple[tuple[str, int], ...] = ()

    @property
    def capacity(self) -> int:
        return int(self.occupied.shape[0])

    @property
    def rank(self) -> int:
        return int(next(iter(self.lora_a.values())).shape[-1])

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(path for path, _ in self.kernels)

    def set(self, slot: int, params: Mapping[str, Any], config: LoRAConfig) -> AdapterStack:
        """A new stack with ``slot`` holding the adapter in ``params`` (a params tree with
        ``lora_a``/``lora_b`` leaves, e.g. from ``jaxlora.load_adapter``), scaled per
        ``config`` (``read_adapter_config`` for a file). Same shapes: no recompile.

        Raises:
            ValueError: a slot outside [0, capacity), a rank above the stack's, other layers
                than the stack's, a base kernel of another shape (or used in its product
                otherwise), a non-linear layer, layers stacked by nn.scan on another layer axis
                than the stack's (or over several), a product with batch axes, a rank that
                disagrees with ``config``, non-finite values.
        """
        _check_slot(slot, self.capacity)
        layers = _adapter_layers(params, config, self.rank)
        _check_same_layers(self.paths, layers, dict(self.kernels), dict(self.roles))
        if _scanned(layers) != self.scanned:
            raise ValueError(
                f"the adapter's layers stacked by nn.scan (path, layer axis) {_scanned(layers)} "
                f"are not the stack's {self.scanned}: it was made for another base model"
            )
        if _modules(layers) != self.modules:
            raise ValueError(
                f"the adapter's modules with several adapted weights {_modules(layers)} are "
                f"not the stack's {self.modules}: it was made for another base model"
            )
        a, b, scale = dict(self.lora_a), dict(self.lora_b), dict(self.scale)
        for path, layer in layers.items():
            a[path] = a[path].at[slot].set(layer.a.astype(a[path].dtype))
            b[path] = b[path].at[slot].set(layer.b.astype(b[path].dtype))
            scale[path] = scale[path].at[slot].set(layer.scale)
        return dataclasses.replace(
            self, lora_a=a, lora_b=b, scale=scale, occupied=self.occupied.at[slot].set(True)
        )

    def params(self, base: Mapping[str, Any]) -> Any:
        """``base`` (the plain base params, bare or under ``"params"``) with the stacks of the
        layers adapted inside ``nn.scan`` (``scanned``) beside their weights, so that the scan
        slices them per layer as it slices the weights: ``lora_served_a`` (N, C…, R) and
        ``lora_served_b`` (N, R, F…) per layer (``<weight>_lora_served_a``/``_b`` per weight
        of several, ``served_names``), the layer axis where the scan's ``variable_axes`` puts
        it. Call it inside the jitted function, on the stack passed as its argument, and
        apply the model on the result within ``intercept_stack``; ``base`` itself (no copy)
        when no layer is scanned.

        Raises:
            ValueError: ``base`` lacks a scanned layer's module or already holds its names.
        """
        if not self.scanned:
            return base
        wrapped = "params" in base and isinstance(base["params"], Mapping)
        tree = dict(base["params"] if wrapped else base)
        modules = {key: m for m, keys in self.modules for key in keys}
        for key, axis in self.scanned:
            module = modules.get(key, key)
            weight = key[len(module) + 1 :] if key in modules else None
            node = tree
            for part in module.split("."):
                if not isinstance(node.get(part), Mapping):
                    raise ValueError(
                        f"AdapterStack.params: the base has no module '{module}' (at '{part}') "
                        "for the stack's layer stacked by nn.scan: a stack of another model?"
                    )
                node[part] = dict(node[part])
                node = node[part]
            for name, x in zip(
                served_names(weight), (self.lora_a[key], self.lora_b[key]), strict=True
            ):
                if name in node:
                    raise ValueError(
                        f"AdapterStack.params: layer '{module}' already holds '{name}': pass "
                        "the plain base, not a tree this method made"
                    )
                node[name] = kinds.from_front(jnp.moveaxis(x, 1, 0), axis)
        return {**base, "params": tree} if wrapped else tree

    def clear(self, slot: int) -> AdapterStack:
        """A new stack with ``slot`` empty (zeros, scale 0); indexing it is then an error."""
        _check_slot(slot, self.capacity)
        zero = {p: v.at[slot].set(0) for p, v in self.lora_a.items()}
        return dataclasses.replace(
            self,
            lora_a=zero,
            lora_b={p: v.at[slot].set(0) for p, v in self.lora_b.items()},
            scale={p: v.at[slot].set(0.0) for p, v in self.scale.items()},
            occupied=self.occupied.at[slot].set(False),
        )


jax.tree_util.register_dataclass(
    AdapterStack,
    data_fields=["lora_a", "lora_b", "scale", "occupied"],
    meta_fields=["kernels", "roles", "modules", "scanned"],
)


def served_names(weight: str | None) -> tuple[str, str]:
    """The params names under which ``AdapterStack.params`` passes a scanned layer's stacks
    into ``nn.scan``: ``lora_served_a``/``lora_served_b``, or ``<weight>_lora_served_a``/``_b``
    per weight of a module with several (not LoRA leaves: ``jaxlora.tree.is_lora_name``)."""
    prefix = "" if weight is None else f"{weight}_"
    return f"{prefix}lora_served_a", f"{prefix}lora_served_b"


def stack_adapters(
    adapters: Sequence[tuple[Mapping[str, Any], LoRAConfig]],
    *,
    capacity: int | None = None,
    rank: int | None = None,
) -> AdapterStack:
    """A stack holding ``adapters`` (each ``(params, config)``) in slots 0, 1, …; the other
    slots up to ``capacity`` (default: as many as given) are empty. ``rank`` (default: the
    largest given) bounds the ranks of adapters set later. The first adapter's layers and base
    kernel shapes (and, for an adapter made at its weight's product, the weight's roles in
    it) define the stack; every other adapter must have the same. Each layer's stack holds
    the widest dtype of the adapters given (an adapter ``set`` later is cast to it). A module
    adapted at its weight's product that contains another adapted layer is refused, naming
    both (adapt the module or its submodules, not both).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> import jaxlora
        >>> model = nn.Dense(4)
        >>> base = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
        >>> config = jaxlora.LoRAConfig(r=2, targets=".*")
        >>> one = jaxlora.inject({"dense": base}, config, jax.random.key(1))
        >>> stack = stack_adapters([(one, config)], capacity=4)
        >>> stack.capacity, stack.rank, stack.lora_a["dense"].shape
        (4, 2, (4, 8, 2))
    """
    if not adapters:
        raise ValueError("stack_adapters: give at least one (params, config) adapter")
    capacity = len(adapters) if capacity is None else capacity
    if not isinstance(capacity, int) or capacity < len(adapters):
        raise ValueError(
            f"stack_adapters: capacity must be an int >= the {len(adapters)} adapter(s) given, "
            f"got {capacity!r}"
        )
    given = [_adapter_layers(p, c, None) for p, c in adapters]
    first = given[0]
    paths = {key: layer.module or key for key, layer in first.items()}
    products = [paths[key] for key, layer in first.items() if layer.roles is not None]
    check_not_nested(products, list(paths.values()), "stack_adapters")
    if rank is None:
        rank = max(max(int(layer.a.shape[-1]) for layer in g.values()) for g in given)
    # Each layer's stack in the widest dtype given, not the first adapter's: a float32 adapter
    # after a bfloat16 one was rounded to bfloat16 (~2e-3 off its own model's output).
    dtypes = {
        p: (
            jnp.result_type(*(g[p].a for g in given if p in g)),
            jnp.result_type(*(g[p].b for g in given if p in g)),
        )
        for p in first
    }
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"stack_adapters: rank must be a positive int, got {rank!r}")
    empty = AdapterStack(
        lora_a={
            p: jnp.zeros((capacity, *layer.a.shape[:-1], rank), dtypes[p][0])
            for p, layer in first.items()
        },
        lora_b={
            p: jnp.zeros((capacity, *_b_shape(layer, rank)), dtypes[p][1])
            for p, layer in first.items()
        },
        scale={p: jnp.zeros((capacity,), jnp.float32) for p in first},
        occupied=jnp.zeros((capacity,), bool),
        kernels=tuple((p, layer.kernel) for p, layer in first.items()),
        roles=tuple((p, layer.roles) for p, layer in first.items() if layer.roles is not None),
        modules=_modules(first),
        scanned=_scanned(first),
    )
    for slot, (params, config) in enumerate(adapters):
        empty = empty.set(slot, params, config)
    return empty


def check_not_nested(products: Sequence[str], layers: Sequence[str], where: str) -> None:
    """A ``ValueError`` naming both paths if a module adapted at its weight's product (a path
    of ``products``) contains another stacked layer (a path of ``layers``; "" is the root).
    Its call is evaluated from its own trace, probed with one more example than the adapter
    index has: an inner stacked layer would be refused there (NNX) or never called (Linen)."""
    for outer in sorted(set(products)):
        prefix = f"{outer}." if outer else ""
        inner = sorted(p for p in layers if p != outer and p.startswith(prefix))
        if inner:
            raise ValueError(
                f"{where}: layer '{outer or '<root>'}' is adapted at its weight's product and "
                f"contains the adapted layers {inner}: stacks cannot serve both (the module's "
                "call is evaluated from its own trace, probed with one more example than the "
                "adapter index has, and the inner stacked layers cannot be served within it); "
                "adapt either the module or its submodules, not both"
            )


class _Layer(NamedTuple):
    kernel: tuple[int, ...]  # the base weight's shape
    a: jax.Array  # lora_a, padded to the stack's rank (a scanned layer's: (L, C…, R))
    b: jax.Array  # (R, F…); a scanned layer's (L, R, F…)
    scale: float
    roles: product.ProductRoles | None  # for an adapter made at its weight's product
    module: str | None = None  # the module path of one of several adapted weights
    layer: int | None = None  # the nn.scan layer axis of the params, for a scanned layer


def _b_shape(layer: _Layer, rank: int) -> tuple[int, ...]:
    """One slot's ``lora_b`` shape at the stack's ``rank`` (after a scanned layer's L)."""
    lead = 0 if layer.layer is None else 1
    return (*layer.b.shape[:lead], rank, *layer.b.shape[lead + 1 :])


def _scanned(layers: Mapping[str, _Layer]) -> tuple[tuple[str, int], ...]:
    """((key, layer axis), ...) of the layers stacked by nn.scan."""
    return tuple((k, layer.layer) for k, layer in sorted(layers.items()) if layer.layer is not None)


def _modules(layers: Mapping[str, _Layer]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """((module path, (its keys, ...)), ...) of the modules with several adapted weights."""
    grouped: dict[str, list[str]] = {}
    for key, layer in layers.items():
        if layer.module is not None:
            grouped.setdefault(layer.module, []).append(key)
    return tuple((m, tuple(sorted(keys))) for m, keys in sorted(grouped.items()))


def _adapter_layers(params: Mapping[str, Any], config: LoRAConfig, rank: int | None) -> dict:
    """{layer path: ``_Layer``} of a params tree, each checked (see ``AdapterStack.set``)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"an adapter must be a params tree (a dict), got {type(params).__name__}")
    if "params" in params and isinstance(params["params"], Mapping):
        params = params["params"]
    if config.init in WEIGHT_INITS:
        raise ValueError(
            f"an adapter with init={config.init!r} is relative to a residual kernel, not to the "
            "stack's base: it cannot be served from a stack"
        )
    layers = {}
    for path, node in iter_lora_layers(params):
        name = path_str(path)
        where = f"layer '{name}'"
        weights = _factors(node, where)
        if config.use_dora or "lora_magnitude" in node:
            raise ValueError(
                f"{where} is a DoRA adapter (use_dora, 'lora_magnitude'): a stack serves plain "
                "LoRA adapters only; its magnitude would be ignored"
            )
        if len(weights) > 1:  # one r and alpha for the module: refuse per-weight patterns
            product.check_module_patterns(config, name, [w for w, *_ in weights], where)
        for weight, kernel, a, b, roles, axis in weights:
            key = name if weight is None else f"{name}.{weight}"
            at = where if weight is None else f"{where}, weight '{weight}'"
            layer = _one_layer(kernel, a, b, roles, config, name, rank, at, axis)
            layers[key] = layer if weight is None else layer._replace(module=name)
    if not layers:
        raise ValueError("the adapter's params tree holds no 'lora_a'/'lora_b' leaves")
    return layers


def _one_layer(
    kernel, a, b, roles, config: LoRAConfig, name: str, rank, where: str, axis: int | None
) -> _Layer:
    """One stacked layer (a weight of a module with several: its own), checked: its rank is
    the config's for the module ``name``, within the stack's ``rank``, its values finite. A
    layer stacked by nn.scan on ``axis`` keeps every layer's factors, the layer axis in front
    (each layer's padded as one layer's is)."""
    if axis is not None:
        a, b = kinds.to_front(jnp.asarray(a), axis), kinds.to_front(jnp.asarray(b), axis)
    r = int(a.shape[-1])
    if r != config.rank_for(name):
        raise ValueError(
            f"{where} has r={r} (from its shapes) but the config gives it "
            f"r={config.rank_for(name)}: the scale would be wrong"
        )
    if not (np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(b)).all()):
        raise ValueError(f"{where}: the adapter has non-finite values")
    if rank is not None and r > rank:
        raise ValueError(
            f"{where} has r={r}, above the stack's rank {rank}: build a stack of a larger "
            "rank (stack_adapters(..., rank=...))"
        )
    target = r if rank is None else rank
    scale = core.scaling(r, config.alpha_for(name), use_rslora=config.use_rslora)
    pad = (
        (lambda a, b: pad_rank(a, b, target))
        if axis is None
        else jax.vmap(lambda a, b: pad_rank(a, b, target))
    )
    return _Layer(tuple(np.shape(kernel)), *pad(a, b), scale, roles, None, axis)


def _factors(node: Mapping[str, Any], where: str) -> list[tuple]:
    """[(weight name or None, base weight, lora_a, lora_b, ``ProductRoles`` or None, nn.scan
    layer axis or None)] of a linear layer's or an op-level adapter's node: one entry, or one
    per weight of a module with several adapted weights (named); a ``ValueError`` for any
    other kind (and for layers stacked over several layer axes)."""
    if ROLES_NAME in node:
        adapted = product.check_products(node, where, stacked=True)
        several = len(adapted) > 1
        out = []
        for one in adapted:
            check_no_batch(
                one.marker.roles, f"{where}, weight '{one.weight}'" if several else where
            )
            weight = one.weight if several else None
            out.append((weight, one.value, one.lora_a, one.lora_b, one.marker, one.layer))
        return out
    kind, _, kernel, a, b = kinds.check_layer(node, where, stacked=True)
    if kind != "linear":
        raise ValueError(
            f"{where} holds a {kind} adapter: only linear layers and adapters made at a "
            "weight's product can be stacked"
        )
    return [(None, kernel, a, b, None, _linear_layer_axis(node, kernel, a, b, where))]


def _linear_layer_axis(node: Mapping[str, Any], kernel, a, b, where: str) -> int | None:
    """The nn.scan layer axis of a linear layer stacked by one ``nn.scan`` (its
    ``lora_stack`` record's, else 0), ``None`` for a layer that is not stacked; a
    ``ValueError`` for several layer axes (nested scans), whose slices the scan body would
    not see as one layer's."""
    shapes = [tuple(np.shape(x)) for x in (kernel, a, b)]
    stack = kinds.stack_of("linear", *shapes)  # counts axes: wherever the layer axis is
    if stack > 1:
        raise ValueError(
            f"{where}: 'lora_a' {shapes[1]} and 'lora_b' {shapes[2]} are stacked over {stack} "
            "layer axes (nested nn.scan): a stack serves layers of one nn.scan layer axis only"
        )
    return kinds.layer_axis(node) if stack else None


def check_no_batch(roles: Any, where: str) -> None:
    """A ``ValueError`` for a weight whose product has batch axes (``oplevel.Roles``): after
    routing, an MoE expert's rows are tokens from any example, so there is no per-example
    adapter to gather (see ``jaxlora.multi_oplevel``)."""
    if roles.batch:
        raise ValueError(
            f"{where}: the weight {roles.shape} has batch axes {list(roles.batch)} in its product "
            "(e.g. MoE experts): its rows are not examples, so adapters cannot be gathered per "
            "example; only weights whose product has no batch axes can be stacked"
        )


def pad_rank(a: jax.Array, b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """``a`` (…, r) and ``b`` (r, …) with zero rank components up to ``rank`` (exact: they add
    zero to the branch)."""
    extra = rank - a.shape[-1]
    a = jnp.pad(jnp.asarray(a), [(0, 0)] * (a.ndim - 1) + [(0, extra)])
    return a, jnp.pad(jnp.asarray(b), [(0, extra)] + [(0, 0)] * (b.ndim - 1))


def _check_slot(slot: Any, capacity: int) -> None:
    if isinstance(slot, bool) or not isinstance(slot, int | np.integer):
        raise TypeError(f"the slot must be an int, got {type(slot).__name__}")
    if not 0 <= slot < capacity:
        raise ValueError(
            f"slot {slot} is outside the stack's capacity {capacity} (slots 0..{capacity - 1}): "
            "build a larger stack (stack_adapters(..., capacity=...)); that recompiles once"
        )


def _check_same_layers(
    paths: Sequence[str], layers: Mapping, kernels: Mapping, roles: Mapping
) -> None:
    missing, extra = sorted(set(paths) - set(layers)), sorted(set(layers) - set(paths))
    if missing or extra:
        raise ValueError(
            f"the adapter targets other layers than the stack's: missing {missing}, "
            f"unexpected {extra} (every adapter in a stack must adapt the same layers)"
        )
    for path, layer in layers.items():
        if layer.kernel != tuple(kernels[path]):
            raise ValueError(
                f"layer '{path}': the adapter's base kernel has shape {layer.kernel}, the stack's "
                f"base has {tuple(kernels[path])}: it was made for another base model"
            )
        if layer.roles != roles.get(path):
            raise ValueError(
                f"layer '{path}': the adapter was made for the weight's product as "
                f"{layer.roles}, the stack's layer as {roles.get(path)} (None: a linear layer)"
            )


def check_index(index: Any, where: str) -> None:
    """A ``TypeError``/``ValueError`` unless ``index`` is a 1-D integer array (one adapter
    index per example)."""
    dtype = getattr(index, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{where}: the adapter index must be an integer array of shape (batch,) "
            f"(-1 for the base alone), got {getattr(dtype, 'name', type(index).__name__)}"
        )
    if jnp.ndim(index) != 1:
        raise ValueError(
            f"{where}: the adapter index must have shape (batch,), got {tuple(jnp.shape(index))}"
        )


def check_index_values(index: Any, occupied: Any, where: str) -> None:
    """Where ``index`` and ``occupied`` are concrete: a ``ValueError`` for an index outside
    [-1, capacity) or naming an empty slot (traced, such rows become NaN instead)."""
    if isinstance(index, jax.core.Tracer) or isinstance(occupied, jax.core.Tracer):
        return
    index, occupied = np.asarray(index), np.asarray(occupied)
    bad = [int(i) for i in index if not (i == -1 or (0 <= i < len(occupied) and occupied[i]))]
    if bad:
        raise ValueError(
            f"{where}: adapter index values {sorted(set(bad))} name no adapter (expected -1 for "
            f"the base or an occupied slot of {np.flatnonzero(occupied).tolist()})"
        )


def gathered_branch(
    x: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    scale: jax.Array,
    occupied: jax.Array,
    index: jax.Array,
    axis: tuple[int, ...] = (-1,),
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Each example's own branch: ``x[i]``'s ``axis`` contracted with ``lora_a[index[i]]``,
    times ``scale[index[i]]`` (in fp32, rounded once), times ``lora_b[index[i]]``; exactly zero
    where ``index[i] == -1`` and NaN where it names no adapter. ``x`` has the examples on axis
    0; the output axes come last, as ``core.factored``'s do. ``precision`` and
    ``preferred_element_type`` are the products' (``jax.lax.dot_general``'s); the scaled
    intermediate is rounded to the inputs' dtype, as the single-adapter branches do."""
    n = lora_a.shape[0]
    axis = tuple(i % x.ndim for i in axis)
    if 0 in axis:
        raise ValueError("the examples' axis 0 cannot be contracted by a stacked layer")
    safe = jnp.clip(index, 0, n - 1)
    valid = (index >= 0) & (index < n) & occupied[safe]
    s = jnp.where(index == -1, 0.0, jnp.where(valid, scale[safe], jnp.nan))
    a = jnp.take(lora_a, safe, axis=0, mode="clip")  # safe is in range: no fill
    b = jnp.take(lora_b, safe, axis=0, mode="clip")
    dims = ((axis, tuple(range(1, len(axis) + 1))), ((0,), (0,)))
    options = dict(precision=precision, preferred_element_type=preferred_element_type)
    h = jax.lax.dot_general(x, a, dims, **options)  # (B, free…, R)
    wide = jnp.promote_types(h.dtype, jnp.float32)
    s = s.reshape((-1,) + (1,) * (h.ndim - 1)).astype(wide)
    h = (h.astype(wide) * s).astype(jnp.result_type(x, a))
    b_flat = b.reshape(b.shape[0], b.shape[1], -1)
    y = jax.lax.dot_general(h, b_flat, (((h.ndim - 1,), (1,)), ((0,), (0,))), **options)
    return y.reshape((*h.shape[:-1], *lora_b.shape[2:]))
