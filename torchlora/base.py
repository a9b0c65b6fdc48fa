"""What every torchlora layer shares: the hyperparameters, the scale, and merging.

A layer holds a frozen ``weight`` (and ``bias``) in its torch layout and trainable ``lora_a`` /
``lora_b`` in PEFT's layout for its kind; it says how ``scaling · B A`` maps onto its weight
(``_delta``) and how to rebuild the plain layer (``to_base``). Merging is explicit, refuses
non-finite results and never happens as a side effect of ``train()``/``eval()``.
"""

from __future__ import annotations

import torch
from torch import nn

from _loracore.config import INITS
from torchlora import core


class LoRALayer(nn.Module):
    """Base class of ``torchlora.Linear``, ``Embedding`` and ``Conv1d/2d/3d`` (not used
    directly)."""

    weight: nn.Parameter
    lora_a: nn.Parameter
    lora_b: nn.Parameter

    def _setup_lora(
        self, r: int, alpha: float | None, use_rslora: bool, init: str, inits: tuple[str, ...]
    ) -> None:
        if init not in INITS or init not in inits:
            raise ValueError(f"{self._name(r)}: init must be one of {inits}, got {init!r}")
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.init = init
        self._merged = False

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
        self.weight.copy_(self._checked(self._wide_weight() + self._delta(), "merge"))
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts ``scaling · B A`` from ``weight``, restoring it to rounding error."""
        if not self._merged:
            raise RuntimeError(f"{self._name()} is not merged; nothing to unmerge")
        self.weight.copy_(self._checked(self._wide_weight() - self._delta(), "unmerge"))
        self._merged = False

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new tensor: the weight with the adapter folded in (whether or not merged)."""
        if self._merged:
            return self.weight.detach().clone()
        return self._checked(self._wide_weight() + self._delta(), "merged_weight")

    def to_base(self) -> nn.Module:
        """A new plain layer of the base type holding the merged weight (and a copy of the bias)."""
        raise NotImplementedError

    @torch.no_grad()
    def _filled(self, plain: nn.Module) -> nn.Module:
        """``plain`` (a new base-type layer) given the merged weight and a copy of the bias.
        The merge is computed (and checked) before ``plain`` is touched."""
        merged = self.merged_weight()
        plain.weight.copy_(merged)
        if getattr(self, "bias", None) is not None:
            plain.bias.copy_(self.bias)
        return plain

    def _delta(self) -> torch.Tensor:
        """``scaling · B A`` in fp32, laid out like ``weight``."""
        flat = core.delta(self.lora_a.flatten(1), self.lora_b.flatten(1), self.scaling)
        return flat.reshape(self.weight.shape)

    def _adapter_repr(self) -> str:
        """The adapter's part of ``extra_repr``, the same for every layer type."""
        return (
            f"r={self.r}, alpha={self.alpha:g}, use_rslora={self.use_rslora}, merged={self._merged}"
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

    def _share(self, weight: nn.Parameter, bias: nn.Parameter | None, copy: bool) -> None:
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
