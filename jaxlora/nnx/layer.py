"""``LoRALinear``: a Flax NNX ``nnx.Linear`` with a trainable low-rank update.

The adapter weights are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``), so train only them
with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and differentiate with
``nnx.DiffState(0, nnx.LoRAParam)``: a plain ``wrt=nnx.Param`` would train the base too.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PrecisionLike

from _loracore.config import INITS
from jaxlora import core, oplevel
from jaxlora.nnx.quant import QuantizedKernel, kernel_value, requantized_kernel

# Where NNX keeps a variable's partitioning (the name changed across Flax releases).
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


def lora_params(
    weight: nnx.Variable,
    lora_a: jax.Array,
    lora_b: jax.Array,
    axis_names: Callable[[tuple], tuple[tuple, tuple]],
) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    """``lora_a`` and ``lora_b`` as ``nnx.LoRAParam``, partitioned as ``axis_names`` derives
    from ``weight``'s axis names when ``weight`` has any (the mesh too), so the adapter is
    sharded along the weight's axes; unpartitioned otherwise."""
    metadata = weight.get_metadata()
    key = next((k for k in _SHARDING_KEYS if metadata.get(k) is not None), None)
    if key is None:
        return nnx.LoRAParam(lora_a), nnx.LoRAParam(lora_b)
    names_a, names_b = axis_names(tuple(metadata[key]))
    extra = {k: metadata[k] for k in ("mesh", "eager_sharding") if k in metadata}
    return (
        nnx.LoRAParam(lora_a, **{key: names_a, **extra}),
        nnx.LoRAParam(lora_b, **{key: names_b, **extra}),
    )


def _placeholder(key: jax.Array, shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
    # Stands in for a weight that is about to be replaced by an existing one (no allocation).
    return jnp.zeros((0,), dtype)


def check_rngs(rngs: object, where: str) -> None:
    """A ``TypeError`` naming ``rngs`` unless it is an ``nnx.Rngs`` (NNX's error is a raw one)."""
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"{where}: rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}"
        )


def check_init(init: object, known: tuple[str, ...], where: str) -> None:
    """A ``ValueError`` naming the allowed values unless ``init`` is one of ``known``."""
    if not isinstance(init, str) or init not in known:
        raise ValueError(f"{where}: init must be one of {known}, got {init!r}")


def check_dora(use_dora: object, where: str) -> bool:
    """``use_dora`` if it is exactly ``True`` or ``False``; a ``TypeError`` naming it otherwise."""
    if not isinstance(use_dora, bool):
        raise TypeError(
            f"{where}: use_dora must be True or False, got {use_dora!r} ({type(use_dora).__name__})"
        )
    return use_dora


def merged_weight(
    weight: jax.Array,
    delta: jax.Array,
    magnitude: jax.Array | None = None,
    name: str | None = None,
):
    """``weight + delta`` (the fp32 delta in the weight's shape: ``jaxlora.kinds.delta``,
    ``oplevel.delta``) in fp32, rounded once to the weight's dtype; with DoRA's
    ``magnitude`` m (out,) each output column rescaled by ``m / ‖weight + delta‖`` (PEFT's
    merged weight). A ``ValueError`` (naming the weight ``name``) if the result is not
    finite."""
    full = weight.astype(jnp.float32) + delta
    if magnitude is not None:
        full = magnitude.astype(full.dtype) / core.dora_norm(weight, delta) * full
    merged = full.astype(weight.dtype)
    finite = jnp.isfinite(merged).all()
    # Under nnx.vmap (a stacked layer) the caller checks the whole stack before
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        which = "" if name is None else f" '{name}'"
        raise ValueError(f"the merged weight{which} has non-finite values")
    return merged


class LoRALinear(nnx.Module):
    """``nnx.Linear`` plus ``scaling · dropout(x) @ a @ b``, mirroring ``torchlora.Linear``.

    ``kernel`` (in, out) and ``bias`` (out,) are ``nnx.Param`` with ``nnx.Linear``'s default
    initialisers; ``lora_a`` (in, r), initialised like torch's kaiming_uniform(a=√5), and
    ``lora_b`` (r, out), zeros, are ``nnx.LoRAParam``. Dropout (on the LoRA branch's input only)
    follows NNX's convention: active until ``model.eval()``, or per call via ``deterministic``.

    With ``use_dora=True`` (PEFT's DoRA) the layer also has ``lora_magnitude`` m (out,), an
    ``nnx.LoRAParam`` initialised to the column norms of ``kernel + scaling · a @ b``, and
    computes with ``m / ‖kernel + scaling · a @ b‖`` times that kernel (the norm constant in
    backward; with dropout active, PEFT's correction on the dropped-out input).

    Examples:
        >>> from flax import nnx
        >>> layer = LoRALinear(16, 8, r=4, alpha=8, rngs=nnx.Rngs(0))
        >>> layer(jnp.ones((2, 16))).shape
        (2, 8)
        >>> sorted(nnx.state(layer, nnx.LoRAParam).keys())
        ['lora_a', 'lora_b']
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int,
        alpha: float | None = None,
        use_bias: bool = True,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = nnx.nn.linear.default_kernel_init,
        bias_init: Initializer = core.default_bias_init,
        lora_a_init: Initializer = core.default_lora_a_init,
        lora_b_init: Initializer = core.default_lora_b_init,
        rngs: nnx.Rngs,
    ) -> None:
        where = f"jaxlora.nnx.LoRALinear({in_features}, {out_features})"
        check_rngs(rngs, where)
        core.check_hparams(
            r=r,
            alpha=alpha,
            dropout=dropout,
            in_features=in_features,
            out_features=out_features,
            where=where,
        )
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        # How the adapter relates to the kernel: "pissa"/"olora" (set by from_linear) mean the
        # kernel is a residual, which decides what an adapter file may be loaded into it.
        self.init = "kaiming"
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        # jaxlora.nnx.quantize may replace it by a QuantizedKernel.
        self.kernel: nnx.Param[jax.Array] | QuantizedKernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        )
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        )
        self.lora_a = nnx.LoRAParam(lora_a_init(rngs.params(), (in_features, r), param_dtype))
        self.lora_b = nnx.LoRAParam(lora_b_init(rngs.params(), (r, out_features), param_dtype))
        self.lora_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.use_dora = check_dora(use_dora, where)
        if use_dora:
            self.lora_magnitude = nnx.LoRAParam(jnp.zeros((out_features,), param_dtype))
            if kernel_init is not _placeholder:
                self.reset_magnitude()

    def reset_magnitude(self) -> None:
        """Sets DoRA's ``lora_magnitude`` to ‖kernel + scaling · a @ b‖ per output feature
        (PEFT's init, from the current kernel and adapter)."""
        norm = core.dora_norm(kernel_value(self.kernel), self.delta())
        self.lora_magnitude[...] = norm.astype(self.lora_magnitude.dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nnx.Linear,
        *,
        r: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> LoRALinear:
        """Wraps a pretrained ``nnx.Linear``, sharing its ``kernel``/``bias`` variables.

        The adapter is created in ``param_dtype`` (fp32 by default, also for a bf16 base), per
        ``init`` ("kaiming", "gaussian", "pissa" or "olora"; the last two write the residual
        into the shared kernel, as PEFT does).
        """
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"from_linear expects an nnx.Linear, got {type(linear).__name__}")
        check_init(init, INITS, "LoRALinear.from_linear")
        check_rngs(rngs, "LoRALinear.from_linear")
        layer = cls(
            linear.in_features,
            linear.out_features,
            r=r,
            alpha=alpha,
            use_bias=linear.bias is not None,
            dropout=dropout,
            use_rslora=use_rslora,
            use_dora=use_dora,
            dtype=linear.dtype,
            param_dtype=param_dtype,
            precision=linear.precision,
            kernel_init=_placeholder,
            bias_init=_placeholder,
            rngs=rngs,
        )
        layer.kernel, layer.bias = linear.kernel, linear.bias
        # The adapter follows the kernel: A (in, ·), B (·, out).
        layer.lora_a, layer.lora_b = lora_params(
            linear.kernel,
            layer.lora_a[...],
            layer.lora_b[...],
            lambda n: ((n[0], None), (None, n[1])),
        )
        layer.init = init
        if init != "kaiming":
            from jaxlora.inject import init_leaves

            leaves = init_leaves(
                layer.kernel[...], r, layer.scaling, init, rngs.params(), param_dtype
            )
            for name, value in leaves.items():
                getattr(layer, name)[...] = value
        if use_dora:
            if isinstance(layer.kernel, QuantizedKernel):
                raise ValueError(
                    "LoRALinear.from_linear: use_dora=True with a quantized kernel is not "
                    "implemented"
                )
            layer.reset_magnitude()
        return layer

    @property
    def scaling(self) -> float:
        return core.scaling(self.r, self.alpha, use_rslora=self.use_rslora)

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.kernel, QuantizedKernel)

    @property
    def lora_roles(self) -> oplevel.Roles:
        """The kernel's roles in the layer's product ``x @ kernel`` (``'bi,io->bo'``), which
        lay out its adapter, delta and torch layout as any product's (``Roles.linear``)."""
        return oplevel.Roles.linear((self.in_features, self.out_features), 1)

    def delta(self, lora_a: jax.Array | None = None, lora_b: jax.Array | None = None):
        """``scaling · lora_a @ lora_b`` (in, out) in fp32 (the product rule's
        ``oplevel.delta``); of the given factors (one layer's of a stack) if any."""
        a = self.lora_a[...] if lora_a is None else lora_a
        b = self.lora_b[...] if lora_b is None else lora_b
        return oplevel.delta(self.lora_roles, a, b, self.scaling)

    def to_base(self) -> nnx.Linear:
        """An ``nnx.Linear`` holding the merged kernel (fp32 delta, rounded once; the kernel
        variable's metadata kept) and sharing the bias; a ``ValueError`` if non-finite."""
        kernel = kernel_value(self.kernel)  # a quantized kernel merges into a float one
        magnitude = self.lora_magnitude[...] if self.use_dora else None
        merged = merged_weight(kernel, self.delta(), magnitude)
        linear = nnx.Linear(
            self.in_features,
            self.out_features,
            use_bias=self.bias is not None,
            dtype=self.dtype,
            param_dtype=kernel.dtype,
            precision=self.precision,
            kernel_init=_placeholder,
            bias_init=_placeholder,
            rngs=nnx.Rngs(0),
        )
        if isinstance(self.kernel, QuantizedKernel):
            linear.kernel = nnx.Param(merged)
        else:
            # flax types Variable.replace as returning Variable; it keeps the type (a Param).
            linear.kernel = self.kernel.replace(merged)  # type: ignore[assignment]
        linear.bias = self.bias
        return linear

    def requantized(self) -> QuantizedKernel:
        """The merged kernel ``to_base`` computes (from the dequantized kernel, fp32 delta,
        rounded once) quantized again in this layer's quantized kernel's format; for
        ``jaxlora.nnx.merge(model, requantize=True)``. A ``ValueError`` if non-finite."""
        if not isinstance(self.kernel, QuantizedKernel):
            raise ValueError("requantized: the kernel is not quantized")
        kernel, a, b = kernel_value(self.kernel), self.lora_a[...], self.lora_b[...]
        if self.kernel.layer_axis is None:
            merged = merged_weight(kernel, self.delta(a, b))
        else:  # an nnx.vmap stack: each layer merged as its unstacked twin is
            layers = range(kernel.shape[0])
            merged = jnp.stack([merged_weight(kernel[i], self.delta(a[i], b[i])) for i in layers])
        return requantized_kernel(self.kernel, merged)

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        where = f"jaxlora.nnx.LoRALinear({self.in_features}, {self.out_features}, r={self.r})"
        core.check_input(x, self.in_features, where)
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias, lora_a, lora_b = nnx.nn.dtypes.promote_dtype(
            (x, kernel_value(self.kernel), bias, self.lora_a[...], self.lora_b[...]),
            dtype=self.dtype,
        )
        y = jnp.matmul(x, kernel, precision=self.precision)
        if bias is not None:
            y = y + bias
        h = self.lora_dropout(x, deterministic=deterministic)
        if self.use_dora:
            off = self.lora_dropout.deterministic if deterministic is None else deterministic
            active = self.lora_dropout.rate > 0 and not off
            adapter = (lora_a, lora_b, self.lora_magnitude[...])
            return y + core.dora_branch(
                h, kernel, bias, adapter, self.scaling, y, active, self.precision
            )
        return y + oplevel.linear_branch(h, lora_a, lora_b, self.scaling, (-1,), self.precision)
