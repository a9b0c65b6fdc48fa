"""Training shared by the tests that check training moves only the adapters: one jitted
step on an NNX model's LoRA params; the loss of a Linen model holding a packed base ('quant')
and jitted optax steps on a Linen model's params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxlora


@nnx.jit
def nnx_lora_step(model, optimizer, x, target):
    """One ``optimizer`` step (made with ``wrt=nnx.LoRAParam``) on the mean squared error of
    ``model(x)`` against ``target``; returns (loss, the LoRA params' gradients)."""

    def loss_fn(model):
        return jnp.mean((model(x) - target) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss, grads


def intercepted_loss(model, config: jaxlora.LoRAConfig):
    """loss(params, quant, x): the mean square of the Linen ``model``'s output under
    ``config``, its packed base ``quant`` an input apart from the trained ``params``."""

    @jaxlora.intercept(config)
    def loss(params, quant, x):
        return jnp.mean(model.apply({"params": params, "quant": quant}, x) ** 2)

    return loss


def linen_adam_steps(model, config, variables, x, target, steps: int):
    """``steps`` jitted steps of ``freeze_base(adam(1e-2))`` on the mean squared error of the
    Linen ``model`` under ``config``: 'params' trained, any other collection of ``variables``
    (a packed 'quant') held as it is; returns (params, optimizer state, [each step's loss],
    the last step's gradients)."""
    params = variables["params"]
    tx = jaxlora.freeze_base(optax.adam(1e-2))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss_fn(params):
            with jaxlora.intercept(config):
                y = model.apply({**variables, "params": params}, x)
            return jnp.mean((y - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, grads

    losses = []
    for _ in range(steps):
        params, state, loss, grads = step(params, state)
        losses.append(float(loss))
    return params, state, losses, grads
