"""Adapter files in Hugging Face PEFT's format, for Flax Linen params trees.

The format and its safety rules (safetensors only, atomic writes, strict reading) live in
``_loracore/peft_format.py``, shared with torchlora and ``jaxlora.nnx``; this file maps Linen
params trees onto it (Flax layout in, torch layout on disk).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax.core import meta

from _loracore import peft_format
from _loracore.peft_format import (
    PREFIX,
    PathMap,
    check_layer_set,
    check_pair,
    file_config,
    map_path,
)
from jaxlora.config import LoRAConfig
from jaxlora.core import pissa, scaling
from jaxlora.tree import PyTree, _like, _require_mapping, iter_lora_layers


def is_finite(value) -> bool:
    return bool(np.isfinite(np.asarray(value, np.float32)).all())


def write_adapter(directory, tensors, peft) -> None:
    peft_format.write_adapter(
        directory, tensors, peft, save_file=safetensors.numpy.save_file, is_finite=is_finite
    )


def read_adapter(directory):
    """The adapter's config and {torch module path: (A, B)} as numpy arrays, checked."""
    return peft_format.read_adapter(directory, framework="np", is_finite=is_finite)


def save_adapter(
    params: PyTree, directory: str | os.PathLike, config: LoRAConfig, *, path_map: PathMap = None
) -> Path:
    """Writes the LoRA leaves of a Linen params tree as a PEFT adapter; returns the directory.

    Only ``lora_a``/``lora_b`` are written (transposed to torch layout, in their own dtype). Each
    layer's rank comes from its shapes and its alpha from ``config.alpha_for(path)``;
    ``rank_pattern`` and ``target_modules`` are written so that PEFT rebuilds exactly these
    layers. ``path_map`` maps a '.'-joined Flax layer path to the torch module path where the
    names differ (a dict or a function).
    """
    _require_mapping(params, "save_adapter")
    tensors, layers = {}, {}
    for path, node in iter_lora_layers(params):
        name = ".".join(path[1:] if path and path[0] == "params" else path)
        a, b = np.asarray(node["lora_a"]), np.asarray(node["lora_b"])
        torch_path = map_path(path_map, name)
        tensors[f"{PREFIX}{torch_path}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{torch_path}.lora_B.weight"] = np.ascontiguousarray(b.T)
        layers[torch_path] = (a.shape[-1], config.alpha_for(name))
    if not layers:
        raise ValueError("save_adapter: the params tree has no 'lora_a'/'lora_b' leaves")
    candidates = [map_path(path_map, p) for p in _node_paths(params)]
    write_adapter(directory, tensors, file_config(config, layers, candidates))
    return Path(directory)


def load_adapter(
    params: PyTree, directory: str | os.PathLike, *, path_map: PathMap = None
) -> PyTree:
    """Returns a new params tree holding the adapter in ``directory``.

    Into a plain tree (no LoRA leaves) the layers selected by the file's ``target_modules`` get
    new leaves; into an injected tree the existing leaves are replaced. The file must match the
    tree exactly: a missing, unexpected or wrongly shaped tensor, a rank that disagrees with
    the config, a non-finite value or a damaged file is a ``ValueError`` naming the key, and
    the input tree is never modified. Use ``read_adapter_config(directory)`` for the config to
    pass to ``jaxlora.intercept``.
    """
    _require_mapping(params, "load_adapter")
    config, tensors = read_adapter(directory)
    nodes = {map_path(path_map, name): kn for name, kn in _node_paths(params).items()}
    injected = {
        ".".join(p[1:] if p and p[0] == "params" else p) for p, _ in iter_lora_layers(params)
    }
    if injected:
        expected = {map_path(path_map, p) for p in injected}
    else:
        expected = set(config.select(nodes))
    check_layer_set(expected, set(tensors), directory)
    new = {}
    for torch_path, (a, b) in tensors.items():
        flax_path, node = nodes[torch_path]
        boxed = node.get("kernel")
        kernel = meta.unbox(boxed) if boxed is not None else None
        if kernel is None or jnp.ndim(kernel) != 2:
            raise ValueError(f"{directory}: layer '{torch_path}' has no 2-D kernel to adapt")
        n_in, n_out = jnp.shape(kernel)
        check_pair(torch_path, a, b, n_in, n_out, directory)
        if "lora_a" in node and jnp.shape(meta.unbox(node["lora_a"]))[-1] != a.shape[0]:
            raise ValueError(
                f"{directory}: layer '{torch_path}' has rank {a.shape[0]} in the "
                f"file but {jnp.shape(meta.unbox(node['lora_a']))[-1]} in the params tree"
            )
        dtype = meta.unbox(node["lora_a"]).dtype if "lora_a" in node else a.dtype
        new[flax_path] = {"lora_a": jnp.asarray(a.T, dtype), "lora_b": jnp.asarray(b.T, dtype)}
        if config.init == "pissa" and not injected:
            # A PiSSA adapter is relative to the residual base W − scaling·B₀A₀ (B₀A₀: the top-r
            # SVD part of W, sign-free), which PEFT's loader recomputes the same way.
            scale = scaling(a.shape[0], config.alpha_for(torch_path), use_rslora=config.use_rslora)
            residual = pissa(kernel, a.shape[0], scale)[2].astype(kernel.dtype)
            new[flax_path]["kernel"] = (
                boxed.replace_boxed(residual) if isinstance(boxed, meta.AxisMetadata) else residual
            )
    return _set_leaves(params, (), new)


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    """The ``LoRAConfig`` stored in an adapter directory (for ``intercept``/``merge``)."""
    return read_adapter(directory)[0]


def _node_paths(params: Mapping, path: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{'.'-joined layer path: (key path, node)} for every sub-dict below the 'params' level."""
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            sub = (*path, str(key))
            name = ".".join(sub[1:] if sub[0] == "params" else sub)
            if name:
                out[name] = (sub, value)
            out.update(_node_paths(value, sub))
    return out


def _set_leaves(tree: Mapping, path: tuple, new: Mapping[tuple, dict]) -> Mapping:
    out = {}
    for key, value in tree.items():
        sub = (*path, str(key))
        out[key] = _set_leaves(value, sub, new) if isinstance(value, Mapping) else value
    if path in new:
        out.update(new[path])
    return _like(tree, out)
