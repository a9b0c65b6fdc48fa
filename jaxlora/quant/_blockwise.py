"""Blockwise 4-bit (NF4/FP4) and 8-bit (dynamic map) kernels, bit-equal to bitsandbytes 0.50.2.

All functions take the weight flattened in C order, as bitsandbytes does: blocks of
``blocksize`` consecutive elements of the flat weight, the last one possibly shorter. The
arithmetic is float32 and in the same order as bitsandbytes' CPU kernels, so that the codes
and scales are the same bits (see ``parity_tests/test_qlora_bnb.py``).

XLA flushes float32 subnormals to zero (on CPU as on GPU/TPU), bitsandbytes does not. Two
kinds of block are therefore quantized differently from bitsandbytes (never silently wrong):
a block whose absmax is subnormal (below 2**-126) is stored as zeros, where bitsandbytes keeps
values of at most that absmax; and a block whose absmax exceeds 2**126 (about 8.5e37, whose
reciprocal is subnormal) is divided by its absmax instead of multiplied by the flushed
reciprocal, which gives the nearest codes where bitsandbytes' subnormal reciprocal may not.
"""

import jax
import jax.numpy as jnp

from jaxlora.quant import _tables

# Above this absmax the float32 reciprocal is subnormal, which XLA would flush to zero.
_MAX_RECIPROCAL_SAFE = 2.0**126


def _divide(blocks: jnp.ndarray, divisor: jnp.ndarray) -> jnp.ndarray:
    """``blocks / divisor[:, None]`` correctly rounded.

    XLA rewrites a division by a broadcast into a multiplication by the reciprocal, which
    differs in the last bit (and flushes a subnormal reciprocal to zero); hiding the
    broadcast behind a barrier keeps the true division bitsandbytes (torch) performs.
    """
    full = jax.lax.optimization_barrier(jnp.broadcast_to(divisor[:, None], blocks.shape))
    return blocks / full


def _blocks(flat: jnp.ndarray, blocksize: int) -> jnp.ndarray:
    """(num_blocks, blocksize) float32 view of ``flat``, the last block padded with zeros."""
    n = flat.shape[0]
    num_blocks = -(-n // blocksize)
    padded = jnp.pad(flat.astype(jnp.float32), (0, num_blocks * blocksize - n))
    return padded.reshape(num_blocks, blocksize)


def _absmax(blocks: jnp.ndarray) -> jnp.ndarray:
    # Zero padding cannot raise an absolute maximum.
    return jnp.max(jnp.abs(blocks), axis=1)


def _scale_4bit(blocks: jnp.ndarray, absmax: jnp.ndarray, n: int) -> jnp.ndarray:
    """``blocks / absmax`` clipped to [-1, 1], rounded as bitsandbytes' default kernel.

    bitsandbytes multiplies full blocks by the reciprocal of their absmax but divides the
    last, partial block by it; the two differ in the last bit, so both are copied. Its
    ``clamp(min=1e-38)`` guard for all-zero blocks is a subnormal that XLA flushes to zero,
    so a zero absmax selects 0 instead (bitsandbytes gets 0 * 1e38 = 0 there too).
    """
    blocksize = blocks.shape[1]
    safe = jnp.where(absmax > 0, absmax, 1.0)
    divide = jnp.broadcast_to((absmax > _MAX_RECIPROCAL_SAFE)[:, None], blocks.shape)
    if n % blocksize:
        divide = divide.at[-1].set(True)
    scaled = jnp.where(divide, _divide(blocks, safe), blocks * (1.0 / safe)[:, None])
    scaled = jnp.where((absmax > 0)[:, None], scaled, 0.0)
    return jnp.clip(scaled, -1.0, 1.0)


# float32(1e-38), a subnormal: bitsandbytes stores max(absmax, 1e-38) for the last, partial
# block only (``am.clamp(min=1e-38)``), full blocks keep their absmax, zero included.
_ABSMAX_FLOOR_BITS = 0x006CE3EE


def _at_least_1e_38(absmax: jnp.ndarray) -> jnp.ndarray:
    # Compared and selected as bits: XLA would flush the subnormal in float arithmetic.
    bits = jax.lax.bitcast_convert_type(absmax, jnp.uint32)
    floor = jax.lax.bitcast_convert_type(jnp.uint32(_ABSMAX_FLOOR_BITS), jnp.float32)
    return jnp.where(bits < _ABSMAX_FLOOR_BITS, floor, absmax)


def quantize_4bit(flat: jnp.ndarray, blocksize: int, quant_type: str):
    """Packed codes ((n + 1) // 2, 1) uint8 and absmax (num_blocks,) float32.

    Each value goes to the code nearest to it; a value exactly between two codes goes to the
    smaller one (``torch.bucketize`` with ``right=False``: the count of midpoints below it).
    Two codes per byte, the first element in the high nibble.
    """
    n = flat.shape[0]
    blocks = _blocks(flat, blocksize)
    absmax = _absmax(blocks)
    scaled = _scale_4bit(blocks, absmax, n).reshape(-1)[: n + n % 2]
    if n % blocksize:
        absmax = absmax.at[-1].set(_at_least_1e_38(absmax[-1]))
    midpoints, order = _tables.sorted_4bit(quant_type)
    rank = jnp.sum(scaled[:, None] > jnp.asarray(midpoints), axis=1)
    codes = jnp.asarray(order)[rank]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.reshape(-1, 1), absmax


def dequantize_4bit(packed, absmax, n: int, blocksize: int, quant_type: str) -> jnp.ndarray:
    """Flat float32 values ``code[nibble] * absmax[block]``, the product bitsandbytes takes."""
    packed = packed.reshape(-1)
    codes = jnp.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)[:n]
    values = jnp.asarray(_tables.CODES[quant_type])[codes]
    return (_blocks(values, blocksize) * absmax[:, None]).reshape(-1)[:n]


def quantize_8bit(flat: jnp.ndarray, blocksize: int):
    """Codes (n,) uint8 into the dynamic map and absmax (num_blocks,) float32.

    bitsandbytes' CPU kernel rounds the scaled value to a 65536-point grid on [-1, 1] and
    looks the code up in a table built from that grid; copied step by step, in float32.
    A block whose absmax is 0 gets code 0 everywhere, as there.
    """
    n = flat.shape[0]
    blocks = _blocks(flat, blocksize)
    absmax = _absmax(blocks)
    positive = absmax > 0
    safe = jnp.where(positive, absmax, 1.0)
    huge = (absmax > _MAX_RECIPROCAL_SAFE)[:, None]
    scaled = jnp.where(huge, _divide(blocks, safe), blocks * (1.0 / safe)[:, None])
    scaled = jnp.clip(scaled, -1.0, 1.0)
    grid = ((scaled + 1.0) * 0.5 * float(_tables.LUT_SIZE - 1) + 0.5).astype(jnp.int32)
    codes = jnp.asarray(_tables.dynamic_lut())[grid]
    codes = jnp.where(positive[:, None], codes, jnp.uint8(0))
    return codes.reshape(-1)[:n], absmax


def dequantize_8bit(codes, absmax, blocksize: int) -> jnp.ndarray:
    """Flat float32 values ``dynamic_map[code] * absmax[block]``."""
    n = codes.shape[0]
    values = jnp.asarray(_tables.DYNAMIC_CODE)[codes]
    return (_blocks(values, blocksize) * absmax[:, None]).reshape(-1)[:n]


def pairwise_mean(x: jnp.ndarray) -> jnp.ndarray:
    """Float32 mean by a fixed pairwise tree, so every backend gives the same bits.

    bitsandbytes takes ``torch.mean``, whose summation order depends on the CPU's vector
    width and thread count; no fixed order reproduces it everywhere. This one is as accurate
    (error O(log n) ulps) and the same on CPU, GPU and TPU.
    """
    n = x.shape[0]
    size = 1 << max(n - 1, 0).bit_length()
    total = jnp.pad(x.astype(jnp.float32), (0, size - n))
    while total.shape[0] > 1:
        total = total[0::2] + total[1::2]
    return total[0] / jnp.float32(n)
