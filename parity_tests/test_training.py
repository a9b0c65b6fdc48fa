"""100 training steps from identical weights on identical batches: torch vs Linen vs NNX.

Adam and AdamW (weight decay on). The JAX sides train with ``freeze_base`` (Linen, whole params
tree differentiated, as users write it) and ``nnx.Optimizer(wrt=nnx.LoRAParam)`` (NNX).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn
from flax import nnx

import jaxlora
import torchlora
from jaxlora.nnx import LoRALinear
from parity_tests.twins import flax_params, rel_err, to_np, torch_mse_steps
from tests._train import nnx_lora_step

STEPS, BATCH, LR = 100, 32, 1e-2
LAYERS = {"fc1": (16, 32), "fc2": (32, 8)}
R, ALPHA = 4, 8


class TorchMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torchlora.Linear(16, 32, True, R, ALPHA)
        self.fc2 = torchlora.Linear(32, 8, True, R, ALPHA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.tanh(jaxlora.LoRADense(32, R, ALPHA, name="fc1")(x))
        return jaxlora.LoRADense(8, R, ALPHA, name="fc2")(x)


class NnxMLP(nnx.Module):
    def __init__(self, params: dict) -> None:
        for name, (n_in, n_out) in LAYERS.items():
            layer = LoRALinear(n_in, n_out, r=R, alpha=ALPHA, rngs=nnx.Rngs(0))
            for leaf, value in params[name].items():
                getattr(layer, leaf)[...] = value
            setattr(self, name, layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jnp.tanh(self.fc1(x)))


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS, BATCH, 16)).astype("f4")
    teacher = rng.standard_normal((16, 8)).astype("f4") / 4
    return x, np.sin(x @ teacher).astype("f4")


OPTIMIZERS = {
    "adam": (lambda p: torch.optim.Adam(p, lr=LR), lambda: optax.adam(LR)),
    "adamw": (
        lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.1),
        lambda: optax.adamw(LR, weight_decay=0.1),
    ),
}


def _train_torch(model, make_opt, xs, ys):
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    return torch_mse_steps(model, opt, xs, ys)


def _train_linen(params, tx, xs, ys):
    model, tx = LinenMLP(), jaxlora.freeze_base(tx)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(params):
            return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for x, y in zip(xs, ys, strict=True):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    return params, np.array(losses)


def _train_nnx(model, tx, xs, ys):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    steps = (nnx_lora_step(model, optimizer, x, y)[0] for x, y in zip(xs, ys, strict=True))
    return np.array([float(loss) for loss in steps])


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_training_run_parity(opt):
    make_torch_opt, make_tx = OPTIMIZERS[opt]
    xs, ys = _data()
    torch_model = TorchMLP()
    start = {name: flax_params(getattr(torch_model, name)) for name in LAYERS}
    base_start = jaxlora.split(start)[1]
    torch_base_start = {
        k: v.clone()
        for k, v in torch_model.state_dict().items()
        if not k.endswith(("lora_a", "lora_b"))
    }

    torch_losses = _train_torch(torch_model, make_torch_opt, xs, ys)
    linen_params, linen_losses = _train_linen(start, make_tx(), xs, ys)
    nnx_model = NnxMLP(start)
    nnx_losses = _train_nnx(nnx_model, make_tx(), xs, ys)

    # It learned something, so agreement is not the trivial agreement of two frozen models.
    assert torch_losses[-10:].mean() < 0.5 * torch_losses[:10].mean()
    # 100 Adam steps amplify fp32 rounding (each step divides by sqrt(v)). Measured: 6e-6
    # relative on the losses, 5e-6 on the adapters. 1e-4 leaves 16x headroom and still tells
    # Adam from AdamW here (their final losses differ by 5e-3 relative).
    for losses in (linen_losses, nnx_losses):
        assert np.max(np.abs(losses - torch_losses) / torch_losses) <= 1e-4
    for name in LAYERS:
        layer = getattr(torch_model, name)
        for leaf in ("lora_a", "lora_b"):
            expected = getattr(layer, leaf).T
            assert rel_err(linen_params[name][leaf], expected) <= 1e-4, (name, leaf)
            assert rel_err(getattr(getattr(nnx_model, name), leaf)[...], expected) <= 1e-4

    # The frozen base is bit-identical to its start on every side.
    for name, leaves in base_start.items():
        for leaf, value in leaves.items():
            assert np.array_equal(
                np.asarray(linen_params[name][leaf]).view(np.uint32),
                np.asarray(value).view(np.uint32),
            ), (name, leaf)
            nnx_value = getattr(getattr(nnx_model, name), leaf)[...]
            assert np.array_equal(np.asarray(nnx_value), np.asarray(value)), (name, leaf)
    for key, value in torch_model.state_dict().items():
        if key in torch_base_start:
            assert torch.equal(value, torch_base_start[key]), key
    assert to_np(torch_model.fc1.lora_b).any()  # B moved away from its zero init
