"""jaxlora for Flax NNX: the ``LoRALinear`` layer, injection into models, and merging."""

from jaxlora.nnx.inject import inject, merge, trainable_parameters
from jaxlora.nnx.layer import LoRALinear

__all__ = ["LoRALinear", "inject", "merge", "trainable_parameters"]
