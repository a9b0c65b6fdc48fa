"""NNX ``LoRALinearGeneral``, ``LoRAConv`` and ``LoRAEmbed``: NNX's own layers plus an adapter.

Each is a subclass of the NNX layer it adapts (``nnx.LinearGeneral``, ``nnx.Conv``,
``nnx.Embed``): the base weight keeps its name and place, the adapter is ``lora_a``/``lora_b``
(``nnx.LoRAParam``) in ``jaxlora.kinds``' layouts, and the output is the base layer's plus the
factored branch. ``from_base`` wraps a pretrained layer sharing its variables; ``to_base``
returns the plain layer holding the merged weight.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from _loracore.config import INITS
from jaxlora import core, kinds
from jaxlora.inject import _lora_names, init_leaves, lora_init
from jaxlora.nnx.layer import _SHARDING_KEYS, _placeholder, merged_weight


def _zeros(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    # LinearGeneral reshapes what its initialiser returns, so the stand-in needs the shape.
    return jnp.zeros(shape, dtype)


class _Adapter:
    """The adapter half shared by the three layers."""

    kind: str
    base_type: type
    lora_a: nnx.LoRAParam
    lora_b: nnx.LoRAParam

    def _add_adapter(
        self,
        base_shape: tuple[int, ...],
        in_axes: int,
        *,
        r: int,
        alpha: float | None,
        dropout: float,
        use_rslora: bool,
        init: str,
        lora_dtype: Any,
        rngs: nnx.Rngs,
    ) -> None:
        n_in, n_out = kinds.flat_features(self.kind, base_shape, in_axes)
        where = f"jaxlora.nnx.{type(self).__name__}{base_shape}"
        core.check_hparams(
            r=r, alpha=alpha, dropout=dropout, in_features=n_in, out_features=n_out, where=where
        )
        known = INITS if self.kind == "linear" else ("kaiming", "gaussian")
        if init not in known:
            raise ValueError(f"{where}: init {init!r} is not defined for a {self.kind} layer")
        self.r, self.alpha, self.use_rslora, self.init = r, alpha, use_rslora, init
        self.in_axes = in_axes
        leaves = lora_init(self.kind, base_shape, r, init, rngs.params(), lora_dtype, in_axes)
        self.lora_a, self.lora_b = (nnx.LoRAParam(leaves[n]) for n in ("lora_a", "lora_b"))
        self.lora_dropout = nnx.Dropout(dropout, rngs=rngs)

    @property
    def scaling(self) -> float:
        return core.scaling(self.r, self.alpha, use_rslora=self.use_rslora)

    @property
    def base_name(self) -> str:
        return "embedding" if self.kind == "embed" else "kernel"

    @classmethod
    def from_base(
        cls,
        base: nnx.Module,
        *,
        r: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Wraps a pretrained layer, sharing its weight (and bias) variables.

        The adapter is created in ``param_dtype`` per ``init``; PiSSA (linear layers only)
        writes the residual into the shared kernel, as PEFT does. Sharding metadata on the
        weight carries over to the adapter (input axes to ``lora_a``, output axes to
        ``lora_b``).
        """
        if type(base) is not cls.base_type:
            raise TypeError(
                f"{cls.__name__}.from_base expects an {cls.base_type.__name__}, "
                f"got {type(base).__name__}"
            )
        args, kwargs = cls._arguments(base)
        options = dict(r=r, alpha=alpha, use_rslora=use_rslora, init="kaiming")
        if cls.kind != "embed":
            options["dropout"] = dropout
        layer = cls(*args, **kwargs, **options, lora_dtype=param_dtype, rngs=rngs)
        for name in ("kernel", "bias", "embedding"):
            if hasattr(base, name):
                setattr(layer, name, getattr(base, name))
        weight = getattr(base, layer.base_name)
        metadata = weight.get_metadata()
        key = next((k for k in _SHARDING_KEYS if metadata.get(k) is not None), None)
        if key is not None:
            leaves = {"lora_a": layer.lora_a[...], "lora_b": layer.lora_b[...]}
            names_a, names_b = _lora_names(layer.kind, tuple(metadata[key]), leaves)
            extra = {k: metadata[k] for k in ("mesh", "eager_sharding") if k in metadata}
            layer.lora_a = nnx.LoRAParam(leaves["lora_a"], **{key: names_a}, **extra)
            layer.lora_b = nnx.LoRAParam(leaves["lora_b"], **{key: names_b}, **extra)
        layer.init = init
        if init != "kaiming":
            leaves = init_leaves(
                weight[...],
                r,
                layer.scaling,
                init,
                rngs.params(),
                param_dtype,
                kind=layer.kind,
                in_axes=layer.in_axes,
            )
            for name, value in leaves.items():
                getattr(layer, name)[...] = value
        return layer

    def to_base(self) -> nnx.Module:
        """A plain layer of the base type holding the merged weight (fp32 delta, rounded
        once); the bias variable is shared. A non-finite result is a ``ValueError``."""
        weight = getattr(self, self.base_name)
        value = weight[...]
        merged = merged_weight(value, self.lora_a[...], self.lora_b[...], self.scaling)
        args, kwargs = self._arguments(self)
        kwargs = {**kwargs, "param_dtype": value.dtype}
        plain = self.base_type(*args, **kwargs, rngs=nnx.Rngs(0))
        setattr(plain, self.base_name, weight.replace(merged))  # keeps the variable's metadata
        if self.kind != "embed":
            plain.bias = self.bias
        return plain

    def _branch_input(self, x: jax.Array, deterministic: bool | None) -> jax.Array:
        return self.lora_dropout(x, deterministic=deterministic)


class LoRALinearGeneral(_Adapter, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` plus ``scaling · x @ lora_a @ lora_b`` over its ``axis``.

    ``lora_a`` (*in_features, r), ``lora_b`` (r, *out_features): a torch ``Linear`` over the
    flattened axes. ``batch_axis`` is not supported.

    >>> from flax import nnx
    >>> layer = LoRALinearGeneral(8, (2, 4), r=2, rngs=nnx.Rngs(0))
    >>> layer.lora_a.shape, layer.lora_b.shape, layer(jnp.ones((3, 8))).shape
    ((8, 2), (2, 2, 4), (3, 2, 4))
    """

    kind = "linear"
    base_type = nnx.LinearGeneral

    def __init__(
        self,
        in_features,
        out_features,
        *,
        r: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        lora_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("batch_axis"):
            raise ValueError("jaxlora.nnx.LoRALinearGeneral: batch_axis is not supported")
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self._add_adapter(
            (*self.in_features, *self.out_features),
            len(self.in_features),
            r=r,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
            lora_dtype=lora_dtype,
            rngs=rngs,
        )

    @staticmethod
    def _arguments(base: nnx.LinearGeneral) -> tuple[tuple, dict]:
        if base.batch_axis:
            raise ValueError("jaxlora.nnx: an nnx.LinearGeneral with batch_axis cannot be adapted")
        return (base.in_features, base.out_features), dict(
            axis=base.axis,
            use_bias=base.bias is not None,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            precision=base.precision,
            kernel_init=_zeros,
            bias_init=_zeros,
        )

    def __call__(
        self, x: jax.Array, out_sharding=None, *, deterministic: bool | None = None
    ) -> jax.Array:
        y = super().__call__(x, out_sharding=out_sharding)
        h, a, b = nnx.nn.dtypes.promote_dtype(
            (self._branch_input(x, deterministic), self.lora_a[...], self.lora_b[...]),
            dtype=self.dtype,
        )
        return y + core.general_branch(h, a, b, self.scaling, self.axis, self.precision)


class LoRAConv(_Adapter, nnx.Conv):
    """``nnx.Conv`` plus ``scaling · conv1x1(conv(x, lora_a), lora_b)``: PEFT's Conv layout.

    ``lora_a`` (*window, in, r) is convolved with the base's strides, padding and dilations;
    ``lora_b`` (1, …, 1, r, out). Grouped and masked convolutions are not supported.

    >>> from flax import nnx
    >>> layer = LoRAConv(3, 8, (3, 3), r=2, rngs=nnx.Rngs(0))
    >>> layer.lora_a.shape, layer.lora_b.shape, layer(jnp.ones((1, 5, 5, 3))).shape
    ((3, 3, 3, 2), (1, 1, 2, 8), (1, 5, 5, 8))
    """

    kind = "conv"
    base_type = nnx.Conv

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size,
        strides=1,
        *,
        r: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        lora_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("feature_group_count", 1) != 1 or kwargs.get("mask") is not None:
            raise ValueError("jaxlora.nnx.LoRAConv: grouped or masked convs are not supported")
        super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs, **kwargs)
        self._add_adapter(
            self.kernel_shape,
            1,
            r=r,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
            lora_dtype=lora_dtype,
            rngs=rngs,
        )

    @staticmethod
    def _arguments(base: nnx.Conv) -> tuple[tuple, dict]:
        if base.feature_group_count != 1 or base.mask is not None:
            raise ValueError(
                f"jaxlora.nnx: an nnx.Conv with feature_group_count={base.feature_group_count}"
                " or a mask cannot be adapted"
            )
        return (base.in_features, base.out_features, base.kernel_size, base.strides), dict(
            padding=base.padding,
            input_dilation=base.input_dilation,
            kernel_dilation=base.kernel_dilation,
            use_bias=base.bias is not None,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            precision=base.precision,
            kernel_init=_placeholder,
            bias_init=_placeholder,
        )

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        y = super().__call__(x)
        h, a, b = nnx.nn.dtypes.promote_dtype(
            (self._branch_input(x, deterministic), self.lora_a[...], self.lora_b[...]),
            dtype=self.dtype,
        )
        conv = nn.Conv(  # Linen's conv as a pure function: the same padding rules as nnx.Conv
            self.r,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            use_bias=False,
            precision=self.precision,
        )
        h = conv.apply({"params": {"kernel": a}}, h)
        return y + core.scaled_matmul(h, b.reshape(self.r, -1), self.scaling, self.precision)


class LoRAEmbed(_Adapter, nnx.Embed):
    """``nnx.Embed`` plus ``scaling · lora_a[x] @ lora_b`` (PEFT's embedding adapter: A zero,
    B standard normal, no dropout); ``attend`` uses the adapted table too.

    >>> from flax import nnx
    >>> layer = LoRAEmbed(10, 4, r=2, rngs=nnx.Rngs(0))
    >>> layer.lora_a.shape, layer.lora_b.shape, layer(jnp.arange(3)).shape
    ((10, 2), (2, 4), (3, 4))
    """

    kind = "embed"
    base_type = nnx.Embed

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        r: int,
        alpha: float | None = None,
        use_rslora: bool = False,
        init: str = "kaiming",
        lora_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_embeddings, features, rngs=rngs, **kwargs)
        self._add_adapter(
            (num_embeddings, features),
            1,
            r=r,
            alpha=alpha,
            dropout=0.0,
            use_rslora=use_rslora,
            init=init,
            lora_dtype=lora_dtype,
            rngs=rngs,
        )

    @staticmethod
    def _arguments(base: nnx.Embed) -> tuple[tuple, dict]:
        return (base.num_embeddings, base.features), dict(
            dtype=base.dtype, param_dtype=base.param_dtype, embedding_init=_placeholder
        )

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding=out_sharding)
        a, b = nnx.nn.dtypes.promote_dtype(
            (self.lora_a[...], self.lora_b[...]), dtype=self.dtype, inexact=False
        )
        return y + core.scaled_matmul(jnp.take(a, inputs, axis=0), b, self.scaling)

    def attend(self, query: jax.Array, out_sharding=None) -> jax.Array:
        y = super().attend(query, out_sharding=out_sharding)
        query, a, b = nnx.nn.dtypes.promote_dtype(
            (query, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
        )
        return y + core.scaled_matmul(jnp.matmul(query, b.T), a.T, self.scaling)
