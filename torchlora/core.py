"""torchlora's side of the LoRA formula: the delta in fp32 (the rules live in ``_loracore``)."""

from __future__ import annotations

import torch

from _loracore.hparams import check_hparams, scaling

__all__ = ["check_hparams", "delta", "dora_norm", "olora", "pissa", "scaling", "weight_init"]


def delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Returns ``scale * B @ A`` with shape (out, in), computed in float32 (or wider).

    Half-precision adapters are widened first so that merging rounds once, into the weight.
    """
    dtype = torch.promote_types(lora_a.dtype, torch.float32)
    return (lora_b.to(dtype) @ lora_a.to(dtype)) * scale


def dora_norm(weight: torch.Tensor, delta: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """DoRA's ``‖W + scaling·B A‖`` per output feature: the norm over every axis but ``axis``
    (0 for a Linear's or conv's weight, 1 for an embedding table's columns), in ``delta``'s
    dtype (fp32 or wider), detached: PEFT, following the paper (§4.3), treats the norm as a
    constant in the backward pass."""
    full = (weight.detach().to(delta.dtype) + delta.detach()).movedim(axis, 0)
    return torch.linalg.norm(full.flatten(1), dim=1)


def pissa(
    weight: torch.Tensor, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA (PEFT's ``init_lora_weights="pissa"``): ``A`` (r, in), ``B`` (out, r) from the top-r
    SVD of ``W``, and the residual ``W − scale·B A``, so the layer's output is unchanged.

    Computed in fp32; singular vectors get a canonical sign (the largest-magnitude entry of each
    left vector positive) so that jaxlora's twin gives the same A and B.
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :r], s[:r] / scale, vh[:r]
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    u, vh = u * sign, vh * sign.T
    root = torch.sqrt(s)
    lora_a, lora_b = root[:, None] * vh, u * root[None, :]
    return lora_a, lora_b, w - scale * (lora_b @ lora_a)


def olora(
    weight: torch.Tensor, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA (PEFT's ``init_lora_weights="olora"``): ``W = Q R``; ``B`` (out, r) the first r
    columns of Q, ``A`` (r, in) the first r rows of R, and the residual ``W − scale·B A``.

    Computed in fp32; R's leading diagonal is made non-negative (the QR's one free choice), so
    that jaxlora's twin gives the same A and B. ``B A`` and the residual do not depend on it.
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    q, rr = torch.linalg.qr(w)
    q, rr = q[:, :r], rr[:r]
    sign = torch.where(torch.diagonal(rr) < 0, -1.0, 1.0).to(w.dtype)
    lora_a, lora_b = sign[:, None] * rr, q * sign[None, :]
    return lora_a, lora_b, w - scale * (lora_b @ lora_a)


def weight_init(init: str):
    """The function for an init derived from the weight ("pissa", "olora")."""
    return {"pissa": pissa, "olora": olora}[init]
