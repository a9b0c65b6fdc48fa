"""Folding adapters into kernels (``merge``) and taking them out again (``unmerge``).

Pure functions over nested-dict params trees: the input is never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxlora import core, kinds
from jaxlora.tree import (
    LORA_NAMES,
    Path,
    PyTree,
    _like,
    _require_mapping,
    combine,
    iter_lora_layers,
    path_str,
)

Alpha = float | None | Callable[[str], float | None]


def merge(params: PyTree, *, alpha: Alpha, use_rslora: bool = False) -> PyTree:
    """Returns a new tree with each ``lora_a``/``lora_b`` pair folded into its sibling ``kernel``
    (or ``embedding``).

    ``kernel + scaling · lora_a @ lora_b`` is computed in float32 and rounded once to the
    kernel's dtype; the LoRA leaves are removed, so the result is what the plain model
    consumes (and costs exactly its FLOPs). ``r`` and the layer kind (Dense, DenseGeneral,
    Conv, Embed: see ``jaxlora.kinds``) are read from the shapes.

    Args:
        params: a nested-dict params tree (with or without the top 'params' collection).
        alpha: keyword-only and required, so the scale always matches the forward pass's: a
            number, ``None`` (meaning ``r``), or a function from a layer path (``'.'``-joined,
            e.g. ``'block_0.query'``) to that layer's alpha.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.

    Raises:
        ValueError: a LoRA leaf without its pair or sibling ``kernel``, mismatched shapes, or
            (on concrete arrays) a non-finite merged kernel. Nothing is returned half-merged.

    >>> import jax.numpy as jnp
    >>> p = {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}
    >>> merge(p, alpha=2.0)["kernel"].tolist()
    [[2.0, 2.0], [2.0, 2.0]]
    """
    _require_mapping(params, "merge")
    new_bases = {}
    for path, node in iter_lora_layers(params):
        kind, name, base, lora_a, lora_b = _layer(node, path, "merge")
        scale = _scale(path, kind, base, lora_a, alpha, use_rslora, "merge")
        new = core.delta(lora_a, lora_b, scale, jnp.shape(base))
        new_bases[path] = name, _apply(base, new, path, "merge")
    return _rebuild(params, (), new_bases, drop_lora=True)


def unmerge(merged: PyTree, adapter: PyTree, *, alpha: Alpha, use_rslora: bool = False) -> PyTree:
    """Inverts ``merge``: subtracts each adapter's delta from its kernel and puts the adapter back.

    Args:
        merged: the tree ``merge`` returned.
        adapter: the LoRA leaves that were merged (e.g. the first half of ``split(params)``).
        alpha, use_rslora: as given to ``merge``.

    Returns the un-merged tree; its kernels equal the originals to fp32 rounding error.
    """
    _require_mapping(merged, "unmerge")
    _require_mapping(adapter, "unmerge")
    new_bases = {}
    for path, lora_node in iter_lora_layers(adapter):
        node = _get(merged, path)
        where = f"unmerge: layer '{path_str(path)}'"
        name = None if node is None else kinds.base_name(node)
        if name is None:
            raise ValueError(f"{where}: the merged tree has no kernel or embedding at this path")
        if any(n in node for n in LORA_NAMES):
            raise ValueError(f"{where}: the merged tree still holds LoRA leaves here")
        kind, _, base, lora_a, lora_b = _layer({**lora_node, name: node[name]}, path, "unmerge")
        scale = _scale(path, kind, base, lora_a, alpha, use_rslora, "unmerge")
        new = -core.delta(lora_a, lora_b, scale, jnp.shape(base))
        new_bases[path] = name, _apply(base, new, path, "unmerge")
    return combine(adapter, _rebuild(merged, (), new_bases, drop_lora=False))


def _layer(node: Mapping, path: Path, op: str) -> tuple[str, str, jax.Array, jax.Array, jax.Array]:
    return kinds.check_layer(node, f"{op}: layer '{path_str(path)}'")


def _scale(
    path: Path,
    kind: str,
    base: jax.Array,
    lora_a: jax.Array,
    alpha: Alpha,
    use_rslora: bool,
    op: str,
) -> float:
    r = jnp.shape(lora_a)[-1]
    layer_alpha = alpha(path_str(path)) if callable(alpha) else alpha
    n_in, n_out = kinds.flat_features(kind, jnp.shape(base), jnp.ndim(lora_a) - 1)
    core.check_hparams(
        r=r,
        alpha=layer_alpha,
        dropout=0.0,
        in_features=n_in,
        out_features=n_out,
        where=f"{op}: layer '{path_str(path)}'",
    )
    return core.scaling(r, layer_alpha, use_rslora=use_rslora)


def _apply(kernel: jax.Array, delta: jax.Array, path: Path, op: str) -> jax.Array:
    new = (kernel.astype(delta.dtype) + delta).astype(kernel.dtype)
    if not isinstance(new, jax.core.Tracer) and not np.isfinite(np.asarray(new, np.float32)).all():
        raise ValueError(
            f"{op}: layer '{path_str(path)}': the merged kernel has non-finite "
            "values (check lora_a, lora_b and the kernel's dtype range)"
        )
    return new


def _get(tree: Mapping, path: Path) -> Mapping | None:
    for key in path:
        tree = tree.get(key) if isinstance(tree, Mapping) else None
        if tree is None:
            return None
    return tree if isinstance(tree, Mapping) else None


def _rebuild(
    tree: Mapping, path: Path, bases: dict[Path, tuple[str, Any]], *, drop_lora: bool
) -> Mapping:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _rebuild(value, (*path, str(key)), bases, drop_lora=drop_lora)
        elif drop_lora and key in LORA_NAMES:
            continue
        elif path in bases and key == bases[path][0]:
            new = bases[path][1]  # keeps nn.Partitioned-style metadata on the kernel
            out[key] = value.replace_boxed(new) if isinstance(value, meta.AxisMetadata) else new
        else:
            out[key] = value
    return _like(tree, out)
