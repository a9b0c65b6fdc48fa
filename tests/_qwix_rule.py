"""A stand-in for ``qwix.LoraRule`` (qwix is not a dependency): the attributes
``jaxlora.nnx.from_qwix`` reads from a rule."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class QwixRule:
    module_path: str
    rank: int
    alpha: float
    dropout: float = 0.0
    op_names: tuple = ()
    weight_qtype: str | None = None
    act_qtype: str | None = None
