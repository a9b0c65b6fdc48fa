"""The twin GPT's hyperparameters: one class for its torch, Linen and NNX versions."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Byte-level by default; ``d_model`` must divide by ``n_head``."""

    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5
