"""A LoRA Embedding in PyTorch, with PEFT's conventions (loralib's, originally)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchlora import core
from torchlora.base import LoRALayer


class Embedding(LoRALayer):
    """An embedding table with a frozen ``weight`` (num_embeddings, embedding_dim) and a
    trainable low-rank update: ``weight[x] + scaling · Aᵀ[x] Bᵀ``.

    ``lora_a`` (r, num_embeddings) starts at zero and ``lora_b`` (embedding_dim, r) standard
    normal: PEFT's ``lora_embedding_A``/``lora_embedding_B`` (the reverse of Linear's, so the
    rows a batch looks up get a gradient from the first step). There is no dropout on an
    embedding's adapter, as in PEFT. ``init`` "kaiming" and "gaussian" both mean this
    initialisation (PEFT's); PiSSA is not defined for embeddings.

    Examples:
        >>> layer = Embedding(10, 4, 2, alpha=4)
        >>> layer(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 4])
        >>> layer.lora_a.shape, layer.lora_b.shape
        (torch.Size([2, 10]), torch.Size([4, 2]))
    """

    base_type = nn.Embedding
    kind = "embed"
    dora_axis = 1  # DoRA's magnitude is per embedding feature: the table's columns

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int,
        alpha: float | None = None,
        *,
        padding_idx: int | None = None,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        core.check_hparams(
            r=r,
            alpha=alpha,
            dropout=0.0,
            in_features=num_embeddings,
            out_features=embedding_dim,
            where=f"torchlora.Embedding({num_embeddings}, {embedding_dim})",
        )
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        self._setup_lora(r, alpha, use_rslora, init, ("kaiming", "gaussian"))
        self._setup_dora(use_dora, init, "torchlora.Embedding")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, **factory), requires_grad=False
        )
        self.lora_a = nn.Parameter(torch.empty(r, num_embeddings, **factory))
        self.lora_b = nn.Parameter(torch.empty(embedding_dim, r, **factory))
        if use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(embedding_dim, **factory))
        self.reset_parameters()

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        r: int,
        alpha: float | None = None,
        *,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        copy: bool = False,
    ) -> Embedding:
        """Wraps a pretrained ``nn.Embedding``, sharing its weight unless ``copy=True``.

        ``max_norm`` and ``sparse`` embeddings are refused: the first rewrites the table during
        the forward pass, the second needs sparse gradients the adapter does not produce.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}"
            )
        reason = cls.unsupported(embedding)
        if reason:
            raise ValueError(f"torchlora.Embedding: {reason}")
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            r,
            alpha,
            padding_idx=embedding.padding_idx,
            use_rslora=use_rslora,
            init=init,
            use_dora=use_dora,
            device="meta",
            dtype=embedding.weight.dtype,
        )
        layer.scale_grad_by_freq = embedding.scale_grad_by_freq
        layer._share(embedding.weight, None, copy)
        layer.reset_lora_parameters()
        return layer

    scale_grad_by_freq = False

    @staticmethod
    def unsupported(embedding: nn.Module) -> str | None:
        """Why ``embedding`` cannot be adapted, or ``None``."""
        if embedding.max_norm is not None or embedding.sparse:
            return (
                f"an embedding with max_norm={embedding.max_norm}, sparse={embedding.sparse} "
                "cannot be adapted (expected max_norm=None, sparse=False)"
            )
        return None

    def reset_parameters(self) -> None:
        """Initialises ``weight`` as ``nn.Embedding`` does (N(0, 1), zero padding row), then
        the adapter."""
        with torch.no_grad():
            nn.init.normal_(self.weight)
            if self.padding_idx is not None:
                self.weight[self.padding_idx].fill_(0)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A = 0, B ~ N(0, 1) (PEFT's embedding init): the output is unchanged by it."""
        if self.lora_a.is_meta:
            return
        nn.init.zeros_(self.lora_a)
        nn.init.normal_(self.lora_b)
        self._reset_magnitude()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{self._name()}: expected integer token ids, got dtype {x.dtype}")
        y = self._lookup(x, self.weight)
        if self._merged:
            return y
        lora = (self._lookup(x, self.lora_a.T) @ self.lora_b.T) * self.scaling
        if self.use_dora:  # PEFT: m/‖E + ΔE‖ (per embedding feature) times both terms
            norm = core.dora_norm(self.weight, self._delta(), self.dora_axis).to(y.dtype)
            factor = self.lora_magnitude.to(y.dtype) / norm
            return factor * y + factor * lora
        return y + lora

    def to_base(self) -> nn.Embedding:
        """A new plain ``nn.Embedding`` holding the merged table."""
        return self._filled(
            nn.Embedding(
                self.num_embeddings,
                self.embedding_dim,
                padding_idx=self.padding_idx,
                scale_grad_by_freq=self.scale_grad_by_freq,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"{self._adapter_repr()}"
        )

    def _delta(
        self, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None
    ) -> torch.Tensor:
        lora_a = self.lora_a if lora_a is None else lora_a
        lora_b = self.lora_b if lora_b is None else lora_b
        return core.delta(lora_a, lora_b, self.scaling).T  # (num, dim), like weight

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, table, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
