"""tunix-style Llama ``q_proj`` (``einsum('BTD,DNH->BTNH', x, w)``, w (D, N, H)) adapted at its
product equals a torch ``nn.Linear(D, N·H)`` with a torchlora adapter, under the PEFT mapping
the adapter files will need:

    weight (N·H, D) = w.reshape(D, N·H).T
    lora_A (r, D)   = lora_a.T                         (lora_a (D, r))
    lora_B (N·H, r) = lora_b.reshape(r, N·H).T         (lora_b (r, N, H))

Forward, the gradients of both factors (mapped the same way) and the merged weight agree to
fp32 rounding (tolerance relative to each array's scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxlora
import torchlora
from jaxlora import nnx as jnnx
from parity_tests.twins import assert_close

B, T, D, N, H, R, ALPHA = 2, 5, 16, 4, 8, 4, 8.0


class Einsum(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, N, H)) / np.sqrt(D))

    def __call__(self, x):
        return jnp.einsum("BTD,DNH->BTNH", x, self.w[...])


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = Einsum(rngs)

    def __call__(self, x):
        return self.q_proj(x)


class TorchAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(D, N * H, bias=False)

    def forward(self, x):
        return self.q_proj(x)


def _close(got, want, tol=1e-5):
    assert_close(got, want, tol, floor=1e-3)


@pytest.fixture
def twins():
    x = np.array(jax.random.normal(jax.random.key(1), (B, T, D)))
    jax_model = Attention(nnx.Rngs(0))
    jnnx.inject(
        jax_model,
        jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["q_proj"]),
        nnx.Rngs(2),
        inputs=(jnp.asarray(x),),
    )
    layer = jax_model.q_proj
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), layer.lora_b.shape)
    torch_model = TorchAttention()
    w = np.asarray(layer.w[...])
    with torch.no_grad():
        torch_model.q_proj.weight.copy_(torch.from_numpy(w.reshape(D, N * H).T.copy()))
    torchlora.inject(torch_model, torchlora.LoRAConfig(r=R, alpha=ALPHA, targets=["q_proj"]))
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    with torch.no_grad():
        torch_model.q_proj.lora_a.copy_(torch.from_numpy(a.T.copy()))
        torch_model.q_proj.lora_b.copy_(torch.from_numpy(b.reshape(R, N * H).T.copy()))
    return jax_model, torch_model, x


def test_forward_matches_torch_linear_with_the_peft_mapping(twins):
    jax_model, torch_model, x = twins
    want = torch_model(torch.from_numpy(x)).detach().numpy()
    _close(np.asarray(jax_model(jnp.asarray(x))).reshape(B, T, N * H), want)


def test_gradients_match_under_the_mapping(twins):
    jax_model, torch_model, x = twins
    cot = np.array(jax.random.normal(jax.random.key(4), (B, T, N, H)))
    grads = nnx.grad(
        lambda m: jnp.sum(m(jnp.asarray(x)) * cot), argnums=nnx.DiffState(0, nnx.LoRAParam)
    )(jax_model)
    out = torch_model(torch.from_numpy(x))
    (out * torch.from_numpy(cot.reshape(B, T, N * H))).sum().backward()
    layer = torch_model.q_proj
    _close(np.asarray(grads["q_proj"]["lora_a"][...]).T, layer.lora_a.grad.numpy())
    _close(
        np.asarray(grads["q_proj"]["lora_b"][...]).reshape(R, N * H).T,
        layer.lora_b.grad.numpy(),
    )


def test_merged_weights_match(twins):
    jax_model, torch_model, x = twins
    jnnx.merge(jax_model)
    torchlora.merge(torch_model)
    merged = np.asarray(jax_model.q_proj.w[...]).reshape(D, N * H).T
    _close(merged, torch_model.q_proj.weight.detach().numpy())
    want = torch_model(torch.from_numpy(x)).detach().numpy()
    _close(np.asarray(jax_model(jnp.asarray(x))).reshape(B, T, N * H), want)
