"""tunix's own trainer (``tunix.sft.peft_trainer.PeftTrainer``) trains a jaxlora-adapted tunix
Llama3 with the attention projections (tunix ``Einsum`` weights, adapted at their einsum) and
the MLP adapted: it finds LoRA mode through ``nnx.LoRAParam`` (its optimizer then holds only
the adapters), the loss falls, the base stays bit for bit, and the trained adapter is served by
the real ``peft`` with the JAX logits. Its LoRA-only orbax checkpoint restores into a fresh
adapted model and resumes exactly where an uninterrupted run goes."""

from __future__ import annotations

import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tunix.sft import peft_trainer, utils

import jaxlora
from jaxlora import nnx as jnnx
from parity_tests.twins import peft_load
from thirdparty_tests.twins import (
    TOKENS,
    TOL,
    base_state,
    lora_state,
    rel_err,
    torch_logits,
    trees_equal,
    tunix_inputs,
    tunix_twins,
)

LLAMA3 = next(t for t in tunix_twins() if t.name == "llama3")


def _model_input(x: peft_trainer.TrainingInput) -> dict:
    """tunix's ``_default_loss_fn`` arguments from a batch (causal mask from the input mask)."""
    return {
        "input_tokens": x.input_tokens,
        "input_mask": x.input_mask,
        "positions": utils.build_positions_from_mask(x.input_mask),
        "attention_mask": utils.make_causal_attn_mask(x.input_mask),
    }


BATCH = peft_trainer.TrainingInput(
    input_tokens=TOKENS.astype(np.int32), input_mask=np.ones(TOKENS.shape, bool)
)


def _adapted(directory, seed: int = 0) -> nnx.Module:
    model = LLAMA3.tunix_load(str(directory))
    config = jaxlora.LoRAConfig(r=4, alpha=8.0, targets=list(LLAMA3.jax_targets))
    return jnnx.inject(model, config, nnx.Rngs(seed), inputs=tunix_inputs())


def _train(model: nnx.Module, steps: int, checkpoints=None) -> peft_trainer.PeftTrainer:
    options = None if checkpoints is None else ocp.CheckpointManagerOptions(save_interval_steps=4)
    training = peft_trainer.TrainingConfig(
        eval_every_n_steps=100,
        max_steps=steps,
        pbar_description=None,
        checkpoint_root_directory=None if checkpoints is None else str(checkpoints),
        checkpointing_options=options,
    )
    trainer = peft_trainer.PeftTrainer(model, optax.adam(1e-2), training)
    trainer.with_gen_model_input_fn(_model_input).train([BATCH] * steps)
    return trainer


def test_peft_trainer_trains_attention_adapters(tmp_path):
    directory = tmp_path / "hf"
    hf = LLAMA3.hf_model()
    hf.save_pretrained(str(directory))
    model = _adapted(directory)
    base = base_state(model)
    assert utils.is_lora_enabled(model)

    trainer = _train(model, 8)
    losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses
    assert trees_equal(base_state(model), base)

    y_jax = np.asarray(model(*tunix_inputs())[0])
    assert rel_err(y_jax, torch_logits(hf)) > 1e-3
    jnnx.save_adapter(model, tmp_path / "adapter", path_map="tunix.llama3")
    peft_model = peft_load(type(hf).from_pretrained(str(directory)).eval(), tmp_path / "adapter")
    assert rel_err(torch_logits(peft_model), y_jax) <= TOL

    # 4 steps, checkpointed; a fresh model (other adapters) restores them and runs to 8.
    _train(_adapted(directory), 4, tmp_path / "ckpt")
    resumed = _adapted(directory, seed=5)
    _train(resumed, 8, tmp_path / "ckpt")
    assert trees_equal(lora_state(resumed), lora_state(model))
    assert trees_equal(base_state(resumed), base)
