"""The reference LoRA Linear layer (Hu et al., 2021), in PyTorch."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from _loracore.config import INITS, WEIGHT_INITS
from torchlora import core
from torchlora.base import LoRALayer


class Linear(LoRALayer):
    """A linear layer with a frozen weight and a trainable low-rank update.

    ``y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ`` with ``W`` (out, in) and ``b`` frozen,
    ``A = lora_a`` (r, in) initialised kaiming_uniform(a=√5) and ``B = lora_b`` (out, r) zeros,
    so the layer starts equal to its base. ``scaling = alpha / r`` (``alpha`` defaults to ``r``),
    or ``alpha / sqrt(r)`` with ``use_rslora``. Unlike loralib, ``weight`` and ``bias`` are
    initialised like ``nn.Linear``'s, never left as uninitialised memory.

    Merging (``merge()``) folds ``scaling · B A`` into ``weight`` for zero-overhead inference; it
    is explicit and never triggered by ``train()``/``eval()``. While merged, the forward pass uses
    only the weight, so the adapter receives no gradient: ``unmerge()`` before training again.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether the layer has a (frozen) bias.
        r: the rank, in ``[1, min(in_features, out_features)]``.
        alpha: the LoRA alpha; ``None`` means ``r``.
        dropout: dropout rate on the LoRA branch's input only (the base path sees ``x``).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: DoRA (PEFT's ``use_dora``): a trainable ``lora_magnitude`` m (out,),
            initialised to the row norms of ``W + scaling·B A``, and the output
            ``x (m/‖W + scaling·B A‖ ⊙ (W + scaling·B A))ᵀ + b``, the norm detached in backward.

    Examples:
        >>> layer = Linear(16, 8, True, 4, alpha=8)
        >>> layer(torch.ones(2, 3, 16)).shape
        torch.Size([2, 3, 8])
        >>> [name for name, p in layer.named_parameters() if p.requires_grad]
        ['lora_a', 'lora_b']
    """

    base_type = nn.Linear
    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        r: int,
        alpha: float | None = None,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = f"torchlora.Linear({in_features}, {out_features})"
        core.check_hparams(
            r=r,
            alpha=alpha,
            dropout=dropout,
            in_features=in_features,
            out_features=out_features,
            where=where,
        )
        self.in_features = in_features
        self.out_features = out_features
        self._setup_lora(r, alpha, use_rslora, init, INITS)
        self._setup_dora(use_dora, init, where)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, **factory), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_a = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(out_features, r, **factory))
        if use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(out_features, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float | None = None,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        copy: bool = False,
    ) -> Linear:
        """Wraps a pretrained ``nn.Linear``.

        By default the new layer **shares** ``linear.weight`` and ``linear.bias`` (the same
        ``Parameter`` objects, no extra memory): they are frozen (``requires_grad=False``) on
        both, and ``merge()`` writes into the shared weight. Pass ``copy=True`` to clone them
        instead and leave ``linear`` untouched. ``init="pissa"`` replaces the (shared) weight by
        its residual ``W − scaling·B A``, as PEFT does.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight, bias = linear.weight, linear.bias
        # Built on the meta device so no throwaway base weight is allocated or initialised.
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias is not None,
            r,
            alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
            use_dora=use_dora,
            device="meta",
            dtype=weight.dtype,
        )
        layer._share(weight, bias, copy)
        layer.reset_lora_parameters()
        return layer

    @staticmethod
    def unsupported(linear: nn.Module) -> str | None:
        """Why ``linear`` cannot be adapted, or ``None`` (every ``nn.Linear`` can)."""
        return None

    def reset_parameters(self) -> None:
        """Initialises ``weight`` and ``bias`` exactly as ``nn.Linear`` does, then the adapter."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Initialises the adapter per ``init``; the layer's output is unchanged by it.

        "kaiming": A ~ kaiming_uniform(a=√5), i.e. U(±1/√in), B = 0. "gaussian": A ~ N(0, σ=1/r),
        B = 0 (PEFT's). "pissa": A, B from the top-r SVD of the weight, which becomes the
        residual ``W − scaling·B A`` (fp32 SVD, rounded once to the weight's dtype). "olora":
        the same with the weight's QR decomposition.
        """
        if self.lora_a.is_meta:  # from_linear's placeholder: the real tensors come next
            return
        if self.init in WEIGHT_INITS:
            if self._merged:
                raise RuntimeError(f"{self._name()} is merged; unmerge() before re-initialising")
            self.check_untied("reset_lora_parameters")
            make = core.weight_init(self.init)
            lora_a, lora_b, residual = make(self.weight, self.r, self.scaling)
            self.lora_a.copy_(lora_a)
            self.lora_b.copy_(lora_b)
            self.weight.copy_(residual)
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_a, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        self._reset_magnitude()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"{self._name()}: expected input with last dimension in_features="
                f"{self.in_features}, got shape {tuple(x.shape)}"
            )
        y = F.linear(x, self.weight, self.bias)
        if self._merged:
            return y
        h = self.lora_dropout(x)
        lora = (h @ self.lora_a.T @ self.lora_b.T) * self.scaling
        if self.use_dora:
            return y + self._dora_output(h, y, lora, lambda h: F.linear(h, self.weight))
        return y + lora

    def to_linear(self) -> nn.Linear:
        """Returns a new plain ``nn.Linear`` holding the merged weight (and a copy of the bias)."""
        return self._filled(
            nn.Linear(
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._adapter_repr()}"
        )

    def to_base(self) -> nn.Linear:
        return self.to_linear()

    def _name(self, r: int | None = None) -> str:
        r = self.r if r is None else r
        return f"torchlora.Linear({self.in_features}, {self.out_features}, r={r})"
