"""The docs page "Fine-tune a tunix or Hugging Face Flax model, serve the adapter with PEFT"
(docs/thirdparty.md) runs as written against the real tunix, transformers and peft.

Its code blocks are fenced as ```python thirdparty (the main suite's docs test runs only
plain ```python blocks, in an environment without tunix): each such block must be ``SNIPPET``
exactly, and ``SNIPPET`` runs here; then the JAX logits are checked against PEFT's."""

from __future__ import annotations

import numpy as np

from tests.doc_pages import ROOT, code_blocks
from thirdparty_tests.twins import TOL, rel_err

PAGE = ROOT / "docs" / "thirdparty.md"
SNIPPET = """\
import tempfile

import numpy as np, optax, torch
from flax import nnx
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM
from tunix.models.llama3 import model as llama3, params as llama3_params

import jaxlora
from jaxlora import nnx as jnnx

# A Hugging Face checkpoint (here a tiny random one), loaded by tunix's own loader.
hf_dir, adapter_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
LlamaForCausalLM(
    LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )
).save_pretrained(hf_dir)
config = llama3.ModelConfig(
    num_layers=2,
    vocab_size=128,
    embed_dim=64,
    hidden_dim=96,
    num_heads=4,
    head_dim=16,
    num_kv_heads=2,
    rope_theta=1_000_000,
    norm_eps=1e-6,
)
model = llama3_params.create_model_from_safe_tensors(hf_dir, config)

tokens = np.random.default_rng(0).integers(0, 128, (2, 8), dtype=np.int32)
positions = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))
mask = np.broadcast_to(np.tril(np.ones((8, 8), bool)), (2, 8, 8))
inputs = (tokens, positions, None, mask)  # tunix's model(tokens, positions, cache, mask)

# LoRA on the attention projections (tunix Einsums: adapted at their einsum, found by
# tracing the call on `inputs`) and on the MLP's nnx.Linear layers.
lora = jaxlora.LoRAConfig(
    r=8,
    alpha=16,
    targets=[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],
)
jnnx.inject(model, lora, nnx.Rngs(0), inputs=inputs)


def loss_fn(model):
    logits = model(*inputs)[0][:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)  # the base stays
for _ in range(5):
    optimizer.update(model, nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))

jnnx.save_adapter(model, adapter_dir, path_map="tunix.llama3")  # a PEFT adapter

# Serve it with PEFT on the transformers model holding the same base weights.
peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_dir), adapter_dir)
with torch.no_grad():
    want = peft_model(torch.from_numpy(tokens)).logits.numpy()
print(np.abs(np.asarray(model(*inputs)[0]) - want).max())  # ~1e-6
"""


def test_page_blocks_are_the_snippet():
    """Every ```python thirdparty block of the page is the snippet this file runs."""
    blocks = code_blocks(PAGE.read_text(), "python thirdparty")
    assert len(blocks) >= 1, "docs/thirdparty.md has no ```python thirdparty block"
    assert all(block == SNIPPET for block in blocks)


def test_snippet_runs_and_peft_serves_the_adapter():
    namespace: dict = {}
    exec(compile(SNIPPET, "docs/thirdparty.md (python thirdparty)", "exec"), namespace)
    model, inputs, want = namespace["model"], namespace["inputs"], namespace["want"]
    base = namespace["LlamaForCausalLM"].from_pretrained(namespace["hf_dir"])
    y_base = base(namespace["torch"].from_numpy(namespace["tokens"])).logits.detach().numpy()
    y_jax = np.asarray(model(*inputs)[0])
    assert rel_err(y_jax, y_base) > 1e-3  # the trained adapters count
    assert rel_err(y_jax, want) <= TOL
