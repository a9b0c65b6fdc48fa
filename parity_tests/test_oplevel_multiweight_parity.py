"""A module with several adapted weights (``w_gate``, ``w_up``, ``w_down`` in one NNX module,
each used by its own einsum) against the real ``peft`` on a torch twin holding three
``nn.Linear`` modules (``gate_proj``, ``up_proj``, ``down_proj``) with the same base weights.

jaxlora saves (``path_map`` naming each weight ``mlp.<weight>``) → ``PeftModel.from_pretrained``
on the twin gives the JAX outputs; ``merge_and_unload`` gives them too; an adapter trained
(randomized) in PEFT loads into the JAX model and gives PEFT's outputs. fp32; tolerance 1e-5
of the output scale (the same sums in another association), inside the 1e-4 the brief asks.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model

from jaxlora import LoRAConfig
from jaxlora import nnx as jnnx
from parity_tests.twins import rel_err
from tests.test_oplevel_multiweight import ALPHA, BASE, WEIGHTS, Block, R, X, _randomize

TOL = 1e-5
PATH_MAP = {f"mlp.{w}": f"mlp.{w.removeprefix('w_')}_proj" for w in WEIGHTS}


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        d, f = BASE["w_gate"].shape
        self.gate_proj = torch.nn.Linear(d, f, bias=False)
        self.up_proj = torch.nn.Linear(d, f, bias=False)
        self.down_proj = torch.nn.Linear(f, d, bias=False)
        with torch.no_grad():
            for name in ("gate", "up", "down"):
                getattr(self, f"{name}_proj").weight.copy_(
                    torch.from_numpy(BASE[f"w_{name}"].T.copy())
                )

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TorchTwin(torch.nn.Module):
    def __init__(self, jax_model: Block):
        super().__init__()
        self.mlp = TorchMLP()
        kernel = np.asarray(jax_model.head.kernel[...])
        self.head = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(kernel.T.copy()))
            self.head.bias.copy_(torch.tensor(np.asarray(jax_model.head.bias[...])))

    def forward(self, x):
        return self.head(self.mlp(x))


def _jax_model() -> Block:
    model = Block()
    config = LoRAConfig(r=R, alpha=ALPHA, targets=["mlp"])
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(jnp.asarray(X),))
    return model


def _torch_out(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


def test_saved_adapter_gives_peft_the_jax_outputs(tmp_path):
    model = _jax_model()
    _randomize(model.mlp)
    want = np.asarray(model(jnp.asarray(X)))
    jnnx.save_adapter(model, tmp_path, path_map=PATH_MAP)
    twin = TorchTwin(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a key PEFT did not load is a warning: fail on it
        peft_model = PeftModel.from_pretrained(twin, tmp_path)
    assert rel_err(_torch_out(peft_model), want) < TOL
    merged = peft_model.merge_and_unload()
    assert rel_err(_torch_out(merged), want) < TOL
    jnnx.merge(model)
    assert rel_err(np.asarray(model(jnp.asarray(X))), want) < TOL


def test_peft_adapter_loads_into_the_jax_model(tmp_path):
    twin_model = _jax_model()
    twin = TorchTwin(twin_model)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(twin, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    peft_model.save_pretrained(tmp_path)
    want = _torch_out(peft_model)
    model = _jax_model()
    jnnx.load_adapter(model, tmp_path, path_map=PATH_MAP)
    got = np.asarray(model(jnp.asarray(X)))
    assert rel_err(got, want) < TOL
    assert np.abs(want - _torch_out(TorchTwin(model))).max() > 1e-3  # the adapter matters
    jax.block_until_ready(got)
