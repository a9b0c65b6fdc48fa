"""Scanned twin GPTs (Linen ``nn.scan``, NNX ``nnx.vmap`` + ``nnx.scan``) against the torch twin
with the same weights and LoRA adapters, through the existing converters."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx

import jaxlora
import jaxlora.nnx
import torchlora
from jaxlora.models import gpt as jgpt
from parity_tests.twins import rel_err
from torchlora.models import gpt as tgpt

CFG = dict(vocab_size=96, block_size=32, n_layer=3, n_head=4, d_model=64)
LORA = dict(r=8, alpha=16, targets=["query", "value", "fc"])
TOL = 1e-5  # fp32, as parity_tests/test_gpt.py


def _tokens(seed: int) -> np.ndarray:
    starts = np.random.default_rng(seed).integers(0, CFG["vocab_size"], (4, 1))
    return (starts + np.arange(17)) % CFG["vocab_size"]


def _torch_twin() -> tgpt.GPT:
    torch.manual_seed(0)
    model = tgpt.GPT(tgpt.GPTConfig(**CFG))
    torchlora.inject(model, torchlora.LoRAConfig(**LORA))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _scanned_params(model: tgpt.GPT) -> dict:
    params = jgpt.from_torch_state_dict(model.state_dict())  # blocks_0, blocks_1, ...
    return jgpt.stack_blocks(params, CFG["n_layer"])


def _linen_loss(params, tokens):
    model = jgpt.ScanGPT(jgpt.GPTConfig(**CFG), remat=True)
    with jaxlora.intercept(jaxlora.LoRAConfig(**LORA)):
        logits = model.apply({"params": params}, tokens[:, :-1])
    return logits, optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def test_scanned_linen_and_nnx_match_torch_logits_and_grads():
    import jax

    model = _torch_twin()
    tokens = _tokens(0)
    t = torch.from_numpy(tokens)
    logits_t = model(t[:, :-1])
    loss_t = F.cross_entropy(logits_t.reshape(-1, logits_t.shape[-1]), t[:, 1:].reshape(-1))
    loss_t.backward()
    params = _scanned_params(model)
    logits_l, _ = _linen_loss(params, jnp.asarray(tokens))
    assert rel_err(logits_l, logits_t.detach()) <= TOL
    # the adapters matter
    base = jaxlora.split(params)[1]
    assert (
        rel_err(
            jgpt.ScanGPT(jgpt.GPTConfig(**CFG)).apply({"params": base}, tokens[:, :-1]),
            logits_t.detach(),
        )
        > 1e-3
    )

    grads = jax.grad(lambda p: _linen_loss(p, jnp.asarray(tokens))[1])(params)
    torch_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    flax_grads: dict = {}
    for name, grad in torch_grads.items():  # torch (r, in) / (out, r) -> Flax (in, r) / (r, out)
        *module, leaf = name.split(".")
        node = flax_grads
        for part in module:
            node = node.setdefault(part, {})
        node[leaf] = grad.numpy().T
    want = jgpt.stack_blocks(flax_grads, CFG["n_layer"])
    adapter = jaxlora.split(grads)[0]
    assert jax.tree.structure(adapter) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(adapter), jax.tree.leaves(want), strict=True):
        assert rel_err(got, expected) <= 1e-4

    nnx_model = jgpt.NnxScanGPT(jgpt.GPTConfig(**CFG), rngs=nnx.Rngs(0))
    jaxlora.nnx.inject(nnx_model, jaxlora.LoRAConfig(**LORA), nnx.Rngs(1))
    jgpt.load_nnx(nnx_model, params)
    assert rel_err(nnx_model(jnp.asarray(tokens[:, :-1])), logits_t.detach()) <= TOL


def test_scanned_merge_matches_torch_merge():
    model = _torch_twin()
    tokens = _tokens(1)
    params = _scanned_params(model)
    merged = jaxlora.merge(params, alpha=LORA["alpha"])
    torchlora.merge(model)
    want = model(torch.from_numpy(tokens[:, :-1])).detach()
    got = jgpt.ScanGPT(jgpt.GPTConfig(**CFG)).apply({"params": merged}, tokens[:, :-1])
    assert rel_err(got, want) <= TOL
