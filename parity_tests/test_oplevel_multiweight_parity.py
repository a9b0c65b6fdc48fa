"""A module with several adapted weights (``w_gate``, ``w_up``, ``w_down`` in one NNX module,
each used by its own einsum) against the real ``peft`` on a torch twin holding three
``nn.Linear`` modules (``gate_proj``, ``up_proj``, ``down_proj``) with the same base weights.

jaxlora saves (``path_map`` naming each weight ``mlp.<weight>``) → ``PeftModel.from_pretrained``
on the twin gives the JAX outputs; ``merge_and_unload`` gives them too; an adapter trained
(randomized) in PEFT loads into the JAX model and gives PEFT's outputs. fp32; tolerance 1e-5
of the output scale (the same sums in another association), inside the 1e-4 the brief asks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from peft import LoraConfig

from jaxlora import LoRAConfig
from jaxlora import nnx as jnnx
from parity_tests.twins import (
    GATED_PATH_MAP,
    GatedBlockTwin,
    gated_peft_adapter,
    peft_load,
    rel_err,
    torch_out,
)
from tests.test_oplevel_multiweight import ALPHA, BASE, Block, R, X, _randomize

TOL = 1e-5


def _torch_twin(jax_model: Block) -> GatedBlockTwin:
    return GatedBlockTwin(BASE, jax_model.head.kernel[...], jax_model.head.bias[...])


def _jax_model() -> Block:
    model = Block()
    config = LoRAConfig(r=R, alpha=ALPHA, targets=["mlp"])
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(jnp.asarray(X),))
    return model


def test_saved_adapter_gives_peft_the_jax_outputs(tmp_path):
    model = _jax_model()
    _randomize(model.mlp)
    want = np.asarray(model(jnp.asarray(X)))
    jnnx.save_adapter(model, tmp_path, path_map=GATED_PATH_MAP)
    peft_model = peft_load(_torch_twin(model), tmp_path)
    assert rel_err(torch_out(peft_model, X), want) < TOL
    merged = peft_model.merge_and_unload()
    assert rel_err(torch_out(merged, X), want) < TOL
    jnnx.merge(model)
    assert rel_err(np.asarray(model(jnp.asarray(X))), want) < TOL


def test_peft_adapter_loads_into_the_jax_model(tmp_path):
    twin_model = _jax_model()
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["gate_proj", "up_proj", "down_proj"])
    want = torch_out(gated_peft_adapter(_torch_twin(twin_model), config, tmp_path), X)
    model = _jax_model()
    jnnx.load_adapter(model, tmp_path, path_map=GATED_PATH_MAP)
    got = np.asarray(model(jnp.asarray(X)))
    assert rel_err(got, want) < TOL
    assert np.abs(want - torch_out(_torch_twin(model), X)).max() > 1e-3  # the adapter matters
    jax.block_until_ready(got)
