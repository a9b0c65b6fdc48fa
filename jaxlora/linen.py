"""Flax Linen LoRA layers: drop-ins for ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` and
``nn.Embed`` (the same params and names, plus ``lora_a``/``lora_b`` in ``jaxlora.kinds``'
layouts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta
from flax.typing import Dtype, Initializer, PrecisionLike

from jaxlora import core, kinds, oplevel
from jaxlora.intercept import branch, dora_output


class LoRADense(nn.Module):
    """``nn.Dense`` plus ``scaling · dropout(x) @ lora_a @ lora_b``, mirroring ``torchlora.Linear``.

    Params: ``kernel`` (in, out) and ``bias`` (out,) with ``nn.Dense``'s names and default
    initialisers, so a pretrained Dense tree loads as is; ``lora_a`` (in, r) initialised like
    torch's kaiming_uniform(a=√5), i.e. U(±1/√in); ``lora_b`` (r, out) zeros, so the layer starts
    equal to its base. Freezing is the optimizer's job: see ``jaxlora.freeze_base``.

    Attributes:
        features: number of output features.
        r: the rank, in ``[1, min(in, out)]`` (checked at the first call).
        alpha: the LoRA alpha; ``None`` means ``r``.
        use_bias: whether to add a bias.
        dropout: dropout rate on the LoRA branch's input only; needs a ``'dropout'`` rng when
            ``deterministic=False``.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: DoRA (PEFT's ``use_dora``): a trainable ``lora_magnitude`` m (out,),
            initialised to the column norms of ``kernel + scaling · lora_a @ lora_b``; the layer
            computes with ``m / ‖kernel + scaling · lora_a @ lora_b‖`` times that kernel (the
            norm constant in backward, as in PEFT).
        dtype: computation dtype (``None``: inferred from inputs and params).
        param_dtype: dtype of the params.
        precision: matmul precision, as for ``nn.Dense``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = LoRADense(8, r=4, alpha=8)
        >>> params = layer.init(jax.random.key(0), jnp.ones((2, 16)))["params"]
        >>> {k: v.shape for k, v in params.items()}
        {'kernel': (16, 8), 'bias': (8,), 'lora_a': (16, 4), 'lora_b': (4, 8)}
    """

    adds_own_lora_branch = True  # so jaxlora.intercept leaves it alone

    features: int
    r: int
    alpha: float | None = None
    _: dataclasses.KW_ONLY
    use_bias: bool = True
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = nn.linear.default_kernel_init
    bias_init: Initializer = core.default_bias_init
    lora_a_init: Initializer = core.default_lora_a_init
    lora_b_init: Initializer = core.default_lora_b_init

    @property
    def scaling(self) -> float:
        return core.scaling(self.r, self.alpha, use_rslora=self.use_rslora)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        where = f"LoRADense at '{'.'.join(self.path) or '<root>'}'"
        in_features: int
        if self.has_variable("params", "kernel"):
            in_features = self.get_variable("params", "kernel").shape[0]
            core.check_input(x, in_features, where)
        else:
            in_features = jnp.shape(x)[-1] if jnp.ndim(x) else 0
        core.check_hparams(
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            in_features=in_features,
            out_features=self.features,
            where=where,
        )
        shapes = {
            "kernel": (in_features, self.features),
            "lora_a": (in_features, self.r),
            "lora_b": (self.r, self.features),
            "lora_magnitude": (self.features,),
        }
        for name, shape in shapes.items():
            if self.has_variable("params", name):
                core.check_shape(self.get_variable("params", name), shape, f"{where}, '{name}'")
        if not self.use_dora and self.has_variable("params", "lora_magnitude"):
            raise ValueError(
                f"{where}: the params hold 'lora_magnitude' (a DoRA adapter) but the layer has "
                "use_dora=False, which would ignore it; build it with use_dora=True"
            )
        kernel = self.param("kernel", self.kernel_init, shapes["kernel"], self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        lora_a = self.param("lora_a", self.lora_a_init, shapes["lora_a"], self.param_dtype)
        lora_b = self.param("lora_b", self.lora_b_init, shapes["lora_b"], self.param_dtype)
        if self.use_dora:  # PEFT's init: the norms of the adapted kernel as initialised
            delta = core.delta(lora_a, lora_b, self.scaling)
            magnitude = self.param(
                "lora_magnitude",
                lambda _: core.dora_norm(kernel, delta).astype(self.param_dtype),
            )
        x, kernel, bias, lora_a, lora_b = nn.dtypes.promote_dtype(
            x, kernel, bias, lora_a, lora_b, dtype=self.dtype
        )
        y = jnp.matmul(x, kernel, precision=self.precision)
        if bias is not None:
            y = y + bias
        h = nn.Dropout(self.dropout, name="lora_dropout")(x, deterministic=deterministic)
        if self.use_dora:
            active = not deterministic and self.dropout > 0
            adapter = (lora_a, lora_b, magnitude)
            return y + core.dora_branch(
                h, kernel, bias, adapter, self.scaling, y, active, self.precision
            )
        return y + oplevel.linear_branch(h, lora_a, lora_b, self.scaling, (-1,), self.precision)


class _Host(Protocol):
    """What ``_Adapter`` uses of the Linen layer it is mixed into (its fields and
    ``nn.Module``'s variable methods), for the type checker."""

    kind: str
    r: int
    alpha: float | None
    use_rslora: bool
    param_dtype: Dtype
    lora_a_init: Initializer
    lora_b_init: Initializer

    @property
    def path(self) -> tuple[str, ...]: ...

    @property
    def scaling(self) -> float: ...

    def has_variable(self, col: str, name: str) -> bool: ...

    def get_variable(self, col: str, name: str) -> Any: ...

    def param(self, name: str, init_fn: Callable[..., Any], *init_args: Any) -> Any: ...


class _Adapter:
    """The fields and adapter creation the multi-axis Linen LoRA layers share."""

    kind = "linear"
    adds_own_lora_branch = True  # so jaxlora.intercept does not add a second branch

    @property
    def scaling(self: _Host) -> float:
        return core.scaling(self.r, self.alpha, use_rslora=self.use_rslora)

    def _adapter(self: _Host, base_shape: tuple[int, ...], in_axes: int, dropout: float):
        where = f"{type(self).__name__} at '{'.'.join(self.path) or '<root>'}'"
        n_in, n_out = kinds.flat_features(self.kind, base_shape, in_axes)
        core.check_hparams(
            r=self.r,
            alpha=self.alpha,
            dropout=dropout,
            in_features=n_in,
            out_features=n_out,
            where=where,
        )
        shape_a, shape_b = kinds.lora_shapes(self.kind, base_shape, self.r, in_axes)
        if not getattr(self, "use_dora", False) and self.has_variable("params", "lora_magnitude"):
            raise ValueError(
                f"{where}: the params hold 'lora_magnitude' (a DoRA adapter) but the layer does "
                "not use DoRA and would ignore it; build it with use_dora=True (LoRADense, "
                "LoRAConv, LoRAEmbed) or use the plain Flax layer with jaxlora.intercept"
            )
        for name, shape in (("lora_a", shape_a), ("lora_b", shape_b)):
            if self.has_variable("params", name):
                core.check_shape(self.get_variable("params", name), shape, f"{where}, '{name}'")
        lora_a = self.param("lora_a", self.lora_a_init, shape_a, self.param_dtype)
        return lora_a, self.param("lora_b", self.lora_b_init, shape_b, self.param_dtype)

    def _magnitude(self: _Host, weight, lora_a, lora_b):
        """DoRA's ``lora_magnitude`` (out,), initialised as PEFT does: ‖W + scaling·a b‖."""
        weight, lora_a, lora_b = (meta.unbox(v) for v in (weight, lora_a, lora_b))
        out = jnp.shape(weight)[-1]
        if self.has_variable("params", "lora_magnitude"):
            where = f"{type(self).__name__} at '{'.'.join(self.path) or '<root>'}'"
            core.check_shape(
                self.get_variable("params", "lora_magnitude"), (out,), f"{where}, 'lora_magnitude'"
            )

        def init(_):
            delta = core.delta(lora_a, lora_b, self.scaling)
            return core.dora_norm(weight, delta).astype(self.param_dtype)

        return self.param("lora_magnitude", init)


class LoRADenseGeneral(_Adapter, nn.DenseGeneral):
    """``nn.DenseGeneral`` plus a LoRA branch over its contracted ``axis``: ``lora_a``
    (*in_axes, r), ``lora_b`` (r, *features), a torch ``Linear`` over the flattened axes.
    ``batch_dims`` is not supported.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = LoRADenseGeneral((2, 4), r=2)
        >>> params = layer.init(jax.random.key(0), jnp.ones((3, 8)))["params"]
        >>> params["lora_a"].shape, params["lora_b"].shape
        ((8, 2), (2, 2, 4))
    """

    r: int = dataclasses.field(default=1, kw_only=True)
    alpha: float | None = dataclasses.field(default=None, kw_only=True)
    dropout: float = dataclasses.field(default=0.0, kw_only=True)
    use_rslora: bool = dataclasses.field(default=False, kw_only=True)
    lora_a_init: Initializer = dataclasses.field(default=core.default_lora_a_init, kw_only=True)
    lora_b_init: Initializer = dataclasses.field(default=core.default_lora_b_init, kw_only=True)

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.batch_dims:
            raise ValueError(f"{type(self).__name__}: batch_dims is not supported")
        y = super().__call__(inputs)
        kernel: jax.Array | meta.AxisMetadata[jax.Array] = self.get_variable("params", "kernel")
        axis = self.axis if isinstance(self.axis, tuple | list) else (self.axis,)
        a, b = self._adapter(jnp.shape(meta.unbox(kernel)), len(axis), self.dropout)
        rate = 0.0 if deterministic else self.dropout
        return y + branch(self, "linear", "__call__", inputs, a, b, self.scaling, rate)


class LoRAConv(_Adapter, nn.Conv):
    """``nn.Conv`` plus a LoRA branch in PEFT's layout: ``lora_a`` (*window, in, r), a conv with
    the base's strides, padding and dilations, then ``lora_b`` (1, …, 1, r, out), a 1×1 conv.
    Grouped (``feature_group_count`` > 1) and masked convs are not supported. ``use_dora``:
    PEFT's DoRA, with a trainable ``lora_magnitude`` (out,) (see ``LoRADense``).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = LoRAConv(8, (3, 3), r=2)
        >>> params = layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))["params"]
        >>> params["lora_a"].shape, params["lora_b"].shape
        ((3, 3, 3, 2), (1, 1, 2, 8))
    """

    kind = "conv"
    r: int = dataclasses.field(default=1, kw_only=True)
    alpha: float | None = dataclasses.field(default=None, kw_only=True)
    dropout: float = dataclasses.field(default=0.0, kw_only=True)
    use_rslora: bool = dataclasses.field(default=False, kw_only=True)
    use_dora: bool = dataclasses.field(default=False, kw_only=True)
    lora_a_init: Initializer = dataclasses.field(default=core.default_lora_a_init, kw_only=True)
    lora_b_init: Initializer = dataclasses.field(default=core.default_lora_b_init, kw_only=True)

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.feature_group_count != 1 or self.mask is not None:
            raise ValueError(f"{type(self).__name__}: grouped or masked convs are not supported")
        y = super().__call__(inputs)
        kernel: jax.Array | meta.AxisMetadata[jax.Array] = self.get_variable("params", "kernel")
        a, b = self._adapter(jnp.shape(meta.unbox(kernel)), 1, self.dropout)
        rate = 0.0 if deterministic else self.dropout
        if self.use_dora:
            adapter = (a, b, self._magnitude(kernel, a, b))
            return y + dora_output(
                self, "conv", inputs, y, meta.unbox(kernel), adapter, self.scaling, rate
            )
        return y + branch(self, "conv", "__call__", inputs, a, b, self.scaling, rate)


class LoRAEmbed(_Adapter, nn.Embed):
    """``nn.Embed`` plus PEFT's embedding adapter: ``lora_a`` (num_embeddings, r) zeros,
    ``lora_b`` (r, features) standard normal, no dropout; ``attend`` uses the adapted table.
    ``use_dora``: PEFT's DoRA, with a trainable ``lora_magnitude`` (features,).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = LoRAEmbed(10, 4, r=2)
        >>> params = layer.init(jax.random.key(0), jnp.arange(3))["params"]
        >>> params["lora_a"].shape, params["lora_b"].shape
        ((10, 2), (2, 4))
    """

    kind = "embed"
    r: int = dataclasses.field(default=1, kw_only=True)
    alpha: float | None = dataclasses.field(default=None, kw_only=True)
    use_rslora: bool = dataclasses.field(default=False, kw_only=True)
    use_dora: bool = dataclasses.field(default=False, kw_only=True)
    lora_a_init: Initializer = dataclasses.field(default=nn.initializers.zeros_init(), kw_only=True)
    lora_b_init: Initializer = dataclasses.field(default=nn.initializers.normal(1.0), kw_only=True)

    def setup(self) -> None:
        super().setup()
        self.lora_a, self.lora_b = self._adapter((self.num_embeddings, self.features), 1, 0.0)
        if self.use_dora:
            self.lora_magnitude = self._magnitude(self.embedding, self.lora_a, self.lora_b)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        a, b = self.lora_a, self.lora_b
        if self.use_dora:
            adapter = (a, b, self.lora_magnitude)
            return y + dora_output(
                self, "embed", inputs, y, self.embedding, adapter, self.scaling, 0.0
            )
        return y + branch(self, "embed", "__call__", inputs, a, b, self.scaling)

    def attend(self, query: jax.Array) -> jax.Array:
        if self.use_dora:  # the merged table's attend: (query ⊙ f) @ (E + s·a b)ᵀ
            (query,) = nn.dtypes.promote_dtype(query, dtype=self.dtype)
            m = self.lora_magnitude
            f = core.dora_factor(
                self.embedding, self.lora_a, self.lora_b, m, self.scaling, query.dtype
            )
            query = query * f
        y = super().attend(query)
        return y + branch(self, "embed", "attend", query, self.lora_a, self.lora_b, self.scaling)
