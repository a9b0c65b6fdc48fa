"""jaxlora.quant against closed forms: code tables, nearest-code rounding, packing, bounds.

Bit-equality with bitsandbytes itself is in parity_tests/test_qlora_bnb.py.
"""

import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from jaxlora.quant import QuantizedWeight, _blockwise, _tables, dequantize, quantize

FOUR_BIT = ("nf4", "fp4")


def _codes(q: QuantizedWeight) -> np.ndarray:
    """The 4-bit codes of ``q`` in element order (high nibble first)."""
    packed = np.asarray(q.packed).reshape(-1)
    return np.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[: int(np.prod(q.shape))]


def _scaled_f64(weight: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Each element divided by its block's absmax, in float64, and the absmax per element."""
    flat = weight.astype(np.float64).reshape(-1)
    block = np.arange(flat.size) // blocksize
    absmax = np.array([np.abs(flat[block == b]).max() for b in range(block.max() + 1)])
    per_element = absmax[block]
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(per_element > 0, flat / per_element, 0.0)
    return scaled, per_element


def test_nf4_table_is_normal_quantiles():
    # QLoRA's construction (create_normal_map): 8 positive and 7 negative quantiles, scaled to 1.
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(_tables.NF4_CODE, values / values.max(), rtol=0, atol=2e-7)


def test_fp4_table_is_e2m1_over_12():
    magnitudes = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    expected = np.concatenate([magnitudes, -magnitudes])
    np.testing.assert_array_equal(_tables.FP4_CODE, expected.astype(np.float32))


def test_dynamic_table_closed_form():
    # create_dynamic_map(signed=True): for exponent i, 2**i means of a linspace(0.1, 1) grid
    # scaled by 10**(i - 6), both signs, plus 0 and 1.
    data = [0.0, 1.0]
    for i in range(7):
        bounds = np.linspace(0.1, 1, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (i - 6)
        data += [*means, *(-means)]
    np.testing.assert_allclose(_tables.DYNAMIC_CODE, np.sort(data), rtol=1e-6, atol=0)


@pytest.mark.parametrize("quant_type", FOUR_BIT)
def test_packing_order_high_nibble_first(quant_type):
    # Weight = the code values themselves with absmax 1: each element's code is its index.
    code = _tables.CODES[quant_type]
    idx = [15, 3, 7, 9, 1] if quant_type == "nf4" else [3, 11, 5, 12, 6]
    q = quantize(jnp.asarray(code[idx]), quant_type=quant_type)
    assert _codes(q).tolist() == idx
    expected = [idx[0] << 4 | idx[1], idx[2] << 4 | idx[3], idx[4] << 4 | _zero_code(quant_type)]
    assert np.asarray(q.packed).reshape(-1).tolist() == expected
    assert q.packed.shape == (3, 1) and q.packed.dtype == jnp.uint8


def _zero_code(quant_type):
    return 7 if quant_type == "nf4" else 0


@pytest.mark.parametrize("quant_type", FOUR_BIT)
def test_exact_midpoints_round_to_the_smaller_code(quant_type):
    midpoints, order = _tables.sorted_4bit(quant_type)
    code = _tables.CODES[quant_type]
    weight = np.concatenate([[1.0], midpoints]).astype(np.float32)  # absmax 1: scaled == value
    got = _codes(quantize(jnp.asarray(weight), quant_type=quant_type, blocksize=32))[1:]
    below = code[order[:-1]]
    np.testing.assert_array_equal(code[got], below)


@pytest.mark.parametrize("quant_type", FOUR_BIT)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (64, 96), (2, 3, 33)], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_nearest_code_and_error_bound(quant_type, shape, blocksize):
    rng = np.random.default_rng(sum(shape) + blocksize)
    weight = (rng.standard_normal(shape) * 3).astype(np.float32)
    q = quantize(jnp.asarray(weight), quant_type=quant_type, blocksize=blocksize)
    num_blocks = -(-weight.size // blocksize)
    assert q.packed.shape == ((weight.size + 1) // 2, 1)
    assert q.absmax.shape == (num_blocks,) and q.absmax.dtype == jnp.float32
    scaled, absmax = _scaled_f64(weight, blocksize)
    first_of_block = absmax[::blocksize].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q.absmax), first_of_block)
    code = _tables.CODES[quant_type].astype(np.float64)
    dist = np.abs(scaled[:, None] - code[None, :])
    chosen = dist[np.arange(scaled.size), _codes(q)]
    # The chosen code is the nearest one, up to float32 rounding of the scaled value.
    assert np.all(chosen <= dist.min(axis=1) + 1e-6)
    dq = np.asarray(dequantize(q))
    assert dq.shape == shape and dq.dtype == np.float32
    np.testing.assert_array_equal(dq.reshape(-1), (code[_codes(q)] * absmax).astype(np.float32))


def test_blockwise_absmax_over_flattened_weight():
    # Blocks run across rows: a (3, 48) weight has blocks [0:64), [64:128), [128:144) flat.
    weight = np.ones((3, 48), np.float32)
    weight.reshape(-1)[[5, 70, 140]] = [2.0, -4.0, 8.0]
    q = quantize(jnp.asarray(weight), blocksize=64)
    assert np.asarray(q.absmax).tolist() == [2.0, 4.0, 8.0]


@settings(max_examples=40, deadline=None)
@given(
    quant_type=st.sampled_from(FOUR_BIT),
    size=st.integers(1, 300),
    blocksize=st.sampled_from([32, 64, 128]),
    log_scale=st.floats(-20, 30),
    zero_block=st.booleans(),
    bf16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_bound(quant_type, size, blocksize, log_scale, zero_block, bf16, seed):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal(size) * 2.0**log_scale).astype(np.float32)
    if zero_block:
        weight[:blocksize] = 0.0
    x = jnp.asarray(weight).astype(jnp.bfloat16 if bf16 else jnp.float32)
    q = jax.jit(lambda w: quantize(w, quant_type=quant_type, blocksize=blocksize))(x)
    dq = np.asarray(dequantize(q, jnp.float32), np.float64)
    _, absmax = _scaled_f64(np.asarray(x.astype(jnp.float32)), blocksize)
    code = np.sort(_tables.CODES[quant_type].astype(np.float64))
    half_gap = np.max(np.diff(code)) / 2
    err = np.abs(dq - np.asarray(x.astype(jnp.float32), np.float64))
    assert np.all(err <= absmax * (half_gap + 1e-6))
    if zero_block:
        assert np.all(dq[:blocksize] == 0.0)


@pytest.mark.parametrize("quant_type", FOUR_BIT)
def test_large_magnitudes_and_bf16_output(quant_type):
    # absmax above 2**126 has a subnormal reciprocal, which XLA flushes: divided instead.
    weight = jnp.asarray([[3e38, -1e38, 1.0, 0.0]], jnp.float32)
    q = quantize(weight, quant_type=quant_type)
    assert np.asarray(q.absmax).tolist() == [np.float32(3e38)]
    dq = np.asarray(dequantize(q))
    assert np.all(np.isfinite(dq)) and dq[0, 0] == np.float32(3e38)
    code = _tables.CODES[quant_type]
    nearest = code[np.argmin(np.abs(code - np.float32(-1e38 / 3e38)))]
    assert dq[0, 1] == np.float32(nearest * np.float32(3e38))
    # bf16 output is the float32 product rounded once to nearest.
    bf = dequantize(q, jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf), dq.astype(jnp.bfloat16))


@pytest.mark.parametrize("quant_type", FOUR_BIT)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_weight_gives_a_non_finite_block(quant_type, bad):
    # Loud, not silent: every value of that block dequantizes non-finite, the others are exact.
    weight = np.random.default_rng(3).standard_normal(128).astype(np.float32)
    clean = np.asarray(dequantize(quantize(jnp.asarray(weight), quant_type=quant_type)))
    weight[3] = bad
    dq = np.asarray(dequantize(quantize(jnp.asarray(weight), quant_type=quant_type)))
    assert not np.any(np.isfinite(dq[:64]))
    np.testing.assert_array_equal(dq[64:], clean[64:])


def test_subnormal_block_quantizes_to_zero():
    # XLA flushes float32 subnormals; such a block is stored as zeros (documented).
    weight = jnp.asarray(np.full(64, 1e-40, np.float32))
    np.testing.assert_array_equal(np.asarray(dequantize(quantize(weight))), 0.0)


def test_int8_nearest_code_and_shape():
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((40, 70)) * 5).astype(np.float32)
    q = quantize(jnp.asarray(weight), quant_type="int8", blocksize=256)
    assert q.quant_type == "int8" and q.packed.shape == weight.shape
    assert q.absmax.shape == (-(-weight.size // 256),)
    scaled, absmax = _scaled_f64(weight, 256)
    code = _tables.DYNAMIC_CODE.astype(np.float64)
    chosen = np.abs(scaled - code[np.asarray(q.packed).reshape(-1)])
    nearest = np.abs(scaled[:, None] - code[None, :]).min(axis=1)
    # bitsandbytes' CPU kernel rounds to a 2/65535 grid before choosing: off by at most that.
    assert np.all(chosen <= nearest + 2.0 / 65535)
    np.testing.assert_allclose(np.asarray(dequantize(q)), weight, atol=float(absmax.max()) * 0.05)


@pytest.mark.parametrize("quant_type", FOUR_BIT)
def test_double_quant_round_trip(quant_type):
    rng = np.random.default_rng(1)
    weight = jnp.asarray(rng.standard_normal((300, 64)).astype(np.float32))
    plain = quantize(weight, quant_type=quant_type)
    q = quantize(weight, quant_type=quant_type, double_quant=True)
    assert q.double_quant and q.absmax.dtype == jnp.uint8 and q.absmax.shape == (300,)
    assert q.nested_absmax.shape == (2,) and q.offset.shape == ()
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(plain.packed))
    mean64 = np.asarray(plain.absmax, np.float64).mean()
    assert abs(float(q.offset) - mean64) <= 4 * np.spacing(np.float32(mean64))
    absmax = _blockwise.dequantize_8bit(q.absmax, q.nested_absmax, 256) + q.offset
    # 8-bit dynamic codes of (absmax - mean): relative error well under 1% of the spread.
    spread = float(np.max(np.abs(np.asarray(plain.absmax) - mean64)))
    np.testing.assert_allclose(np.asarray(absmax), np.asarray(plain.absmax), atol=0.02 * spread)


def test_pairwise_mean_is_order_fixed_and_accurate():
    x = np.random.default_rng(2).uniform(0, 10, 1001).astype(np.float32)
    got = np.float32(_blockwise.pairwise_mean(jnp.asarray(x)))
    assert abs(float(got) - x.astype(np.float64).mean()) <= 2 * np.spacing(got)
    assert _blockwise.pairwise_mean(jnp.asarray([3.0])) == 3.0


def test_pytree_and_jit():
    weight = jnp.arange(-50.0, 50.0).reshape(10, 10)
    q = quantize(weight, double_quant=True)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 4
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.shape == (10, 10) and again.quant_type == "nf4" and again.blocksize == 64
    jitted = jax.jit(lambda w: quantize(w, double_quant=True))(weight)
    for a, b in zip(jax.tree_util.tree_leaves(jitted), leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(q)), np.asarray(dequantize(q)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"quant_type": "nf3"}, ValueError, "quant_type must be one of"),
        ({"blocksize": 48}, ValueError, r"blocksize for nf4 must be one of .* got 48"),
        ({"blocksize": True}, ValueError, "blocksize"),
        ({"quant_type": "int8", "blocksize": 32}, ValueError, "blocksize for int8"),
        ({"double_quant": 1}, TypeError, "double_quant must be a bool"),
        ({"quant_type": "int8", "double_quant": True}, ValueError, "nf4/fp4 only"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_options_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(jnp.ones((4, 4)), **kwargs)


def test_bad_weights_and_dtypes_refused():
    with pytest.raises(TypeError, match="weight dtype must be float32, bfloat16 or float16"):
        quantize(jnp.ones((4, 4), jnp.int32))
    with pytest.raises(ValueError, match="empty weight of shape"):
        quantize(jnp.ones((0, 4)))
    q = quantize(jnp.ones((4, 4)))
    with pytest.raises(TypeError, match="dequantize dtype"):
        dequantize(q, jnp.int8)
    with pytest.raises(TypeError, match="expects a QuantizedWeight"):
        dequantize(jnp.ones(3))


def test_defaults_follow_bitsandbytes():
    shapes = itertools.product(["nf4", "fp4", "int8"], [jnp.float32, jnp.bfloat16])
    for quant_type, dtype in shapes:
        q = quantize(jnp.ones((8, 8), dtype), quant_type=quant_type)
        assert q.blocksize == (4096 if quant_type == "int8" else 64)
        assert dequantize(q).dtype == dtype


def test_imports_without_torch_or_bitsandbytes():
    code = (
        "import sys, importlib.abc\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'bitsandbytes', 'scipy'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, B())\n"
        "import jax.numpy as jnp\n"
        "from jaxlora.quant import dequantize, quantize\n"
        "print(float(dequantize(quantize(jnp.ones(3)))[0]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "1.0", out.stderr
