"""Dropout on the LoRA branch: eval mode equals no dropout; with the same mask, all agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn
from flax import nnx

from parity_tests.twins import linen_twin, nnx_twin, rel_err, to_np, torch_layer

RATE = 0.3


def _setup():
    layer = torch_layer(40, 24, 6, alpha=12, dropout=RATE)
    x = np.random.default_rng(3).standard_normal((2, 7, 40)).astype("f4")
    mask = np.random.default_rng(4).random(x.shape) >= RATE
    return layer, x, mask


def _reference(layer, x, branch_input):
    w, a, b = (to_np(t) for t in (layer.weight, layer.lora_a, layer.lora_b))
    return x @ w.T + to_np(layer.bias) + (branch_input @ a.T @ b.T) * layer.scaling


class _FixedMaskTorch(torch.nn.Module):
    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.mask = torch.from_numpy(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask / (1 - RATE)


class _FixedMaskNnx(nnx.Module):
    def __init__(self, mask: np.ndarray) -> None:
        self.mask = jnp.asarray(mask)

    def __call__(self, x, *, deterministic=None):
        return x * self.mask / (1 - RATE)


def test_eval_mode_equals_no_dropout():
    layer, x, _ = _setup()
    no_dropout = torch_layer(40, 24, 6, alpha=12, dropout=0.0)
    layer.eval()
    expected = _reference(no_dropout, x, x)
    assert rel_err(layer(torch.from_numpy(x)), expected) <= 1e-5
    module, params = linen_twin(layer)
    assert rel_err(module.apply(params, x, deterministic=True), expected) <= 1e-5
    model = nnx_twin(layer)
    model.eval()
    assert rel_err(model(jnp.asarray(x)), expected) <= 1e-5


def test_train_mode_same_mask_agrees():
    """The frameworks draw masks from different RNGs, so each is handed the same mask."""
    layer, x, mask = _setup()
    expected = _reference(layer, x, x * mask / (1 - RATE))
    module, params = linen_twin(layer)
    model = nnx_twin(layer)
    layer.train()
    layer.lora_dropout = _FixedMaskTorch(mask)
    y_torch = layer(torch.from_numpy(x))

    def fixed_mask(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            assert context.module.rate == RATE and kwargs["deterministic"] is False
            return args[0] * mask / (1 - RATE)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(fixed_mask):
        y_linen = module.apply(params, x, deterministic=False)
    assert model.lora_dropout.rate == RATE
    model.lora_dropout = _FixedMaskNnx(mask)
    y_nnx = model(jnp.asarray(x))

    for y in (y_torch, y_linen, y_nnx):
        assert rel_err(y, expected) <= 1e-5
    assert rel_err(y_torch, _reference(layer, x, x)) > 1e-2  # the mask really changed it


def test_own_dropout_only_touches_the_branch():
    """With each framework's own RNG: dropout varies the output, and with B = 0 it cannot."""
    layer, x, _ = _setup()
    module, params = linen_twin(layer)
    y1 = module.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    y2 = module.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert rel_err(y1, y2) > 1e-3
    zero_b = jax.tree.map(lambda v: v, params)
    zero_b["params"]["lora_b"] = jnp.zeros_like(params["params"]["lora_b"])
    y_base = module.apply(zero_b, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert rel_err(y_base, module.apply(zero_b, x)) == 0.0

    layer.train()
    torch.manual_seed(0)
    t1 = layer(torch.from_numpy(x))
    t2 = layer(torch.from_numpy(x))
    assert rel_err(t1, t2) > 1e-3
    with torch.no_grad():
        layer.lora_b.zero_()
    layer.eval()
    t_eval = layer(torch.from_numpy(x))
    layer.train()
    assert rel_err(layer(torch.from_numpy(x)), t_eval) == 0.0
