"""torchlora.Linear against closed-form numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import torchlora


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def test_base_init_equals_nn_linear():
    """weight and bias are drawn exactly as nn.Linear draws them (never uninitialised memory)."""
    torch.manual_seed(7)
    lora = torchlora.Linear(33, 12, True, 4)
    torch.manual_seed(7)
    plain = nn.Linear(33, 12)
    assert torch.equal(lora.weight, plain.weight) and torch.equal(lora.bias, plain.bias)


def test_adapter_init_distribution():
    layer = torchlora.Linear(400, 300, False, 64)
    a = _np(layer.lora_a)
    bound = 1 / math.sqrt(400)
    assert np.abs(a).max() <= bound
    assert abs(a.var() - bound**2 / 3) < 0.05 * bound**2 / 3  # U(±b) has variance b²/3
    assert not layer.lora_b.any()


def test_only_adapter_trains():
    layer = torchlora.Linear(8, 6, True, 2)
    assert {n: p.requires_grad for n, p in layer.named_parameters()} == {
        "weight": False,
        "bias": False,
        "lora_a": True,
        "lora_b": True,
    }
    assert layer.lora_a.shape == (2, 8) and layer.lora_b.shape == (6, 2)


@pytest.mark.parametrize(
    "alpha,rslora,expected",
    [(None, False, 1.0), (16, False, 4.0), (16, True, 8.0), (2.5, False, 0.625)],
)
def test_scaling(alpha, rslora, expected):
    assert torchlora.Linear(8, 8, True, 4, alpha, use_rslora=rslora).scaling == expected


@pytest.mark.parametrize("batch", [(), (3,), (2, 4)], ids=str)
def test_forward_matches_formula(batch):
    layer = torchlora.Linear(10, 7, True, 3, 6)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(*batch, 10)
    w, b, a, bb = (_np(t) for t in (layer.weight, layer.bias, layer.lora_a, layer.lora_b))
    expected = _np(x) @ w.T + b + 2.0 * (_np(x) @ a.T @ bb.T)
    np.testing.assert_allclose(_np(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_starts_equal_to_base():
    linear = nn.Linear(12, 5)
    layer = torchlora.Linear.from_linear(linear, 4, alpha=8)
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), linear(x))


def test_from_linear_shares_by_default_and_copies_on_request():
    linear = nn.Linear(6, 4)
    shared = torchlora.Linear.from_linear(linear, 2)
    assert shared.weight is linear.weight and shared.bias is linear.bias
    assert not linear.weight.requires_grad
    other = nn.Linear(6, 4)
    copied = torchlora.Linear.from_linear(other, 2, copy=True)
    assert copied.weight is not other.weight and torch.equal(copied.weight, other.weight)
    assert other.weight.requires_grad
    with torch.no_grad():
        copied.lora_b.fill_(1.0)
    copied.merge()
    assert not torch.equal(copied.weight, other.weight)  # the original stayed untouched


def test_merge_unmerge_roundtrip():
    layer = torchlora.Linear(20, 16, True, 4, 8)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 20)
    before, w0 = layer(x).detach(), layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    expected_w = _np(w0) + 2.0 * _np(layer.lora_b) @ _np(layer.lora_a)
    np.testing.assert_allclose(_np(layer.weight), expected_w, atol=1e-6)
    # Merged forward uses only W: changing the adapter now must not change the output.
    with torch.no_grad():
        layer.lora_a.mul_(2)
    merged_out = layer(x).detach()
    np.testing.assert_allclose(_np(merged_out), _np(before), atol=1e-5)
    with torch.no_grad():
        layer.lora_a.div_(2)
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.weight, w0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_merge_refuses_non_finite_and_leaves_layer_unchanged():
    layer = torchlora.Linear(4, 4, True, 2)
    with torch.no_grad():
        layer.lora_b.fill_(float("inf"))
    w0 = layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.weight, w0) and not layer.merged


def test_half_precision_merge_rounds_once():
    """The delta is computed in fp32 and the sum rounded once to bf16."""
    torch.manual_seed(0)
    layer = torchlora.Linear(64, 64, False, 8, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.1)
    w0 = layer.weight.clone()
    exact = w0.double() + 2.0 * layer.lora_b.double() @ layer.lora_a.double()
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, exact.float().to(torch.bfloat16))
    naive = w0 + 2.0 * (layer.lora_b @ layer.lora_a)  # all-bf16: two roundings
    err_ours = (layer.weight.double() - exact).abs().max()
    err_naive = (naive.double() - exact).abs().max()
    assert err_ours <= err_naive


def test_to_linear_is_plain_and_merged():
    layer = torchlora.Linear(9, 5, True, 3)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 9)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and not layer.merged
    np.testing.assert_allclose(_np(linear(x)), _np(layer(x)), atol=1e-5)
    layer.merge()
    assert torch.equal(layer.to_linear().weight, layer.weight)


def test_merged_layer_gives_adapter_no_gradient():
    layer = torchlora.Linear(4, 4, True, 2)
    assert layer(torch.randn(2, 4)).requires_grad
    layer.merge()
    assert not layer(torch.randn(2, 4)).requires_grad  # as documented: unmerge() to train


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(r=0), ValueError, r"r must be in \[1, min\(in, out\)\] = \[1, 6\], got 0"),
        (dict(r=7), ValueError, "got 7"),
        (dict(r=2.0), TypeError, "r must be an int"),
        (dict(r=True), TypeError, "r must be an int"),
        (dict(r=2, dropout=-0.1), ValueError, r"dropout must be in \[0, 1\), got -0.1"),
        (dict(r=2, dropout=1.0), ValueError, "dropout must be in"),
        (dict(r=2, alpha=0), ValueError, "alpha must be a finite number > 0, got 0"),
        (dict(r=2, alpha="8"), TypeError, "alpha must be a number"),
    ],
    ids=["r0", "r-too-big", "r-float", "r-bool", "dropout-neg", "dropout-1", "alpha0", "alpha-str"],
)
def test_bad_hyperparameters(kwargs, error, match):
    r = kwargs.pop("r")
    with pytest.raises(error, match=match):
        torchlora.Linear(8, 6, True, r, **kwargs)


def test_bad_input_dimension():
    layer = torchlora.Linear(8, 6, True, 2)
    with pytest.raises(ValueError, match=r"in_features=8, got shape \(3, 7\)"):
        layer(torch.randn(3, 7))


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        torchlora.Linear.from_linear(nn.Conv1d(2, 2, 1), 1)
