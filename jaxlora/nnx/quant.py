"""A quantized frozen base for NNX: ``QuantizedKernel`` and ``quantize_base``.

``quantize_base(model, targets)`` replaces, in place, the adapted weight of each chosen
``LoRALinear`` (its ``kernel``) or op-level adapted module (``OpAdapter``: its weight, e.g. a
tunix ``Einsum``'s ``w``) by a ``QuantizedKernel`` holding the weight quantized in its torch
Linear layout (``jaxlora.quant._layout``: (out, in) = (prod free, prod contracted) axes, the
blocks bitsandbytes / a Hugging Face ``Linear4bit`` hold). A ``QuantizedKernel`` is an
``nnx.Variable`` but not an ``nnx.Param``: ``nnx.Optimizer(..., wrt=nnx.LoRAParam)`` and
``nnx.DiffState(0, nnx.LoRAParam)`` never see it (nor does ``wrt=nnx.Param``, which would train
the bias only). The layer dequantizes it in its forward pass, to the weight's own shape and
dtype; ``jaxlora.nnx.merge`` (``to_base``) dequantizes, merges in fp32 and returns the plain
layer with a float weight, or with ``requantize=True`` keeps the adapted layer with the merged
weight quantized again (``requantized``) and ``lora_b`` zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from jaxlora.config import LoRAConfig
from jaxlora.oplevel import Roles
from jaxlora.quant._api import QuantizedWeight, _check_options
from jaxlora.quant._layout import (
    dequantize_stack,
    layer_length,
    linear_roles,
    quantize_stack,
    requantize_stack,
    stacked_shape,
)


class QuantizedKernel(nnx.Variable):
    """A frozen, quantized weight: its value is a ``jaxlora.quant.QuantizedWeight`` of the
        weight's Linear layout; the metadata ``roles`` (a ``jaxlora.oplevel.Roles``) say how the
        weight's axes make that layout (default: a Dense kernel (in, out), stored transposed). Not
        an ``nnx.Param``: no optimizer or gradient filter for parameters selects it. ``shape``,
        ``ndim`` and ``dtype`` are those of the weight it stands for, so code that reads a layer's
        weight shape sees the layer's. A stacked layer's (``nnx.vmap``: a layer axis L in front)
    holds its L layers quantized one by one, their arrays stacked in front (``jaxlora.quant.
    _layout``); ``nnx.scan`` slices them with the layer's other variables, so each layer
    dequantizes its own, and outside the scan it stands for the (L, …) stacked weight."""

    @property
    def layout(self) -> Roles:
        roles = self.get_metadata().get("roles")
        return linear_roles(tuple(reversed(self.get_value().shape))) if roles is None else roles

    @property
    def shape(self) -> tuple[int, ...]:
        return stacked_shape(self.get_value(), self.layout, self.layer_axis)

    @property
    def layer_axis(self) -> int | None:
        """0 for a stack of layers' quantized weights (``nnx.vmap``), None for one layer's."""
        q = self.get_value()
        return None if layer_length(q, self.layout, "a QuantizedKernel") is None else 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.get_value().dtype


def quantize_base(
    model: nnx.Module,
    targets: LoRAConfig | str | Sequence[str],
    *,
    quant_type: str = "nf4",
    blocksize: int | None = None,
    double_quant: bool = False,
) -> nnx.Module:
    """Quantizes, in place, the adapted weight of each chosen ``LoRALinear`` or op-level
    adapted module (inject LoRA first with ``jaxlora.nnx.inject``); returns ``model``.

    An op-level module with several adapted weights (``<weight>_lora_a``) has each quantized
    as its own torch Linear. A weight with batch axes in its product (MoE experts, batched
    'EBD,EDF->EBF' or one static slice ``w[i]`` per expert) is quantized expert by expert,
    each as its own Linear (its blocks never straddle two experts), the experts' arrays
    stacked in front (``jaxlora.quant._layout``); the forward dequantizes each expert.

    A ``LoRALinear`` or op-level adapter of an ``nnx.vmap``-made stack (a kernel (L, in, out),
    a weight (L, …) of one layer's roles, run by ``nnx.scan``) is quantized layer by layer,
    each layer exactly as its unstacked twin (its own blocks), the L quantized weights' arrays
    stacked in front; ``nnx.scan`` slices them with the layer's other variables, so each layer
    dequantizes its own weight.

    Args:
        model: an NNX model.
        targets: a ``LoRAConfig`` (its ``targets``) or targets as ``LoRAConfig`` takes them.
        quant_type: "nf4", "fp4" or "int8", as in ``jaxlora.quant.quantize``.
        blocksize: elements per scale, as in ``jaxlora.quant.quantize``.
        double_quant: also quantize the scales, as in ``jaxlora.quant.quantize``.

    Raises:
        ValueError: no module matches, a targets entry matches none, a matched module is not
            a ``LoRALinear`` with a 2-D float kernel nor an op-level adapter, nor a stack of
            either with one layer axis in front (a plain ``nnx.Linear``, another layer,
            nested stacks, or an already quantized one), naming its
            path. All are checked before any weight is replaced.
    """
    config = targets if isinstance(targets, LoRAConfig) else LoRAConfig(r=1, targets=targets)
    blocksize = _check_options(quant_type, blocksize, double_quant)
    weights = {}
    for name, layer in _chosen(model, config).items():
        for weight, roles, axis in _targets(layer, f"quantize_base: layer '{name}'"):
            # a tied layer is quantized once
            weights[id(layer), weight] = (layer, weight, roles, axis)
    options = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    new = {
        key: QuantizedKernel(
            quantize_stack(getattr(layer, weight)[...], roles, axis, **options), roles=roles
        )
        for key, (layer, weight, roles, axis) in weights.items()
    }
    for key, (layer, weight, _, _) in weights.items():
        setattr(layer, weight, new[key])
    return model


def _chosen(model: nnx.Module, config: LoRAConfig) -> dict[str, nnx.Module]:
    # Imported here: the layers import this module (they dequantize with kernel_value).
    from jaxlora.nnx.inject import _module_paths

    modules = _module_paths(model)
    try:
        chosen = config.select(sorted(modules))
    except ValueError as error:
        raise ValueError(f"quantize_base: {error}") from None
    return {name: modules[name][1] for name in chosen}


def _targets(layer: nnx.Module, where: str) -> list[tuple[str, Roles, int | None]]:
    """[(the weight's attribute name, one layer's roles, the layer axis of an ``nnx.vmap``
    stack or None)] of the weights ``quantize_base`` quantizes in ``layer``: a
    ``LoRALinear``'s kernel, or each adapted weight of an op-level adapter (a module with
    several, ``<weight>_lora_a``, has each quantized as its own Linear)."""
    from jaxlora.nnx.layer import LoRALinear
    from jaxlora.nnx.oplevel import OpAdapter

    if isinstance(layer, OpAdapter):
        return [_weight(layer, name, roles, where) for name, roles in layer.lora_products]
    if isinstance(layer, LoRALinear):
        return [_weight(layer, "kernel", None, where, (layer.in_features, layer.out_features))]
    raise ValueError(
        f"{where} is a {type(layer).__name__}; only LoRALinear layers and modules adapted "
        "at their weight's product can have a quantized weight (inject LoRA first)"
    )


def _weight(
    layer: nnx.Module, name: str, roles: Roles | None, where: str, one: tuple[int, int] = (0, 0)
) -> tuple[str, Roles, int | None]:
    """(name, one layer's roles, layer axis) of the weight ``name`` of ``layer``, whose
    adapter was made for ``roles`` (None: a ``LoRALinear``'s kernel, (in, out) = ``one``)."""
    weight = getattr(layer, name)
    if isinstance(weight, QuantizedKernel):
        what = "the kernel" if name == "kernel" else f"the weight '{name}'"
        raise ValueError(f"{where}: {what} is already quantized")
    axis = None
    if roles is None:
        if tuple(weight.shape) not in (one, tuple(weight.shape[:1]) + one):
            raise ValueError(
                f"{where}: the kernel has shape {weight.shape}; only a 2-D (in, out) = {one} "
                "kernel, or a stack of them with the layer axis in front (nnx.vmap, "
                "out_axes=0), can be quantized"
            )
        roles, axis = linear_roles(one), (0 if weight.ndim == 3 else None)
    elif tuple(weight.shape) == (*weight.shape[:1], *roles.shape):  # nnx.vmap stack
        axis = 0
    elif tuple(weight.shape) != roles.shape:
        raise ValueError(
            f"{where}: the weight '{name}' has shape {tuple(weight.shape)}, neither the shape "
            f"{roles.shape} its adapter was made for nor a stack of them with the layer axis "
            "in front (nnx.vmap, out_axes=0)"
        )
    return name, roles, axis


def kernel_value(kernel: nnx.Variable):
    """A weight variable's array in its own shape: dequantized (in its stored dtype) when
    quantized, layer by layer for a stack (outside ``nnx.scan``)."""
    if isinstance(kernel, QuantizedKernel):
        q = kernel.get_value()
        if not isinstance(q, QuantizedWeight):
            raise TypeError(
                f"a QuantizedKernel must hold a QuantizedWeight, got {type(q).__name__}"
            )
        return dequantize_stack(q, kernel.layout, kernel.layer_axis)
    return kernel[...]


def requantized_kernel(kernel: QuantizedKernel, merged) -> QuantizedKernel:
    """``merged`` (the weight's shape) quantized in ``kernel``'s format and layout."""
    roles = kernel.layout
    q = requantize_stack(kernel.get_value(), roles, kernel.layer_axis, merged)
    return QuantizedKernel(q, roles=roles)
