"""jaxlora for Flax NNX: the ``LoRALinear`` layer, injection, merging and adapter files."""

from jaxlora.nnx.adapter import load_adapter, save_adapter
from jaxlora.nnx.inject import inject, merge, trainable_parameters
from jaxlora.nnx.layer import LoRALinear

__all__ = [
    "LoRALinear",
    "inject",
    "load_adapter",
    "merge",
    "save_adapter",
    "trainable_parameters",
]
