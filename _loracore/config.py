"""``LoRAConfig``: one configuration for jaxlora and torchlora (targets, rank/alpha patterns,
PEFT's adapter_config.json)."""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from _loracore import hparams, peft_fields


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which layers to adapt, and how.

    ``targets`` follows PEFT's ``target_modules``: a list matches a layer whose '.'-joined path
    equals an entry or ends with '.' + entry; a single string is a regular expression matched
    against the whole path. ``rank_pattern``/``alpha_pattern`` override ``r``/``alpha`` per layer,
    keyed as in PEFT (the first key ``k`` for which ``(.*\\.)?(k)$`` matches the path wins).
    ``alpha=None`` means each layer's alpha equals its rank (scaling 1). ``init`` is PEFT's
    ``init_lora_weights``: "kaiming" (A ~ U(±1/√in), B = 0), "gaussian" (A ~ N(0, σ=1/r), B = 0)
    "pissa" (A, B from the top-r SVD of W, and W replaced by W − scaling·B A) or "olora" (A, B
    from the QR decomposition of W: B the first r columns of Q, A the first r rows of R; W
    replaced likewise). The last two derive from the weight (``WEIGHT_INITS``) and adapt linear
    layers only, as in PEFT.

    Everything is checked when the config is built (a ``TypeError``/``ValueError`` naming the
    field): ``use_rslora`` must be a bool, ``targets`` a string or a list of names, the
    patterns mappings whose keys compile as PEFT uses them; numpy scalars become plain
    numbers. ``select`` (which every ``inject`` calls) refuses a ``targets`` entry or a
    pattern key that matches no layer.

    Examples:
        >>> LoRAConfig(r=8, alpha=16, targets=["query", "value"]).matches("blocks_0.attn.query")
        True
        >>> LoRAConfig(r=8, targets=r"blocks_\\d+\\.attn\\.(query|value)").matches("attn.query")
        False
    """

    r: int = 8
    alpha: float | None = None
    targets: str | Sequence[str] = ()
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    init: str = "kaiming"
    use_dora: bool = False
    target_parameters: Sequence[str] = ()

    def __post_init__(self) -> None:
        hparams.check_hparams(
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            in_features=None,
            out_features=None,
            where="LoRAConfig",
        )
        # Plain Python numbers (not numpy scalars), so to_peft() is JSON as it stands.
        object.__setattr__(self, "r", int(self.r))
        object.__setattr__(self, "alpha", _plain(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_parameters", _checked_parameters(self.target_parameters))
        # PEFT's target_modules=[] with target_parameters: only the named weights are adapted.
        empty = not isinstance(self.targets, str) and isinstance(self.targets, list | tuple)
        if not (empty and not self.targets and self.target_parameters):
            object.__setattr__(self, "targets", _checked_targets(self.targets))
        else:
            object.__setattr__(self, "targets", ())
        if not isinstance(self.use_rslora, bool):  # "no" or JSON "false" must not mean True
            raise TypeError(
                f"LoRAConfig: use_rslora must be True or False, got {self.use_rslora!r} "
                f"({type(self.use_rslora).__name__})"
            )
        if not isinstance(self.use_dora, bool):
            raise TypeError(
                f"LoRAConfig: use_dora must be True or False, got {self.use_dora!r} "
                f"({type(self.use_dora).__name__})"
            )
        if self.use_dora and self.init in WEIGHT_INITS:
            raise ValueError(
                f"LoRAConfig: use_dora=True with init={self.init!r} is not implemented "
                "(DoRA is supported with init 'kaiming' or 'gaussian')"
            )
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ValueError(f"LoRAConfig: init must be one of {INITS}, got {self.init!r}")
        for field in ("rank_pattern", "alpha_pattern"):
            object.__setattr__(self, field, _checked_pattern(field, getattr(self, field)))

    def matches(self, path: str) -> bool:
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, path) is not None
        return any(path == t or path.endswith("." + t) for t in self.targets)

    def rank_for(self, path: str) -> int:
        """The rank of the layer at ``path``: its ``rank_pattern`` entry, else ``r``."""
        key = _pattern_key(self.rank_pattern, path)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, path: str) -> float:
        """The alpha of the layer at ``path``: ``alpha_pattern``, else ``alpha``, else its rank."""
        key = _pattern_key(self.alpha_pattern, path)
        if key is not None:
            return float(self.alpha_pattern[key])
        return float(self.rank_for(path) if self.alpha is None else self.alpha)

    def to_peft(self) -> dict[str, Any]:
        """The ``adapter_config.json`` contents that PEFT reads with the same meaning."""
        lora_alpha = self.r if self.alpha is None else self.alpha
        alpha_pattern = dict(self.alpha_pattern)
        if self.alpha is None:  # PEFT keeps lora_alpha for rank_pattern layers; we use their r
            for key, rank in self.rank_pattern.items():
                alpha_pattern.setdefault(key, rank)
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {
            "peft_type": "LORA",
            "task_type": None,
            "target_modules": targets,
            "r": self.r,
            "lora_alpha": lora_alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": self.use_dora,
            "modules_to_save": None,
            "init_lora_weights": True if self.init == "kaiming" else self.init,
            "inference_mode": True,
            **(
                {"target_parameters": list(self.target_parameters)}
                if self.target_parameters
                else {}
            ),
        }

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any]) -> LoRAConfig:
        """Reads a PEFT ``adapter_config.json`` dict; refuses what this library can't reproduce."""
        if not isinstance(peft_config, Mapping):
            raise ValueError(f"adapter config must be a JSON object, got {type(peft_config)}")
        if "peft_type" not in peft_config:
            raise ValueError("adapter config has no 'peft_type': not a PEFT adapter config")
        if peft_config["peft_type"] != "LORA":
            raise ValueError(
                f"adapter config has peft_type {peft_config['peft_type']!r}; "
                "only 'LORA' is supported"
            )
        for key in ("r", "lora_alpha", "target_modules"):
            if peft_config.get(key) is None:
                extra = " (PEFT would silently use 8)" if key == "lora_alpha" else ""
                raise ValueError(f"adapter config has no {key!r}{extra}")
        peft_fields.check_fields(peft_config)
        return cls(
            r=peft_config["r"],
            alpha=peft_config["lora_alpha"],
            targets=peft_config["target_modules"],
            dropout=peft_config.get("lora_dropout", 0.0) or 0.0,
            use_rslora=peft_config.get("use_rslora", False),
            rank_pattern=_or_empty(peft_config.get("rank_pattern")),
            alpha_pattern=_or_empty(peft_config.get("alpha_pattern")),
            init=_init_from_peft(peft_config.get("init_lora_weights", True)),
            use_dora=peft_config.get("use_dora", False),
            target_parameters=peft_config.get("target_parameters") or (),
        )

    def select(
        self,
        paths: Iterable[str],
        *,
        strict: bool = True,
        listed: Iterable[str] | None = None,
        also: Iterable[str] = (),
    ) -> list[str]:
        """The paths that match, or a ``ValueError`` listing the paths that exist (``listed``:
        the ones to name, where ``paths`` also holds names a layer may turn out to have).

        With ``strict`` (what ``inject`` uses) a ``targets`` list entry, or a ``rank_pattern``/
        ``alpha_pattern`` key, that matches none of the paths is an error too: a typo would
        otherwise adapt the other layers silently, or leave a layer's rank/alpha at the default.
        Loaders pass ``strict=False``: PEFT ignores such entries in the files it writes and
        reads, and the file's tensors say exactly which layers it adapts. ``also``: layers
        adapted besides the matching ones (those ``target_parameters`` names), which a pattern
        key may match.
        """
        paths = list(paths)
        listed = paths if listed is None else list(listed)
        chosen = [p for p in paths if self.matches(p)]
        if not chosen:
            raise ValueError(
                f"targets {self.targets!r} match no layer; the layer paths are: "
                f"{', '.join(p for p in listed if p) or '(none)'}"
            )
        if strict:
            self.check_unmatched(paths, [*chosen, *also], listed=listed)
        return chosen

    def select_parameters(self, keys: Iterable[str]) -> list[str]:
        """The weight keys (``'<module path>.<weight name>'``) that ``target_parameters`` names,
        matched as PEFT's ``target_parameters`` and as a ``targets`` list: a key equal to an
        entry or ending with '.' + entry. An entry that matches no key is a ``ValueError`` (a
        typo would otherwise leave a weight unadapted silently), listing the keys.

        Examples:
            >>> config = LoRAConfig(targets=[], target_parameters=["mlp.w_gate"])
            >>> config.select_parameters(["blocks.0.mlp.w_gate", "blocks.0.mlp.w_up"])
            ['blocks.0.mlp.w_gate']
        """
        keys = list(keys)
        hit = lambda key, entry: key == entry or key.endswith("." + entry)  # noqa: E731
        for entry in self.target_parameters:
            if not any(hit(key, entry) for key in keys):
                raise ValueError(
                    f"target_parameters entry {entry!r} matches no weight (a typo?); the "
                    f"weights are: {', '.join(keys) or '(none)'}"
                )
        return [k for k in keys if any(hit(k, e) for e in self.target_parameters)]

    def check_unmatched(
        self, paths: Iterable[str], adapted: Iterable[str], listed: Iterable[str] | None = None
    ) -> None:
        """A ``ValueError`` for a ``targets`` list entry that matches none of ``paths`` (the
        message names ``listed``, by default ``paths``), or a ``rank_pattern``/``alpha_pattern``
        key that matches none of the ``adapted`` paths (which may include other names of the
        same layers, as torch's aliased modules have)."""
        paths, adapted = list(paths), list(adapted)
        listed = paths if listed is None else list(listed)
        if not isinstance(self.targets, str):
            for entry in self.targets:
                if not any(p == entry or p.endswith("." + entry) for p in paths):
                    raise ValueError(
                        f"targets entry {entry!r} matches no layer (a typo?); the layer paths "
                        f"are: {', '.join(p for p in listed if p) or '(none)'}"
                    )
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field):
                if not any(re.match(_key_regex(key), p) for p in adapted):
                    raise ValueError(
                        f"{field} key {key!r} matches none of the adapted layers (a typo?): "
                        f"{', '.join(adapted)}"
                    )

    def for_layers(self, layers: Mapping[str, tuple[int, float]]) -> LoRAConfig:
        """This config narrowed to exactly ``layers`` ({path: (r, alpha)}), each named by its
        exact path: what a loader injects, whatever patterns the file's config used."""
        keys = sorted(layers, key=lambda p: (-len(p), p))  # a longer exact key wins
        return dataclasses.replace(
            self,
            targets="|".join(re.escape(p) for p in sorted(layers)),
            rank_pattern={re.escape(p): layers[p][0] for p in keys},
            alpha_pattern={re.escape(p): layers[p][1] for p in keys},
        )


def _or_empty(pattern: Any) -> Any:
    return {} if pattern is None else pattern  # PEFT writes {} or null for "no pattern"


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _checked_targets(targets: Any) -> str | tuple[str, ...]:
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(
                f"LoRAConfig: targets {targets!r} is not a valid regular expression: {err}"
            ) from None
        return targets
    if isinstance(targets, Mapping) or not isinstance(targets, list | tuple | set | frozenset):
        raise TypeError(
            "LoRAConfig: targets must be a regular expression (str) or a list of layer names, "
            f"got {targets!r} ({type(targets).__name__})"
        )
    entries = sorted(targets) if isinstance(targets, set | frozenset) else tuple(targets)
    if not entries or not all(isinstance(t, str) and t for t in entries):
        raise ValueError(
            "LoRAConfig: targets must be a regular expression or a "
            f"non-empty list of layer names, got {targets!r}"
        )
    return tuple(entries)


def _checked_parameters(entries: Any) -> tuple[str, ...]:
    if entries is None:
        return ()
    if isinstance(entries, str | Mapping) or not isinstance(entries, list | tuple):
        raise TypeError(
            "LoRAConfig: target_parameters must be a list of '<module>.<weight>' names (PEFT "
            f"does not take a regular expression there), got {entries!r}"
        )
    bad = [e for e in entries if not isinstance(e, str) or not e]
    if bad:
        raise ValueError(
            "LoRAConfig: each target_parameters entry must be a non-empty string naming a "
            f"weight as '<module>.<weight>' (e.g. 'mlp.w_gate') or its end, got {bad!r}"
        )
    return tuple(entries)


def _checked_pattern(field: str, pattern: Any) -> dict[str, Any]:
    if not isinstance(pattern, Mapping):
        raise TypeError(
            f"LoRAConfig: {field} must be a mapping from a layer-name pattern to a value, got "
            f"{pattern!r} ({type(pattern).__name__})"
        )
    out = {}
    for key, value in pattern.items():
        where = f"LoRAConfig.{field}[{key!r}]"
        if not isinstance(key, str) or not key:
            raise ValueError(f"LoRAConfig: {field} keys must be non-empty strings, got {key!r}")
        try:  # the key alone first, so that the error's position is in the key
            re.compile(key)
            re.compile(_key_regex(key))
        except re.error as err:
            raise ValueError(f"{where}: the key is not a valid regular expression: {err}") from None
        if field == "rank_pattern":
            hparams.check_hparams(
                r=value, alpha=None, dropout=0.0, in_features=None, out_features=None, where=where
            )
        else:
            hparams.check_hparams(
                r=1, alpha=value, dropout=0.0, in_features=None, out_features=None, where=where
            )
        out[key] = _plain(value)
    return out


def _key_regex(key: str) -> str:
    # PEFT's get_pattern_key: a key k matches a path when (.*\.)?(k)$ matches it.
    return rf"(.*\.)?({key})$"


def _pattern_key(pattern: Mapping[str, Any], path: str) -> str | None:
    # PEFT's get_pattern_key: the first key k for which (.*\.)?(k)$ matches the path.
    for key in pattern:
        if re.match(_key_regex(key), path):
            return key
    return None


INITS = ("kaiming", "gaussian", "pissa", "olora")
# The naming rule: a leaf or parameter is part of the adapter (trained, split off, saved)
# exactly when it has one of these names. ``lora_magnitude`` is DoRA's magnitude vector m.
LORA_NAMES = ("lora_a", "lora_b", "lora_magnitude")
WEIGHT_INITS = ("pissa", "olora")  # derived from the weight, which becomes the residual


def _init_from_peft(value: Any) -> str:
    # True is PEFT's default (kaiming A, zero B); the stored weights override any init on load,
    # except for PiSSA and OLoRA, whose adapters are relative to the residual base they make.
    if value is True or value is False or value is None:  # type-exact: 1 or "true" is not True
        return "kaiming"
    if isinstance(value, str) and value in INITS:
        return value
    raise ValueError(
        f"adapter config has init_lora_weights={value!r}; supported: True, 'gaussian', "
        "'pissa', 'olora'"
    )
