"""A quantized frozen base for NNX: ``QuantizedKernel`` and ``quantize_base``.

``quantize_base(model, targets)`` replaces, in place, each chosen ``LoRALinear``'s ``kernel``
``nnx.Param`` by a ``QuantizedKernel`` holding ``jaxlora.quant.quantize(kernel.T)`` (torch's
(out, in) layout, the blocks bitsandbytes / a Hugging Face ``Linear4bit`` hold). A
``QuantizedKernel`` is an ``nnx.Variable`` but not an ``nnx.Param``: ``nnx.Optimizer(...,
wrt=nnx.LoRAParam)`` and ``nnx.DiffState(0, nnx.LoRAParam)`` never see it (nor does
``wrt=nnx.Param``, which would train the bias only). ``LoRALinear`` dequantizes it in its
forward pass; ``jaxlora.nnx.merge`` (``to_base``) dequantizes, merges in fp32 and returns a
plain ``nnx.Linear`` with a float kernel, or with ``requantize=True`` keeps the ``LoRALinear``
with the merged kernel quantized again (``LoRALinear.requantized``) and ``lora_b`` zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from jaxlora.config import LoRAConfig
from jaxlora.quant._api import QuantizedWeight, _check_options, dequantize, quantize


class QuantizedKernel(nnx.Variable):
    """A frozen, quantized kernel: its value is a ``jaxlora.quant.QuantizedWeight`` of the
    (in, out) kernel's transpose. Not an ``nnx.Param``: no optimizer or gradient filter for
    parameters selects it. ``shape``, ``ndim`` and ``dtype`` are those of the (in, out) kernel
    it stands for, so code that reads a layer's kernel shape sees the layer's."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.get_value().shape))

    @property
    def ndim(self) -> int:
        return len(self.get_value().shape)

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
    """Quantizes, in place, the kernel of each chosen ``LoRALinear`` (inject LoRA first with
    ``jaxlora.nnx.inject``); returns ``model``.

    Args:
        model: an NNX model.
        targets: a ``LoRAConfig`` (its ``targets``) or targets as ``LoRAConfig`` takes them.
        quant_type: "nf4", "fp4" or "int8", as in ``jaxlora.quant.quantize``.
        blocksize: elements per scale, as in ``jaxlora.quant.quantize``.
        double_quant: also quantize the scales, as in ``jaxlora.quant.quantize``.

    Raises:
        ValueError: no module matches, a targets entry matches none, a matched module is not
            a ``LoRALinear`` with a 2-D float kernel (a plain ``nnx.Linear``, another layer, a
            stacked layer, or an already quantized one), naming its path. All are checked
            before any kernel is replaced.
    """
    # Imported here: both import this module (LoRALinear dequantizes with kernel_value).
    from jaxlora.nnx.inject import _module_paths
    from jaxlora.nnx.layer import LoRALinear

    config = targets if isinstance(targets, LoRAConfig) else LoRAConfig(r=1, targets=targets)
    blocksize = _check_options(quant_type, blocksize, double_quant)
    modules = _module_paths(model)
    try:
        chosen = config.select(sorted(modules))
    except ValueError as error:
        raise ValueError(f"quantize_base: {error}") from None
    layers = {}
    for name in chosen:
        module = modules[name][1]
        where = f"quantize_base: layer '{name}'"
        if not isinstance(module, LoRALinear):
            raise ValueError(
                f"{where} is a {type(module).__name__}; only LoRALinear layers can have a "
                "quantized kernel (inject LoRA into nnx.Linear layers first)"
            )
        kernel = module.kernel
        if isinstance(kernel, QuantizedKernel):
            raise ValueError(f"{where}: the kernel is already quantized")
        if kernel.ndim != 2:
            raise ValueError(
                f"{where}: the kernel has shape {kernel.shape}; only a 2-D (in, out) kernel "
                "can be quantized (not an nnx.vmap stack)"
            )
        layers[id(module)] = module  # a tied layer is quantized once
    new = {
        key: QuantizedKernel(
            quantize(
                layer.kernel[...].T,
                quant_type=quant_type,
                blocksize=blocksize,
                double_quant=double_quant,
            )
        )
        for key, layer in layers.items()
    }
    for key, layer in layers.items():
        layer.kernel = new[key]
    return model


def kernel_value(kernel: nnx.Variable):
    """A kernel variable's (in, out) array: dequantized (in its stored dtype) when quantized."""
    if isinstance(kernel, QuantizedKernel):
        q = kernel.get_value()
        if not isinstance(q, QuantizedWeight):
            raise TypeError(
                f"a QuantizedKernel must hold a QuantizedWeight, got {type(q).__name__}"
            )
        return dequantize(q).T
    return kernel[...]
