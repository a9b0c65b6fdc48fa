"""What every torchlora layer shares: the hyperparameters, the scale, and merging.

A layer holds a frozen ``weight`` (and ``bias``) in its torch layout and trainable ``lora_a`` /
``lora_b`` in PEFT's layout for its kind; it says how ``scaling · B A`` maps onto its weight
(``_delta``) and how to rebuild the plain layer (``to_base``). Merging is explicit, refuses
non-finite results and never happens as a side effect of ``train()``/``eval()``.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import torch
from torch import nn

from _loracore.config import INITS, WEIGHT_INITS
from torchlora import core

# What ``scaling`` is computed from. A merged weight holds ``scaling · B A``, so these cannot
# change while merged: unmerge would subtract another delta than merge added.
_HPARAMS = ("r", "alpha", "use_rslora", "use_dora")

_Plain = TypeVar("_Plain", bound=nn.Module)


class LoRALayer(nn.Module):
    """Base class of ``torchlora.Linear``, ``Embedding`` and ``Conv1d/2d/3d`` (not used
    directly)."""

    # Typed as torch types nn.Linear's (a Parameter at run time; nn.Module refuses a plain
    # tensor there). An Embedding has no bias attribute.
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    kind: ClassVar[str]  # PEFT's layer kind: "linear", "embed" or "conv"
    base_type: ClassVar[type[nn.Module]]  # the torch layer this one wraps
    lora_dropout: nn.Module
    # Set only with use_dora (and its merge buffers only while merged); declared here so the
    # type checker does not read them through nn.Module.__getattr__ (Tensor | Module).
    lora_magnitude: nn.Parameter
    _unmerged_weight: torch.Tensor
    _merged_a: torch.Tensor
    _merged_b: torch.Tensor
    # Other (path, module, attribute) holding this layer's weight, recorded by ``inject``: an
    # in-place merge would change them too (a tied embedding and head).
    weight_ties: tuple[tuple[str, nn.Module, str], ...] = ()
    # DoRA (PEFT's use_dora): a trainable ``lora_magnitude`` m (out,) rescales each output
    # feature of W + scaling·B A to norm m. Only the layer types that accept it set it.
    use_dora: bool = False
    dora_axis = 0  # the weight's axis of output features (1 for an embedding table)

    def _setup_lora(
        self, r: int, alpha: float | None, use_rslora: bool, init: str, inits: tuple[str, ...]
    ) -> None:
        if init not in INITS or init not in inits:
            raise ValueError(f"{self._name(r)}: init must be one of {inits}, got {init!r}")
        check_flag(use_rslora, "use_rslora", self._name(r))
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.init = init
        self._merged = False

    def _setup_dora(self, use_dora: bool, init: str, where: str) -> None:
        check_flag(use_dora, "use_dora", where)
        if use_dora and init in WEIGHT_INITS:
            raise ValueError(
                f"{where}: use_dora=True with init={init!r} is not implemented (DoRA is "
                "supported with init 'kaiming' or 'gaussian')"
            )
        self.use_dora = use_dora

    @torch.no_grad()
    def _reset_magnitude(self) -> None:
        """DoRA's m = ‖W + scaling·B A‖ per output feature (PEFT's init, with the current A, B)."""
        if self.use_dora:
            m = core.dora_norm(self.weight, self._delta(), self.dora_axis)
            self.lora_magnitude.copy_(m.to(self.lora_magnitude.dtype))

    def __setattr__(self, name: str, value: object) -> None:
        if name in _HPARAMS and name in self.__dict__:
            value = self._new_hparam(name, value)
        # torch types the value as Tensor | Module; Module.__setattr__ stores any object.
        super().__setattr__(name, value)  # type: ignore[arg-type]

    def _new_hparam(self, name: str, value: object) -> object:
        """``value`` checked as the new ``r``/``alpha``/``use_rslora`` of a built layer."""
        if self._merged:
            raise RuntimeError(
                f"{self._name()}: cannot set {name}={value!r} while merged (the weight holds "
                f"scaling={self.scaling:g} times B A); unmerge() first"
            )
        if name == "r":
            raise ValueError(
                f"{self._name()}: r is fixed by the shape of lora_a; build a new layer for "
                f"rank {value!r}"
            )
        if name == "use_dora":
            raise ValueError(
                f"{self._name()}: use_dora is fixed when the layer is built (it decides "
                f"whether it has a lora_magnitude); build a new layer for use_dora={value!r}"
            )
        if name == "alpha":
            core.check_hparams(
                r=self.r,
                alpha=value,
                dropout=0.0,
                in_features=None,
                out_features=None,
                where=self._name(),
            )
            return float(value)  # type: ignore[arg-type]  # check_hparams proved it a real
        check_flag(value, name, self._name())
        return value

    @property
    def scaling(self) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), from the layer's own settings."""
        return core.scaling(self.r, self.alpha, use_rslora=self.use_rslora)

    @property
    def merged(self) -> bool:
        """Whether ``scaling · B A`` is currently folded into ``weight``."""
        return self._merged

    @torch.no_grad()
    def merge(self) -> None:
        """Folds ``scaling · B A`` into ``weight`` (delta in fp32, rounded once).

        Raises ``ValueError`` and leaves the layer unchanged if the merged weight would hold
        non-finite values (PEFT's ``safe_merge``). Merging a merged layer is an error.
        """
        if self._merged:
            raise RuntimeError(f"{self._name()} is already merged; call unmerge() first")
        self.check_untied("merge")
        merged = self._checked(self._merged_value(), "merge")
        if self.use_dora:  # W cannot be recovered exactly from m/‖W+ΔW‖·(W+ΔW): keep it
            self.register_buffer("_unmerged_weight", self.weight.detach().clone(), persistent=False)
        self.weight.copy_(merged)
        # What was folded in, so that unmerge subtracts exactly it even if lora_a/lora_b are
        # edited meanwhile (non-persistent: not part of any state dict).
        self.register_buffer("_merged_a", self.lora_a.detach().clone(), persistent=False)
        self.register_buffer("_merged_b", self.lora_b.detach().clone(), persistent=False)
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the ``scaling · B A`` that ``merge`` added (from the adapter as it was then),
        restoring the weight to rounding error."""
        if not self._merged:
            raise RuntimeError(f"{self._name()} is not merged; nothing to unmerge")
        self.check_untied("unmerge")
        if self.use_dora:  # exactly the weight merge replaced
            self.weight.copy_(self._unmerged_weight)
            del self._unmerged_weight
        else:
            delta = self._delta(self._merged_a, self._merged_b)
            self.weight.copy_(self._checked(self._wide_weight() - delta, "unmerge"))
        del self._merged_a, self._merged_b
        self._merged = False

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new tensor: the weight with the adapter folded in (whether or not merged)."""
        if self._merged:
            return self.weight.detach().clone()
        return self._checked(self._merged_value(), "merged_weight")

    def reset_lora_parameters(self) -> None:
        """Initialises ``lora_a``/``lora_b`` (and DoRA's magnitude) per the layer's ``init``."""
        raise NotImplementedError

    def to_base(self) -> nn.Module:
        """A new plain layer of the base type holding the merged weight (and a copy of the bias)."""
        raise NotImplementedError

    @torch.no_grad()
    def _filled(self, plain: _Plain) -> _Plain:
        """``plain`` (a new base-type layer) given the merged weight and a copy of the bias.
        The merge is computed (and checked) before ``plain`` is touched."""
        merged = self.merged_weight()
        plain.get_parameter("weight").copy_(merged)
        bias = getattr(self, "bias", None)  # an embedding has none
        if bias is not None:
            plain.get_parameter("bias").copy_(bias)
        return plain

    def check_untied(self, op: str) -> None:
        """Refuses ``op`` (an in-place write of ``weight``) while another module holds the same
        weight, naming it: the write would change that module too."""
        tied = [
            path
            for path, module, attr in self.weight_ties
            if getattr(module, attr, None) is self.weight
        ]
        if tied:
            raise ValueError(
                f"{self._name()}.{op}: its weight is also {', '.join(map(repr, tied))} (tied), "
                "which an in-place write would change too; give this layer its own weight "
                "(layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)) "
                "first"
            )

    def _delta(
        self, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``scaling · B A`` in fp32, laid out like ``weight`` (the layer's own A and B unless
        given)."""
        lora_a = self.lora_a if lora_a is None else lora_a
        lora_b = self.lora_b if lora_b is None else lora_b
        flat = core.delta(lora_a.flatten(1), lora_b.flatten(1), self.scaling)
        return flat.reshape(self.weight.shape)

    def _merged_value(self) -> torch.Tensor:
        """``W + scaling·B A`` in fp32; with DoRA each output feature (row) rescaled by
        ``m / ‖W + scaling·B A‖``, PEFT's merged weight."""
        delta = self._delta()
        full = self._wide_weight() + delta
        if not self.use_dora:
            return full
        factor = self.lora_magnitude.to(full.dtype) / core.dora_norm(
            self.weight, delta, self.dora_axis
        )
        view = [1] * full.ndim
        view[self.dora_axis] = -1
        return factor.view(view) * full

    def _dora_output(self, h: torch.Tensor, y: torch.Tensor, lora: torch.Tensor, base):
        """What DoRA adds to the base output ``y`` (bias included), as PEFT computes it:
        ``(m/‖W+ΔW‖ − 1) · plain + m/‖W+ΔW‖ · lora`` with the norm a constant in backward.
        ``plain`` is ``y`` without its bias, except while dropout is active (training with a
        rate > 0): then it is ``base(h)``, the bias-free base product of the dropped-out input
        ``h``, which is what PEFT's ``DoraLinearLayer.forward`` does. Output features are the
        last axis of a linear output and axis 1 of a conv's (PEFT's factor view)."""
        view = (-1, *(1,) * (self.weight.ndim - 2))
        norm = core.dora_norm(self.weight, self._delta()).to(y.dtype)
        factor = (self.lora_magnitude.to(y.dtype) / norm).view(view)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            plain = y if self.bias is None else y - self.bias.view(view)
        else:
            plain = base(h)
        return (factor - 1) * plain + factor * lora

    def _adapter_repr(self) -> str:
        """The adapter's part of ``extra_repr``, the same for every layer type."""
        dora = ", use_dora=True" if self.use_dora else ""
        return (
            f"r={self.r}, alpha={self.alpha:g}, use_rslora={self.use_rslora}{dora}, "
            f"merged={self._merged}"
        )

    def _name(self, r: int | None = None) -> str:
        return f"torchlora.{type(self).__name__}(r={self.r if r is None else r})"

    def _wide_weight(self) -> torch.Tensor:
        return self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))

    def _checked(self, new: torch.Tensor, op: str) -> torch.Tensor:
        new = new.to(self.weight.dtype)
        if not torch.isfinite(new).all():
            bad = int((~torch.isfinite(new)).sum())
            raise ValueError(
                f"{self._name()}.{op}: the result has {bad} non-finite value(s) (check lora_a, "
                "lora_b and the weight's dtype range); the layer was left unchanged"
            )
        return new

    def _share(self, weight: torch.Tensor, bias: torch.Tensor | None, copy: bool) -> None:
        """Takes a pretrained layer's weight and bias (shared, or cloned with ``copy``), frozen,
        and makes real adapter tensors beside them (the layer was built on the meta device)."""
        if copy:
            weight = nn.Parameter(weight.detach().clone())
            bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.weight = weight.requires_grad_(False)
        if bias is not None:
            self.bias = bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty_like(self.lora_a, device=weight.device))
        self.lora_b = nn.Parameter(torch.empty_like(self.lora_b, device=weight.device))
        if self.use_dora:
            m = self.lora_magnitude
            self.lora_magnitude = nn.Parameter(torch.empty_like(m, device=weight.device))


def check_flag(value: object, name: str, where: str) -> None:
    """Refuses a flag that is not exactly ``True`` or ``False`` (``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise TypeError(
            f"{where}: {name} must be True or False, got {value!r} ({type(value).__name__})"
        )
