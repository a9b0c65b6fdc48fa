"""``LoRALinearGeneral``: NNX's ``LinearGeneral`` (multi-axis kernels, e.g. attention's
projections) with a LoRA adapter over its contracted axes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import oplevel
from jaxlora.nnx.base import Adapter, _zeros


class LoRALinearGeneral(Adapter, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` plus ``scaling · x @ lora_a @ lora_b`` over its ``axis``.

    ``lora_a`` (*in_features, r), ``lora_b`` (r, *out_features): a torch ``Linear`` over the
    flattened axes. ``batch_axis`` is not supported.

    Examples:
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
        use_dora: bool = False,
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
            use_dora=use_dora,  # refused: DoRA is not implemented for LinearGeneral
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
        axis = self.axis if isinstance(self.axis, tuple | list) else (self.axis,)
        return y + oplevel.linear_branch(h, a, b, self.scaling, axis, self.precision)
