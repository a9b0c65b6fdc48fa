"""Scanned twin GPTs (Linen ``nn.scan``, NNX ``nnx.vmap`` + ``nnx.scan``) against the torch twin
with the same weights and LoRA adapters, through the existing converters."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


NAMES = {"blocks": "blocks_{i}"}  # the torch twin names its layers blocks_0, blocks_1, ...


def _torch_base() -> tgpt.GPT:
    torch.manual_seed(0)
    return tgpt.GPT(tgpt.GPTConfig(**CFG))


def _scan_logits(params, tokens, config):
    with jaxlora.intercept(config):
        return jgpt.ScanGPT(jgpt.GPTConfig(**CFG)).apply({"params": params}, tokens)


def _peft_saved(directory, *, seed: int):
    """A real PEFT adapter (key, proj; random B) on the torch twin base, saved to ``directory``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        _torch_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["key", "proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.05)
    peft_model.save_pretrained(str(directory))
    return peft_model


def test_stacked_adapter_file_loads_in_real_peft_and_back(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    tokens = _tokens(2)[:, :-1]
    params = _scanned_params(_torch_twin())
    config = jaxlora.LoRAConfig(**LORA)
    with pytest.raises(ValueError, match="stacked over 1 leading layer axis"):
        jaxlora.save_adapter(params, tmp_path / "refused", config)
    jaxlora.save_adapter(params, tmp_path / "a", config, layer_names=NAMES)
    peft_model = PeftModel.from_pretrained(_torch_base(), str(tmp_path / "a"))
    want = peft_model(torch.from_numpy(tokens)).detach()
    assert rel_err(_scan_logits(params, tokens, config), want) <= TOL

    # PEFT's own per-layer file into the scanned base: stacked on load
    peft_model = _peft_saved(tmp_path / "b", seed=5)
    want = peft_model(torch.from_numpy(tokens)).detach()
    base = jaxlora.split(params)[1]
    loaded = jaxlora.load_adapter(base, tmp_path / "b", layer_names=NAMES)
    key = loaded["blocks"]["attn"]["key"]
    assert key["lora_a"].shape == (CFG["n_layer"], CFG["d_model"], 4)
    assert loaded["blocks"]["attn"]["key"]["kernel"] is base["blocks"]["attn"]["key"]["kernel"]
    peft_config = jaxlora.read_adapter_config(tmp_path / "b", path_map=None)
    assert rel_err(_scan_logits(loaded, tokens, peft_config), want) <= TOL

    # a file covering only some layers of the stack is refused
    partial = get_peft_model(
        _torch_base(), LoraConfig(r=4, lora_alpha=8, target_modules=r"blocks_[01]\.attn\.key")
    )
    partial.save_pretrained(str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"covers only some layers of the stack 'blocks'"):
        jaxlora.load_adapter(base, tmp_path / "c", layer_names=NAMES)


def _nnx_scanned(params) -> nnx.Module:
    model = jgpt.NnxScanGPT(jgpt.GPTConfig(**CFG), rngs=nnx.Rngs(0))
    jaxlora.nnx.inject(model, jaxlora.LoRAConfig(**LORA), nnx.Rngs(1))
    return jgpt.load_nnx(model, params)


def test_nnx_stacked_adapter_file_loads_in_real_peft_and_back(tmp_path):
    """NNX stacks are written as PEFT's per-layer keys and read back stacked (the file names
    the torch twin's blocks_{i}); before this, save_adapter wrote one (r, L·in) tensor."""
    from peft import LoraConfig, PeftModel, get_peft_model

    tokens = _tokens(3)[:, :-1]
    params = _scanned_params(_torch_twin())
    model = _nnx_scanned(params)
    jaxlora.nnx.save_adapter(model, tmp_path / "a", layer_names=NAMES)
    peft_model = PeftModel.from_pretrained(_torch_base(), str(tmp_path / "a"))
    want = peft_model(torch.from_numpy(tokens)).detach()
    assert rel_err(model(jnp.asarray(tokens)), want) <= TOL

    peft_model = _peft_saved(tmp_path / "b", seed=6)
    want = peft_model(torch.from_numpy(tokens)).detach()
    base = jaxlora.split(params)[1]
    plain = jgpt.load_nnx(jgpt.NnxScanGPT(jgpt.GPTConfig(**CFG), rngs=nnx.Rngs(0)), base)
    jaxlora.nnx.load_adapter(plain, tmp_path / "b", layer_names=NAMES)
    assert plain.blocks.attn.key.lora_a.shape == (CFG["n_layer"], CFG["d_model"], 4)
    assert rel_err(plain(jnp.asarray(tokens)), want) <= TOL
    # into an injected stacked model (same targets): the adapters are replaced
    injected = jgpt.load_nnx(jgpt.NnxScanGPT(jgpt.GPTConfig(**CFG), rngs=nnx.Rngs(0)), base)
    jaxlora.nnx.inject(
        injected, jaxlora.LoRAConfig(r=4, alpha=2, targets=["key", "proj"]), nnx.Rngs(2)
    )
    jaxlora.nnx.load_adapter(injected, tmp_path / "b", layer_names=NAMES)
    assert rel_err(injected(jnp.asarray(tokens)), want) <= TOL
    # and it saves back to the same tensors
    jaxlora.nnx.save_adapter(injected, tmp_path / "c", layer_names=NAMES)
    from safetensors.numpy import load_file

    ours = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])

    # a file covering only some layers of the stack is refused, nothing changed
    partial = get_peft_model(
        _torch_base(), LoraConfig(r=4, lora_alpha=8, target_modules=r"blocks_[01]\.attn\.key")
    )
    partial.save_pretrained(str(tmp_path / "d"))
    before = np.asarray(injected.blocks.attn.key.lora_a[...])
    with pytest.raises(ValueError, match=r"missing tensors for layer\(s\) \['blocks_0\.mlp"):
        jaxlora.nnx.load_adapter(injected, tmp_path / "d", layer_names=NAMES)
    np.testing.assert_array_equal(np.asarray(injected.blocks.attn.key.lora_a[...]), before)
    plain = jgpt.load_nnx(jgpt.NnxScanGPT(jgpt.GPTConfig(**CFG), rngs=nnx.Rngs(0)), base)
    with pytest.raises(ValueError, match=r"'blocks\.attn\.key' needs all 3 layers' adapters"):
        jaxlora.nnx.load_adapter(plain, tmp_path / "d", layer_names=NAMES)
    assert type(plain.blocks.attn.key) is nnx.Linear
