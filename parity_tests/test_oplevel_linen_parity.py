"""Linen modules adapted at their product (``layouts`` → ``inject`` → ``intercept``) equal torch
``nn.Linear`` layers with torchlora adapters, under the PEFT mapping:

- transformers' ``FlaxConv1D`` (kernel (out, in), ``x @ kernel.T + bias``): weight = kernel,
  lora_A (r, in) = lora_a.T, lora_B (out, r) = lora_b.T;
- tunix's q_proj ``einsum('BTD,DNH->BTNH', x, w)``: weight (N·H, D) = w.reshape(D, N·H).T,
  lora_A = lora_a.T, lora_B (N·H, r) = lora_b.reshape(r, N·H).T.

Forward, the gradients of both factors and the merged weights agree to fp32 rounding: the
tolerance is 1e-5 of each array's scale (sums of 16 products, a few ulps each).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

import jaxlora
import torchlora
from parity_tests.twins import assert_close

B, T, D, N, H, R, ALPHA = 2, 5, 16, 4, 8, 4, 8.0
CONFIG = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn", "q_proj"])


class FlaxConv1D(nn.Module):  # transformers 4.57's, as in tests/test_oplevel_linen.py
    features: int

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", nn.initializers.normal(0.25), (self.features, D))
        y = jax.lax.dot_general(inputs, kernel.transpose(), (((inputs.ndim - 1,), (0,)), ((), ())))
        return y + self.param("bias", nn.initializers.normal(1.0), (self.features,))


class Einsum(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.25), (D, N, H))
        return jnp.einsum("BTD,DNH->BTNH", x, w)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return FlaxConv1D(D, name="c_attn")(x), Einsum(name="q_proj")(x)


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = torch.nn.Linear(D, D)
        self.q_proj = torch.nn.Linear(D, N * H, bias=False)

    def forward(self, x):
        return self.c_attn(x), self.q_proj(x)


def _close(got, want, tol=1e-5):
    assert_close(got, want, tol, floor=1e-3)


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float32, copy=True, order="C"))


@pytest.fixture
def twins():
    x = np.array(jax.random.normal(jax.random.key(1), (B, T, D)))
    model = Block()
    variables = model.init(jax.random.key(0), x)
    params = jaxlora.inject(
        variables, CONFIG, jax.random.key(2), layouts=jaxlora.layouts(model, x)
    )["params"]
    for k, name in enumerate(("c_attn", "q_proj")):
        b = params[name]["lora_b"]
        params[name]["lora_b"] = jax.random.normal(jax.random.key(3 + k), b.shape)
    torch_model = TorchBlock()
    c, q = params["c_attn"], params["q_proj"]
    with torch.no_grad():
        torch_model.c_attn.weight.copy_(_t(c["kernel"]))
        torch_model.c_attn.bias.copy_(_t(c["bias"]))
        torch_model.q_proj.weight.copy_(_t(np.asarray(q["w"]).reshape(D, N * H).T))
    torchlora.inject(
        torch_model, torchlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn", "q_proj"])
    )
    with torch.no_grad():
        torch_model.c_attn.lora_a.copy_(_t(np.asarray(c["lora_a"]).T))
        torch_model.c_attn.lora_b.copy_(_t(np.asarray(c["lora_b"]).T))
        torch_model.q_proj.lora_a.copy_(_t(np.asarray(q["lora_a"]).T))
        torch_model.q_proj.lora_b.copy_(_t(np.asarray(q["lora_b"]).reshape(R, N * H).T))
    return model, {"params": params}, torch_model, x


def test_forward_and_gradients_match_torch(twins):
    model, variables, torch_model, x = twins
    cot_c = np.array(jax.random.normal(jax.random.key(7), (B, T, D)))
    cot_q = np.array(jax.random.normal(jax.random.key(8), (B, T, N, H)))

    def loss(v):
        with jaxlora.intercept(CONFIG):
            c, q = model.apply(v, jnp.asarray(x))
        return jnp.sum(c * cot_c) + jnp.sum(q * cot_q), (c, q)

    grads, (c, q) = jax.grad(loss, has_aux=True)(variables)
    want_c, want_q = torch_model(_t(x))
    _close(c, want_c.detach().numpy())
    _close(np.asarray(q).reshape(B, T, N * H), want_q.detach().numpy())
    (want_c * _t(cot_c)).sum().add((want_q * _t(cot_q.reshape(B, T, N * H))).sum()).backward()
    g = grads["params"]
    _close(np.asarray(g["c_attn"]["lora_a"]).T, torch_model.c_attn.lora_a.grad.numpy())
    _close(np.asarray(g["c_attn"]["lora_b"]).T, torch_model.c_attn.lora_b.grad.numpy())
    _close(np.asarray(g["q_proj"]["lora_a"]).T, torch_model.q_proj.lora_a.grad.numpy())
    _close(
        np.asarray(g["q_proj"]["lora_b"]).reshape(R, N * H).T,
        torch_model.q_proj.lora_b.grad.numpy(),
    )


def test_merged_weights_match_torch(twins):
    model, variables, torch_model, x = twins
    merged = jaxlora.merge(variables, alpha=ALPHA)["params"]
    torchlora.merge(torch_model)
    _close(merged["c_attn"]["kernel"], torch_model.c_attn.weight.detach().numpy())
    _close(
        np.asarray(merged["q_proj"]["w"]).reshape(D, N * H).T,
        torch_model.q_proj.weight.detach().numpy(),
    )
    c, _ = model.apply({"params": merged}, jnp.asarray(x))
    _close(c, torch_model(_t(x))[0].detach().numpy())


def test_adapter_file_is_served_by_peft(twins, tmp_path):
    """``save_adapter`` writes each product adapter as its torch ``nn.Linear`` (``lora_A`` =
    lora_a.T over the contracted axes, ``lora_B`` over the free axes in the weight's order):
    the real PEFT, loading the file onto the torch twin's base, gives jaxlora's outputs."""
    import peft

    model, variables, torch_model, x = twins
    jaxlora.save_adapter(variables["params"], tmp_path, CONFIG)
    base = TorchBlock()
    with torch.no_grad():
        for name in ("c_attn", "q_proj"):
            getattr(base, name).weight.copy_(getattr(torch_model, name).weight)
        base.c_attn.bias.copy_(torch_model.c_attn.bias)
    served = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with jaxlora.intercept(CONFIG):
        c, q = model.apply(variables, jnp.asarray(x))
    with torch.no_grad():
        want_c, want_q = served(_t(x))
    _close(c, want_c.numpy())
    _close(np.asarray(q).reshape(B, T, N * H), want_q.numpy())
    # Loaded back into a tree injected with the same layouts (other factors): the same arrays.
    layouts = jaxlora.layouts(model, x)
    other = jaxlora.inject(
        model.init(jax.random.key(0), x), CONFIG, jax.random.key(9), layouts=layouts
    )
    other = other["params"]
    loaded = jaxlora.load_adapter(other, tmp_path)
    for name in ("c_attn", "q_proj"):
        for leaf in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(loaded[name][leaf], variables["params"][name][leaf])
