"""Checks shared by the QLoRA scan tests (``tests/test_qlora_scan.py``,
``tests/test_qlora_scan_oplevel.py``): a scanned quantized stack against its unrolled twin,
trained alike by optax and writing the same adapter files."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

import jaxlora
from tests._train import intercepted_loss


def adam_trained(runs: Iterable, config, inputs: Callable, steps: int = 3) -> dict:
    """{key: params after ``steps`` jitted steps of ``freeze_base(adam(1e-2))`` on inputs(10),
    inputs(11), …} for each (key, model, variables) of ``runs``; checks that no optimizer
    state holds a packed byte ('quant' is not an input to the optimizer)."""
    tx = jaxlora.freeze_base(optax.adam(1e-2))
    trained = {}
    for key, model, variables in runs:
        params, quant = variables["params"], variables["quant"]
        state = tx.init(params)
        assert not any(leaf.dtype == jnp.uint8 for leaf in jax.tree.leaves(state))

        @jax.jit
        def step(params, state, x, model=model, quant=quant):
            grads = jax.grad(intercepted_loss(model, config))(params, quant, x)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for s in range(steps):
            params, state = step(params, state, inputs(10 + s))
        trained[key] = params
    return trained


def assert_same_files(scanned_dir, unrolled_dir, expected_key: str):
    """The scanned model's adapter file holds the unrolled twin's keys (``expected_key``
    among them) and the same arrays, exactly."""
    ours = safetensors.numpy.load_file(scanned_dir / "adapter_model.safetensors")
    twin = safetensors.numpy.load_file(unrolled_dir / "adapter_model.safetensors")
    assert sorted(ours) == sorted(twin)
    assert expected_key in ours
    for key in twin:
        np.testing.assert_array_equal(ours[key], twin[key])


def layer_of(tree, i):
    """Layer ``i`` of a stacked tree (stacked on axis 0)."""
    return jax.tree.map(lambda x: x[i], tree)


def bits(x):
    """The array to compare bit for bit: float32 as its uint32 words (-0.0 is not 0.0)."""
    x = np.asarray(x)
    return x.view(np.uint32) if x.dtype == np.float32 else x
