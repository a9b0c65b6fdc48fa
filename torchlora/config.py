"""``LoRAConfig`` and target matching: the same fields and rules as ``jaxlora/config.py``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from torchlora import core


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which layers to adapt, and how.

    ``targets`` follows PEFT's ``target_modules``: a list matches a layer whose '.'-joined path
    equals an entry or ends with '.' + entry; a single string is a regular expression matched
    against the whole path.

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

    def __post_init__(self) -> None:
        core.check_hparams(
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

    def matches(self, path: str) -> bool:
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, path) is not None
        return any(path == t or path.endswith("." + t) for t in self.targets)

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
