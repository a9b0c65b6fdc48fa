"""Hugging Face PEFT's adapter format, shared by jaxlora and torchlora (no framework here).

A directory holds ``adapter_model.safetensors`` and ``adapter_config.json``. Tensor keys are
``base_model.model.<torch module path>.`` followed by ``lora_A.weight`` (r, in) and
``lora_B.weight`` (out, r) for a Linear; the same names with (r, in, kh, kw) and
(out, r, 1, 1) for a Conv2d; ``lora_embedding_A`` (r, num_embeddings) and
``lora_embedding_B`` (dim, r) for an Embedding.
Safety: safetensors only (nothing is unpickled); each file is written under a temporary name
in the target directory and renamed into place, so an interrupted save leaves the previous
file intact; the weights file embeds its config, so a crash between the two renames (the only
window) is reported on load instead of mixing two adapters. Reading checks everything the
files can tell before the caller changes anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors

from _loracore.config import LoRAConfig

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
META_KEY = "lora_config"
SUFFIXES = {
    ".lora_A.weight": ("lora_A", False),
    ".lora_B.weight": ("lora_B", False),
    ".lora_embedding_A": ("lora_A", True),
    ".lora_embedding_B": ("lora_B", True),
}


def tensor_keys(path: str, kind: str) -> tuple[str, str]:
    """The file's keys for a layer's A and B; ``kind`` is "linear", "conv" or "embed"."""
    if kind == "embed":
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


PathMap = Mapping[str, str] | Callable[[str], str] | None


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
    directory: str | os.PathLike,
    tensors: Mapping[str, Any],
    peft: Mapping[str, Any],
    *,
    save_file: Callable,
    is_finite: Callable[[Any], bool],
) -> None:
    """Refuses non-finite tensors, then writes both files atomically.

    ``save_file`` is safetensors' numpy or torch writer, ``is_finite`` the framework's check.
    """
    for key, value in tensors.items():
        if not is_finite(value):
            raise ValueError(f"refusing to save non-finite values in '{key}'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(peft, indent=2, sort_keys=True)
    metadata = {"format": "pt", META_KEY: text}
    _atomic(
        directory / ADAPTER_FILE,
        lambda tmp: save_file(dict(tensors), tmp, metadata=metadata),
    )
    _atomic(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))


def read_adapter(
    directory: str | os.PathLike, *, framework: str, is_finite: Callable[[Any], bool]
) -> tuple[LoRAConfig, dict[str, tuple[Any, Any, str]]]:
    """Reads and checks an adapter directory: its config and {torch module path: (A, B, kind)},
    as ``framework``'s arrays ('np' or 'pt'), kind "linear", "conv" or "embed"."""
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
        with safetensors.safe_open(weights_path, framework=framework) as f:
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
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(
                f"{weights_path}: unexpected tensor '{key}' (expected "
                f"'{PREFIX}<path>.lora_A.weight' / '.lora_B.weight', or "
                "'.lora_embedding_A' / '.lora_embedding_B')"
            )
        half, embed = SUFFIXES[suffix]
        pair = pairs.setdefault(key[len(PREFIX) : -len(suffix)], {})
        if pair.setdefault("embed", embed) != embed:
            raise ValueError(
                f"{weights_path}: '{key}' mixes embedding and linear/conv keys for one layer"
            )
        pair[half] = value
    tensors = {}
    for path, pair in pairs.items():
        kind = "embed" if pair["embed"] else "linear"
        for half, key in zip(("lora_A", "lora_B"), tensor_keys(path, kind), strict=True):
            if half not in pair:
                raise ValueError(f"{weights_path}: missing tensor '{key}'")
            if not is_finite(pair[half]):
                raise ValueError(f"{weights_path}: non-finite values in '{key}'")
        a, b = pair["lora_A"], pair["lora_B"]
        if kind == "linear" and a.ndim > 2:
            kind = "conv"
        if kind == "conv":
            valid = b.ndim == a.ndim and all(n == 1 for n in b.shape[2:])
            layout = "(r, in, *window) and (out, r, 1, ...)"
        else:
            valid = a.ndim == 2 and b.ndim == 2
            layout = "(r, in) and (out, r)"
        if not valid or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights_path}: layer '{path}': lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)} are not {layout}"
            )
        if a.shape[0] != config.rank_for(path):
            raise ValueError(
                f"{weights_path}: layer '{path}' has rank {a.shape[0]} in its "
                f"tensors but {config.rank_for(path)} in {CONFIG_FILE}"
            )
        tensors[path] = (a, b, kind)
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
    path: str,
    kind: str,
    a: Any,
    b: Any,
    layer: tuple[str, str, Callable[[int], tuple[tuple, tuple]]],
    directory: Any,
) -> None:
    """Checks a file's (A, B) against the layer it goes to: ``layer`` is (the layer's kind, a
    description such as 'Linear 16 -> 8', and a function from r to the expected shapes)."""
    layer_kind, described, shapes = layer
    if kind != layer_kind:
        raise ValueError(
            f"{directory}: layer '{path}' is a {described} ({layer_kind}) but the file holds "
            f"a {kind} adapter for it"
        )
    r = a.shape[0]
    for key, got, want in zip(tensor_keys(path, kind), (a.shape, b.shape), shapes(r), strict=True):
        if tuple(got) != tuple(want):
            raise ValueError(
                f"{directory}: '{key}' has shape {tuple(got)}, expected {tuple(want)} for "
                f"the {described} layer"
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
