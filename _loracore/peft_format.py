"""Hugging Face PEFT's adapter format, shared by jaxlora and torchlora (no framework here).

A directory holds ``adapter_model.safetensors`` and ``adapter_config.json``. Tensor keys are
``base_model.model.<torch module path>.`` followed by ``lora_A.weight`` (r, in) and
``lora_B.weight`` (out, r) for a Linear; the same names with (r, in, kh, kw) and
(out, r, 1, 1) for a Conv2d; ``lora_embedding_A`` (r, num_embeddings) and
``lora_embedding_B`` (dim, r) for an Embedding.
Safety: safetensors only (nothing is unpickled); the weights file written here embeds its
config and a sha256 of its tensors (``lora_sha256``: each tensor's key, dtype, shape and bytes
in sorted key order), verified on load when present (PEFT's own files have none). Both files
are fully built in memory, written under temporary names in the target directory, and only
then renamed into place, so a failed or interrupted save leaves the previous adapter intact;
a crash between the two renames (the only window) is reported on load, where the embedded
config means something else than ``adapter_config.json``, instead of mixing two adapters.
Reading checks everything the files can tell (fields PEFT sets that this library cannot
reproduce, floating-point tensors, shapes, ranks, finiteness) before the caller changes
anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Collection, Mapping, Set
from pathlib import Path
from typing import Any, TypeVar

from _loracore import safe_files
from _loracore.config import WEIGHT_INITS, LoRAConfig, _key_regex

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
META_KEY = "lora_config"

# What ``check_pair`` compares a file's (A, B) with: (the layer's kind, a description such as
# 'Linear 16 -> 8', and a function from r to the expected (A, B) shapes).
LayerShapes = tuple[str, str, Callable[[int], tuple[tuple[int, ...], tuple[int, ...]]]]
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


MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m, shape (out,), as peft 0.21 writes it


def magnitude_key(path: str) -> str:
    """The file's key for a DoRA layer's magnitude vector (the same for every kind)."""
    return f"{PREFIX}{path}{MAGNITUDE}"


def magnitude_shape(kind: str, out: int, window: int) -> tuple[int, ...]:
    """The shape PEFT stores a magnitude of ``out`` features in: (out,), except for a conv with
    ``window`` spatial axes, whose norm PEFT keeps as (1, out, 1, ...)."""
    return (1, out, *(1,) * window) if kind == "conv" else (out,)


class LayerTensors(tuple[Any, Any, str]):
    """One layer's ``(A, B, kind)`` as ``read_adapter`` returns it, with DoRA's magnitude
    vector (out,) in ``magnitude`` (``None`` for a plain LoRA file)."""

    magnitude: Any = None


def layer_tensors(a: Any, b: Any, kind: str, magnitude: Any = None) -> LayerTensors:
    entry = LayerTensors((a, b, kind))
    entry.magnitude = magnitude
    return entry


# A map from a '.'-joined JAX path to a torch module path: a dict, a function, or None (the same
# paths). A framework's maps may give a richer value for some layers (jaxlora's HFLinear).
PathMap = Mapping[str, str] | Callable[[str], str] | None
_Spec = TypeVar("_Spec")


def map_path(
    path_map: Mapping[str, _Spec] | Callable[[str], _Spec] | None, path: str
) -> str | _Spec:
    if path_map is None:
        return path
    return path_map(path) if callable(path_map) else path_map.get(path, path)


def file_config(
    config: LoRAConfig,
    layers: Mapping[str, tuple[int, float]],
    candidates: list[str],
    *,
    fan_in_fan_out: bool = False,
) -> dict[str, Any]:
    """``config.to_peft()`` amended so that PEFT rebuilds exactly ``layers`` with their r, alpha;
    ``fan_in_fan_out`` when every one of them is a transformers ``Conv1D`` (PEFT's flag for
    them, which it would otherwise set itself, with a warning)."""
    peft = config.to_peft()
    # The file names every adapted weight by its torch module (target_modules), a weight chosen
    # by target_parameters too: PEFT then builds plain Linear adapters for all of them.
    peft.pop("target_parameters", None)
    if sorted(p for p in candidates if config.matches(p)) != sorted(layers):
        peft["target_modules"] = sorted(layers)  # exact paths: PEFT rebuilds just these
    ranks = {p: r for p, (r, _) in layers.items() if r != config.rank_for(p)}
    alphas = {p: alpha for p, (_, alpha) in layers.items() if alpha != config.alpha_for(p)}
    # Exact-path keys go first: PEFT takes the first key that matches. A key that matches
    # none of the written modules (a JAX path that path_map renames) would only make PEFT
    # warn and could match an unrelated module of the torch model: left out.
    for field, exact in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        pattern = {**exact, **peft[field]}
        peft[field] = {k: v for k, v in pattern.items() if _matches_any(k, layers)}
    check = LoRAConfig.from_peft(peft)
    for path, (r, alpha) in layers.items():
        if (check.rank_for(path), check.alpha_for(path)) != (r, alpha):
            raise ValueError(
                f"cannot describe layer '{path}' (r={r}, alpha={alpha}) in PEFT's config format"
            )
    peft["fan_in_fan_out"] = fan_in_fan_out
    return peft


def _matches_any(key: str, paths: Collection[str]) -> bool:
    """Whether a ``rank_pattern``/``alpha_pattern`` key applies to one of ``paths`` (PEFT's
    rule, as ``LoRAConfig.rank_for`` reads it)."""
    return any(re.match(_key_regex(key), p) for p in paths)


def write_adapter(
    directory: str | os.PathLike,
    tensors: Mapping[str, Any],
    peft: Mapping[str, Any],
    *,
    serialize: Callable[..., bytes],
    is_finite: Callable[[Any], bool],
) -> None:
    """Refuses non-finite tensors, then writes both files, each atomically.

    ``serialize`` is safetensors' numpy or torch ``save`` (to bytes), ``is_finite`` the
    framework's check. Everything is built first (the JSON text, the weights file's bytes with
    its checksum): a value that cannot be written fails before the directory is created or any
    file touched. Both files are then written under temporary names and renamed into place,
    weights first: a failure while writing either leaves the previous adapter intact. The one
    remaining window is between the two renames (microseconds): a crash there leaves the new
    weights with the old config, which ``read_adapter`` reports (the weights embed their
    config) instead of mixing two adapters.
    """
    for key, value in tensors.items():
        if not is_finite(value):
            raise ValueError(f"refusing to save non-finite values in '{key}'")
    text = json.dumps(peft, indent=2, sort_keys=True)
    blob = safe_files.weights_bytes(tensors, {"format": "pt", META_KEY: text}, serialize)
    safe_files.write_files(
        Path(directory), {ADAPTER_FILE: blob, CONFIG_FILE: (text + "\n").encode()}
    )


def parse_config(peft: Any, *, conv1d: bool) -> tuple[LoRAConfig, bool]:
    """(the config, its ``fan_in_fan_out``) from a PEFT config dict. ``fan_in_fan_out=True``
    (PEFT's flag for transformers' ``Conv1D``, weight (in, out)) is read only where the caller
    can check it against the torch module kinds (``conv1d``); else it is refused by name."""
    if isinstance(peft, Mapping) and peft.get("target_parameters"):
        # PEFT's ParamWrapper layout (an adapter keyed at the module holding the parameter) is
        # not read: jaxlora writes each adapted weight as the torch Linear its path_map names.
        raise ValueError(
            f"adapter config sets target_parameters={peft['target_parameters']!r}, which is "
            "not supported in a file: PEFT ParamWrapper adapters on nn.Parameter weights are "
            "not read (a file whose adapted weights are torch Linear modules lists them in "
            "target_modules)"
        )
    if conv1d and isinstance(peft, Mapping) and peft.get("fan_in_fan_out") is True:
        return LoRAConfig.from_peft({**peft, "fan_in_fan_out": False}), True
    return LoRAConfig.from_peft(peft), False


def read_adapter(
    directory: str | os.PathLike,
    *,
    framework: str,
    is_finite: Callable[[Any], bool],
    conv1d: Collection[str] | None = None,
) -> tuple[LoRAConfig, dict[str, LayerTensors]]:
    """Reads and checks an adapter directory: its config and {torch module path: (A, B, kind)},
    as ``framework``'s arrays ('np' or 'pt'), kind "linear", "conv" or "embed".

    ``conv1d``: the torch module paths the caller knows to be transformers ``Conv1D``. A file
    with ``fan_in_fan_out=true`` is read only when every one of its layers is among them (a
    Conv1D's lora_A (r, in) and lora_B (out, r) are a Linear's: PEFT's flag only transposes
    its merged delta); a layer that is a Linear is refused by name, never transposed to fit.
    ``None`` (a reader with no Conv1D): such a file is refused."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / ADAPTER_FILE
    try:
        peft = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{config_path}: no such file (not an adapter directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    try:
        config, fan_in_fan_out = parse_config(peft, conv1d=conv1d is not None)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    if not weights_path.exists():
        raise ValueError(f"{weights_path}: no such file")
    metadata, raw = safe_files.read_weights(weights_path, framework)
    if META_KEY in metadata:
        _check_same_save(directory, metadata[META_KEY], (config, fan_in_fan_out))
    pairs: dict[str, dict[str, Any]] = {}
    magnitudes = _magnitudes(raw, config, weights_path)
    for key, value in raw.items():
        if key.startswith(PREFIX) and key.endswith(MAGNITUDE):
            continue  # read by _magnitudes
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
    tensors: dict[str, LayerTensors] = {}
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
        magnitude = _magnitude(magnitudes, path, kind, b, is_finite, config, weights_path)
        tensors[path] = layer_tensors(a, b, kind, magnitude)
    if not tensors:
        raise ValueError(f"{weights_path}: holds no LoRA tensors")
    if fan_in_fan_out:  # parse_config reads it as True only when conv1d is given
        _check_conv1d(tensors, conv1d or (), config_path)
    stray = sorted(set(magnitudes) - set(tensors))
    if stray:
        raise ValueError(
            f"{weights_path}: '{magnitude_key(stray[0])}' belongs to no layer with lora_A/lora_B"
        )
    return config, tensors


def _magnitudes(raw: Mapping[str, Any], config: LoRAConfig, weights_path: Path) -> dict:
    """{layer path: value} of the file's DoRA magnitude vectors; an error in a non-DoRA file."""
    found = {
        k[len(PREFIX) : -len(MAGNITUDE)]: v
        for k, v in raw.items()
        if k.startswith(PREFIX) and k.endswith(MAGNITUDE)
    }
    if found and not config.use_dora:
        raise ValueError(
            f"{weights_path}: '{next(iter(found))}' is a DoRA magnitude vector but "
            f"{CONFIG_FILE} does not set use_dora=true"
        )
    return found


def _magnitude(
    magnitudes: dict, path: str, kind: str, b: Any, is_finite, config: LoRAConfig, weights_path
) -> Any:
    """The layer's DoRA magnitude vector, checked against B's output features."""
    if not config.use_dora:
        return None
    key = magnitude_key(path)
    where = f"{weights_path}: layer '{path}'"
    if path not in magnitudes:
        raise ValueError(f"{where}: use_dora=true but the file has no '{key}'")
    value = magnitudes[path]
    expected = magnitude_shape(kind, b.shape[0], b.ndim - 2)
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{where}: '{key}' has shape {tuple(value.shape)}, expected {expected} (one "
            "magnitude per output feature)"
        )
    if not is_finite(value):
        raise ValueError(f"{where}: non-finite values in '{key}'")
    return value.reshape(b.shape[0])  # (out,) for every kind


def check_paths_exist(found: set[str], nodes: Mapping, path_map: object, directory: Any) -> None:
    """The file's layer paths must be in the model (after path_map): else say how to map them."""
    absent = sorted(found - set(nodes))
    if absent:
        tree = sorted(nodes)
        shown = ", ".join(tree[:12]) + (f", ... ({len(tree)} in all)" if len(tree) > 12 else "")
        hint = "fix" if path_map is not None else "pass"
        raise ValueError(
            f"{directory}: the file's module path(s) {absent} are not in the model "
            f"(the file holds: {', '.join(sorted(found))}; the model's layer paths"
            f"{' after path_map' if path_map is not None else ''} are: {shown or '(none)'}); "
            f"if the model's names differ from the torch names, {hint} path_map= (a dict or "
            "function from a '.'-joined JAX path to the torch module path)"
        )


def residual_needed(
    path: str,
    kind: str,
    file: tuple[str, float],
    layer: tuple[str | None, float],
    directory: Any,
) -> bool:
    """Whether loading a file's adapter into an injected layer must first turn the layer's
    weight into the PiSSA/OLoRA residual; a ``ValueError`` where the result would be wrong.

    ``file`` and ``layer`` are (init, scaling): the file's, and the one the layer was injected
    with (``None``: unknown). A PiSSA/OLoRA adapter is relative to the residual
    W − scaling·B₀A₀ that PEFT builds from the base weight W; other adapters to W itself.
    A kaiming/gaussian-injected layer still holds W, so the residual is built from it (as
    loading into the plain model does). A PiSSA/OLoRA-injected layer holds its own residual:
    right for a file of the same init (and, for OLoRA, whose residual depends on it, the same
    scaling), but W cannot be recovered from it for any other file.
    """
    (file_init, file_scale), (layer_init, layer_scale) = file, layer
    if layer_init in WEIGHT_INITS:
        if file_init == layer_init and (file_init == "pissa" or file_scale == layer_scale):
            return False
        raise ValueError(
            f"{directory}: layer '{path}' was injected with init={layer_init!r} (scaling "
            f"{layer_scale:g}), so its weight is the residual W − scaling·B₀A₀, not the base "
            f"weight that this init={file_init!r} (scaling {file_scale:g}) adapter applies to; "
            "load the file into the plain base model instead"
        )
    if file_init not in WEIGHT_INITS:
        return False
    if kind != "linear":
        raise ValueError(
            f"{directory}: the file's init={file_init!r} adapts linear layers only, but "
            f"layer '{path}' is a {kind} layer"
        )
    if layer_init is None:
        raise ValueError(
            f"{directory}: the file is an init={file_init!r} adapter, relative to a residual "
            f"of the base weight, and it is not known how layer '{path}' was injected; load "
            "the file into the plain base model instead"
        )
    return True


def check_layer_set(expected: Set[object], found: Set[str], directory: Any) -> None:
    # key=str: an expected layer may be a framework's spec (an HFLinear), not a path
    missing, unexpected = sorted(expected - found, key=str), sorted(found - expected)
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
    layer: LayerShapes,
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


def _check_conv1d(tensors: Mapping[str, Any], conv1d: Collection[str], config_path) -> None:
    """``fan_in_fan_out=true`` says every module of the file is a transformers ``Conv1D``."""
    for path, (_, _, kind) in tensors.items():
        if kind != "linear" or path not in conv1d:
            what = "an nn.Linear" if kind == "linear" else f"a {kind} layer"
            raise ValueError(
                f"{config_path}: adapter config sets fan_in_fan_out=True, which is not supported "
                f"for layer '{path}': the flag says its torch module is a transformers Conv1D "
                f"(weight (in, out)), but path_map gives it as {what}. Pass the model's ready "
                "map (path_map='transformers.flax_gpt2' for Flax GPT-2) or an "
                "HFLinear(..., conv1d=True) for it; an adapter is never transposed to fit"
            )


def _check_same_save(directory: Path, embedded: str, parsed: tuple[LoRAConfig, bool]) -> None:
    """The weights embed the config they were saved with: it must mean the same as
    adapter_config.json (a crash between the two renames leaves them different). The parsed
    configs are compared, not the JSON, so a hand edit that changes nothing PEFT computes
    (``base_model_name_or_path`` added, keys reordered) is accepted."""
    config, fan_in_fan_out = parsed
    try:
        saved, saved_fan = parse_config(json.loads(embedded), conv1d=True)
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(
            f"{directory / ADAPTER_FILE}: its embedded '{META_KEY}' metadata is not a valid "
            f"adapter config ({err})"
        ) from None
    if saved != config:
        changed = [
            f"{f.name}: {getattr(saved, f.name)!r} in {ADAPTER_FILE}, "
            f"{getattr(config, f.name)!r} in {CONFIG_FILE}"
            for f in dataclasses.fields(config)
            if getattr(saved, f.name) != getattr(config, f.name)
        ]
        raise ValueError(
            f"{directory}: {ADAPTER_FILE} and {CONFIG_FILE} come from different "
            f"saves (an interrupted save?); save the adapter again ({'; '.join(changed)})"
        )
    if saved_fan != fan_in_fan_out:
        raise ValueError(
            f"{directory}: {ADAPTER_FILE} and {CONFIG_FILE} come from different saves (an "
            f"interrupted save?); save the adapter again (fan_in_fan_out: {saved_fan} in "
            f"{ADAPTER_FILE}, {fan_in_fan_out} in {CONFIG_FILE})"
        )
