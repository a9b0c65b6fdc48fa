"""Quickstart: the same LoRA layer in PyTorch (torchlora), Flax Linen and Flax NNX (jaxlora).

Builds a 1024→1024 layer with r=8 in each framework from the same pretrained weights, checks
the output shapes, shows that only the adapter trains, takes one optimizer step, and merges.

    python examples/quickstart.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import jaxlora
import torchlora
from jaxlora.nnx import LoRALinear

IN, OUT, R, ALPHA = 1024, 1024, 8, 16


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def main() -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.manual_seed(0)
    pretrained = torch.nn.Linear(IN, OUT)
    x = np.random.default_rng(0).standard_normal((4, 32, IN)).astype("f4")

    # PyTorch: wrap the pretrained layer; weight and bias are frozen, lora_a/lora_b train.
    t_layer = torchlora.Linear.from_linear(pretrained, R, ALPHA)
    with torch.no_grad():
        t_layer.lora_b.normal_(0, 0.01)  # as if already fine-tuned a little
    y_torch = t_layer(torch.from_numpy(x)).detach().numpy()
    t_total = sum(p.numel() for p in t_layer.parameters())
    t_train = sum(p.numel() for p in t_layer.parameters() if p.requires_grad)

    # Flax Linen: the same weights, transposed into Flax layout by jaxlora.from_torch.
    params = jaxlora.from_torch(t_layer.state_dict())
    l_layer = jaxlora.LoRADense(OUT, R, ALPHA)
    y_linen = l_layer.apply({"params": params}, x)
    adapter, _ = jaxlora.split(params)

    # Flax NNX: lora_a/lora_b are nnx.LoRAParam; the optimizer filters on that type.
    n_layer = LoRALinear(IN, OUT, r=R, alpha=ALPHA, rngs=nnx.Rngs(0))
    for name, value in params.items():
        getattr(n_layer, name)[...] = value
    y_nnx = n_layer(jnp.asarray(x))
    n_total = count(nnx.state(n_layer, nnx.Param))
    n_train = count(nnx.state(n_layer, nnx.LoRAParam))

    print(f"LoRA on a {IN}x{OUT} linear layer, r={R}, alpha={ALPHA} (scaling {ALPHA / R:g})\n")
    print(f"{'framework':<14}{'output shape':<18}{'params':>10}{'trainable':>11}{'%':>8}")
    rows = [
        ("torch", y_torch.shape, t_total, t_train),
        ("flax linen", y_linen.shape, count(params), count(adapter)),
        ("flax nnx", y_nnx.shape, n_total, n_train),
    ]
    for name, shape, total, train in rows:
        print(f"{name:<14}{shape!s:<18}{total:>10,}{train:>11,}{100 * train / total:>7.2f}%")
        assert shape == (4, 32, OUT) and train == R * (IN + OUT)
    scale = np.abs(y_torch).max()
    print(f"\nmax |linen - torch| / max|torch| = {np.abs(y_linen - y_torch).max() / scale:.1e}")
    print(f"max |nnx   - torch| / max|torch| = {np.abs(y_nnx - y_torch).max() / scale:.1e}")

    # One Adam step on the Linen params: freeze_base leaves every base leaf untouched.
    tx = jaxlora.freeze_base(optax.adam(1e-3))
    grads = jax.grad(lambda p: jnp.mean(l_layer.apply({"params": p}, x) ** 2))(params)
    updates, state = tx.update(grads, tx.init(params), params)
    stepped = optax.apply_updates(params, updates)
    base_same = all(np.array_equal(stepped[k], params[k]) for k in ("kernel", "bias"))
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state) if leaf.ndim)
    print(
        f"\nafter one freeze_base(adam) step: base unchanged = {base_same}, "
        f"optimizer state = {state_bytes:,} bytes (full fine-tune: "
        f"{2 * 4 * count(params):,})"
    )

    # Merge for inference: a plain Dense tree, the same outputs, zero extra cost.
    merged = jaxlora.merge({"params": params}, alpha=ALPHA)
    y_merged = jax.numpy.matmul(x, merged["params"]["kernel"]) + merged["params"]["bias"]
    t_layer.merge()
    print(
        f"merged (JAX) vs unmerged: max diff {np.abs(y_merged - y_linen).max():.1e}; "
        f"merged kernel JAX vs torch: "
        f"{np.abs(merged['params']['kernel'] - t_layer.weight.detach().numpy().T).max():.1e}"
    )


if __name__ == "__main__":
    main()
