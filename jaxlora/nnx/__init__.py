"""jaxlora for Flax NNX: the LoRA layers (``LoRALinear``, ``LoRALinearGeneral``, ``LoRAConv``,
``LoRAEmbed``), injection, merging and adapter files."""

from jaxlora.nnx.adapter import load_adapter, save_adapter
from jaxlora.nnx.conv import LoRAConv
from jaxlora.nnx.embed import LoRAEmbed
from jaxlora.nnx.general import LoRALinearGeneral
from jaxlora.nnx.inject import inject, merge, trainable_parameters
from jaxlora.nnx.layer import LoRALinear
from jaxlora.nnx.multi import (
    MultiLoRALinear,
    MultiOpAdapter,
    adapter_index,
    clear_adapter,
    set_adapter,
    to_multi,
)
from jaxlora.nnx.oplevel import OpAdapter
from jaxlora.nnx.quant import QuantizedKernel, quantize_base
from jaxlora.nnx.qwix import from_qwix

__all__ = [
    "LoRAConv",
    "LoRAEmbed",
    "LoRALinear",
    "LoRALinearGeneral",
    "MultiLoRALinear",
    "MultiOpAdapter",
    "OpAdapter",
    "QuantizedKernel",
    "adapter_index",
    "clear_adapter",
    "from_qwix",
    "inject",
    "load_adapter",
    "merge",
    "quantize_base",
    "save_adapter",
    "set_adapter",
    "to_multi",
    "trainable_parameters",
]
