"""Sharded LoRA training on a simulated 8-device mesh (a subprocess, so that the rest of the
suite keeps one device), and the partitioning helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import jaxlora

ROOT = Path(__file__).resolve().parents[1]
FROZEN_KERNELS = 12  # 2 blocks x (query, key, value, out, fc, proj)


def _run(layout: str) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_step.py"), layout],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["dp", "dp_tp", "fsdp_tp"])
def test_sharded_step_matches_single_device(layout):
    r = _run(layout)
    assert r["devices"] == 8
    # 20 AdamW steps; the sharded reductions sum in another order: measured ~4e-7 relative.
    rel = max(abs(a - b) / b for a, b in zip(r["losses"], r["ref_losses"], strict=True))
    assert rel <= 1e-5 and r["max_adapter_diff"] <= 1e-4
    assert r["frozen_bit_identical"] and r["frozen_sharding_kept"]
    # LoRA params inherit the kernel's partitioning; the rank axis is replicated.
    assert r["lora_specs"]["blocks_0/attn/query/lora_a"] == ["fsdp", None]
    assert r["lora_specs"]["blocks_0/attn/query/lora_b"] == [None, "tensor"]
    # No gradient traffic for frozen weights: nothing kernel-shaped is all-reduced or
    # reduce-scattered (the all-reduces are activations of row-parallel layers, LoRA
    # gradients and the loss).
    kernel_shapes = {tuple(s) for s in r["kernel_shapes"]}
    assert not [s for s in r["all_reduces"] if tuple(s) in kernel_shapes]
    assert r["reduce_scatters"] == 0
    if layout == "fsdp_tp":
        # FSDP gathers each kernel shard for the forward (and XLA re-gathers the MLP's for the
        # backward instead of keeping them), plus each lora_a (rank-first, as the branch
        # contracts it; r=8 is no kernel's dimension): never more.
        lora_a = [s for s in r["all_gathers"] if 8 in s]
        assert len(lora_a) == 6
        assert len(r["all_gathers"]) - len(lora_a) <= 2 * FROZEN_KERNELS
    else:
        assert r["all_gathers"] == []  # data and tensor parallelism need no gathers here


def test_partition_specs_follow_the_kernel():
    params = jaxlora.inject(
        {"q": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}, "o": {"kernel": jnp.ones((4, 8))}},
        jaxlora.LoRAConfig(r=2, targets=["q", "o"]),
        jax.random.key(0),
    )
    specs = jaxlora.partition_specs(
        params,
        {
            "q": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
            "o": {"kernel": P("tensor", None)},
        },
    )
    assert specs["q"] == {
        "kernel": P("fsdp", "tensor"),
        "bias": P("tensor"),
        "lora_a": P("fsdp", None),
        "lora_b": P(None, "tensor"),
    }
    assert specs["o"] == {
        "kernel": P("tensor", None),
        "lora_a": P("tensor", None),
        "lora_b": P(None, None),
    }
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        jax.tree.map(lambda _: 0, params)
    )


class Annotated(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(16, kernel_init=nn.with_partitioning(init, ("embed", "mlp")), name="fc")(x)
        return nn.Dense(8, kernel_init=nn.with_partitioning(init, ("mlp", "embed")), name="out")(x)


def test_boxed_params_get_matching_annotations_and_train():
    model, x = Annotated(), jnp.ones((2, 8))
    config = jaxlora.LoRAConfig(r=2, targets=["fc", "out"])
    variables = jaxlora.inject(model.init(jax.random.key(0), x), config, jax.random.key(1))
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["fc"]["lora_a"] == P("embed", None) and specs["fc"]["lora_b"] == P(None, "mlp")
    assert specs["out"]["lora_a"] == P("mlp", None) and specs["out"]["lora_b"] == P(None, "embed")
    mask = jaxlora.lora_mask(variables["params"])
    assert nn.unbox(mask["fc"]["lora_a"]) and not nn.unbox(mask["fc"]["kernel"])
    tx = jaxlora.freeze_base(optax.sgd(0.1))
    params = variables["params"]
    for name, width in (("fc", 16), ("out", 8)):  # B = 0 would give A no gradient
        params[name]["lora_b"] = params[name]["lora_b"].replace_boxed(jnp.ones((2, width)))

    @jaxlora.intercept(config)
    def loss(p):
        return jnp.sum(model.apply({"params": p}, x) ** 2)

    grads = jax.grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert (nn.unbox(new["fc"]["kernel"]) == nn.unbox(params["fc"]["kernel"])).all()
    assert not (nn.unbox(new["fc"]["lora_a"]) == nn.unbox(params["fc"]["lora_a"])).all()
    merged = jaxlora.merge({"params": new}, alpha=None)
    assert nn.get_partition_spec(merged)["params"]["fc"]["kernel"] == P("embed", "mlp")
    with jaxlora.intercept(config):
        y_lora = model.apply({"params": new}, x)
    assert jnp.allclose(model.apply(merged, x), y_lora, atol=1e-5)


def test_nnx_adapter_follows_the_kernel_sharding_metadata():
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh

    import jaxlora.nnx

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("embed", "mlp"))
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    with jax.set_mesh(mesh):
        model = nnx.Sequential(nnx.Linear(8, 4, kernel_init=init, rngs=nnx.Rngs(0)))
        jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["layers.0"]), nnx.Rngs(1))
        layer = model.layers[0]
        meta = {
            name: getattr(layer, name).get_metadata().get("out_sharding")
            for name in ("kernel", "lora_a", "lora_b")
        }
        assert meta == {
            "kernel": ("embed", "mlp"),
            "lora_a": ("embed", None),
            "lora_b": (None, "mlp"),
        }
        assert layer.lora_a[...].sharding.spec == P("embed", None)
        assert layer(jnp.ones((2, 8))).shape == (2, 4)


def test_nnx_conv_embed_and_general_adapters_follow_the_sharding_metadata():
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh

    import jaxlora.nnx

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("vocab", "embed", "heads"))

    def part(*names):
        return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)

    with jax.set_mesh(mesh):
        model = nnx.Sequential(
            nnx.Embed(10, 8, embedding_init=part("vocab", "embed"), rngs=nnx.Rngs(0)),
            nnx.Conv(8, 8, (3,), kernel_init=part(None, "embed", "heads"), rngs=nnx.Rngs(0)),
            nnx.LinearGeneral(
                8, (2, 4), kernel_init=part("embed", "heads", None), rngs=nnx.Rngs(0)
            ),
        )
        config = jaxlora.LoRAConfig(r=2, targets=["layers.0", "layers.1", "layers.2"])
        jaxlora.nnx.inject(model, config, nnx.Rngs(1))
        meta = {
            (i, name): getattr(model.layers[i], name).get_metadata().get("out_sharding")
            for i in range(3)
            for name in ("lora_a", "lora_b")
        }
        assert meta == {
            (0, "lora_a"): ("vocab", None),
            (0, "lora_b"): (None, "embed"),
            (1, "lora_a"): (None, "embed", None),
            (1, "lora_b"): (None, None, "heads"),
            (2, "lora_a"): ("embed", None),
            (2, "lora_b"): (None, "heads", None),
        }
        assert model(jnp.arange(5)[None]).shape == (1, 5, 2, 4)


def test_nnx_oplevel_adapters_follow_each_weights_sharding_metadata():
    """An op-level layer's factors take the names of the weight axes they stand for (lora_a
    (batch…, contracted…, r), lora_b (batch…, r, free…)), per weight in a module with several,
    as Linen's product adapters do (``product.axis_names``); the rank is replicated."""
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh

    import jaxlora.nnx

    class Attn(nnx.Module):  # tunix-like: q (D, N, H) einsum, o (N, H, D) as its left operand
        def __init__(self, rngs):
            normal = nnx.initializers.normal()
            self.wq = nnx.Param(
                normal(rngs.params(), (8, 2, 4)), out_sharding=("embed", "heads", None)
            )
            self.wo = nnx.Param(
                normal(rngs.params(), (2, 4, 8)), out_sharding=("heads", None, "embed")
            )

        def __call__(self, x):
            q = jnp.einsum("btd,dnh->btnh", x, self.wq[...])
            return jnp.einsum("nhd,btnh->btd", self.wo[...], q)

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("embed", "heads"))
    x = jnp.ones((2, 3, 8))
    with jax.set_mesh(mesh):
        model = nnx.Sequential(Attn(nnx.Rngs(0)))
        config = jaxlora.LoRAConfig(r=2, targets=[], target_parameters=["wq", "wo"])
        jaxlora.nnx.inject(model, config, nnx.Rngs(1), inputs=(x,))
        attn = model.layers[0]

        def names(var):
            metadata = var.get_metadata()
            return next(
                metadata[k] for k in ("out_sharding", "sharding_names", "sharding") if k in metadata
            )

        got = {
            n: names(getattr(attn, n)) for n in ("wq_lora_a", "wq_lora_b", "wo_lora_a", "wo_lora_b")
        }
        assert got == {
            "wq_lora_a": ("embed", None),
            "wq_lora_b": (None, "heads", None),
            "wo_lora_a": ("heads", None, None),
            "wo_lora_b": (None, "embed"),
        }
        assert attn.wq_lora_b[...].sharding.spec == P(None, "heads", None)
        assert nnx.jit(lambda m, x: m(x))(model, x).shape == (2, 3, 8)
