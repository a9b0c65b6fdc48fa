"""Quantized frozen weights (QLoRA): NF4, FP4 and int8 blockwise, bit-equal to bitsandbytes."""

from jaxlora.quant._api import QuantizedWeight, dequantize, quantize
from jaxlora.quant._base import dequantize_base, quantize_base

__all__ = ["QuantizedWeight", "dequantize", "dequantize_base", "quantize", "quantize_base"]
