"""Op-level PiSSA/OLoRA against the real PEFT: a torch twin whose nn.Linear weight is the
einsum weight as its (out, in) Linear; PEFT's A, B (each rank component up to one sign: SVD
and QR fix none) and residual base weight equal jaxlora's, and the outputs agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model

import jaxlora
import jaxlora.nnx

R, ALPHA = 2, 6.0


class Ein(nnx.Module):
    def __init__(self):  # Gemma3's q_einsum layout: w (N, D, H), free axes N and H
        self.w = nnx.Param(jax.random.normal(jax.random.key(0), (2, 8, 3)))

    def __call__(self, x):
        return jnp.einsum("btd,ndh->btnh", x, self.w)


class Model(nnx.Module):
    def __init__(self):
        self.proj = Ein()

    def __call__(self, x):
        return self.proj(x)


class Twin(torch.nn.Module):
    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data = torch.from_numpy(weight.copy())

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_residual_and_output_match_peft(init):
    model = Model()
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    w = np.asarray(model.proj.w[...])
    linear = w.transpose(0, 2, 1).reshape(6, 8)  # (N·H, D)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"], init=init)
    jaxlora.nnx.inject(model, config, nnx.Rngs(0), inputs=(x,))
    peft = get_peft_model(
        Twin(linear),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=init),
    )
    layer = peft.base_model.model.proj
    a_peft = layer.lora_A["default"].weight.detach().numpy()  # (r, in)
    b_peft = layer.lora_B["default"].weight.detach().numpy()  # (out, r)
    residual_peft = layer.base_layer.weight.detach().numpy()
    a = np.asarray(model.proj.lora_a[...]).reshape(8, R).T
    b = np.asarray(model.proj.lora_b[...]).reshape(R, 6).T
    sign = np.sign(np.sum(a * a_peft, axis=1))  # per rank component
    scale = np.abs(linear).max()
    np.testing.assert_allclose(a * sign[:, None], a_peft, atol=1e-4 * scale)
    np.testing.assert_allclose(b * sign[None, :], b_peft, atol=1e-4 * scale)
    residual = np.asarray(model.proj.w[...]).transpose(0, 2, 1).reshape(6, 8)
    np.testing.assert_allclose(residual, residual_peft, atol=1e-5 * scale)
    y = np.asarray(model(x)).reshape(2, 5, 6)
    y_peft = peft(torch.from_numpy(np.array(x))).detach().numpy()
    np.testing.assert_allclose(y, y_peft, atol=1e-5 * np.abs(y_peft).max())


def test_gaussian_matches_pefts_distribution():
    model = Model()
    wide = nnx.Param(jax.random.normal(jax.random.key(0), (4, 512, 64)))
    model.proj.w = wide
    config = jaxlora.LoRAConfig(r=16, targets=["proj"], init="gaussian")
    jaxlora.nnx.inject(model, config, nnx.Rngs(0), inputs=(jnp.ones((1, 1, 512)),))
    peft = get_peft_model(
        Twin(np.zeros((256, 512), np.float32)),
        LoraConfig(r=16, target_modules=["proj"], init_lora_weights="gaussian"),
    )
    a_peft = peft.base_model.model.proj.lora_A["default"].weight.detach().numpy()
    a = np.asarray(model.proj.lora_a[...])
    for draws in (a, a_peft):  # 8192 draws each: σ = 1/r within ~5 standard errors
        assert abs(draws.std() - 1 / 16) < 0.04 / 16
    assert not np.asarray(model.proj.lora_b[...]).any()
