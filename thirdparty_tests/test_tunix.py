"""jaxlora on tunix 0.1.7's own NNX Llama3, Qwen3 and Gemma3 (unmodified), served by the real
``peft`` on transformers' torch twins holding the same base weights.

Each twin: a tiny transformers model with random weights is saved with ``save_pretrained``
and loaded into the tunix model by tunix's own safetensors loader (base logits agree). LoRA on
the attention projections (tunix's ``Einsum`` weights, adapted at their einsum: q, k, v, o, or
Gemma3's fused kv/qkv) and the MLP; 5 optax steps train only the adapters (the base stays bit
for bit); the file written with the ready map (``path_map="tunix.llama3"``, …) gives, in
``PeftModel.from_pretrained``, the JAX logits; jaxlora's merge, the unmerged model and PEFT's
``merge_and_unload`` agree; the file loads back exactly; and an adapter trained with PEFT on
the torch model loads into the JAX model with PEFT's logits (a fused JAX weight holds one
lora_A, so the PEFT model trains its modules with one shared lora_A).
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model

import jaxlora
from jaxlora import nnx as jnnx
from parity_tests.twins import peft_load
from thirdparty_tests.twins import (
    TOL,
    TunixTwin,
    base_state,
    lora_state,
    lora_train,
    peft_train,
    rel_err,
    torch_logits,
    trees_equal,
    tunix_inputs,
    tunix_twins,
)

R, ALPHA = 4, 8.0
TWINS = tunix_twins()


@pytest.fixture(scope="module", params=TWINS, ids=[t.name for t in TWINS])
def twin(request, tmp_path_factory):
    """(twin, HF checkpoint directory, the HF model's logits)."""
    spec: TunixTwin = request.param
    directory = tmp_path_factory.mktemp(spec.name)
    hf = spec.hf_model()
    hf.save_pretrained(str(directory))
    return spec, str(directory), torch_logits(hf)


def _hf(spec: TunixTwin, directory: str) -> torch.nn.Module:
    return type(spec.hf_model()).from_pretrained(directory).eval()


def _logits(model: nnx.Module) -> np.ndarray:
    return np.asarray(model(*tunix_inputs())[0])


def _injected(spec: TunixTwin, directory: str, seed: int = 0) -> nnx.Module:
    model = spec.tunix_load(directory)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=list(spec.jax_targets))
    return jnnx.inject(model, config, nnx.Rngs(seed), inputs=tunix_inputs())


def test_base_logits_agree(twin):
    spec, directory, want = twin
    assert rel_err(_logits(spec.tunix_load(directory)), want) <= TOL


def test_jax_trained_adapter_is_served_by_peft(twin, tmp_path):
    spec, directory, y_base = twin
    model = _injected(spec, directory)
    base = base_state(model)
    losses = lora_train(model)
    assert losses[-1] < losses[0], losses
    assert trees_equal(base_state(model), base)  # only the adapters trained
    y_jax = _logits(model)
    assert rel_err(y_jax, y_base) > 1e-3  # the adapters count

    jnnx.save_adapter(model, tmp_path, path_map=spec.path_map)
    peft_model = peft_load(_hf(spec, directory), tmp_path)
    assert rel_err(torch_logits(peft_model), y_jax) <= TOL

    other = _injected(spec, directory, seed=9)  # other adapters, replaced by the file's
    jnnx.load_adapter(other, tmp_path, path_map=spec.path_map)
    assert trees_equal(lora_state(other), lora_state(model))
    np.testing.assert_array_equal(_logits(other), y_jax)

    y_peft_merged = torch_logits(peft_model.merge_and_unload())
    jnnx.merge(model)
    assert not nnx.state(model, nnx.LoRAParam)
    y_merged = _logits(model)
    assert rel_err(y_merged, y_jax) <= TOL
    assert rel_err(y_peft_merged, y_jax) <= TOL


def _peft_trained(spec: TunixTwin, directory: str, out) -> np.ndarray:
    """Trains a PEFT adapter on the torch model a few steps (nonzero B), one lora_A shared by
    the torch modules of a fused JAX weight; saves it to ``out``; returns its logits."""
    torch.manual_seed(3)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(spec.torch_targets))
    peft_model = get_peft_model(copy.deepcopy(_hf(spec, directory)), config)
    for layer in peft_model.base_model.model.model.layers:
        shared = getattr(layer.self_attn, spec.fused[0]) if spec.fused else None
        for name in spec.fused[1:]:
            getattr(layer.self_attn, name).lora_A["default"] = shared.lora_A["default"]
    peft_train(peft_model)
    peft_model.save_pretrained(str(out))
    return torch_logits(peft_model.eval())


def test_peft_trained_adapter_loads_in_jax(twin, tmp_path):
    spec, directory, y_base = twin
    want = _peft_trained(spec, directory, tmp_path)
    assert rel_err(want, y_base) > 1e-3
    model = _injected(spec, directory)
    jnnx.load_adapter(model, tmp_path, path_map=spec.path_map)
    assert rel_err(_logits(model), want) <= TOL


MOE = next(t for t in TWINS if t.name == "qwen3_moe")


def test_qwen3_moe_experts_alone_are_served_by_peft_per_expert(tmp_path):
    """Only the MoE weights carry a nonzero adapter: one per expert (lora_a (E, D, r)), written
    as each expert's own torch Linear ``mlp.experts.{e}.{gate,up,down}_proj``."""
    directory = tmp_path / "hf"
    MOE.hf_model().save_pretrained(str(directory))
    y_base = torch_logits(_hf(MOE, str(directory)))
    model = _injected(MOE, str(directory))
    moe = model.layers[0].mlp
    assert moe.gate_proj_lora_a.shape == (4, 64, R) and moe.down_proj_lora_b.shape == (4, R, 64)
    rng = np.random.default_rng(4)
    for layer in model.layers:
        for weight in ("gate_proj", "up_proj", "down_proj"):
            b = layer.mlp.factors(weight)[1]
            b[...] = jnp.asarray(rng.normal(size=b.shape) * 0.3, jnp.float32)
    y_jax = _logits(model)
    assert rel_err(y_jax, y_base) > 1e-3
    out = tmp_path / "adapter"
    jnnx.save_adapter(model, out, path_map=MOE.path_map)
    from safetensors.numpy import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    a = np.asarray(moe.up_proj_lora_a[...])
    for e in range(4):
        key = f"base_model.model.model.layers.0.mlp.experts.{e}.up_proj.lora_A.weight"
        np.testing.assert_array_equal(tensors[key], a[e].T)
    peft_model = peft_load(_hf(MOE, str(directory)), out)
    assert rel_err(torch_logits(peft_model), y_jax) <= TOL
    jnnx.merge(model)
    assert rel_err(_logits(model), y_jax) <= TOL
