"""Stacked layers (``nn.scan`` / ``nnx.vmap``): one weight with a leading layer axis L.

Inside the stack the layers have one path, the stack's (``blocks.attn.query``); a per-layer
name (for ``rank_pattern``/``alpha_pattern`` keys and PEFT files, which know no stacks) puts
the layer index into it. Where it goes is a template per scanned module: by default the index
follows the scanned module's own path (``blocks`` → ``blocks.3.attn.query``); for a torch
twin that names its layers ``blocks_3`` pass ``{"blocks": "blocks_{i}"}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora.config import LoRAConfig

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


def select(paths: list[str], per_layer: Mapping[str, list[str]], config: LoRAConfig) -> list[str]:
    """The ``paths`` that ``config.targets`` choose: a stacked layer (one with ``per_layer``
    paths) is chosen by its own path or by all of its per-layer paths; a ``ValueError`` if
    only some of them match (a stack is adapted in all its layers or none)."""
    matched = set(config.select([*paths, *(p for ps in per_layer.values() for p in ps)]))
    chosen = []
    for path in paths:
        layers = per_layer.get(path, [])
        hits = [p for p in layers if p in matched]
        if path in matched or (layers and len(hits) == len(layers)):
            chosen.append(path)
        elif hits:
            raise ValueError(
                f"inject: targets {config.targets!r} match only some layers of the stacked "
                f"layer '{path}' ({', '.join(hits[:4])}{', ...' if len(hits) > 4 else ''} of "
                f"{len(layers)}): a stacked (nn.scan/nnx.vmap) layer is adapted in all its "
                "layers or none"
            )
    return chosen


def unstack(params: Mapping, layer_names: Mapping[str, str]) -> dict:
    """The params tree with each scanned module ``R`` in ``layer_names`` replaced by its L
    layers, each at its per-layer path (``layer_names[R]`` with the index: ``blocks.{i}``),
    every leaf below ``R`` sliced on its leading layer axis. For PEFT files, which know no
    stacks."""
    out = _plain(params)
    for root in layer_names:
        sub = _pop(out, root)
        if not isinstance(sub, Mapping):
            raise ValueError(f"layer_names names '{root}', which is not a module in the params")
        lengths = {np.shape(v)[0] if np.ndim(v) else 0 for v in _leaves(sub)}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"the leaves under '{root}' share no leading layer axis")
        for i in range(lengths.pop()):
            _put(out, layer_path(root, root, i, layer_names), _map(sub, lambda v, i=i: v[i]))
    return out


def restack_adapter(adapter: Mapping, layer_names: Mapping[str, str], lengths: Mapping) -> dict:
    """The inverse of ``unstack`` for an adapter tree (only LoRA leaves): the per-layer
    adapters of each scanned module stacked again. Every layer must hold the same leaves (a
    stacked adapter covers all L layers)."""
    out = _plain(adapter)
    for root, length in lengths.items():
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
            _put(out, root, _stack(layers))
    return out


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
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, Mapping) else (v,))


def _paths(tree: Mapping, prefix: str = ""):
    for k, v in tree.items():
        yield from (_paths(v, f"{prefix}{k}.") if isinstance(v, Mapping) else (prefix + k,))


def _map(tree: Mapping, fn) -> dict:
    return {k: _map(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def _stack(trees: list) -> dict:
    first = trees[0]
    return {
        k: _stack([t[k] for t in trees])
        if isinstance(v, Mapping)
        else jnp.stack([t[k] for t in trees])
        for k, v in first.items()
    }


def _subtree(tree: Mapping, path: str):
    node: Any = tree
    for key in path.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node
