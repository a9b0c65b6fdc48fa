"""Stacked layers (``nn.scan`` / ``nnx.vmap``): one weight with a leading layer axis L.

Inside the stack the layers have one path, the stack's (``blocks.attn.query``); a per-layer
name (for ``rank_pattern``/``alpha_pattern`` keys and PEFT files, which know no stacks) puts
the layer index into it. Where it goes is a template per scanned module: by default the index
follows the scanned module's own path (``blocks`` → ``blocks.3.attn.query``); for a torch
twin that names its layers ``blocks_3`` pass ``{"blocks": "blocks_{i}"}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora import kinds
from jaxlora.config import LoRAConfig
from jaxlora.tree import RECORD_NAMES, ROLES_NAME, STACK_NAME, StackRecord

LayerNames = Mapping[str, str] | None


def layer_path(path: str, scan: str, index: int, layer_names: LayerNames = None) -> str:
    """The per-layer path of layer ``index`` of the stacked layer at ``path``, which lies in
    the scanned module at ``scan``: ``layer_names[scan]`` (a template with ``{i}``, default
    ``'<scan>.{i}'``) formatted with the index, followed by the rest of ``path``.

    Examples:
        >>> layer_path("blocks.attn.query", "blocks", 3)
        'blocks.3.attn.query'
        >>> layer_path("blocks.attn.query", "blocks", 3, {"blocks": "h_{i}"})
        'h_3.attn.query'
    """
    if not (path == scan or path.startswith(scan + ".")):
        raise ValueError(f"layer '{path}' does not lie in the scanned module '{scan}'")
    template = (layer_names or {}).get(scan, scan + ".{i}")
    if not isinstance(template, str) or "{i}" not in template:
        raise ValueError(
            f"layer_names[{scan!r}] must be a string holding '{{i}}' (where the layer index "
            f"goes, e.g. '{scan}.{{i}}'), got {template!r}"
        )
    return template.replace("{i}", str(index)) + path[len(scan) :]


def layer_paths(path: str, scan: str, length: int, layer_names: LayerNames = None) -> list[str]:
    """The per-layer paths of all ``length`` layers of a stack (``layer_path``)."""
    return [layer_path(path, scan, i, layer_names) for i in range(length)]


def check_uniform(config: LoRAConfig, path: str, per_layer: list[str], where: str) -> None:
    """A ``ValueError`` unless every layer of a stack gets the (r, alpha) its stack path gets:
    a stacked adapter has one rank (its factors are single arrays) and one scale, the one
    ``jaxlora.intercept`` applies from the stack path inside the scan."""
    settings = {p: (config.rank_for(p), config.alpha_for(p)) for p in (path, *per_layer)}
    if len(set(settings.values())) > 1:
        differing = {p: s for p, s in settings.items() if s != settings[path]}
        shown = ", ".join(f"'{p}': {s}" for p, s in list(differing.items())[:4])
        raise ValueError(
            f"{where}: rank_pattern/alpha_pattern give layers of this stack (r, alpha) other "
            f"than the stack path's {settings[path]} (e.g. {shown}): a stacked (nn.scan/"
            "nnx.vmap) layer has one r and one alpha for all its layers; give them all the "
            "same, with a pattern that also matches the stack path"
        )


def select(
    paths: list[str],
    per_layer: Mapping[str, list[str]],
    config: LoRAConfig,
    maybe: Mapping[str, list[str]] | None = None,
    also: Sequence[str] = (),
) -> list[str]:
    """The ``paths`` that ``config.targets`` choose: a stacked layer (one with ``per_layer``
    paths) is chosen by its own path or by all of its per-layer paths; a ``ValueError`` if
    only some of them match (a stack is adapted in all its layers or none). ``maybe``: the
    per-layer paths of layers not yet known to be stacks: chosen by any of them, to be
    selected again once known (``select`` without ``maybe``). ``also``: the layers adapted
    besides (``target_parameters``'), which a rank/alpha pattern key may match."""
    maybe = {k: v for k, v in (maybe or {}).items() if k not in per_layer}
    known = [*paths, *(p for ps in per_layer.values() for p in ps)]
    # A refusal names the paths that exist, not every per-layer path a module might have if
    # it were a stack (a (V, D) embedding would add V of them).
    every = [*known, *(p for ps in maybe.values() for p in ps)]
    matched = set(config.select(every, listed=known, also=also))
    chosen = []
    for path in paths:
        layers = per_layer.get(path, maybe.get(path, []))
        hits = [p for p in layers if p in matched]
        if path in matched or (layers and len(hits) == len(layers)) or (hits and path in maybe):
            chosen.append(path)
        elif hits:
            raise ValueError(
                f"inject: targets {config.targets!r} match only some layers of the stacked "
                f"layer '{path}' ({', '.join(hits[:4])}{', ...' if len(hits) > 4 else ''} of "
                f"{len(layers)}): a stacked (nn.scan/nnx.vmap) layer is adapted in all its "
                "layers or none"
            )
    return chosen


def stack_axis(params: Mapping, root: str, layouts: Mapping | None = None) -> int:
    """The layer axis of the scanned module ``root`` (its ``nn.scan`` ``variable_axes``): the
    one its adapters' ``lora_stack`` records say (an adapter without one: 0), or the one
    ``layouts`` (``jaxlora.layouts``) gives its layers; 0 if neither says. A ``ValueError``
    if they disagree."""
    sub = _subtree(params, root)
    said = {kinds.layer_axis(node) for node in _nodes(sub) if _is_adapter(node)}
    for layout in (layouts or {}).values():
        if getattr(layout, "scan", None) == root and layout.stack:
            said.add(layout.axis)
    if len(said) > 1:
        raise ValueError(
            f"the stacked layers under '{root}' disagree on their layer axis ({sorted(said)}, "
            "from their 'lora_stack' records and the layouts): one nn.scan stacks them all on "
            "one axis"
        )
    return said.pop() if said else 0


def unstack(
    params: Mapping, layer_names: Mapping[str, str], axes: Mapping[str, int] | None = None
) -> dict:
    """The params tree with each scanned module ``R`` in ``layer_names`` replaced by its L
    layers, each at its per-layer path (``layer_names[R]`` with the index: ``blocks.{i}``),
    every leaf below ``R`` sliced on its layer axis (``axes[R]``, default ``stack_axis``: the
    leading axis unless the adapters' records say another). For PEFT files, which know no
    stacks."""
    out = _plain(params)
    for root in layer_names:
        axis = (axes or {}).get(root, stack_axis(out, root))
        sub = _pop(out, root)
        if not isinstance(sub, Mapping):
            raise ValueError(f"layer_names names '{root}', which is not a module in the params")
        for i in range(stack_length(sub, root, axis)):
            one = _map(sub, lambda v, i=i, axis=axis: _take(v, i, axis))
            _put(out, layer_path(root, root, i, layer_names), one)
    return out


def stack_length(sub: Mapping, root: str, axis: int) -> int:
    """L, the length all arrays under the scanned module share on the layer axis ``axis``; a
    ``ValueError`` if they share none (stacked on another axis, or not stacked)."""
    lengths: set[int] = set()
    missing = False  # a leaf with no such axis
    for v in _leaves(sub):
        position = kinds.axis_position(np.ndim(v), axis)
        if position is None:
            missing = True
        else:
            lengths.add(int(np.shape(v)[position]))
    if len(lengths) != 1 or missing:
        raise ValueError(
            f"the params under '{root}' share no layer axis at position {axis}: a module in "
            "layer_names must be stacked by nn.scan with variable_axes={'params': "
            f"{axis}}}; for params stacked on another axis pass "
            "layouts=jaxlora.layouts(model, *inputs) (it records nn.scan's axis), or load "
            "into the injected params (their 'lora_stack' records say it)"
        )
    return lengths.pop()


def restack_adapter(
    adapter: Mapping,
    layer_names: Mapping[str, str],
    lengths: Mapping,
    axes: Mapping[str, int] | None = None,
) -> dict:
    """The inverse of ``unstack`` for an adapter tree (only LoRA leaves): the per-layer
    adapters of each scanned module stacked again, on its layer axis (``axes``, default 0;
    adapters stacked on another one get its ``lora_stack`` record). Every layer must hold the
    same leaves (a stacked adapter covers all L layers)."""
    out = _plain(adapter)
    for root, length in lengths.items():
        axis = (axes or {}).get(root, 0)
        layers = [_pop(out, layer_path(root, root, i, layer_names)) for i in range(length)]
        have = [sorted(_paths(layer)) if isinstance(layer, Mapping) else [] for layer in layers]
        if any(h != have[0] for h in have):
            missing = [layer_path(root, root, i, layer_names) for i, h in enumerate(have) if not h]
            raise ValueError(
                f"the adapter covers only some layers of the stack '{root}' (no adapter at "
                f"{', '.join(missing[:4]) or 'some layers'}): a stacked layer needs all "
                f"{length} layers' adapters, with the same layers adapted in each"
            )
        if have[0]:
            _put(out, root, _stack(layers, axis))
    return out


def _is_adapter(node: Mapping) -> bool:
    """An adapter's node: ``lora_a``, or a product adapter's record (a module with several
    weights holds ``<weight>_lora_a``, ``jaxlora.tree.factor_names``)."""
    return "lora_a" in node or ROLES_NAME in node


def _take(v, i: int, axis: int):
    """Layer ``i`` of a stacked leaf (its slice on the layer axis); records pass as they are."""
    if not hasattr(v, "shape"):
        return v
    return v[(slice(None),) * kinds.position_of(np.ndim(v), axis) + (i,)]


def _plain(tree: Mapping) -> dict:
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _pop(tree: dict, path: str):
    *parents, last = path.split(".")
    node: Any = tree
    for key in parents:
        node = node.get(key)
        if not isinstance(node, dict):
            return None
    return node.pop(last, None)


def _put(tree: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    if last in tree:
        raise ValueError(f"the per-layer path '{path}' already exists in the params")
    tree[last] = value


def _leaves(tree: Mapping):
    """The arrays of a tree (records beside adapters hold none)."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v)
        elif k not in RECORD_NAMES:
            yield v


def _nodes(tree):
    if isinstance(tree, Mapping):
        yield tree
        for v in tree.values():
            yield from _nodes(v)


def _paths(tree: Mapping, prefix: str = ""):
    for k, v in tree.items():
        yield from (_paths(v, f"{prefix}{k}.") if isinstance(v, Mapping) else (prefix + k,))


def _map(tree: Mapping, fn) -> dict:
    return {k: _map(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def _stack(trees: list, axis: int) -> dict:
    first = trees[0]
    out: dict[str, Any] = {}
    for k, v in first.items():
        if isinstance(v, Mapping):
            out[k] = _stack([t[k] for t in trees], axis)
        elif k not in RECORD_NAMES:
            out[k] = jnp.stack([t[k] for t in trees], axis=axis)
        elif k != STACK_NAME:  # a record (no arrays) is the same for every layer
            out[k] = v
    if axis and _is_adapter(out):  # the factors' layer axis is not in front: say where it is
        out[STACK_NAME] = StackRecord(axis)
    return out


def _subtree(tree: Mapping, path: str):
    node: Any = tree
    for key in path.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node
