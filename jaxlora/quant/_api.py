"""``quantize`` / ``dequantize``: a frozen weight stored as bitsandbytes stores it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant import _blockwise

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZE = {"nf4": 64, "fp4": 64, "int8": 4096}
# bitsandbytes quantizes the absmax of double quantization with 8-bit blocks of 256.
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight; a pytree whose leaves are the stored arrays.

    Attributes:
        packed: nf4/fp4: ((size + 1) // 2, 1) uint8, two codes per byte, first element in the
            high nibble (bitsandbytes' ``quantize_4bit`` output); int8: the weight's shape.
        absmax: (num_blocks,) float32 block scales, or their uint8 codes if double-quantized.
        nested_absmax: (ceil(num_blocks / 256),) float32 scales of those codes, or None.
        offset: float32 scalar subtracted from absmax before its quantization, or None.
        shape, dtype, quant_type, blocksize: static metadata (the original weight's shape and
            dtype, the default of ``dequantize``).

    A stack of L layers' weights (``nn.scan``/``nnx.vmap``: see ``jaxlora.quant._layout``) is
    one QuantizedWeight with one layer's metadata whose arrays each have a leading axis L;
    ``dequantize`` refuses it (a scan hands each layer its slice).
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...]
    dtype: np.dtype
    quant_type: str
    blocksize: int

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


jax.tree_util.register_dataclass(
    QuantizedWeight,
    data_fields=["packed", "absmax", "nested_absmax", "offset"],
    meta_fields=["shape", "dtype", "quant_type", "blocksize"],
)


def _check_float_dtype(dtype, what: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in [np.dtype(d) for d in FLOAT_DTYPES]:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def _check_options(quant_type, blocksize, double_quant) -> int:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize is None:
        blocksize = DEFAULT_BLOCKSIZE[quant_type]
    allowed = BLOCKSIZES_8BIT if quant_type == "int8" else BLOCKSIZES_4BIT
    if isinstance(blocksize, bool) or blocksize not in allowed:
        raise ValueError(f"blocksize for {quant_type} must be one of {allowed}, got {blocksize!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    if double_quant and quant_type == "int8":
        raise ValueError("double_quant applies to nf4/fp4 only (bitsandbytes' compress_statistics)")
    return int(blocksize)


def quantize(
    weight: jax.Array,
    *,
    quant_type: str = "nf4",
    blocksize: int | None = None,
    double_quant: bool = False,
) -> QuantizedWeight:
    """Quantizes a weight blockwise over its C-order flattening, as bitsandbytes 0.50.2 does.

    nf4/fp4 equal ``bitsandbytes.functional.quantize_4bit(w, quant_type=..., blocksize=...,
    compress_statistics=double_quant)`` bit for bit (packed bytes, absmax); int8 equals
    ``quantize_blockwise(w, blocksize=...)`` (the signed dynamic map). With ``double_quant``
    the absmax minus its mean is quantized to 8 bits in blocks of 256; the mean is summed in
    a fixed order (see ``pairwise_mean``), and may differ from bitsandbytes' ``torch.mean`` in
    the last bits. Works under ``jax.jit`` (the options are static).

    Args:
        weight: a float32, bfloat16 or float16 array with at least one element.
        quant_type: "nf4", "fp4" or "int8".
        blocksize: elements per scale; None means bitsandbytes' default (64 for nf4/fp4,
            4096 for int8).
        double_quant: also quantize the scales (nf4/fp4 only).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize(jnp.linspace(-1.0, 1.0, 6).reshape(2, 3))
        >>> q.packed.shape, q.absmax.tolist()
        ((3, 1), [1.0])
        >>> dequantize(q)[0].tolist()  # the nearest NF4 codes to -1, -0.6, -0.2
        [-1.0, -0.5250730514526367, -0.18477343022823334]
    """
    blocksize = _check_options(quant_type, blocksize, double_quant)
    dtype = _check_float_dtype(weight.dtype, "weight dtype")
    if weight.size == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {weight.shape}")
    flat = jnp.ravel(weight)
    nested_absmax = offset = None
    if quant_type == "int8":
        packed, absmax = _blockwise.quantize_8bit(flat, blocksize)
        packed = packed.reshape(weight.shape)
    else:
        packed, absmax = _blockwise.quantize_4bit(flat, blocksize, quant_type)
    if double_quant:
        offset = _blockwise.pairwise_mean(absmax)
        absmax, nested_absmax = _blockwise.quantize_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return QuantizedWeight(
        packed, absmax, nested_absmax, offset, tuple(weight.shape), dtype, quant_type, blocksize
    )


def requantize(q: QuantizedWeight, weight: jax.Array) -> QuantizedWeight:
    """``weight`` (of ``q``'s shape) quantized in ``q``'s format: the same quant_type,
    blocksize and double quantization. What a re-quantizing merge stores."""
    if tuple(weight.shape) != q.shape:
        raise ValueError(f"requantize: weight shape {tuple(weight.shape)} != quantized {q.shape}")
    return quantize(
        weight, quant_type=q.quant_type, blocksize=q.blocksize, double_quant=q.double_quant
    )


def dequantize(q: QuantizedWeight, dtype=None) -> jax.Array:
    """The weight ``q`` stands for, as ``dequantize_4bit`` / ``dequantize_blockwise`` give it.

    Values are ``code * absmax`` in float32 (absmax first dequantized and offset when double
    quantized), then cast once to ``dtype`` (default: the quantized weight's dtype), so the
    result equals bitsandbytes' bit for bit in every dtype.
    """
    if not isinstance(q, QuantizedWeight):
        raise TypeError(f"dequantize expects a QuantizedWeight, got {type(q).__name__}")
    dtype = _check_float_dtype(q.dtype if dtype is None else dtype, "dequantize dtype")
    _check_shapes(q)
    absmax = q.absmax
    if q.double_quant:
        if q.offset is None:
            raise ValueError(
                "dequantize: a double-quantized weight (nested_absmax set) needs its offset "
                "(the float32 scalar subtracted from absmax), got None"
            )
        absmax = _blockwise.dequantize_8bit(absmax, q.nested_absmax, NESTED_BLOCKSIZE) + q.offset
    n = int(np.prod(q.shape))
    if q.quant_type == "int8":
        flat = _blockwise.dequantize_8bit(q.packed.reshape(-1), absmax, q.blocksize)
    else:
        flat = _blockwise.dequantize_4bit(q.packed, absmax, n, q.blocksize, q.quant_type)
    return flat.reshape(q.shape).astype(dtype)


def stored_shapes(q: QuantizedWeight) -> dict[str, tuple[int, ...]]:
    """The shapes ``quantize`` gives ``q``'s arrays for one weight of shape ``q.shape``."""
    n = int(np.prod(q.shape))
    num_blocks = -(-n // q.blocksize)
    packed = tuple(q.shape) if q.quant_type == "int8" else ((n + 1) // 2, 1)
    shapes = {"packed": packed, "absmax": (num_blocks,)}
    if q.double_quant:
        shapes.update(nested_absmax=(-(-num_blocks // NESTED_BLOCKSIZE),), offset=())
    return shapes


def stack_length(q: QuantizedWeight, where: str) -> int | None:
    """L when ``q`` is a stack of L quantized weights (each array with a leading layer axis:
    ``nn.scan``/``nnx.vmap`` layers quantized one by one, or a MoE weight's E experts; a
    stack of layers of experts has (L, E) in front and gives L), None for one weight; a
    ``ValueError`` naming ``where`` when its arrays fit none of these."""
    lead = leading_axes(q, where)
    return lead[0] if lead else None


def leading_axes(q: QuantizedWeight, where: str) -> tuple[int, ...]:
    """The axes ``q``'s arrays all have in front of one weight's (``stored_shapes``): () for
    one weight, (L,) for a stack of layers or of experts, (L, E) for a stack of layers of
    experts; a ``ValueError`` naming ``where`` otherwise."""
    shapes = stored_shapes(q)
    got = {name: tuple(np.shape(getattr(q, name))) for name in shapes}
    for depth in (0, 1, 2):
        fronts = {g[:depth] for g in got.values()}
        if len(fronts) == 1:
            front = fronts.pop()
            if len(front) == depth and got == {n: (*front, *s) for n, s in shapes.items()}:
                return front
    raise ValueError(
        f"{where}: the QuantizedWeight's arrays have shapes {got}; a {q.quant_type} weight of "
        f"shape {q.shape} (blocksize {q.blocksize}) has {shapes}, or a stack of L of them "
        "(each with a leading layer axis L; (L, E) for a stack of layers of E experts)"
    )


def _check_shapes(q: QuantizedWeight) -> None:
    """A ``ValueError`` unless ``q`` holds one weight's arrays: a stack of layers' (a leading
    layer axis) would otherwise be read as its first layer's, silently."""
    length = stack_length(q, "dequantize")
    if length is not None:
        raise ValueError(
            f"dequantize: the QuantizedWeight is a stack of {length} quantized weights of "
            f"shape {q.shape} (its arrays have a leading layer axis, as an nn.scan/nnx.vmap "
            "stack stores them); dequantize one layer's slice (inside the scan, or "
            "jax.tree.map(lambda x: x[i], q))"
        )
