"""Adapter files in Hugging Face PEFT's format, for torch models. Mirrors ``jaxlora/adapter.py``.

A directory holds ``adapter_model.safetensors`` (``base_model.model.<path>.lora_A.weight``
(r, in), ``.lora_B.weight`` (out, r)) and ``adapter_config.json``; PEFT's
``PeftModel.from_pretrained`` reads what ``save_adapter`` writes, and ``load_adapter`` reads what
PEFT's ``save_pretrained`` writes. safetensors only; each file is written to a temporary name
and renamed into place; the weights file embeds its config so a crash between the two renames
is detected on load; loading checks everything before it changes anything.
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
import safetensors.torch
import torch
from torch import nn

from torchlora.config import LoRAConfig
from torchlora.core import scaling
from torchlora.inject import inject
from torchlora.layer import Linear

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
META_KEY = "lora_config"
SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, config: LoRAConfig | None = None
) -> Path:
    """Writes the model's ``torchlora.Linear`` adapters as a PEFT adapter; returns the directory.

    ``config`` defaults to the one ``inject`` remembered (``model.lora_config``). Each layer's
    own rank and alpha are written (via ``rank_pattern``/``alpha_pattern`` where they differ),
    and ``target_modules`` so that PEFT rebuilds exactly these layers. Only the adapter's
    tensors are written, in their own dtype.
    """
    config = config if config is not None else getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("save_adapter: pass a LoRAConfig (the model has no lora_config)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    if not layers:
        raise ValueError("save_adapter: the model has no torchlora.Linear layers")
    if len({m.use_rslora for m in layers.values()} | {config.use_rslora}) != 1:
        raise ValueError("save_adapter: the layers' use_rslora differs from the config's")
    tensors = {}
    for path, layer in layers.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_a.detach().cpu().contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_b.detach().cpu().contiguous()
    peft = file_config(
        config,
        {p: (m.r, m.alpha) for p, m in layers.items()},
        [n for n, _ in model.named_modules()],
    )
    write_adapter(directory, tensors, peft)
    return Path(directory)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Loads the adapter in ``directory`` into ``model``; returns ``model``.

    Into a plain model the layers selected by the file's ``target_modules`` are injected first
    (as PEFT's ``from_pretrained`` does); into an injected model the existing adapters are
    replaced, and their alpha set to the file's. Strict: a missing, unexpected or wrongly
    shaped tensor, a rank that disagrees with the config, a merged layer, a non-finite value
    or a damaged file is a ``ValueError`` naming the key, and the model is left unchanged.
    """
    config, tensors = read_adapter(directory)
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if isinstance(m, Linear)}
    expected = set(layers) if layers else set(config.select(modules))
    check_layer_set(expected, set(tensors), directory)
    for path, (a, b) in tensors.items():
        module = modules[path]
        if not isinstance(module, nn.Linear | Linear):
            raise ValueError(
                f"{directory}: layer '{path}' is a {type(module).__name__}, not a Linear layer"
            )
        check_pair(path, a, b, module.in_features, module.out_features, directory)
        if isinstance(module, Linear) and module.merged:
            raise ValueError(f"{directory}: layer '{path}' is merged; unmerge() it first")
        if isinstance(module, Linear) and module.r != a.shape[0]:
            raise ValueError(
                f"{directory}: layer '{path}' has rank {a.shape[0]} in the file "
                f"but {module.r} in the model"
            )
    if not layers:
        inject(model, config)
    with torch.no_grad():
        for path, (a, b) in tensors.items():
            layer = model.get_submodule(path)
            layer.lora_a.copy_(a.to(layer.lora_a.dtype))
            layer.lora_b.copy_(b.to(layer.lora_b.dtype))
            layer.alpha = config.alpha_for(path)
            layer.use_rslora = config.use_rslora
            layer.scaling = scaling(layer.r, layer.alpha, use_rslora=config.use_rslora)
    model.lora_config = config
    return model


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    """The ``LoRAConfig`` stored in an adapter directory."""
    return read_adapter(directory)[0]


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
    directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor], peft: Mapping[str, Any]
) -> None:
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"refusing to save non-finite values in '{key}'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(peft, indent=2, sort_keys=True)
    metadata = {"format": "pt", META_KEY: text}
    _atomic(
        directory / ADAPTER_FILE,
        lambda tmp: safetensors.torch.save_file(dict(tensors), tmp, metadata=metadata),
    )
    _atomic(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))


def read_adapter(
    directory: str | os.PathLike,
) -> tuple[LoRAConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Reads and checks an adapter directory: its config and {module path: (A, B)}."""
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
        with safetensors.safe_open(weights_path, framework="pt") as f:
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
    pairs: dict[str, dict[str, torch.Tensor]] = {}
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
            if not torch.isfinite(pair[half]).all():
                raise ValueError(
                    f"{weights_path}: non-finite values in '{PREFIX}{path}.{half}.weight'"
                )
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights_path}: layer '{path}': lora_A {tuple(a.shape)} and "
                f"lora_B {tuple(b.shape)} are not (r, in) and (out, r)"
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


def check_pair(path: str, a: Any, b: Any, n_in: int, n_out: int, directory: Any) -> None:
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
