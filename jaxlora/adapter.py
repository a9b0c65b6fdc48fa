"""Adapter files in Hugging Face PEFT's format, for Flax Linen params trees.

A directory holds ``adapter_model.safetensors`` (keys
``base_model.model.<torch path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), torch
layout) and ``adapter_config.json``. Mirrors ``torchlora/adapter.py``; ``jaxlora.nnx`` reuses
the format half of this file.

Safety: safetensors only (nothing is unpickled). Each file is written under a temporary name
in the target directory and renamed into place, so an interrupted save leaves the previous
file intact; the weights file also embeds its config, so a crash between the two renames (the
only window) is detected on load instead of mixing two adapters. Loading is strict and checks
everything before it changes anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxlora.config import LoRAConfig
from jaxlora.tree import PyTree, _like, _require_mapping, iter_lora_layers

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
META_KEY = "lora_config"
SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}

PathMap = Mapping[str, str] | Callable[[str], str] | None


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
        kernel = node.get("kernel")
        if kernel is None or jnp.ndim(kernel) != 2:
            raise ValueError(f"{directory}: layer '{torch_path}' has no 2-D kernel to adapt")
        n_in, n_out = jnp.shape(kernel)
        check_pair(torch_path, a, b, n_in, n_out, directory)
        if "lora_a" in node and jnp.shape(node["lora_a"])[-1] != a.shape[0]:
            raise ValueError(
                f"{directory}: layer '{torch_path}' has rank {a.shape[0]} in the "
                f"file but {jnp.shape(node['lora_a'])[-1]} in the params tree"
            )
        dtype = node["lora_a"].dtype if "lora_a" in node else a.dtype
        new[flax_path] = {"lora_a": jnp.asarray(a.T, dtype), "lora_b": jnp.asarray(b.T, dtype)}
    return _set_leaves(params, (), new)


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    """The ``LoRAConfig`` stored in an adapter directory (for ``intercept``/``merge``)."""
    return read_adapter(directory)[0]


# ---- the format, shared with jaxlora.nnx -------------------------------------------------


def map_path(path_map: PathMap, path: str) -> str:
    if path_map is None:
        return path
    return path_map(path) if callable(path_map) else path_map.get(path, path)


def file_config(
    config: LoRAConfig, layers: Mapping[str, tuple[int, float]], candidates: list[str]
) -> dict[str, Any]:
    """``config.to_peft()`` amended so that PEFT rebuilds exactly ``layers`` with their r, alpha."""
    peft = config.to_peft()
    if sorted(p for p in candidates if config.matches(p)) != sorted(layers):
        peft["target_modules"] = sorted(layers)  # exact paths: PEFT rebuilds just these
    ranks = {p: r for p, (r, _) in layers.items() if r != config.rank_for(p)}
    alphas = {p: alpha for p, (_, alpha) in layers.items() if alpha != config.alpha_for(p)}
    # Exact-path keys go first: PEFT takes the first key that matches.
    peft["rank_pattern"] = {**ranks, **peft["rank_pattern"]}
    peft["alpha_pattern"] = {**alphas, **peft["alpha_pattern"]}
    check = LoRAConfig.from_peft(peft)
    for path, (r, alpha) in layers.items():
        if (check.rank_for(path), check.alpha_for(path)) != (r, alpha):
            raise ValueError(
                f"cannot describe layer '{path}' (r={r}, alpha={alpha}) in PEFT's config format"
            )
    return peft


def write_adapter(
    directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], peft: Mapping[str, Any]
) -> None:
    for key, value in tensors.items():
        if not np.isfinite(np.asarray(value, np.float32)).all():
            raise ValueError(f"refusing to save non-finite values in '{key}'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(peft, indent=2, sort_keys=True)
    metadata = {"format": "pt", META_KEY: text}
    _atomic(
        directory / ADAPTER_FILE,
        lambda tmp: safetensors.numpy.save_file(dict(tensors), tmp, metadata=metadata),
    )
    _atomic(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))


def read_adapter(
    directory: str | os.PathLike,
) -> tuple[LoRAConfig, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Reads and checks an adapter directory: its config and {torch path: (A, B)}."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / ADAPTER_FILE
    try:
        peft = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{config_path}: no such file (not an adapter directory)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    try:
        config = LoRAConfig.from_peft(peft)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    if not weights_path.exists():
        raise ValueError(f"{weights_path}: no such file")
    try:
        with safetensors.safe_open(weights_path, framework="np") as f:
            metadata = f.metadata() or {}
            raw = {key: f.get_tensor(key) for key in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{weights_path}: cannot be read as safetensors, it may be truncated "
            f"or corrupted ({err})"
        ) from None
    if META_KEY in metadata and json.loads(metadata[META_KEY]) != peft:
        raise ValueError(
            f"{directory}: {ADAPTER_FILE} and {CONFIG_FILE} come from different "
            "saves (an interrupted save?); save the adapter again"
        )
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in raw.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(
                f"{weights_path}: unexpected tensor '{key}' (expected "
                f"'{PREFIX}<path>.lora_A.weight' / '.lora_B.weight')"
            )
        pairs.setdefault(key[len(PREFIX) : -len(suffix)], {})[SUFFIXES[suffix]] = value
    tensors = {}
    for path, pair in pairs.items():
        for half in ("lora_A", "lora_B"):
            if half not in pair:
                raise ValueError(f"{weights_path}: missing tensor '{PREFIX}{path}.{half}.weight'")
            if not np.isfinite(np.asarray(pair[half], np.float32)).all():
                raise ValueError(
                    f"{weights_path}: non-finite values in '{PREFIX}{path}.{half}.weight'"
                )
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights_path}: layer '{path}': lora_A {a.shape} and lora_B "
                f"{b.shape} are not (r, in) and (out, r)"
            )
        if a.shape[0] != config.rank_for(path):
            raise ValueError(
                f"{weights_path}: layer '{path}' has rank {a.shape[0]} in its "
                f"tensors but {config.rank_for(path)} in {CONFIG_FILE}"
            )
        tensors[path] = (a, b)
    if not tensors:
        raise ValueError(f"{weights_path}: holds no LoRA tensors")
    return config, tensors


def check_layer_set(expected: set[str], found: set[str], directory: Any) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ValueError(
            f"{directory}: missing tensors for layer(s) {missing} "
            f"(e.g. '{PREFIX}{missing[0]}.lora_A.weight')"
        )
    if unexpected:
        raise ValueError(
            f"{directory}: unexpected tensors for layer(s) {unexpected}, which the "
            "model does not have or does not adapt"
        )


def check_pair(
    path: str, a: np.ndarray, b: np.ndarray, n_in: int, n_out: int, directory: Any
) -> None:
    r = a.shape[0]
    for half, got, want in (("lora_A", a.shape, (r, n_in)), ("lora_B", b.shape, (n_out, r))):
        if tuple(got) != want:
            raise ValueError(
                f"{directory}: '{PREFIX}{path}.{half}.weight' has shape "
                f"{tuple(got)}, expected {want} for a {n_in} -> {n_out} layer"
            )


def _atomic(final: Path, write: Callable[[str], Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
