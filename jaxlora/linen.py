"""``LoRADense``: a Flax Linen drop-in for ``nn.Dense`` with a trainable low-rank update."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, Initializer, PrecisionLike

from jaxlora import core


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
        dtype: computation dtype (``None``: inferred from inputs and params).
        param_dtype: dtype of the params.
        precision: matmul precision, as for ``nn.Dense``.

    >>> import jax, jax.numpy as jnp
    >>> layer = LoRADense(8, r=4, alpha=8)
    >>> params = layer.init(jax.random.key(0), jnp.ones((2, 16)))["params"]
    >>> {k: v.shape for k, v in params.items()}
    {'kernel': (16, 8), 'bias': (8,), 'lora_a': (16, 4), 'lora_b': (4, 8)}
    """

    features: int
    r: int
    alpha: float | None = None
    _: dataclasses.KW_ONLY
    use_bias: bool = True
    dropout: float = 0.0
    use_rslora: bool = False
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
        where = f"LoRADense at '{'.'.join(self.scope.path) or '<root>'}'"
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
        }
        for name, shape in shapes.items():
            if self.has_variable("params", name):
                core.check_shape(self.get_variable("params", name), shape, f"{where}, '{name}'")
        kernel = self.param("kernel", self.kernel_init, shapes["kernel"], self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        lora_a = self.param("lora_a", self.lora_a_init, shapes["lora_a"], self.param_dtype)
        lora_b = self.param("lora_b", self.lora_b_init, shapes["lora_b"], self.param_dtype)
        x, kernel, bias, lora_a, lora_b = nn.dtypes.promote_dtype(
            x, kernel, bias, lora_a, lora_b, dtype=self.dtype
        )
        y = jnp.matmul(x, kernel, precision=self.precision)
        if bias is not None:
            y = y + bias
        h = nn.Dropout(self.dropout, name="lora_dropout")(x, deterministic=deterministic)
        return y + core.lora_branch(h, lora_a, lora_b, self.scaling, self.precision)
