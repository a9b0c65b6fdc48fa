"""LoRA init variants ("kaiming", "gaussian", "pissa"), the same math in torch, Linen and NNX:
each leaves the initial output unchanged, PiSSA gives the same A, B and residual W on both
sides, and PiSSA adapters round-trip with the real PEFT package."""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model

import jaxlora
import jaxlora.nnx
import torchlora
from jaxlora.models import gpt as jgpt
from parity_tests.twins import rel_err
from torchlora.models import gpt as tgpt

CFG = dict(vocab_size=96, block_size=32, n_layer=2, n_head=4, d_model=64)
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 24))


def _torch_base() -> tgpt.GPT:
    torch.manual_seed(0)
    return tgpt.GPT(tgpt.GPTConfig(**CFG))


def _three(init: str):
    """The GPT in torch, Linen and NNX from the same weights, each injected with ``init``."""
    config = jaxlora.LoRAConfig(r=8, alpha=16, targets=["query", "value"], init=init)
    torch_model = _torch_base()
    base = jgpt.from_torch_state_dict(torch_model.state_dict())
    y_base = torch_model(torch.from_numpy(TOKENS)).detach()
    torchlora.inject(torch_model, config)
    params = jaxlora.inject(base, config, jax.random.key(0))
    nnx_model = jgpt.load_nnx(jgpt.NnxGPT(jgpt.GPTConfig(**CFG), rngs=nnx.Rngs(0)), base)
    jaxlora.nnx.inject(nnx_model, config, nnx.Rngs(1))
    return config, torch_model, params, nnx_model, y_base


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa", "olora"])
def test_initial_output_is_the_base_output(init):
    config, torch_model, params, nnx_model, y_base = _three(init)
    with jaxlora.intercept(config):
        y_linen = jgpt.GPT(jgpt.GPTConfig(**CFG)).apply({"params": params}, TOKENS)
    # PiSSA's/OLoRA's residual + B A reproduces W in fp32: ~1e-7 relative, through the model
    # ~1e-6.
    for y in (torch_model(torch.from_numpy(TOKENS)), y_linen, nnx_model(jnp.asarray(TOKENS))):
        assert rel_err(y, y_base) <= 1e-5
    b = params["blocks_0"]["attn"]["query"]["lora_b"]
    assert bool(jnp.any(b != 0)) == (init in ("pissa", "olora"))  # only they start with B ≠ 0


def _svd_tolerance(weight: np.ndarray, r: int) -> float:
    """How far two correct fp32 SVDs' top-r singular vectors may differ (Davis-Kahan): about
    eps·σ₁/gap, with gap the smallest distance between σ₁…σ_{r+1}. Random weights can have
    near-equal singular values, which makes the vectors (not their span's use) ill-conditioned
    in any implementation; a constant tolerance would pass or fail by the machine's LAPACK."""
    s = np.linalg.svd(weight, compute_uv=False)
    gap = np.min(-np.diff(s[: r + 1]))
    return 1e-5 + 10 * np.finfo(np.float32).eps * s[0] / gap


def _qr_tolerance(weight: np.ndarray, r: int) -> float:
    """Householder QR is backward stable and, with R's diagonal made positive, unique; its
    first r columns depend on W's first r columns only, through a triangular solve with
    cond(W[:, :r]) (small for these random weights: measured < 2)."""
    return 1e-5 + 10 * np.finfo(np.float32).eps * np.linalg.cond(weight[:, :r])


@pytest.mark.parametrize(
    "init,tolerance", [("pissa", _svd_tolerance), ("olora", _qr_tolerance)], ids=["pissa", "olora"]
)
def test_same_adapter_and_residual_on_both_sides(init, tolerance):
    _, torch_model, params, nnx_model, _ = _three(init)
    original = _torch_base()
    for i in range(2):
        for name in ("query", "value"):
            t = getattr(getattr(torch_model, f"blocks_{i}").attn, name)
            j = params[f"blocks_{i}"]["attn"][name]
            n = getattr(getattr(nnx_model, f"blocks_{i}").attn, name)
            weight = getattr(getattr(original, f"blocks_{i}").attn, name).weight.detach()
            tol = tolerance(weight.numpy().astype(np.float64), t.r)
            # Signs are canonical on both sides, so A and B match, not only their product.
            for flax_name, torch_value in (
                ("lora_a", t.lora_a.T),
                ("lora_b", t.lora_b.T),
                ("kernel", t.weight.T),
            ):
                assert rel_err(j[flax_name], torch_value) <= tol, (i, name, flax_name, tol)
                assert rel_err(getattr(n, flax_name)[...], torch_value) <= tol
    if init == "olora":  # the sign choice: R's leading diagonal non-negative
        assert bool((torch.diagonal(t.lora_a[:, : t.r]) >= 0).all())


def test_gaussian_is_pefts_distribution():
    layer = torchlora.Linear(512, 512, False, 16, init="gaussian")
    params = jaxlora.inject(
        {"d": {"kernel": jnp.zeros((512, 512))}},
        jaxlora.LoRAConfig(r=16, targets=["d"], init="gaussian"),
        jax.random.key(0),
    )
    for a in (layer.lora_a.detach().numpy(), np.asarray(params["d"]["lora_a"])):
        # 8192 draws: the std and mean are within ~5 standard errors of N(0, σ=1/16).
        assert abs(a.std() - 1 / 16) < 0.04 / 16 and abs(a.mean()) < 0.05 / 16


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_derived_adapters_round_trip_with_peft(tmp_path, init):
    """PEFT recomputes the residual base from the original weights when it loads a PiSSA or
    OLoRA adapter; jaxlora does the same, so adapters move both ways on the *original* base."""
    config, _, params, _, _ = _three(init)
    params = jax.tree_util.tree_map_with_path(  # "train" it: move A and B
        lambda p, v: v * 1.1 if p[-1].key in ("lora_a", "lora_b") else v, params
    )
    jaxlora.save_adapter(params, tmp_path / "jax", config)
    with jaxlora.intercept(config):
        y_jax = jgpt.GPT(jgpt.GPTConfig(**CFG)).apply({"params": params}, TOKENS)
    original = _torch_base()  # the same, unmodified base weights
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "jax"))
    assert not [w for w in caught if init not in str(w.message).lower()]
    assert rel_err(y_jax, served(torch.from_numpy(TOKENS))) <= 1e-4

    peft_model = get_peft_model(
        copy.deepcopy(original),
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=init),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(1.2)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    y_peft = peft_model(torch.from_numpy(TOKENS))
    base = jgpt.from_torch_state_dict(original.state_dict())
    loaded = jaxlora.load_adapter(base, tmp_path / "peft")
    with jaxlora.intercept(jaxlora.read_adapter_config(tmp_path / "peft")):
        y_linen = jgpt.GPT(jgpt.GPTConfig(**CFG)).apply({"params": loaded}, TOKENS)
    assert rel_err(y_linen, y_peft) <= 1e-4
    torch_model = torchlora.load_adapter(copy.deepcopy(original), tmp_path / "peft")
    assert rel_err(torch_model(torch.from_numpy(TOKENS)), y_peft) <= 1e-4
    nnx_model = jgpt.load_nnx(jgpt.NnxGPT(jgpt.GPTConfig(**CFG), rngs=nnx.Rngs(0)), base)
    jaxlora.nnx.load_adapter(nnx_model, tmp_path / "peft")
    assert rel_err(nnx_model(jnp.asarray(TOKENS)), y_peft) <= 1e-4
