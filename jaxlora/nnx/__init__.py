"""jaxlora for Flax NNX: the LoRA layers (``LoRALinear``, ``LoRALinearGeneral``, ``LoRAConv``,
``LoRAEmbed``), injection, merging and adapter files."""

from jaxlora.nnx.adapter import load_adapter, save_adapter
from jaxlora.nnx.inject import inject, merge, trainable_parameters
from jaxlora.nnx.kinds import LoRAConv, LoRAEmbed, LoRALinearGeneral
from jaxlora.nnx.layer import LoRALinear

__all__ = [
    "LoRAConv",
    "LoRAEmbed",
    "LoRALinear",
    "LoRALinearGeneral",
    "inject",
    "load_adapter",
    "merge",
    "save_adapter",
    "trainable_parameters",
]
