"""The LoRA formula, defined once for jaxlora: scaling, checks, the branch and the delta.

Mirrors ``torchlora/core.py``; the two files hold the same rules so the frameworks agree.
Flax layout: ``kernel`` (in, out), ``lora_a`` (in, r), ``lora_b`` (r, out).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from _loracore.hparams import check_hparams, scaling

__all__ = [
    "check_hparams",
    "check_input",
    "check_key",
    "check_shape",
    "default_bias_init",
    "default_lora_a_init",
    "default_lora_b_init",
    "delta",
    "dora_branch",
    "dora_combine",
    "dora_factor",
    "dora_norm",
    "factored",
    "olora",
    "pissa",
    "scale_once",
    "scaled_matmul",
    "scaling",
    "weight_init",
]

# torch's kaiming_uniform(a=√5) on the (r, in) tensor is U(±1/√in): variance 1/(3·in). On the
# Flax (in, r) layout fan_in is axis -2, so this is the same distribution. (he_uniform is √6
# times wider and must not be the default.)
default_lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
default_lora_b_init = nn.initializers.zeros_init()
default_bias_init = nn.initializers.zeros_init()


def check_input(x: jax.Array, in_features: int, where: str) -> None:
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{where}: expected input with last dimension in_features={in_features}, "
            f"got shape {tuple(x.shape)}"
        )


def check_key(key: Any, where: str) -> None:
    """A ``TypeError`` naming ``where`` unless ``key`` is one PRNG key: a typed key
    (``jax.random.key``) of shape (), or a raw uint32 key (``jax.random.PRNGKey``) of the
    default implementation's shape. JAX's own errors for anything else do not say which
    argument was wrong."""
    expected = "a jax.random.key(seed) or jax.random.PRNGKey(seed)"
    if not isinstance(key, jax.Array | np.ndarray):
        raise TypeError(f"{where} must be {expected}, got {type(key).__name__}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise TypeError(f"{where} must be {expected}: one key, got keys of shape {key.shape}")
        return
    raw_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
    if key.dtype != jnp.uint32 or key.shape != raw_shape:
        raise TypeError(
            f"{where} must be {expected} (a raw key is uint32 of shape {raw_shape}), got "
            f"{key.dtype} of shape {key.shape}"
        )


def check_shape(value: Any, expected: tuple[int, ...], where: str) -> None:
    if tuple(jnp.shape(value)) != tuple(expected):
        got = tuple(jnp.shape(value))
        raise ValueError(f"{where}: expected shape {tuple(expected)}, got {got}")


def factored(
    x: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    scale: float,
    contract: tuple[int, ...],
    batch: tuple[int, ...] = (),
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """The LoRA branch of one product, factored: ``x``'s axes ``contract`` contracted with
    ``lora_a`` (B…, C…, r)'s C axes and its axes ``batch`` paired with B, times ``scale``, then
    with ``lora_b`` (B…, r, F…): the output is (B…, x's other axes…, F…), as ``dot_general``
    lays out a product with the weight as its right operand. ``jaxlora.oplevel.product_branch``
    calls it for every adapted product (a Dense's ``x @ kernel`` as any einsum's), with the
    factors laid out as the product's weight operand; the full delta is never materialised.

    The scale is applied to the small (…, r) intermediate, not to the (…, out) output: the same
    value to rounding, but the backward pass then never makes an extra pass over an (n, out)
    array (measured: a 4x1024 MLP LoRA step got ~10% faster on CPU). It is applied in fp32 and
    rounded once, so a half-precision run does not round the scale itself first.

    ``x`` is contracted with ``a`` held rank-first, behind an optimization barrier, so that
    ``a``'s gradient is computed as the wide (r, in) product ``duᵀ @ x`` and only then turned
    into (in, r). Without the barrier XLA folds that transpose into the dot and asks for
    ``xᵀ @ du`` as a tall (in, r) output, which XLA:CPU runs through a slow path: 4.4 ms
    against 0.5 ms for (2048, 1024)ᵀ @ (2048, 8), and a 4x1024 MLP LoRA Adam step went from
    0.72× to 0.68× of the full fine-tune's time (benchmarks/README.md). The values are the
    same products; the barrier only fixes the layout, and grad, jvp and vmap pass through it
    (jax ≥ 0.6 differentiates the barrier).
    """
    nb = len(batch)
    nc = jnp.ndim(lora_a) - 1 - nb
    a_rank_first = jax.lax.optimization_barrier(jnp.moveaxis(lora_a, -1, nb))
    dims = ((tuple(contract), tuple(range(nb + 1, nb + 1 + nc))), (tuple(batch), tuple(range(nb))))
    options: dict[str, Any] = {"precision": precision}
    if preferred_element_type is not None:  # (an op-level product's, e.g. jnp.einsum's)
        options["preferred_element_type"] = preferred_element_type
    h = jax.lax.dot_general(x, a_rank_first, dims, **options)
    # one rounding of the scaled intermediate to the factors' dtype (a no-op unless the
    # product asked for a wider result, preferred_element_type)
    hs = scale_once(h, scale).astype(lora_b.dtype)
    if nb:  # one adapter per batch index (MoE experts, slice views)
        up = (((hs.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
        return jax.lax.dot_general(hs, lora_b, up, **options)
    r = jnp.shape(lora_b)[0]
    y = _up_projection(hs, lora_b.reshape(r, -1), precision, preferred_element_type)
    return y.reshape((*h.shape[:-1], *lora_b.shape[1:]))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _up_projection(
    hs: jax.Array, lora_b: jax.Array, precision: jax.lax.PrecisionLike, preferred: Any = None
) -> jax.Array:
    """``hs @ lora_b``, (…, r) @ (r, out), with ``lora_b``'s tangent term written as a product
    of ``hs`` held rank-first, (r, n), behind an optimization barrier, so that reverse mode
    computes ``lora_b``'s gradient as the row-major (r, n) @ (n, out) dot.

    Left to autodiff, that gradient is ``dot_general(dY, hs)`` plus a transpose, which XLA folds
    into the dot (``hsᵀ dY``); XLA:CPU's layout assignment may then give the dot a column-major
    copy of ``dY`` (it does for the twin GPT's query and value, whose ``dY`` comes out of the
    attention's head transposes) and run it with both operands transposed on a slow path:
    0.63 ms against 0.07 ms for (2048, 8)ᵀ @ (2048, 96), about 5% of that LoRA step's CPU time
    (benchmarks/README.md). Same values; forward mode works (a ``custom_jvp``).
    """
    return jnp.matmul(hs, lora_b, **_dot_options(precision, preferred))


def _dot_options(precision: jax.lax.PrecisionLike, preferred: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"precision": precision}
    if preferred is not None:
        options["preferred_element_type"] = preferred
    return options


def _up_projection_jvp(precision, preferred, primals, tangents):
    (hs, lora_b), (dhs, db) = primals, tangents
    options = _dot_options(precision, preferred)
    terms = []
    if not isinstance(dhs, jax.custom_derivatives.SymbolicZero):
        terms.append(jnp.matmul(dhs, lora_b, **options))
    if not isinstance(db, jax.custom_derivatives.SymbolicZero):
        rank_first = jax.lax.optimization_barrier(hs.reshape(-1, hs.shape[-1]).T)
        term = jax.lax.dot_general(rank_first, db, (((0,), (0,)), ((), ())), **options)
        terms.append(term.reshape((*hs.shape[:-1], db.shape[-1])))
    # JAX calls the rule only with at least one tangent that is not a symbolic zero
    return _up_projection(hs, lora_b, precision, preferred), functools.reduce(jnp.add, terms)


_up_projection.defjvp(_up_projection_jvp, symbolic_zeros=True)


def scaled_matmul(
    h: jax.Array, lora_b: jax.Array, scale: float, precision: jax.lax.PrecisionLike = None
) -> jax.Array:
    """A branch's second half: the (…, r) intermediate times ``scale`` (in fp32, rounded once)
    times the 2-D ``lora_b`` (r, out)."""
    return jnp.matmul(scale_once(h, scale), lora_b, precision=precision)


def scale_once(h: jax.Array, scale: float) -> jax.Array:
    """``h · scale`` computed in fp32 (or wider) and rounded once to ``h``'s dtype."""
    wide = jnp.promote_types(h.dtype, jnp.float32)
    return (h.astype(wide) * jnp.asarray(scale, wide)).astype(h.dtype)


def delta(
    lora_a: jax.Array,
    lora_b: jax.Array,
    scale: float,
    shape: tuple[int, ...] | None = None,
    stack: int = 0,
) -> jax.Array:
    """``scale · a @ b`` in float32 (or wider) at full matmul precision.

    With 2-D factors the result is (in, out). Multi-axis factors (``jaxlora.kinds``: ``a``
    (*in_axes, r), ``b`` (r, *out_axes)) are contracted over the rank and the result reshaped
    to ``shape``, the base weight's. With ``stack`` leading layer axes (a stacked layer: ``a``
    (L, …, r), ``b`` (L, r, …)) each layer's delta is its own slices' product.
    """
    r = jnp.shape(lora_a)[-1]
    lead = tuple(jnp.shape(lora_a)[:stack])
    dtype = jnp.promote_types(lora_a.dtype, jnp.float32)
    prod = jnp.matmul(  # batched over the layer axes
        lora_a.reshape(*lead, -1, r).astype(dtype),
        lora_b.reshape(*lead, r, -1).astype(dtype),
        precision=jax.lax.Precision.HIGHEST,
    )
    prod = prod * jnp.asarray(scale, dtype)
    return prod if shape is None else prod.reshape(shape)


def dora_norm(weight: jax.Array, delta: jax.Array) -> jax.Array:
    """DoRA's ``‖W + scaling·B A‖`` per output feature: the norms (out,) over every axis but
    the last of ``weight + delta`` (a Dense or Conv kernel, an Embed table: Flax keeps the
    output features last; ``delta`` may be the flat (…, out) product), in ``delta``'s dtype
    (fp32 or wider), with no gradient: PEFT, following the paper (§4.3), treats the norm as a
    constant in the backward pass. The same as ``torchlora.core.dora_norm`` in torch layout."""
    out = jnp.shape(weight)[-1]
    full = weight.reshape(-1, out).astype(delta.dtype) + delta.reshape(-1, out)
    return jax.lax.stop_gradient(jnp.sqrt(jnp.sum(full * full, axis=0)))


def dora_factor(
    weight: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, scale: float, dtype
) -> jax.Array:
    """``m / ‖W + scale·a b‖`` (out,) in ``dtype``: what DoRA rescales each output feature by."""
    return (magnitude / dora_norm(weight, delta(a, b, scale))).astype(dtype)


def dora_combine(plain: jax.Array, lora: jax.Array, factor: jax.Array) -> jax.Array:
    """What DoRA adds to a layer's output, as PEFT computes it: ``(f − 1)·plain + f·lora``
    with ``f`` the factor per output feature (last axis), ``lora`` the LoRA branch and
    ``plain`` the bias-free base output (of the dropped-out input while dropout is active:
    PEFT's ``DoraLinearLayer.forward``). Without dropout the layer's output is then that of
    the merged weight ``f ⊙ (W + scale·a b)`` plus its bias."""
    return (factor - 1) * plain + factor * lora


def dora_branch(
    h: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    adapter: tuple[jax.Array, jax.Array, jax.Array],
    scale: float,
    y: jax.Array,
    dropout_active: bool,
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """``dora_combine`` for a dense layer ``y = x @ kernel + bias`` with ``adapter = (a, b,
    m)`` and branch input ``h`` (``x`` dropped out when ``dropout_active``; ``h``, ``kernel``,
    ``a``, ``b`` in the compute dtype)."""
    a, b, magnitude = adapter
    lora = factored(h, a, b, scale, (jnp.ndim(h) - 1,), precision=precision)
    if dropout_active:
        plain = jnp.matmul(h, kernel, precision=precision)
    else:
        plain = y if bias is None else y - bias.astype(y.dtype)
    return dora_combine(plain, lora, dora_factor(kernel, a, b, magnitude, scale, y.dtype))


def pissa(kernel: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA in Flax layout: ``a`` (in, r), ``b`` (r, out) from the top-r SVD of the kernel, and
    the residual ``kernel − scale·a @ b``, so the layer's output is unchanged.

    The same math as ``torchlora.core.pissa`` on ``W = kernelᵀ``, with the same canonical signs
    (the largest-magnitude entry of each left singular vector of W positive), in fp32.
    """
    w = kernel.T.astype(jnp.promote_types(kernel.dtype, jnp.float32))
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :r], s[:r] / scale, vh[:r]
    sign = jnp.sign(jnp.take_along_axis(u, jnp.abs(u).argmax(0)[None], axis=0))
    u, vh = u * sign, vh * sign.T
    root = jnp.sqrt(s)
    lora_a, lora_b = (root[:, None] * vh).T, (u * root[None, :]).T
    residual = w.T - scale * jnp.matmul(lora_a, lora_b, precision=jax.lax.Precision.HIGHEST)
    return lora_a, lora_b, residual


def olora(kernel: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OLoRA in Flax layout: with ``W = kernelᵀ = Q R``, ``a`` (in, r) = (first r rows of R)ᵀ,
    ``b`` (r, out) = (first r columns of Q)ᵀ, and the residual ``kernel − scale·a @ b``.

    The same math as ``torchlora.core.olora``, with the same sign choice (R's leading diagonal
    non-negative), in fp32.
    """
    w = kernel.T.astype(jnp.promote_types(kernel.dtype, jnp.float32))
    q, rr = jnp.linalg.qr(w)
    q, rr = q[:, :r], rr[:r]
    sign = jnp.where(jnp.diagonal(rr) < 0, -1.0, 1.0).astype(w.dtype)
    lora_a, lora_b = (sign[:, None] * rr).T, (q * sign[None, :]).T
    residual = w.T - scale * jnp.matmul(lora_a, lora_b, precision=jax.lax.Precision.HIGHEST)
    return lora_a, lora_b, residual


def weight_init(init: str):
    """The function for an init derived from the weight ("pissa", "olora")."""
    return {"pissa": pissa, "olora": olora}[init]
