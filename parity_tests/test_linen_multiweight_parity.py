"""A Linen module with several adapted weights (``w_gate``, ``w_up``, ``w_down`` in one module,
each used by its own einsum) against the real ``peft`` on a torch twin holding three
``nn.Linear`` modules (``gate_proj``, ``up_proj``, ``down_proj``) with the same base weights.

jaxlora saves (``path_map`` naming each weight ``mlp.<weight>``) → ``PeftModel.from_pretrained``
on the twin gives the JAX outputs; ``merge_and_unload`` gives them too, as does
``jaxlora.merge``; an adapter trained (randomized) in PEFT, with its own alpha for the module,
loads into the JAX tree and gives PEFT's outputs. fp32; tolerance 1e-5 of the output scale
(the same sums in another association), inside the 1e-4 the brief asks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from peft import LoraConfig

import jaxlora
from parity_tests.twins import (
    GATED_PATH_MAP,
    GatedBlockTwin,
    gated_peft_adapter,
    peft_load,
    rel_err,
    torch_out,
)
from tests.test_linen_multiweight import (
    ALPHA,
    BASE,
    CONFIG,
    WEIGHTS,
    Block,
    X,
    _injected,
    _randomize,
)

TOL = 1e-5


def _jax_out(lora, config=CONFIG) -> np.ndarray:
    with jaxlora.intercept(config):
        return np.asarray(Block().apply(lora, jnp.asarray(X)))


def test_saved_adapter_gives_peft_the_jax_outputs(tmp_path):
    _, _, lora = _injected()
    lora, _ = _randomize(lora)
    want = _jax_out(lora)
    jaxlora.save_adapter(lora, tmp_path, CONFIG, path_map=GATED_PATH_MAP)
    head = lora["params"]["head"]
    peft_model = peft_load(GatedBlockTwin(BASE, head["kernel"], head["bias"]), tmp_path)
    assert rel_err(torch_out(peft_model, X), want) < TOL
    merged = peft_model.merge_and_unload()
    assert rel_err(torch_out(merged, X), want) < TOL
    merged_jax = jaxlora.merge(lora, alpha=CONFIG.alpha_for)
    assert rel_err(np.asarray(Block().apply(merged_jax, jnp.asarray(X))), want) < TOL
    for w in WEIGHTS:  # PEFT's merged Linear weight is the JAX merged weight, transposed
        torch_weight = getattr(merged.mlp, f"{w.removeprefix('w_')}_proj").weight
        np.testing.assert_allclose(
            torch_weight.detach().numpy().T, merged_jax["params"]["mlp"][w], atol=1e-6
        )


def test_peft_adapter_loads_into_the_jax_tree(tmp_path):
    """A PEFT adapter with its own alpha for the MLP's modules (alpha_pattern): loaded and
    read back with ``read_adapter_config(params=...)``, the JAX tree gives PEFT's outputs."""
    _, variables, lora = _injected()
    head = variables["params"]["head"]
    twin = GatedBlockTwin(BASE, head["kernel"], head["bias"])
    config = LoraConfig(
        r=CONFIG.r,
        lora_alpha=ALPHA,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        alpha_pattern={"mlp.gate_proj": 5.0, "mlp.up_proj": 5.0, "mlp.down_proj": 5.0},
    )
    want = torch_out(gated_peft_adapter(twin, config, tmp_path), X)
    loaded = jaxlora.load_adapter(lora, tmp_path, path_map=GATED_PATH_MAP)
    read = jaxlora.read_adapter_config(tmp_path, path_map=GATED_PATH_MAP, params=loaded)
    assert read.alpha_for("mlp") == 5.0
    got = _jax_out(loaded, read)
    assert rel_err(got, want) < TOL
    # Read without the tree, the patterns are keyed by '<path>.<weight>', which the module
    # (one alpha) would not see: refused at the call, never the default alpha.
    keyed = jaxlora.read_adapter_config(tmp_path, path_map=GATED_PATH_MAP)
    with pytest.raises(ValueError, match=r"alpha_pattern gives weight 'mlp.w_down' 5.0, but"):
        _jax_out(loaded, keyed)
    with pytest.raises(ValueError, match=r"merge: layer 'mlp': the config's alpha_pattern"):
        jaxlora.merge(loaded, alpha=keyed.alpha_for)
    merged = jaxlora.merge(loaded, alpha=read.alpha_for)
    assert rel_err(np.asarray(Block().apply(merged, jnp.asarray(X))), want) < TOL
    assert rel_err(_jax_out(lora), want) > 1e-2  # the adapter matters
    # Saved again from JAX: the same tensors PEFT wrote, exactly.
    jaxlora.save_adapter(loaded, tmp_path / "again", read, path_map=GATED_PATH_MAP)
    from safetensors.numpy import load_file

    theirs = load_file(tmp_path / "adapter_model.safetensors")
    ours = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value)
    jax.block_until_ready(got)
