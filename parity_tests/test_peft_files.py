"""Adapter files against the real ``peft`` package, both directions, fp32 and bf16.

jaxlora (Linen, NNX) and torchlora save → ``PeftModel.from_pretrained`` loads with no warning
and gives the same outputs; PEFT's ``save_pretrained`` (non-zero A and B) → each loads it and
gives PEFT's outputs. On a plain torch model and on the twin GPT.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import nnx
from peft import LoraConfig, get_peft_model

import jaxlora
import jaxlora.nnx
import torchlora
from jaxlora.models import gpt as jgpt
from parity_tests.twins import peft_load, rel_err
from torchlora.models import gpt as tgpt

GPT_CFG = dict(vocab_size=96, block_size=32, n_layer=2, n_head=4, d_model=64)
TOL = 1e-5  # fp32 forward through the model, as in the GPT parity tests


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query = torch.nn.Linear(12, 16)
        self.value = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.value(torch.tanh(self.query(x)))))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(16, name="query")(x))
        return nn.Dense(5, name="out")(jnp.tanh(nn.Dense(16, name="value")(x)))


class NnxNet(nnx.Module):
    def __init__(self) -> None:
        rngs = nnx.Rngs(0)
        self.query, self.value = nnx.Linear(12, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)
        self.out = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.value(jnp.tanh(self.query(x)))))


def _net_params(model: torch.nn.Module) -> dict:
    return {
        name: jaxlora.from_torch(getattr(model, name).state_dict())
        for name in ("query", "value", "out")
    }


X = np.random.default_rng(0).standard_normal((4, 12)).astype("f4")
TOKENS = np.random.default_rng(1).integers(0, GPT_CFG["vocab_size"], (2, 24))


def _random_adapter(params, dtype, seed=2):
    """Non-zero A and B, in ``dtype``."""
    key = iter(jax.random.split(jax.random.key(seed), 64))

    def fill(path, value):
        if path[-1].key in ("lora_a", "lora_b"):
            return (jax.random.normal(next(key), value.shape) * 0.2).astype(dtype)
        return value

    return jax.tree_util.tree_map_with_path(fill, params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_linen_adapter_loads_in_peft_plain_model(tmp_path, dtype):
    torch_model = TorchNet()
    config = jaxlora.LoRAConfig(r=4, alpha=8, targets=["query", "value"])
    params = _random_adapter(
        jaxlora.inject(_net_params(torch_model), config, jax.random.key(0)), dtype
    )
    jaxlora.save_adapter(params, tmp_path, config)
    with jaxlora.intercept(config):
        y_jax = LinenNet().apply({"params": params}, X)
    y_peft = peft_load(torch_model, tmp_path)(torch.from_numpy(X))
    assert rel_err(y_jax, y_peft) <= TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_linen_and_nnx_adapters_load_in_peft_gpt(tmp_path, dtype):
    torch_model = tgpt.GPT(tgpt.GPTConfig(**GPT_CFG))
    params = jgpt.from_torch_state_dict(torch_model.state_dict())
    config = jaxlora.LoRAConfig(
        r=8, alpha=16, targets=["query", "value"], rank_pattern={"blocks_1.attn.value": 2}
    )
    params = _random_adapter(jaxlora.inject(params, config, jax.random.key(0)), dtype)
    jaxlora.save_adapter(params, tmp_path / "linen", config)
    with jaxlora.intercept(config):
        y_jax = jgpt.GPT(jgpt.GPTConfig(**GPT_CFG)).apply({"params": params}, TOKENS)
    peft_model = peft_load(copy.deepcopy(torch_model), tmp_path / "linen")
    assert peft_model.base_model.model.blocks_1.attn.value.lora_A["default"].weight.shape[0] == 2
    assert rel_err(y_jax, peft_model(torch.from_numpy(TOKENS))) <= TOL

    nnx_model = jgpt.NnxGPT(jgpt.GPTConfig(**GPT_CFG), rngs=nnx.Rngs(0))
    jaxlora.nnx.inject(nnx_model, config, nnx.Rngs(1))
    jgpt.load_nnx(nnx_model, params)
    jaxlora.nnx.save_adapter(nnx_model, tmp_path / "nnx")  # config remembered by inject
    peft_model = peft_load(copy.deepcopy(torch_model), tmp_path / "nnx")
    assert rel_err(nnx_model(jnp.asarray(TOKENS)), peft_model(torch.from_numpy(TOKENS))) <= TOL


def test_torchlora_adapter_loads_in_peft(tmp_path):
    base = tgpt.GPT(tgpt.GPTConfig(**GPT_CFG))
    model = torchlora.inject(
        copy.deepcopy(base),
        torchlora.LoRAConfig(
            r=4, alpha=8, targets=r"blocks_\d\.attn\.(query|value)", use_rslora=True
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.2)
    torchlora.save_adapter(model, tmp_path)
    peft_model = peft_load(base, tmp_path)
    assert rel_err(model(torch.from_numpy(TOKENS)), peft_model(torch.from_numpy(TOKENS))) <= TOL


def _peft_saved(base, directory, dtype, **lora_kwargs):
    peft_model = get_peft_model(base, LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)  # non-zero A and B
                p.copy_(p.to(dtype).to(p.dtype))  # exactly representable in ``dtype``
    if dtype != torch.float32:
        for name, module in peft_model.named_modules():
            if name.endswith(("lora_A", "lora_B")):
                module.to(dtype)
    peft_model.save_pretrained(str(directory))
    return peft_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peft_adapter_loads_in_all_three_plain_model(tmp_path, dtype):
    peft_model = _peft_saved(
        TorchNet(),
        tmp_path,
        dtype,
        r=4,
        lora_alpha=6,
        target_modules=["query", "value"],
        rank_pattern={"value": 2},
        alpha_pattern={"value": 3},
    )
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    peft_model.eval()
    y_peft_bf16 = peft_model(torch.from_numpy(X)).detach()  # PEFT runs the branch in bf16 ...
    peft_model.float()  # ... so compare with the same (exactly bf16) weights at fp32 as well
    y_peft = peft_model(torch.from_numpy(X)).detach()
    # bf16 compute keeps 8 bits: 1.5e-2 as in the bf16 forward test (measured 1.9e-3).
    assert rel_err(y_peft_bf16, y_peft) <= (1.5e-2 if dtype == torch.bfloat16 else 0)

    plain = _net_params(TorchNet())
    loaded = jaxlora.load_adapter(plain, tmp_path)
    config = jaxlora.read_adapter_config(tmp_path, path_map=None)  # it has patterns
    assert loaded["value"]["lora_a"].shape == (16, 2) and config.alpha_for("value") == 3
    with jaxlora.intercept(config):
        assert rel_err(LinenNet().apply({"params": loaded}, X), y_peft) <= TOL

    nnx_model = NnxNet()
    for name, layer in plain.items():
        for leaf, value in layer.items():
            getattr(getattr(nnx_model, name), leaf)[...] = value
    jaxlora.nnx.load_adapter(nnx_model, tmp_path)
    assert isinstance(nnx_model.value, jaxlora.nnx.LoRALinear)
    assert rel_err(nnx_model(jnp.asarray(X)), y_peft) <= TOL

    torch_model = torchlora.load_adapter(TorchNet(), tmp_path)
    assert isinstance(torch_model.value, torchlora.Linear) and torch_model.value.scaling == 1.5
    assert rel_err(torch_model(torch.from_numpy(X)), y_peft) <= TOL


def test_peft_adapter_loads_in_all_three_gpt(tmp_path):
    base = tgpt.GPT(tgpt.GPTConfig(**GPT_CFG))
    peft_model = _peft_saved(
        copy.deepcopy(base),
        tmp_path,
        torch.float32,
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
    ).eval()
    y_peft = peft_model(torch.from_numpy(TOKENS))
    params = jgpt.from_torch_state_dict(base.state_dict())
    loaded = jaxlora.load_adapter(params, tmp_path)
    with jaxlora.intercept(jaxlora.read_adapter_config(tmp_path)):
        y_linen = jgpt.GPT(jgpt.GPTConfig(**GPT_CFG)).apply({"params": loaded}, TOKENS)
    assert rel_err(y_linen, y_peft) <= TOL
    nnx_model = jgpt.load_nnx(jgpt.NnxGPT(jgpt.GPTConfig(**GPT_CFG), rngs=nnx.Rngs(0)), params)
    jaxlora.nnx.load_adapter(nnx_model, tmp_path)
    assert rel_err(nnx_model(jnp.asarray(TOKENS)), y_peft) <= TOL
    torch_model = torchlora.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel_err(torch_model(torch.from_numpy(TOKENS)), y_peft) <= TOL
