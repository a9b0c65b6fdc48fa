"""What NNX's ``LoRALinearGeneral``, ``LoRAConv`` and ``LoRAEmbed`` share.

Each is a subclass of the NNX layer it adapts (``nnx.LinearGeneral``, ``nnx.Conv``,
``nnx.Embed``) and of ``Adapter``: the base weight keeps its name and place, the adapter is
``lora_a``/``lora_b`` (``nnx.LoRAParam``) in ``jaxlora.kinds``' layouts, and the output is the
base layer's plus the factored branch. ``from_base`` wraps a pretrained layer sharing its
variables; ``to_base`` returns the plain layer holding the merged weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from _loracore.config import INITS, WEIGHT_INITS
from jaxlora import core, kinds
from jaxlora.inject import init_leaves, lora_init
from jaxlora.nnx.layer import (
    check_dora,
    check_init,
    check_rngs,
    lora_params,
    merged_weight,
)


def _zeros(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    # LinearGeneral reshapes what its initialiser returns, so the stand-in needs the shape.
    return jnp.zeros(shape, dtype)


def _known_inits(kind: str) -> tuple[str, ...]:
    # PiSSA and OLoRA factor a matrix: linear layers only, as in PEFT.
    return INITS if kind == "linear" else tuple(i for i in INITS if i not in WEIGHT_INITS)


if TYPE_CHECKING:
    _Module = nnx.Module  # Adapter is only ever mixed into an NNX layer
else:
    _Module = object


class Adapter(_Module):
    """The adapter half shared by the three layers."""

    kind: str
    base_type: type
    lora_a: nnx.LoRAParam
    lora_b: nnx.LoRAParam
    lora_magnitude: nnx.LoRAParam  # with use_dora only
    # The base layer's weights: kernel and bias (LoRAEmbed has an embedding instead).
    kernel: nnx.Param[jax.Array]
    bias: nnx.Param[jax.Array] | None

    if TYPE_CHECKING:  # the layer class this is mixed into takes its base type's arguments

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    @staticmethod
    def _arguments(base: Any) -> tuple[tuple, dict]:
        """The (positional, keyword) arguments that build a layer like ``base``."""
        raise NotImplementedError

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
        use_dora: bool = False,
    ) -> None:
        n_in, n_out = kinds.flat_features(self.kind, base_shape, in_axes)
        where = f"jaxlora.nnx.{type(self).__name__}{base_shape}"
        core.check_hparams(
            r=r, alpha=alpha, dropout=dropout, in_features=n_in, out_features=n_out, where=where
        )
        check_init(init, _known_inits(self.kind), where)
        self.r, self.alpha, self.use_rslora, self.init = r, alpha, use_rslora, init
        self.in_axes = in_axes
        leaves = lora_init(self.kind, base_shape, r, init, rngs.params(), lora_dtype, in_axes)
        self.lora_a, self.lora_b = (nnx.LoRAParam(leaves[n]) for n in ("lora_a", "lora_b"))
        self.lora_dropout = nnx.Dropout(dropout, rngs=rngs)
        if init in WEIGHT_INITS:  # lora_init made a placeholder: PiSSA/OLoRA need the weight
            self._reinit(init, rngs, lora_dtype)
        self.use_dora = check_dora(use_dora, where)
        if use_dora:
            if self.kind == "linear":
                raise ValueError(
                    f"{where}: use_dora=True is not implemented for {type(self).__name__} "
                    "(DoRA: LoRALinear, LoRAConv and LoRAEmbed)"
                )
            self.lora_magnitude = nnx.LoRAParam(jnp.zeros((base_shape[-1],), lora_dtype))
            if getattr(self, self.base_name)[...].shape == tuple(base_shape):
                self.reset_magnitude()

    def reset_magnitude(self) -> None:
        """Sets DoRA's ``lora_magnitude`` to ‖W + scaling · a b‖ per output feature (PEFT's
        init, from the current weight and adapter)."""
        weight = getattr(self, self.base_name)[...]
        delta = core.delta(self.lora_a[...], self.lora_b[...], self.scaling)
        self.lora_magnitude[...] = core.dora_norm(weight, delta).astype(self.lora_magnitude.dtype)

    def _dora_factor(self, dtype: Any):
        """``m / ‖W + scaling · a b‖`` (out,) in ``dtype``."""
        weight = getattr(self, self.base_name)[...]
        a, b, m = self.lora_a[...], self.lora_b[...], self.lora_magnitude[...]
        return core.dora_factor(weight, a, b, m, self.scaling, dtype)

    def _dropout_active(self, deterministic: bool | None) -> bool:
        off = self.lora_dropout.deterministic if deterministic is None else deterministic
        return self.lora_dropout.rate > 0 and not off

    def _reinit(self, init: str, rngs: nnx.Rngs, lora_dtype: Any) -> None:
        """Draws the adapter again per ``init``; PiSSA/OLoRA write the residual weight."""
        leaves = init_leaves(
            getattr(self, self.base_name)[...],
            self.r,
            self.scaling,
            init,
            rngs.params(),
            lora_dtype,
            kind=self.kind,
            in_axes=self.in_axes,
        )
        for name, value in leaves.items():
            getattr(self, name)[...] = value

    @property
    def scaling(self) -> float:
        return core.scaling(self.r, self.alpha, use_rslora=self.use_rslora)

    def delta(self) -> jax.Array:
        """``scaling · lora_a ⋅ lora_b`` in fp32 in the weight's layout (``kinds.delta``: a
        LinearGeneral's and an Embed's by the product rule, with their static roles)."""
        shape = getattr(self, self.base_name)[...].shape
        a, b = self.lora_a[...], self.lora_b[...]
        return kinds.delta(self.kind, shape, a, b, self.scaling, self.in_axes)

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
        use_dora: bool = False,
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
        check_init(init, _known_inits(cls.kind), f"{cls.__name__}.from_base")
        check_rngs(rngs, f"{cls.__name__}.from_base")
        args, kwargs = cls._arguments(base)
        options = dict(r=r, alpha=alpha, use_rslora=use_rslora, init="kaiming", use_dora=use_dora)
        if cls.kind != "embed":
            options["dropout"] = dropout
        layer = cls(*args, **kwargs, **options, lora_dtype=param_dtype, rngs=rngs)
        for name in ("kernel", "bias", "embedding"):
            if hasattr(base, name):
                setattr(layer, name, getattr(base, name))
        weight = getattr(base, layer.base_name)
        ndim = layer.lora_a[...].ndim
        layer.lora_a, layer.lora_b = lora_params(
            weight,
            layer.lora_a[...],
            layer.lora_b[...],
            lambda names: kinds.lora_axis_names(layer.kind, names, ndim),
        )
        layer.init = init
        if init != "kaiming":
            layer._reinit(init, rngs, param_dtype)
        if use_dora:  # from the shared weight, now in place
            layer.reset_magnitude()
        return layer

    def to_base(self) -> nnx.Module:
        """A plain layer of the base type holding the merged weight (fp32 delta, rounded
        once); the bias variable is shared. A non-finite result is a ``ValueError``."""
        weight = getattr(self, self.base_name)
        value = weight[...]
        magnitude = self.lora_magnitude[...] if self.use_dora else None
        merged = merged_weight(value, self.delta(), magnitude)
        args, kwargs = self._arguments(self)
        kwargs = {**kwargs, "param_dtype": value.dtype}
        plain = self.base_type(*args, **kwargs, rngs=nnx.Rngs(0))
        setattr(plain, self.base_name, weight.replace(merged))  # keeps the variable's metadata
        if self.kind != "embed":
            plain.bias = self.bias
        return plain

    def _branch_input(self, x: jax.Array, deterministic: bool | None) -> jax.Array:
        return self.lora_dropout(x, deterministic=deterministic)
