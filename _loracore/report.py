"""The trainable-parameter report, the same on every side."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Trainable vs total parameter counts."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}"
        )
