"""DoRA (PEFT's ``use_dora=True``) against the installed ``peft``: torchlora, Linen (inject +
intercept) and NNX, fp32.

The twin is a small MLP; PEFT's adapted copy and ours start from the same base weights and the
same A, B, m (copied, never re-drawn), with B and m moved off their init so every term counts.
Tolerances: forward outputs, merged weights and gradients agree to 1e-5 relative to their
scale (fp32 has ε ≈ 1.2e-7; the paths differ only in summation order, e.g. PEFT computes
``(m/n − 1)·xWᵀ + m/n·s·BAx`` where a merged weight computes ``m/n·(W + sBA)x``). After 20
AdamW steps 1e-4: Adam divides by √v, which amplifies rounding differences in tiny gradients.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import torchlora

TOL, TOL_TRAIN = 1e-5, 1e-4
TARGETS = ["0", "2"]


def make_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6, bias=False))


def peft_model(base: nn.Module, *, r=3, alpha=6, dropout=0.0, seed=1) -> nn.Module:
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, use_dora=True, lora_dropout=dropout
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            if "lora_magnitude" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    return model


def peft_tensors(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    layer = model.base_model.model.get_submodule(path)
    return {
        "lora_a": layer.lora_A["default"].weight,
        "lora_b": layer.lora_B["default"].weight,
        "lora_magnitude": layer.lora_magnitude_vector["default"].weight,
    }


def torch_twin(base: nn.Module, peft: nn.Module, *, r=3, alpha=6, dropout=0.0) -> nn.Module:
    config = torchlora.LoRAConfig(
        r=r, alpha=alpha, targets=TARGETS, use_dora=True, dropout=dropout
    )
    model = torchlora.inject(copy.deepcopy(base), config)
    with torch.no_grad():
        for path in TARGETS:
            layer = model.get_submodule(path)
            for name, value in peft_tensors(peft, path).items():
                getattr(layer, name).copy_(value)
    return model


def rel(actual, expected) -> float:
    actual, expected = (np.asarray(t.detach(), np.float64) for t in (actual, expected))
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def x_input(seed: int = 2) -> torch.Tensor:
    return torch.randn(7, 12, generator=torch.Generator().manual_seed(seed))


def test_peft_initialises_magnitude_to_the_weight_norm():
    base = make_base()
    ours = torchlora.inject(copy.deepcopy(base), torchlora.LoRAConfig(r=3, targets=TARGETS, use_dora=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=TARGETS, use_dora=True))
    for path in TARGETS:
        m = peft_tensors(theirs, path)["lora_magnitude"]
        assert rel(ours.get_submodule(path).lora_magnitude, m) < TOL
        assert rel(m, torch.linalg.norm(base.get_submodule(path).weight, dim=1)) < TOL


def test_torch_forward_grads_and_merge_match_peft():
    base = make_base()
    peft = peft_model(base)
    ours = torch_twin(base, peft)
    x = x_input()
    y_peft, y_ours = peft(x), ours(x)
    assert rel(y_ours, y_peft) < TOL
    (y_peft**2).sum().backward()
    (y_ours**2).sum().backward()
    for path in TARGETS:
        layer = ours.get_submodule(path)
        for name, theirs in peft_tensors(peft, path).items():
            assert rel(getattr(layer, name).grad, theirs.grad) < TOL, (path, name)
        assert layer.weight.grad is None  # frozen
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(peft).merge_and_unload()
    for path in TARGETS:
        layer = ours.get_submodule(path)
        assert rel(layer.merged_weight(), merged.get_submodule(path).weight) < TOL


def test_torch_dropout_base_term_matches_peft():
    # With dropout active PEFT computes the correction on base(dropout(x)): same masks here
    # because both draw from torch's global generator in the same order (one dropout per layer).
    base = make_base()
    peft = peft_model(base, dropout=0.3)
    ours = torch_twin(base, peft, dropout=0.3)
    peft.train()
    ours.train()
    x = x_input()
    torch.manual_seed(5)
    y_peft = peft(x)
    torch.manual_seed(5)
    y_ours = ours(x)
    assert rel(y_ours, y_peft) < TOL
    peft.eval()
    ours.eval()
    assert rel(ours(x), peft(x)) < TOL


def _adamw_run(model, params, x, steps=20):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()
    return model


def test_torch_twenty_adamw_steps_match_peft():
    base = make_base()
    peft = peft_model(base)
    ours = torch_twin(base, peft)
    x = x_input()
    _adamw_run(peft, [p for p in peft.parameters() if p.requires_grad], x)
    _adamw_run(ours, [p for p in ours.parameters() if p.requires_grad], x)
    for path in TARGETS:
        layer = ours.get_submodule(path)
        for name, theirs in peft_tensors(peft, path).items():
            assert rel(getattr(layer, name), theirs) < TOL_TRAIN, (path, name)
    assert rel(ours(x), peft(x)) < TOL_TRAIN


def test_torch_files_both_ways(tmp_path):
    base = make_base()
    peft = peft_model(base)
    x = x_input()
    peft.save_pretrained(str(tmp_path / "peft"))
    ours = torchlora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert rel(ours(x), peft(x)) < TOL
    torchlora.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    assert rel(back(x), peft(x)) < TOL
    for path in TARGETS:
        for name, theirs in peft_tensors(back, path).items():
            assert torch.equal(getattr(ours.get_submodule(path), name), theirs), (path, name)
