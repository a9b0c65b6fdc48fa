"""``LoRAConv``: NNX's ``Conv`` with a LoRA adapter in PEFT's layout (A a conv like the base's,
B a 1×1 conv)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jaxlora import core
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.layer import _placeholder


class LoRAConv(Adapter, nnx.Conv):
    """``nnx.Conv`` plus ``scaling · conv1x1(conv(x, lora_a), lora_b)``: PEFT's Conv layout.

    ``lora_a`` (*window, in, r) is convolved with the base's strides, padding and dilations;
    ``lora_b`` (1, …, 1, r, out). Grouped and masked convolutions are not supported.

    Examples:
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
        use_dora: bool = False,
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
            use_dora=use_dora,
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

    # Unlike nnx.Conv, no out_sharding (the LoRA branch is not sharded to match) and a
    # deterministic flag for the branch's dropout: a narrower signature, on purpose.
    def __call__(  # type: ignore[override]
        self, x: jax.Array, *, deterministic: bool | None = None
    ) -> jax.Array:
        y = super().__call__(x)
        dropped, a, b = nnx.nn.dtypes.promote_dtype(
            (self._branch_input(x, deterministic), self.lora_a[...], self.lora_b[...]),
            dtype=self.dtype,
        )
        h = self._conv(self.r)(dropped, a)
        lora = core.scaled_matmul(h, b.reshape(self.r, -1), self.scaling, self.precision)
        if not self.use_dora:
            return y + lora
        if self._dropout_active(deterministic):  # PEFT: the base conv of the dropped-out input
            (kernel,) = nnx.nn.dtypes.promote_dtype((self.kernel[...],), dtype=self.dtype)
            plain = self._conv(self.out_features)(dropped, kernel).astype(y.dtype)
        else:
            plain = y if self.bias is None else y - self.bias[...].astype(y.dtype)
        return y + core.dora_combine(plain, lora, self._dora_factor(y.dtype))

    def _conv(self, features: int):
        """``(x, kernel) -> conv``: Linen's conv as a pure function with this layer's settings
        (the same padding rules as nnx.Conv), ``features`` outputs and no bias."""
        conv = nn.Conv(
            features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            use_bias=False,
            precision=self.precision,
        )
        return lambda x, kernel: conv.apply({"params": {"kernel": kernel}}, x)
