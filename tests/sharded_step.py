"""Run as a script with 8 simulated CPU devices (tests/test_sharding.py does): a sharded LoRA
train step of the twin GPT against the same steps on one device. Prints a JSON report.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step.py LAYOUT
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora.models import gpt as jgpt

STEPS = 20
CFG = jgpt.GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, d_model=64)
LORA = jaxlora.LoRAConfig(r=8, alpha=16, targets=["query", "value", "fc"])
MESHES = {"dp_tp": (4, 1, 2), "fsdp_tp": (2, 2, 2), "dp": (8, 1, 1)}


def loss_fn(model, params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def main(layout: str) -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(MESHES[layout]), ("data", "fsdp", "tensor"))
    model = jgpt.GPT(CFG)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (STEPS, 16, 33))
    base = model.init(jax.random.key(0), tokens[0, :, :-1])["params"]
    params = jaxlora.inject(base, LORA, jax.random.key(1))
    tx = jaxlora.freeze_base(optax.adamw(3e-3, weight_decay=0.01))

    @jaxlora.intercept(LORA)
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Reference: one device.
    ref_step, ref_params, ref_state, ref_losses = jax.jit(step), params, tx.init(params), []
    for batch in tokens:
        ref_params, ref_state, loss = ref_step(ref_params, ref_state, batch)
        ref_losses.append(float(loss))

    specs = jaxlora.partition_specs(params, jgpt.partition_rules(base))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    sharded = jax.device_put(params, shardings)
    opt_state = jax.jit(tx.init, out_shardings=None)(sharded)
    jitted = jax.jit(step, out_shardings=(shardings, None, None), donate_argnums=(0, 1))
    hlo = (
        jitted.lower(sharded, opt_state, jax.device_put(tokens[0], batch_sharding))
        .compile()
        .as_text()
    )
    frozen_start = {k: np.asarray(v) for k, v in _flat(jaxlora.split(params)[1]).items()}
    losses = []
    for batch in tokens:
        sharded, opt_state, loss = jitted(sharded, opt_state, jax.device_put(batch, batch_sharding))
        losses.append(float(loss))

    frozen = _flat(jaxlora.split(sharded)[1])
    kernels = {k: v for k, v in frozen.items() if k.endswith("kernel")}
    # Shapes a frozen kernel (or its gradient) could have in the program: whole, or a shard
    # of any of the mesh axes it is split over, or gathered over some of them.
    kernel_shapes = {tuple(v.shape) for v in kernels.values()}
    kernel_shapes |= {tuple(v.addressable_shards[0].data.shape) for v in kernels.values()}
    gathers = _collective_shapes(hlo, "all-gather")
    reduces = _collective_shapes(hlo, "all-reduce")
    report = {
        "devices": len(jax.devices()),
        "losses": losses,
        "ref_losses": ref_losses,
        "max_adapter_diff": max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(
                jax.tree.leaves(jaxlora.split(sharded)[0]),
                jax.tree.leaves(jaxlora.split(ref_params)[0]),
                strict=True,
            )
        ),
        "frozen_bit_identical": all(
            np.array_equal(np.asarray(frozen[k]).view(np.uint32), v.view(np.uint32))
            for k, v in frozen_start.items()
        ),
        "frozen_sharding_kept": all(
            frozen[k].sharding.is_equivalent_to(_flat(shardings)[k], frozen[k].ndim) for k in frozen
        ),
        "lora_specs": {
            k: list(v.sharding.spec)  # JSON: None stays null, names stay strings
            for k, v in _flat(jaxlora.split(sharded)[0]).items()
            if "blocks_0/attn" in k
        },
        "all_gathers": gathers,
        "kernel_shapes": sorted(kernel_shapes),
        "all_reduces": reduces,
        "reduce_scatters": len(re.findall(r" reduce-scatter\(", hlo)),
    }
    print(json.dumps(report))


def _collective_shapes(hlo: str, op: str) -> list[list[int]]:
    """The f32 array shapes produced by each ``op`` in the compiled HLO (tuples flattened)."""
    shapes = []
    for line in hlo.splitlines():
        if f" {op}(" in line or f" {op}-start(" in line:
            result = line.split("=", 1)[1].split(op)[0]
            shapes += [
                [int(d) for d in m.split(",") if d] for m in re.findall(r"f32\[([\d,]*)\]", result)
            ]
    return shapes


def _flat(tree) -> dict:
    return {
        "/".join(str(p.key) for p in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


if __name__ == "__main__":
    main(sys.argv[1])
