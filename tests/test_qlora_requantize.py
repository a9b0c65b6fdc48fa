"""The re-quantizing merge (``jaxlora.merge(..., requantize=True)``,
``jaxlora.nnx.merge(model, requantize=True)``): the result is exactly the quantized float
merge, its error against the float merge is within the format's bound, and misuse is refused.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora import nnx as jnnx
from jaxlora.quant import (
    QuantizedWeight,
    _blockwise,
    _tables,
    dequantize,
    dequantize_base,
    quantize,
)
from jaxlora.quant._api import NESTED_BLOCKSIZE
from tests import test_qlora_linen as linen_case
from tests import test_qlora_nnx as nnx_case

OPTIONS = {
    "nf4": dict(quant_type="nf4"),
    "fp4": dict(quant_type="fp4"),
    "int8": dict(quant_type="int8", blocksize=64),
    "nf4-double-quant": dict(quant_type="nf4", double_quant=True),
}
CODES = {"nf4": _tables.NF4_CODE, "fp4": _tables.FP4_CODE, "int8": _tables.DYNAMIC_CODE}


def _assert_same_bits(got: QuantizedWeight, expected: QuantizedWeight) -> None:
    assert (got.shape, got.dtype, got.quant_type, got.blocksize) == (
        expected.shape,
        expected.dtype,
        expected.quant_type,
        expected.blocksize,
    )
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def _assert_within_bound(q: QuantizedWeight, weight: np.ndarray) -> None:
    """|dequantize(q) - weight| per element <= half the widest code gap times its block's
    absmax (int8: plus bitsandbytes' 16-bit grid step), plus, with double quantization, the
    error of the stored absmax; 1e-6 relative for float32 rounding. Also > 0 somewhere."""
    code = np.sort(CODES[q.quant_type].astype(np.float64))
    half_gap = np.diff(code).max() / 2 + (1 / 65535 if q.quant_type == "int8" else 0)
    flat = np.asarray(weight, np.float64).reshape(-1, q.blocksize)  # whole blocks here
    absmax = np.abs(flat).max(axis=1)
    stored = absmax
    if q.double_quant:  # the absmax dequantization uses: its 8-bit codes, scales and offset
        nested = _blockwise.dequantize_8bit(q.absmax, q.nested_absmax, NESTED_BLOCKSIZE)
        stored = np.asarray(nested + q.offset, np.float64)
    bound = half_gap * absmax + np.abs(stored - absmax) + 1e-6 * absmax
    error = np.abs(np.asarray(dequantize(q), np.float64).reshape(flat.shape) - flat)
    assert (error <= bound[:, None]).all()
    assert error.max() > 0  # a real re-quantization, not the float kernel passed through


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_linen_requantized_merge_is_the_quantized_float_merge(options):
    model, variables, _ = linen_case._model()
    quantized = jaxlora.quant.quantize_base(variables, linen_case.CONFIG, **options)
    floats = jaxlora.merge(quantized, alpha=linen_case.CONFIG.alpha)
    merged = jaxlora.merge(quantized, alpha=linen_case.CONFIG.alpha, requantize=True)
    assert sorted(merged) == ["params", "quant"]
    for name in ("up", "down"):
        assert sorted(merged["params"][name]) == ["bias"]  # no LoRA leaves, no float kernel
        q = merged["quant"][name]["kernel"]
        float_kernel = floats["params"][name]["kernel"]
        _assert_same_bits(q, quantize(float_kernel.T, **options))
        _assert_within_bound(q, np.asarray(float_kernel).T)
    # The float merge it re-quantized is dequantize(W) + delta (closed form, float64).
    p = quantized["params"]["up"]
    expected = np.asarray(dequantize(quantized["quant"]["up"]["kernel"]), np.float64).T
    expected += 2.0 * np.asarray(p["lora_a"], np.float64) @ np.asarray(p["lora_b"], np.float64)
    np.testing.assert_allclose(floats["params"]["up"]["kernel"], expected, rtol=0, atol=1e-6)
    # It runs as a quantized base: the forward is the dequantized kernels' forward.
    x = jax.random.normal(jax.random.key(3), (5, linen_case.IN))
    with jaxlora.intercept(linen_case.CONFIG):
        got = model.apply(merged, x)
    np.testing.assert_allclose(got, model.apply(dequantize_base(merged), x), rtol=1e-6, atol=1e-6)


def test_linen_layers_without_an_adapter_keep_their_quantized_kernel():
    _, variables, _ = linen_case._model()
    del variables["params"]["down"]["lora_a"], variables["params"]["down"]["lora_b"]
    quantized = jaxlora.quant.quantize_base(variables, linen_case.CONFIG, double_quant=True)
    merged = jaxlora.merge(quantized, alpha=linen_case.CONFIG.alpha, requantize=True)
    _assert_same_bits(merged["quant"]["down"]["kernel"], quantized["quant"]["down"]["kernel"])
    assert merged["quant"]["up"]["kernel"].double_quant


def test_linen_requantized_merge_under_jit_equals_eager():
    _, _, quantized = linen_case._model()
    eager = jaxlora.merge(quantized, alpha=linen_case.CONFIG.alpha, requantize=True)
    jitted = jax.jit(lambda v: jaxlora.merge(v, alpha=linen_case.CONFIG.alpha, requantize=True))
    jax.tree.map(np.testing.assert_array_equal, jitted(quantized), eager)


def test_linen_requantize_is_refused_without_a_quantized_base_or_with_record():
    _, variables, quantized = linen_case._model()
    with pytest.raises(ValueError, match="requantize=True needs a quantized base"):
        jaxlora.merge(variables, alpha=8, requantize=True)
    with pytest.raises(ValueError, match="record=True cannot be combined with requantize"):
        jaxlora.merge(quantized, alpha=8, requantize=True, record=True)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_nnx_requantized_merge_keeps_a_quantized_base_equal_to_the_float_merge_quantized(
    options,
):
    floats, _ = nnx_case._model(**options)
    jnnx.merge(floats)  # the float merge of the same model
    model, _ = nnx_case._model(**options)
    assert jnnx.merge(model, requantize=True) is model
    x = jax.random.normal(jax.random.key(3), (5, nnx_case.IN))
    for name in ("up", "down"):
        layer, float_kernel = getattr(model, name), getattr(floats, name).kernel[...]
        assert isinstance(layer, jnnx.LoRALinear) and layer.is_quantized
        np.testing.assert_array_equal(layer.lora_b[...], 0.0)
        q = layer.kernel.get_value()
        _assert_same_bits(q, quantize(float_kernel.T, **options))
        _assert_within_bound(q, np.asarray(float_kernel).T)
    # The output is the re-quantized base's alone (lora_b is zero).
    h = np.asarray(x, np.float64)
    for i, name in enumerate(("up", "down")):
        layer = getattr(model, name)
        kernel = np.asarray(dequantize(layer.kernel.get_value()), np.float64).T
        h = h @ kernel + np.asarray(layer.bias[...], np.float64)
        h = np.maximum(h, 0) if i == 0 else h
    np.testing.assert_allclose(model(x), h, rtol=0, atol=1e-5 * np.abs(h).max())


def test_nnx_requantize_without_a_quantized_kernel_is_refused_and_changes_nothing():
    model = nnx_case.MLP(nnx.Rngs(0))
    jnnx.inject(model, nnx_case.CONFIG, nnx.Rngs(1))
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match="requantize=True needs a LoRALinear with a quantized"):
        jnnx.merge(model, requantize=True)
    assert isinstance(model.up, jnnx.LoRALinear)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), before)
