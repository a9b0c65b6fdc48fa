"""``LoRAEmbed``: NNX's ``Embed`` with PEFT's embedding adapter."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import core
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.layer import _placeholder


class LoRAEmbed(Adapter, nnx.Embed):
    """``nnx.Embed`` plus ``scaling · lora_a[x] @ lora_b`` (PEFT's embedding adapter: A zero,
    B standard normal, no dropout); ``attend`` uses the adapted table too.

    Examples:
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
        use_dora: bool = False,
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
            use_dora=use_dora,
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
        lora = core.scaled_matmul(jnp.take(a, inputs, axis=0), b, self.scaling)
        if self.use_dora:  # PEFT: f ⊙ (E[x] + s·a[x] b)
            return y + core.dora_combine(y, lora, self._dora_factor(y.dtype))
        return y + lora

    def attend(self, query: jax.Array, out_sharding=None) -> jax.Array:
        if self.use_dora:  # the merged table's attend: (query ⊙ f) @ (E + s·a b)ᵀ
            (query,) = nnx.nn.dtypes.promote_dtype((query,), dtype=self.dtype)
            query = query * self._dora_factor(query.dtype)
        y = super().attend(query, out_sharding=out_sharding)
        query, a, b = nnx.nn.dtypes.promote_dtype(
            (query, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
        )
        return y + core.scaled_matmul(jnp.matmul(query, b.T), a.T, self.scaling)
