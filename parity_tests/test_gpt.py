"""The twin GPT in torch, Linen and NNX: base models, injected LoRA, 50-step fine-tune, merge."""

from __future__ import annotations

import jax
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

CFG = dict(vocab_size=96, block_size=32, n_layer=2, n_head=4, d_model=64)
LORA = dict(r=8, alpha=16, targets=["query", "value"])
STEPS, BATCH, SEQ = 50, 8, 32
# fp32 through 2 blocks of attention, LayerNorm and softmax: measured ~3e-7 of the logit scale.
TOL = 1e-5


def _tokens(seed: int, n: int = BATCH) -> np.ndarray:
    """Counting sequences (t, t+1, t+2, ... mod vocab) from random starts: learnable."""
    starts = np.random.default_rng(seed).integers(0, CFG["vocab_size"], (n, 1))
    return (starts + np.arange(SEQ + 1)) % CFG["vocab_size"]


def _torch_base() -> tgpt.GPT:
    torch.manual_seed(0)
    return tgpt.GPT(tgpt.GPTConfig(**CFG))


def _twins(with_lora: bool):
    """The torch GPT (optionally injected, with random non-zero adapters) and its two twins."""
    model = _torch_base()
    if with_lora:
        torchlora.inject(model, torchlora.LoRAConfig(**LORA))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_b"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    params = jgpt.from_torch_state_dict(model.state_dict())
    cfg = jgpt.GPTConfig(**CFG)
    nnx_model = jgpt.NnxGPT(cfg, rngs=nnx.Rngs(0))
    if with_lora:
        jaxlora.nnx.inject(nnx_model, jaxlora.LoRAConfig(**LORA), nnx.Rngs(1))
    jgpt.load_nnx(nnx_model, params)
    return model, params, nnx_model


def _linen_apply(params, tokens, lora: bool):
    model = jgpt.GPT(jgpt.GPTConfig(**CFG))
    if not lora:
        return model.apply({"params": params}, tokens)
    with jaxlora.intercept(jaxlora.LoRAConfig(**LORA)):
        return model.apply({"params": params}, tokens)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora-query-value"])
def test_forward_parity(lora):
    model, params, nnx_model = _twins(lora)
    tokens = _tokens(0)[:, :SEQ]
    y_torch = model(torch.from_numpy(tokens))
    assert rel_err(_linen_apply(params, tokens, lora), y_torch) <= TOL
    assert rel_err(nnx_model(jnp.asarray(tokens)), y_torch) <= TOL
    if lora:  # the adapters really change the output
        base = _twins(False)[0]
        assert rel_err(base(torch.from_numpy(tokens)), y_torch) > 1e-3


def test_injected_layers_and_parameter_report_agree():
    model, params, nnx_model = _twins(True)
    expected = {f"blocks_{i}.attn.{n}" for i in range(2) for n in ("query", "value")}
    assert {n for n, m in model.named_modules() if isinstance(m, torchlora.Linear)} == expected
    assert {".".join(p) for p, _ in jaxlora.tree.iter_lora_layers(params)} == expected
    assert {
        ".".join(map(str, p))
        for p, m in nnx.iter_modules(nnx_model)
        if isinstance(m, jaxlora.nnx.LoRALinear)
    } == expected
    reports = [
        torchlora.trainable_parameters(model),
        jaxlora.trainable_parameters(params),
        jaxlora.nnx.trainable_parameters(nnx_model),
    ]
    assert len({(r.trainable, r.total, r.percent, str(r)) for r in reports}) == 1
    total = sum(p.numel() for p in model.parameters())
    assert reports[0].trainable == 4 * 8 * (64 + 64) and reports[0].total == total
    assert str(reports[0]).startswith("trainable params: 4,096 || all params: ")


def _train_torch(model, batches):
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01
    )
    losses = []
    for tokens in batches:
        t = torch.from_numpy(tokens)
        logits = model(t[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def _ce(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _train_linen(params, batches):
    model, config = jgpt.GPT(jgpt.GPTConfig(**CFG)), jaxlora.LoRAConfig(**LORA)
    tx = jaxlora.freeze_base(optax.adamw(3e-3, weight_decay=0.01))

    @jax.jit
    @jaxlora.intercept(config)
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(
            lambda p: _ce(model.apply({"params": p}, tokens[:, :-1]), tokens)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for tokens in batches:
        params, opt_state, loss = step(params, opt_state, tokens)
        losses.append(float(loss))
    return params, np.array(losses)


def _train_nnx(model, batches):
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.01), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(
            lambda m: _ce(m(tokens[:, :-1]), tokens), argnums=nnx.DiffState(0, nnx.LoRAParam)
        )(model)
        optimizer.update(model, grads)
        return loss

    return np.array([float(step(model, optimizer, jnp.asarray(t))) for t in batches])


def test_finetune_parity_and_frozen_base():
    model, params, nnx_model = _twins(True)
    with torch.no_grad():  # the usual start: B = 0
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.zero_()
    params = jgpt.from_torch_state_dict(model.state_dict())
    jgpt.load_nnx(nnx_model, params)
    base_start = jaxlora.split(params)[1]
    torch_start = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [_tokens(100 + i) for i in range(STEPS)]

    torch_losses = _train_torch(model, batches)
    linen_params, linen_losses = _train_linen(params, batches)
    nnx_losses = _train_nnx(nnx_model, batches)

    assert torch_losses[-5:].mean() < torch_losses[:5].mean() - 0.05  # it learned
    # 50 AdamW steps through softmax attention amplify fp32 rounding. Measured: 1e-6 relative
    # on the losses, 8e-6 on the adapters; the bounds leave >= 12x headroom.
    for losses in (linen_losses, nnx_losses):
        assert np.max(np.abs(losses - torch_losses) / torch_losses) <= 1e-4
    trained = jgpt.from_torch_state_dict(model.state_dict())
    nnx_state = jgpt.from_torch_state_dict(  # NNX values read back through the same paths
        {k: np.asarray(_nnx_leaf(nnx_model, k)) for k in model.state_dict()}
    )
    for path, _ in jaxlora.tree.iter_lora_layers(trained):
        for leaf in ("lora_a", "lora_b"):
            expected = _get(trained, path)[leaf]
            assert rel_err(_get(linen_params, path)[leaf], expected) <= 1e-4, (path, leaf)
            assert rel_err(_get(nnx_state, path)[leaf], expected) <= 1e-4, (path, leaf)
    # Every frozen weight is unchanged, bit for bit, on every side.
    for key, value in model.state_dict().items():
        if not key.endswith(("lora_a", "lora_b")):
            assert torch.equal(value, torch_start[key]), key
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        jaxlora.split(linen_params)[1],
        base_start,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        jaxlora.split(nnx_state)[1],
        base_start,
    )


def test_merge_gives_original_architecture_and_outputs():
    model, params, nnx_model = _twins(True)
    tokens = _tokens(5)[:, :SEQ]
    y_lora = model(torch.from_numpy(tokens)).detach()
    torchlora.merge(model)
    plain = _torch_base()
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    assert set(model.state_dict()) == set(plain.state_dict())
    assert rel_err(model(torch.from_numpy(tokens)), y_lora) <= TOL

    merged = jaxlora.merge(params, alpha=LORA["alpha"])
    plain_params = jgpt.GPT(jgpt.GPTConfig(**CFG)).init(jax.random.key(0), tokens)["params"]
    assert jax.tree.structure(merged) == jax.tree.structure(plain_params)
    assert rel_err(_linen_apply(merged, tokens, lora=False), y_lora) <= TOL
    jaxlora.nnx.merge(nnx_model)
    assert not any(isinstance(m, jaxlora.nnx.LoRALinear) for _, m in nnx.iter_modules(nnx_model))
    assert rel_err(nnx_model(jnp.asarray(tokens)), y_lora) <= TOL

    merged_torch = jgpt.from_torch_state_dict(model.state_dict())
    for i in range(2):
        for name in ("query", "value"):
            expected = merged_torch[f"blocks_{i}"]["attn"][name]["kernel"]
            assert rel_err(merged[f"blocks_{i}"]["attn"][name]["kernel"], expected) <= 1e-6
            nnx_kernel = getattr(getattr(nnx_model, f"blocks_{i}").attn, name).kernel[...]
            assert rel_err(nnx_kernel, expected) <= 1e-6


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _nnx_leaf(model, key: str):
    *modules, leaf = key.split(".")
    obj = model
    for name in modules:
        obj = getattr(obj, name)
    value = getattr(obj, {"weight": _weight_name(obj)}.get(leaf, leaf))[...]
    return (
        value.T
        if (leaf == "weight" and _weight_name(obj) == "kernel") or leaf.startswith("lora")
        else value
    )


def _weight_name(obj) -> str:
    if isinstance(obj, nnx.Embed):
        return "embedding"
    return "scale" if isinstance(obj, (nnx.LayerNorm, jgpt.NnxLayerNorm)) else "kernel"


def test_full_fine_tune_gradients_match_torch():
    """Every parameter's gradient (base included: what a full fine-tune trains) equals torch
    autograd's: covers the twin's written-out attention backward and GELU derivative."""
    model, params, _ = _twins(with_lora=False)
    tokens = _tokens(7)
    jmodel = jgpt.GPT(jgpt.GPTConfig(**CFG))

    def loss(p):
        logits = jmodel.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    grads = jgpt.to_torch_state_dict(jax.grad(loss)(params))
    t = torch.from_numpy(tokens)
    logits = model(t[:, :-1])
    F.cross_entropy(logits.reshape(-1, CFG["vocab_size"]), t[:, 1:].reshape(-1)).backward()
    torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    assert set(grads) == set(torch_grads)
    largest = max(np.abs(g).max() for g in torch_grads.values())
    for name, g in grads.items():
        # fp32 gradients through 2 blocks: measured ≤ ~1e-6 of each tensor's scale. The key
        # bias's gradient is 0 in exact arithmetic (softmax ignores a per-row constant): both
        # sides give ~1e-11 of rounding, so the scale has a floor: 1e-3 of the largest gradient.
        scale = max(np.abs(torch_grads[name]).max(), 1e-3 * largest)
        assert rel_err(np.asarray(g), torch_grads[name], scale) < TOL, name
