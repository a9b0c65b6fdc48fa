"""Folding adapters into kernels (``merge``) and taking them out again (``unmerge``).

Pure functions over nested-dict params trees: the input is never modified. ``unmerge`` undoes
one ``merge`` from the ``MergeRecord`` it returned, so it cannot subtract an adapter that was
never added, or with another scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core import meta

from jaxlora import core, kinds, multi, product
from jaxlora.config import LoRAConfig
from jaxlora.quant._base import dequantize_base, is_quantized, requantize_merged
from jaxlora.tree import (
    RECORD_NAMES,
    ROLES_NAME,
    Path,
    PyTree,
    _like,
    _require_mapping,
    combine,
    is_lora_name,
    iter_lora_layers,
    path_str,
    split,
)

Alpha = float | None | Callable[[str], float | None]


def merge(
    params: PyTree,
    *,
    alpha: Alpha,
    use_rslora: bool = False,
    record: bool = False,
    requantize: bool = False,
) -> PyTree | tuple[PyTree, MergeRecord]:
    """Returns a new tree with each ``lora_a``/``lora_b`` pair folded into its sibling ``kernel``
    (or ``embedding``).

    ``kernel + scaling · lora_a @ lora_b`` is computed in float32 and rounded once to the
    kernel's dtype; the LoRA leaves are removed, so the result is what the plain model
    consumes (and costs exactly its FLOPs). ``r`` and the layer kind (Dense, DenseGeneral,
    Conv, Embed: see ``jaxlora.kinds``) are read from the shapes. A DoRA layer (one holding
    ``lora_magnitude`` m) merges to PEFT's ``m / ‖K + ΔK‖ · (K + ΔK)`` per output feature;
    as ``K`` cannot be recovered exactly from it, ``record=True`` is refused for such a tree
    (keep the unmerged params: this function never modifies its input).

    Args:
        params: a nested-dict params tree (with or without the top 'params' collection).
        alpha: keyword-only and required, so the scale always matches the forward pass's: a
            number, ``None`` (meaning ``r``), or a function from a layer path (``'.'``-joined,
            e.g. ``'block_0.query'``) to that layer's alpha.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        record: also return the ``MergeRecord`` that ``unmerge`` needs to undo this merge:
            ``merged, record = merge(params, alpha=..., record=True)``.
        requantize: for a quantized base only: store each merged kernel quantized again (see
            below) instead of as a float kernel.

    A quantized base (a variables dict with the ``'quant'`` collection of
    ``jaxlora.quant.quantize_base``) is dequantized first (``dequantize_base``: each kernel in
    its stored dtype, back in ``params``), then merged in float32 as above. Two results:

    - float (default): float kernels and no ``'quant'`` collection. Each kernel equals
      ``dequantize(q).T + scaling · lora_a @ lora_b`` rounded once to the stored dtype, so it
      differs from merging the same adapter into the unquantized kernel ``W`` by the
      quantization error ``dequantize(q).T - W`` alone: per element at most half the widest
      gap between neighbouring codes times its block's absmax (NF4: 0.1519 · absmax, FP4:
      0.1667 · absmax, int8: 0.00703 · absmax, plus 1/65535 · absmax for bitsandbytes' 16-bit
      grid), plus one rounding.
    - ``requantize=True``: the ``'quant'`` collection again, each adapted layer's kernel
      ``quantize(float merged kernel)`` in its own format (quant_type, blocksize, double
      quantization), the other quantized layers unchanged; no LoRA leaves. Against the float
      merge its error is one more quantization, bounded as above by the merged kernel's own
      block absmax; with double quantization add the error of the stored absmax itself
      (``|absmax - dequantized absmax|`` per block). Against merging into ``W``, both errors
      add. Such a merge cannot be undone exactly, so ``record=True`` is refused with it.

    Raises:
        ValueError: a LoRA leaf without its pair or sibling ``kernel``, mismatched shapes, or
            (on concrete arrays) a non-finite merged kernel; ``requantize=True`` without a
            quantized base or with ``record=True``; the params of ``AdapterStack.params``
            (adapter stacks: no one delta). Nothing is returned half-merged.

    Examples:
        >>> import jax.numpy as jnp
        >>> p = {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1))}
        >>> p["lora_b"] = jnp.ones((1, 2))
        >>> merge(p, alpha=2.0)["kernel"].tolist()
        [[2.0, 2.0], [2.0, 2.0]]
        >>> merged, rec = merge(p, alpha=2.0, record=True)
        >>> unmerge(merged, rec)["kernel"].tolist()
        [[0.0, 0.0], [0.0, 0.0]]
    """
    _require_mapping(params, "merge")
    _refuse_served(params)
    quantized = params
    if requantize:
        _check_requantize(params, record)
    params = dequantize_base(params)  # unchanged without a 'quant' collection
    new_bases, layers = {}, []
    for path, node in iter_lora_layers(params):
        deltas, scale = _deltas(node, path, alpha, use_rslora, "merge")
        if "lora_magnitude" in node:  # DoRA: the merged kernel is m/‖K + ΔK‖·(K + ΔK)
            deltas = {
                name: (base, _dora_merged_delta(node, path, base, new, record))
                for name, (base, new) in deltas.items()
            }
        new_bases[path] = {
            name: _apply(base, new, path, "merge", name) for name, (base, new) in deltas.items()
        }
        layers.append((path, scale))
    merged = _rebuild(params, (), new_bases, drop_lora=True)
    if requantize:
        return requantize_merged(merged, quantized)
    if not record:
        return merged
    prints = tuple(_fingerprint(new_bases[path]) for path, _ in layers)
    return merged, MergeRecord(split(params)[0], prints, tuple(layers))


def _refuse_served(params: Mapping[str, Any], path: Path = ()) -> None:
    """A ``ValueError`` for the params of ``AdapterStack.params`` (adapter stacks beside the
    weights): many adapters and no one delta, so merging them had nothing to fold and gave
    the base weights as if merged (the plain model ignores the stacks' leaves)."""
    ends = multi.served_names(None)  # a weight's own stacks are named <weight>_<these>
    served = sorted(k for k in params if isinstance(k, str) and k.endswith(ends))
    if served:
        raise ValueError(
            f"merge: layer '{path_str(path)}' holds adapter stacks {served} (from "
            "AdapterStack.params), which hold many adapters and no one delta to merge; merge "
            "a single adapter's params instead"
        )
    for key, value in params.items():
        if isinstance(value, Mapping):
            _refuse_served(value, (*path, str(key)))


def _check_requantize(params: PyTree, record: bool) -> None:
    if not is_quantized(params):
        raise ValueError(
            "merge: requantize=True needs a quantized base (variables holding 'params' and the "
            "'quant' collection of jaxlora.quant.quantize_base); these have no 'quant'"
        )
    if record:
        raise ValueError(
            "merge: record=True cannot be combined with requantize=True: re-quantizing rounds "
            "the merged kernels again, so unmerge could not restore the base"
        )


@struct.dataclass
class MergeRecord:
    """What ``unmerge`` needs to undo one ``merge``: the adapter that was merged, each merged
    layer's path and scale (static), and a fingerprint of each merged kernel, so a tree that
    was never merged, was changed since, or was merged with another adapter or alpha is
    refused rather than silently shifted. A pytree: it passes through ``jax.jit``."""

    adapter: PyTree
    fingerprints: tuple[jax.Array, ...]
    layers: tuple[tuple[Path, float], ...] = struct.field(pytree_node=False)


def unmerge(merged: PyTree, record: MergeRecord) -> PyTree:
    """Inverts ``merge``: subtracts each adapter's delta from its kernel and puts the adapter back.

    Args:
        merged: the tree ``merge(..., record=True)`` returned.
        record: the ``MergeRecord`` returned with it (it holds the adapter and each layer's
            scale, so no alpha can be given that differs from the merge's).

    Returns the un-merged tree; its kernels equal the originals to fp32 rounding error.

    Raises:
        TypeError: ``record`` is not a ``MergeRecord``.
        ValueError: a recorded layer is missing from ``merged`` or still holds LoRA leaves, or
            its kernel is not the one ``merge`` produced (a tree that was never merged, or was
            changed since). Under ``jax.jit`` the kernels cannot be compared before running:
            such a layer's unmerged kernel is NaN instead, never silently shifted.
    """
    _require_mapping(merged, "unmerge")
    if not isinstance(record, MergeRecord):
        raise TypeError(
            "unmerge needs the record that merge(params, alpha=..., record=True) returned with "
            f"the merged tree (the adapter, each layer's scale and a fingerprint of the merged "
            f"kernels), got {type(record).__name__}"
        )
    new_bases = {}
    for (path, scale), expected in zip(record.layers, record.fingerprints, strict=True):
        node = _get(merged, path)
        where = f"unmerge: layer '{path_str(path)}'"
        lora_node = _get(record.adapter, path) or {}
        node, names = _merged_names(node, lora_node, where)
        if any(is_lora_name(n) for n in node):
            raise ValueError(f"{where}: the merged tree still holds LoRA leaves here")
        weights = {n: node[n] for n in names}
        deltas, _ = _deltas({**lora_node, **weights}, path, None, False, "unmerge", scale)
        same = jnp.all(_fingerprint({n: base for n, (base, _) in deltas.items()}) == expected)
        if not isinstance(same, jax.core.Tracer) and not bool(same):
            raise ValueError(
                f"{where}: the kernel is not the one merge returned (the tree was never "
                "merged, was changed since, or belongs to another merge): unmerging it would "
                "shift the kernel by an adapter it does not hold"
            )
        restored = {n: _apply(base, -new, path, "unmerge", n) for n, (base, new) in deltas.items()}
        new_bases[path] = {
            n: jnp.where(same, value, jnp.nan).astype(value.dtype) for n, value in restored.items()
        }
    return combine(record.adapter, _rebuild(merged, (), new_bases, drop_lora=False))


def _merged_names(
    node: Mapping | None, lora_node: Mapping, where: str
) -> tuple[Mapping, list[str]]:
    """(the merged node, the weights of it that ``unmerge`` restores: those its recorded
    adapter's ``lora_roles`` name (an adapter made at a product), else its kernel or
    embedding); a ``ValueError`` if the merged tree lacks them."""
    if ROLES_NAME in lora_node:  # an adapter made at a product: its weights' own names
        names = [m.weight for m in product.records(lora_node, where)]
        missing = [n for n in names if node is None or n not in node]
        if node is None or missing:
            raise ValueError(f"{where}: the merged tree has no {missing} at this path")
        return node, names
    name = None if node is None else kinds.base_name(node)
    if node is None or name is None:
        raise ValueError(f"{where}: the merged tree has no kernel or embedding at this path")
    return node, [name]


def _fingerprint(weights: Mapping[str, jax.Array]) -> jax.Array:
    """``fingerprint`` of a layer's one merged weight, or of each of several (by name)."""
    if len(weights) == 1:
        return fingerprint(next(iter(weights.values())))
    return jnp.stack([fingerprint(weights[n]) for n in sorted(weights)])


def fingerprint(x: jax.Array) -> jax.Array:
    """A uint32 checksum of an array's bits: Σ bitsᵢ · wᵢ mod 2³², with odd weights wᵢ that
    depend on the position. Integer sums wrap exactly in any order, so the result is the same
    eagerly, under jit and on any device; a change of any one element always changes it."""
    x = jnp.asarray(x)
    size = x.dtype.itemsize
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}.get(size, jnp.uint32))
    bits = bits.reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def _deltas(
    node: Mapping,
    path: Path,
    alpha: Alpha,
    use_rslora: bool,
    op: str,
    scale: float | None = None,
) -> tuple[dict[str, tuple[jax.Array, jax.Array]], float]:
    """({weight name: (weight, fp32 delta in the weight's layout)}, scale) of an adapted node:
    a known layer kind (``jaxlora.kinds``: its one kernel) or the weights of an adapter made at
    a product (``lora_roles``: one, or several each with its own factors). ``scale``
    (unmerge's recorded one) replaces the one ``alpha`` gives."""
    if ROLES_NAME in node:
        where = f"{op}: layer '{path_str(path)}'"
        # an nn.scan stack merges layer by layer, each slice with its own adapter slice
        adapted = product.check_products(node, where, stacked=True)
        r = product.rank(adapted[0].lora_a, adapted[0].layer)
        layer_alpha = alpha(path_str(path)) if callable(alpha) else alpha
        config = getattr(alpha, "__self__", None)  # alpha=config.alpha_for: check its patterns
        if len(adapted) > 1 and isinstance(config, LoRAConfig):
            product.check_module_patterns(
                config, path_str(path), [one.weight for one in adapted], where
            )
        for one in adapted:
            core.check_hparams(
                r=r,
                alpha=layer_alpha,
                dropout=0.0,
                in_features=one.marker.roles.in_features,
                out_features=one.marker.roles.out_features,
                where=where if len(adapted) == 1 else f"{where}, weight '{one.weight}'",
            )
        if scale is None:
            scale = core.scaling(r, layer_alpha, use_rslora=use_rslora)
        deltas = {
            one.weight: (
                one.value,
                product.layer_deltas(one.marker.roles, one.lora_a, one.lora_b, scale, one.layer),
            )
            for one in adapted
        }
        return deltas, scale
    kind, name, base, lora_a, lora_b = _layer(node, path, op)
    # A stack on a layer axis other than 0 (its lora_stack record) is merged with that axis
    # in front, then the delta moved back into the weight's own layout.
    axis, front, lora_a, lora_b = kinds.front_view(node, base, lora_a, lora_b)
    stack = kinds.stack_of(kind, *map(jnp.shape, (front, lora_a, lora_b)))
    if scale is None:
        scale = _scale(path, kind, front, lora_a, lora_b, alpha, use_rslora, op)
    in_axes = kinds.in_axes_of(kind, jnp.shape(lora_a), stack)
    delta = kinds.delta(kind, jnp.shape(front), lora_a, lora_b, scale, in_axes, stack)
    return {name: (base, kinds.from_front(delta, axis))}, scale


def _layer(node: Mapping, path: Path, op: str) -> tuple[str, str, jax.Array, jax.Array, jax.Array]:
    # Stacked layers (nn.scan) merge layer by layer: each slice with its own adapter slice.
    return kinds.check_layer(node, f"{op}: layer '{path_str(path)}'", stacked=True)


def _scale(
    path: Path,
    kind: str,
    base: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    alpha: Alpha,
    use_rslora: bool,
    op: str,
) -> float:
    r = jnp.shape(lora_a)[-1]
    layer_alpha = alpha(path_str(path)) if callable(alpha) else alpha
    stack = kinds.stack_of(kind, jnp.shape(base), jnp.shape(lora_a), jnp.shape(lora_b))
    in_axes = kinds.in_axes_of(kind, jnp.shape(lora_a), stack)
    n_in, n_out = kinds.flat_features(kind, jnp.shape(base), in_axes, stack)
    core.check_hparams(
        r=r,
        alpha=layer_alpha,
        dropout=0.0,
        in_features=n_in,
        out_features=n_out,
        where=f"{op}: layer '{path_str(path)}'",
    )
    return core.scaling(r, layer_alpha, use_rslora=use_rslora)


def _dora_merged_delta(node: Mapping, path: Path, base, delta, record: bool) -> jax.Array:
    """DoRA's merged delta, m/‖K + ΔK‖·(K + ΔK) − K, for ``merge``; refused with a record."""
    kind, _, _, lora_a, lora_b = _layer(node, path, "merge")
    stack = kinds.stack_of(kind, *map(jnp.shape, (base, lora_a, lora_b)))
    where = f"merge: layer '{path_str(path)}'"
    magnitude = kinds.check_magnitude(node, kind, base, stack, where)
    if record:
        raise ValueError(
            f"{where} is DoRA (it holds 'lora_magnitude'): its merged kernel "
            "m/‖K + ΔK‖·(K + ΔK) cannot be unmerged exactly, so merge(record=True) is "
            "refused; keep the unmerged params (merge returns a new tree)"
        )
    return _dora_delta(base, delta, magnitude)


def _dora_delta(kernel: jax.Array, delta: jax.Array, magnitude: jax.Array) -> jax.Array:
    """What DoRA's merge adds to ``kernel`` (in fp32): PEFT's merged weight
    ``m/‖K + ΔK‖ · (K + ΔK)``, per output feature (column), minus ``kernel``."""
    full = kernel.astype(delta.dtype) + delta
    factor = magnitude.astype(delta.dtype) / core.dora_norm(kernel, delta)
    return factor * full - kernel.astype(delta.dtype)


def _apply(kernel: jax.Array, delta: jax.Array, path: Path, op: str, name: str) -> jax.Array:
    new = (kernel.astype(delta.dtype) + delta).astype(kernel.dtype)
    if not isinstance(new, jax.core.Tracer) and not np.isfinite(np.asarray(new, np.float32)).all():
        what = "kernel" if name in kinds.BASE_NAMES else f"weight '{name}'"
        raise ValueError(
            f"{op}: layer '{path_str(path)}': the merged {what} has non-finite "
            "values (check lora_a, lora_b and the kernel's dtype range)"
        )
    return new


def _get(tree: Mapping, path: Path) -> Mapping | None:
    node: Any = tree
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            return None
    return node if isinstance(node, Mapping) else None


def _rebuild(
    tree: Mapping, path: Path, bases: dict[Path, dict[str, Any]], *, drop_lora: bool
) -> Mapping:
    out: dict[Any, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _rebuild(value, (*path, str(key)), bases, drop_lora=drop_lora)
        elif drop_lora and (is_lora_name(key) or key in RECORD_NAMES):
            continue
        elif path in bases and key in bases[path]:
            new = bases[path][key]  # keeps nn.Partitioned-style metadata on the kernel
            out[key] = value.replace_boxed(new) if isinstance(value, meta.AxisMetadata) else new
        else:
            out[key] = value
    return _like(tree, out)
