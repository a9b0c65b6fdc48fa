"""LoRA on a tied lm_head: tunix 0.1.7's Gemma3, whose ``Embedder`` holds one weight
``input_embedding`` (V, D) read by row lookups (``encode``: ``W[tokens] * sqrt(D)``) and
multiplied for the logits (``decode``: ``x @ W.T``), against transformers' ``Gemma3ForCausalLM``
(``tie_word_embeddings=True``: ``lm_head.weight`` is ``embed_tokens.weight``) and the real
``peft``, whose ``target_modules=[..., "lm_head"]`` wraps the lm_head Linear only: the logits
get ``s·B·A·x``, the embedding lookups stay the base's.

jaxlora refuses the embedder unless ``inject(..., tied_products={"embedder": "decode"})``
asks for its product; then it trains (5 optax steps, base bit for bit), is written with the
ready map ``"tunix.gemma3"`` as PEFT's ``lm_head`` adapter, served by ``PeftModel`` with the
JAX logits, read back exactly, and a PEFT-trained lm_head adapter gives PEFT's logits in JAX.
Merging is refused: PEFT's ``merge_and_unload`` adds the delta to the one shared weight (with
a warning), which changes the lookups too (checked below: its merged logits differ).
"""

from __future__ import annotations

import copy
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file

import jaxlora
from jaxlora import nnx as jnnx
from thirdparty_tests.twins import (
    TOL,
    VOCAB,
    _gemma3,
    base_state,
    lora_state,
    lora_train,
    peft_train,
    pure,
    rel_err,
    torch_logits,
    trees_equal,
    tunix_inputs,
)

R, ALPHA, D = 4, 8.0, 64
JAX_TARGETS = ["q_einsum", "kv_einsum", "attn_vec_einsum", "embedder"]
TIED = {"embedder": "decode"}
# PEFT's own warning for any LoRA on a tied lm_head (tuners_utils._check_tied_modules and
# _check_merge_allowed): the adapter is loaded as written, the warning is about merging.
TIE_WARNING = "tie_word_embeddings=True"
HF_MODEL, TUNIX_LOAD = _gemma3(2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3_tied")
    hf = HF_MODEL()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # tied, the default
    hf.save_pretrained(str(directory))
    return str(directory)


def _hf(directory: str) -> torch.nn.Module:
    model = type(HF_MODEL()).from_pretrained(directory).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _logits(model: nnx.Module) -> np.ndarray:
    return np.asarray(model(*tunix_inputs())[0])


def _injected(directory: str, targets=JAX_TARGETS, seed: int = 0) -> nnx.Module:
    model = TUNIX_LOAD(directory)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=list(targets))
    return jnnx.inject(model, config, nnx.Rngs(seed), inputs=tunix_inputs(), tied_products=TIED)


def _peft(base: torch.nn.Module, directory) -> PeftModel:
    """``PeftModel.from_pretrained``, with no warning but PEFT's tied-lm_head one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(directory))
    others = [str(w.message) for w in caught if TIE_WARNING not in str(w.message)]
    assert not others, others
    return model.eval()


def test_embedder_is_refused_without_tied_products(checkpoint):
    model = TUNIX_LOAD(checkpoint)
    before, embedder = pure(nnx.state(model)), model.embedder
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=JAX_TARGETS)
    with pytest.raises(ValueError) as err:
        jnnx.inject(model, config, nnx.Rngs(0), inputs=tunix_inputs())
    message = str(err.value)
    assert "layer 'embedder', weight 'input_embedding' (128, 64)" in message
    assert "row lookups" in message and "tied_products={'embedder'" in message
    assert model.embedder is embedder and not hasattr(model, "lora_config")
    assert trees_equal(pure(nnx.state(model)), before)  # nothing changed, the einsums neither


def test_jax_trained_tied_head_is_served_by_peft(checkpoint, tmp_path):
    model = _injected(checkpoint)
    assert model.embedder.lora_a.shape == (D, R) and model.embedder.lora_b.shape == (R, VOCAB)
    base = base_state(model)
    y_base = _logits(model)  # lora_b = 0: the base model's
    losses = lora_train(model)
    assert losses[-1] < losses[0], losses
    assert trees_equal(base_state(model), base)  # only the adapters trained
    y_jax = _logits(model)
    assert rel_err(y_jax, y_base) > 1e-3

    # The lm_head adapter counts on its own: without it the logits differ.
    lm_b = model.embedder.lora_b[...]
    model.embedder.lora_b[...] = jnp.zeros_like(lm_b)
    assert rel_err(_logits(model), y_jax) > 1e-3
    model.embedder.lora_b[...] = lm_b

    jnnx.save_adapter(model, tmp_path, path_map="tunix.gemma3")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    a, b = (tensors[f"base_model.model.lm_head.lora_{k}.weight"] for k in "AB")
    np.testing.assert_array_equal(a, np.asarray(model.embedder.lora_a[...]).T)  # (r, D)
    np.testing.assert_array_equal(b, np.asarray(lm_b).T)  # (V, r)
    assert not any("embed_tokens" in k for k in tensors)

    peft_model = _peft(_hf(checkpoint), tmp_path)
    assert rel_err(torch_logits(peft_model), y_jax) <= TOL

    other = _injected(checkpoint, seed=9)
    jnnx.load_adapter(other, tmp_path, path_map="tunix.gemma3")
    assert trees_equal(lora_state(other), lora_state(model))
    np.testing.assert_array_equal(_logits(other), y_jax)

    # merge is refused by name, before anything changes.
    state = pure(nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match=r"merge: layer 'embedder': .*tied.*row lookups"):
        jnnx.merge(model)
    assert trees_equal(pure(nnx.state(model, nnx.Param)), state)
    np.testing.assert_array_equal(_logits(model), y_jax)

    # What PEFT does instead: merge_and_unload adds the delta to the shared weight, which moves
    # the embedding lookups as well, so its merged model differs from its unmerged one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{TIE_WARNING}")
        merged = peft_model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert rel_err(torch_logits(merged), y_jax) > 1e-3


def test_peft_trained_lm_head_loads_in_jax(checkpoint, tmp_path):
    torch.manual_seed(3)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "lm_head"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{TIE_WARNING}")
        peft_model = get_peft_model(copy.deepcopy(_hf(checkpoint)), config)
    peft_train(peft_model)
    assert peft_model.base_model.model.lm_head.lora_B["default"].weight.abs().max() > 0
    # PEFT would also write the whole tied embedding matrix ("auto" for a target it counts as
    # an embedding); the adapter alone is what is served.
    peft_model.save_pretrained(str(tmp_path), save_embedding_layers=False)
    want = torch_logits(peft_model.eval())

    model = _injected(checkpoint, targets=["q_einsum", "embedder"])
    jnnx.load_adapter(model, tmp_path, path_map="tunix.gemma3")
    assert rel_err(_logits(model), want) <= TOL
