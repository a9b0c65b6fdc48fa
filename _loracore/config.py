"""``LoRAConfig``: one configuration for jaxlora and torchlora (targets, rank/alpha patterns,
PEFT's adapter_config.json)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from _loracore import hparams


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

    def __post_init__(self) -> None:
        hparams.check_hparams(
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            in_features=None,
            out_features=None,
            where="LoRAConfig",
        )
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as err:
                raise ValueError(
                    f"LoRAConfig: targets {self.targets!r} is not a valid regular expression: {err}"
                ) from None
        else:
            targets = tuple(self.targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    "LoRAConfig: targets must be a regular expression or a "
                    f"non-empty list of layer names, got {self.targets!r}"
                )
            object.__setattr__(self, "targets", targets)
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig: init must be one of {INITS}, got {self.init!r}")
        for field in ("rank_pattern", "alpha_pattern"):
            pattern = dict(getattr(self, field))
            for key, value in pattern.items():
                where = f"LoRAConfig.{field}[{key!r}]"
                if not isinstance(key, str) or not key:
                    raise ValueError(f"LoRAConfig: {field} keys must be non-empty strings")
                if field == "rank_pattern":
                    hparams.check_hparams(
                        r=value,
                        alpha=None,
                        dropout=0.0,
                        in_features=None,
                        out_features=None,
                        where=where,
                    )
                else:
                    hparams.check_hparams(
                        r=1,
                        alpha=value,
                        dropout=0.0,
                        in_features=None,
                        out_features=None,
                        where=where,
                    )
            object.__setattr__(self, field, pattern)

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
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True if self.init == "kaiming" else self.init,
            "inference_mode": True,
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
        unsupported = {
            "use_dora": False,
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
            "layers_to_transform": None,
            "lora_bias": False,
        }
        for key, ok in unsupported.items():
            if peft_config.get(key, ok) not in (ok, [], {}) and peft_config.get(key) != ok:
                raise ValueError(
                    f"adapter config sets {key}={peft_config[key]!r}, which is not "
                    f"supported (expected {ok!r})"
                )
        return cls(
            r=peft_config["r"],
            alpha=peft_config["lora_alpha"],
            targets=peft_config["target_modules"],
            dropout=peft_config.get("lora_dropout", 0.0) or 0.0,
            use_rslora=bool(peft_config.get("use_rslora", False)),
            rank_pattern=peft_config.get("rank_pattern") or {},
            alpha_pattern=peft_config.get("alpha_pattern") or {},
            init=_init_from_peft(peft_config.get("init_lora_weights", True)),
        )

    def select(self, paths: Iterable[str]) -> list[str]:
        """The paths that match, or a ``ValueError`` listing the paths that exist."""
        paths = list(paths)
        chosen = [p for p in paths if self.matches(p)]
        if not chosen:
            raise ValueError(
                f"targets {self.targets!r} match no layer; the layer paths are: "
                f"{', '.join(p for p in paths if p) or '(none)'}"
            )
        return chosen


def _pattern_key(pattern: Mapping[str, Any], path: str) -> str | None:
    # PEFT's get_pattern_key: the first key k for which (.*\.)?(k)$ matches the path.
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


INITS = ("kaiming", "gaussian", "pissa", "olora")
WEIGHT_INITS = ("pissa", "olora")  # derived from the weight, which becomes the residual


def _init_from_peft(value: Any) -> str:
    # True is PEFT's default (kaiming A, zero B); the stored weights override any init on load,
    # except for PiSSA and OLoRA, whose adapters are relative to the residual base they make.
    if value in (True, False, None) or value in INITS:
        return value if isinstance(value, str) else "kaiming"
    raise ValueError(
        f"adapter config has init_lora_weights={value!r}; supported: True, 'gaussian', "
        "'pissa', 'olora'"
    )
