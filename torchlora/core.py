"""torchlora's side of the LoRA formula: the delta in fp32 (the rules live in ``_loracore``)."""

from __future__ import annotations

import torch

from _loracore.hparams import check_hparams, scaling

__all__ = ["check_hparams", "delta", "scaling"]


def delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Returns ``scale * B @ A`` with shape (out, in), computed in float32 (or wider).

    Half-precision adapters are widened first so that merging rounds once, into the weight.
    """
    dtype = torch.promote_types(lora_a.dtype, torch.float32)
    return (lora_b.to(dtype) @ lora_a.to(dtype)) * scale
