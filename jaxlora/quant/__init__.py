"""Quantized frozen weights (QLoRA): NF4, FP4 and int8 blockwise, bit-equal to bitsandbytes."""

from jaxlora.quant._api import QuantizedWeight, dequantize, quantize

__all__ = ["QuantizedWeight", "dequantize", "quantize"]
