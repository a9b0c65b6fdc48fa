"""jaxlora.quant against bitsandbytes 0.50.2 on the CPU: the same bits.

Packed bytes, absmax and (given bitsandbytes' offset) the double-quantization state are
compared bit for bit; dequantized values bit for bit as well. Two documented exceptions:
the double-quantization offset is a float32 mean whose summation order torch does not fix
(checked to a few ulps), and bitsandbytes' AVX-512 CPU dequantization kernel reads the wrong
absmax when a row's length is a multiple of 16 but not of the block size, so there the
reference is bitsandbytes' own portable kernel (``backends/default``), which its CUDA and
non-AVX-512 paths agree with (also for weights of one or two elements, whose output its
public ``dequantize_4bit`` transposes).
"""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default import ops as bnb_default
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlora.quant import QuantizedWeight, _blockwise, _tables, dequantize, quantize

FOUR_BIT = ("nf4", "fp4")
DTYPES = {
    "float32": (torch.float32, jnp.float32),
    "bfloat16": (torch.bfloat16, jnp.bfloat16),
    "float16": (torch.float16, jnp.float16),
}


def _to_jax(w: torch.Tensor, dtype_name: str) -> jax.Array:
    return jnp.asarray(w.float().numpy()).astype(DTYPES[dtype_name][1])


def _bits(x) -> np.ndarray:
    """Bit patterns, so that -0.0 != 0.0 and NaNs compare by payload."""
    a = np.asarray(x.float().numpy() if isinstance(x, torch.Tensor) else jnp.asarray(x, "float32"))
    return a.view(np.uint32)


def _reference_dequantize(packed, absmax, quant_type, blocksize, shape, dtype):
    """bitsandbytes' portable 4-bit dequantization (uncompiled, exactly its arithmetic)."""
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    # Unwrap bitsandbytes' torch.compile wrapper where it applied: eager torch arithmetic.
    compute = bnb_default._dequantize_4bit_compute
    compute = getattr(compute, "__wrapped__", compute)
    return compute(packed.reshape(-1), absmax, code, blocksize, shape, dtype)


def _public_kernel_is_right(shape, blocksize) -> bool:
    # See the module docstring: the AVX-512 kernel indexes absmax per row.
    n = shape[-1]
    if int(np.prod(shape)) <= 2:
        # A weight of one or two elements packs into one byte, shape (1, 1), which
        # dequantize_4bit's "BC shim" (A.shape[0] == 1) takes for a transposed layout: it
        # returns out.t(), transposed for 2-D and an error for 3-D weights.
        return False
    return n % 2 == 1 or n % blocksize == 0 or not (n % 16 == 0 and blocksize >= 16)


def test_code_tables_equal_bitsandbytes():
    for quant_type in FOUR_BIT:
        ours = _tables.CODES[quant_type].view(np.uint32)
        theirs = bnbf.get_4bit_type(quant_type, device="cpu").numpy().view(np.uint32)
        np.testing.assert_array_equal(ours, theirs)
        bounds, order = bnb_default._get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        midpoints, our_order = _tables.sorted_4bit(quant_type)
        np.testing.assert_array_equal(midpoints.view(np.uint32), bounds.numpy().view(np.uint32))
        np.testing.assert_array_equal(our_order, order.numpy())
    dynamic = bnbf.create_dynamic_map().numpy().view(np.uint32)
    np.testing.assert_array_equal(_tables.DYNAMIC_CODE.view(np.uint32), dynamic)


def _check_4bit(w: torch.Tensor, dtype_name: str, quant_type: str, blocksize: int):
    packed, state = bnbf.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize)
    q = jax.jit(lambda x: quantize(x, quant_type=quant_type, blocksize=blocksize))(
        _to_jax(w, dtype_name)
    )
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy())
    np.testing.assert_array_equal(_bits(q.absmax), _bits(state.absmax))
    ours = dequantize(q)
    assert ours.dtype == DTYPES[dtype_name][1] and ours.shape == tuple(w.shape)
    args = (packed, state.absmax, quant_type, blocksize, tuple(w.shape), w.dtype)
    np.testing.assert_array_equal(_bits(ours), _bits(_reference_dequantize(*args)))
    if _public_kernel_is_right(tuple(w.shape), blocksize):
        # By value: the AVX-512 kernel's FP4 table has -0.0 for code 8, the portable one +0.0.
        # Reshaped: for a 1-D weight of even length that kernel returns shape (1, n).
        public = bnbf.dequantize_4bit(packed, state).float().numpy().reshape(w.shape)
        np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), public)
    return q, packed, state


SHAPES = [(1,), (7,), (3, 5), (64, 64), (33, 17), (16, 96), (2, 3, 65), (128, 256), (5, 1000)]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("quant_type", FOUR_BIT)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_4bit_bit_equal(shape, blocksize, quant_type, dtype_name):
    rng = np.random.default_rng(abs(hash((shape, blocksize))) % 2**32)
    w = torch.from_numpy((rng.standard_normal(shape) * 0.05).astype(np.float32))
    _check_4bit(w.to(DTYPES[dtype_name][0]), dtype_name, quant_type, blocksize)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple),
    blocksize=st.sampled_from([32, 64, 128, 256]),
    quant_type=st.sampled_from(FOUR_BIT),
    dtype_name=st.sampled_from(list(DTYPES)),
    log_scale=st.floats(-30, 30),
    special=st.sampled_from(["none", "zero_block", "midpoints", "codes", "huge", "integers"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_4bit_bit_equal_hypothesis(
    shape, blocksize, quant_type, dtype_name, log_scale, special, seed
):
    rng = np.random.default_rng(seed)
    if dtype_name == "float16":
        log_scale = min(log_scale, 12.0)  # finite weights only (float16 overflows at 65504)
    flat = rng.standard_normal(int(np.prod(shape))) * 2.0**log_scale
    code = _tables.CODES[quant_type].astype(np.float64)
    if special == "zero_block":
        flat[:blocksize] = 0.0
    elif special == "midpoints":
        # Exact ties between codes (absmax 1 in each block, so scaled == value).
        midpoints, _ = _tables.sorted_4bit(quant_type)
        flat = rng.choice(midpoints, flat.size)
        flat[::blocksize] = 1.0
    elif special == "codes":
        flat = rng.choice(code, flat.size) * 2.0**log_scale
    elif special == "huge":
        # Up to 2**126: above, bitsandbytes' reciprocal of absmax is subnormal and inexact,
        # and jaxlora divides instead (nearest codes, tested in tests/test_quant.py).
        flat = rng.uniform(-1, 1, flat.size) * (6e4 if dtype_name == "float16" else 8e37)
    elif special == "integers":
        flat = np.round(flat / 2.0**log_scale * 4)
    w = torch.from_numpy(flat.reshape(shape).astype(np.float32)).to(DTYPES[dtype_name][0])
    _check_4bit(w, dtype_name, quant_type, blocksize)


@pytest.mark.parametrize("quant_type", FOUR_BIT)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(
    "values",
    [
        np.zeros(1),
        np.zeros(64),
        np.zeros(70),
        np.r_[np.ones(64), np.zeros(6)],
        np.r_[np.zeros(64), 3.0],
    ],
    ids=["zero", "zero_full_block", "zero_partial", "zero_last_partial", "zero_then_one"],
)
def test_zero_blocks_bit_equal(values, dtype_name, quant_type):
    # A full zero block stores absmax 0, a partial one 1e-38 (a subnormal): both copied.
    w = torch.from_numpy(values.astype(np.float32)).to(DTYPES[dtype_name][0])
    _check_4bit(w, dtype_name, quant_type, 64)


@pytest.mark.parametrize("quant_type", FOUR_BIT)
def test_partial_block_is_divided_not_multiplied(quant_type):
    # bitsandbytes divides the last, partial block by its absmax; x / a and x * (1 / a) differ
    # in the last bit. Pick values where that bit moves them across a code midpoint.
    def separating(a, m):
        x = np.float32(m * a)
        for k in range(-64, 64):
            y = np.float32(x + k * np.spacing(x))
            if (y / a <= m) != (y * (np.float32(1) / a) <= m):
                return y
        return None

    midpoints, _ = _tables.sorted_4bit(quant_type)
    for a in np.float32([2.7182817, 3.1415927, 1.3, 0.7, 5.5, 9.1]):
        picked = [y for m in midpoints if m != 0 and (y := separating(a, m)) is not None]
        if picked:
            break
    assert picked, "no value separates division from reciprocal multiplication"
    w = torch.from_numpy(np.array([a, *picked], np.float32))  # 1 + len(picked) < 32: partial
    _check_4bit(w, "float32", quant_type, 32)


@pytest.mark.parametrize("quant_type", FOUR_BIT)
@pytest.mark.parametrize("shape", [(64, 96), (128, 256), (33, 17), (300, 700)], ids=str)
def test_double_quant_state(shape, quant_type):
    rng = np.random.default_rng(shape[0])
    w = torch.from_numpy((rng.standard_normal(shape) * 0.02).astype(np.float32))
    packed, state = bnbf.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    _, plain = bnbf.quantize_4bit(w, quant_type=quant_type)
    q = quantize(jnp.asarray(w.numpy()), quant_type=quant_type, double_quant=True)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy())
    # The offset: a float32 mean; torch's summation order is its own (see module docstring).
    offset = np.float32(state.offset.item())
    assert abs(float(q.offset) - float(offset)) <= 4 * np.spacing(offset)
    # Given bitsandbytes' offset, the 8-bit absmax codes and their scales are the same bits.
    codes, nested = _blockwise.quantize_8bit(jnp.asarray(plain.absmax.numpy()) - offset, 256)
    np.testing.assert_array_equal(np.asarray(codes), state.absmax.numpy())
    np.testing.assert_array_equal(_bits(nested), _bits(state.state2.absmax))
    # bitsandbytes' state loaded as is dequantizes to bitsandbytes' values.
    theirs = QuantizedWeight(
        jnp.asarray(packed.numpy()),
        jnp.asarray(state.absmax.numpy()),
        jnp.asarray(state.state2.absmax.numpy()),
        jnp.asarray(offset),
        shape,
        np.dtype(np.float32),
        quant_type,
        64,
    )
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    reference = _reference_dequantize(packed, absmax, quant_type, 64, shape, torch.float32)
    np.testing.assert_array_equal(_bits(dequantize(theirs)), _bits(reference))
    if _public_kernel_is_right(shape, 64):
        public = bnbf.dequantize_4bit(packed, state).numpy()
        np.testing.assert_array_equal(np.asarray(dequantize(theirs)), public)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("shape", [(7,), (40, 70), (3, 4, 500)], ids=str)
def test_int8_blockwise_bit_equal(shape, blocksize, dtype_name):
    rng = np.random.default_rng(blocksize)
    flat = rng.standard_normal(int(np.prod(shape))) * 3
    flat[: min(blocksize, flat.size // 2)] = 0.0  # an all-zero block gets code 0 there too
    w = torch.from_numpy(flat.reshape(shape).astype(np.float32)).to(DTYPES[dtype_name][0])
    codes, state = bnbf.quantize_blockwise(w, blocksize=blocksize)
    q = quantize(_to_jax(w, dtype_name), quant_type="int8", blocksize=blocksize)
    np.testing.assert_array_equal(np.asarray(q.packed), codes.numpy())
    np.testing.assert_array_equal(_bits(q.absmax), _bits(state.absmax))
    np.testing.assert_array_equal(
        _bits(dequantize(q)), _bits(bnbf.dequantize_blockwise(codes, state))
    )


@pytest.mark.parametrize("quant_type", FOUR_BIT)
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_forward_equals_dequantized_matmul(quant_type, double_quant):
    # bnb.nn.Linear4bit quantizes its weight with quantize_4bit and, in float32 compute, is
    # x @ dequantize_4bit(W).T + b: the same packed bytes here, and the same output up to the
    # summation order of a float32 matmul (relative 1e-6 of the output scale).
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 48)
    layer = bnb.nn.Linear4bit(
        128,
        48,
        compute_dtype=torch.float32,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    x = torch.randn(5, 128)
    with torch.no_grad():
        expected = layer(x).numpy()
    weight = jnp.asarray(dense.weight.detach().numpy())
    q = quantize(weight, quant_type=quant_type, double_quant=double_quant)
    np.testing.assert_array_equal(np.asarray(q.packed), layer.weight.data.numpy())
    bias = jnp.asarray(dense.bias.detach().numpy())
    got = np.asarray(jnp.asarray(x.numpy()) @ dequantize(q).T + bias)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
