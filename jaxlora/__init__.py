"""jaxlora: LoRA for Flax (Linen and NNX) with optax-native training.

The NNX layer lives in ``jaxlora.nnx`` (``from jaxlora.nnx import LoRALinear``).
"""

from jaxlora.convert import from_torch, to_torch
from jaxlora.core import scaling
from jaxlora.linen import LoRADense
from jaxlora.merge import merge, unmerge
from jaxlora.tree import combine, freeze_base, lora_mask, split

__all__ = [
    "LoRADense",
    "combine",
    "freeze_base",
    "from_torch",
    "lora_mask",
    "merge",
    "scaling",
    "split",
    "to_torch",
    "unmerge",
]
