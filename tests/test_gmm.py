"""Op-level LoRA on megablox's grouped matmul (``gmm``, a Pallas kernel under a custom_vjp)
inside a ``shard_map``, as tunix's Qwen3 MoE runs its experts on a device mesh (issue 13;
thirdparty_tests/test_megablox.py runs tunix itself). The toy layer of tests/gmm_sharded.py
runs gmm (interpret mode) in a shard_map under a mesh and a dense per-expert loop otherwise;
the adapted layer's output and adapter gradients match the closed form on both paths, the
weight sharded on its experts, contracted or free axis (2 simulated devices), and what cannot
be adapted there is refused with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.tpu import megablox

import jaxlora
from jaxlora import nnx as jnnx
from jaxlora.nnx import oplevel as oplevel_nnx
from tests import gmm_sharded as toy

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


def _mesh():
    return jax.sharding.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",)))


@pytest.mark.parametrize("transpose", [False, True])
def test_gmm_in_a_shard_map_is_adapted_as_the_dense_loop(transpose):
    """Output and adapter gradients equal the closed form on the gmm path (in the shard_map)
    and on the dense loop, whichever runs first. Not transposed: injected and called without
    a mesh, then called under it (before: the cached dense trace ran there, megablox never
    did). Transposed (transpose_rhs): injected under the mesh, found at gmm's rhs in the
    shard_map (before: refused, 'used only by shard_map'), then called without."""
    oplevel_nnx._TRACES.clear()  # traced afresh here (the key of another test's trace)
    if transpose:
        with _mesh():
            model = toy.injected(transpose=True)
            toy.TRACED.clear()  # inject's own trace ran the gmm path: count the calls' only
            errors = [toy.errors(model, True)]
        errors.append(toy.errors(model, True))
    else:
        model = toy.injected()
        toy.TRACED.clear()
        errors = [toy.errors(model, False)]
        with _mesh():
            errors.append(toy.errors(model, False))
    assert toy.TRACED == ["experts"]  # the gmm path was traced, once
    roles = model.experts.lora_roles
    k = 2 if transpose else 1
    assert (roles.batch, roles.contracted, roles.free) == ((0,), (k,), (3 - k,))
    assert model.experts.lora_a.shape == (toy.G, toy.K, toy.R)
    assert model.experts.lora_b.shape == (toy.G, toy.R, toy.N)
    assert max(max(e) for e in errors) <= TOL, errors


def test_sharded_experts_contracted_and_free_axes_match_the_closed_form():
    """2 simulated devices: the weight sharded on its experts (each device's rows its own
    experts'), on its contracted axis (a psum after) or its free axis; the factors enter the
    shard_map sharded alike."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "gmm_sharded.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report.pop("traced") == ["experts", "contracted", "free"]
    for layout, errs in report.items():
        assert max(errs) <= TOL, (layout, errs)


class _Lhs(nnx.Module):
    """The weight (M, K) as gmm's lhs: the rows of a grouped product, not an expert weight."""

    def __init__(self):
        self.w = nnx.Param(jnp.ones((toy.M, toy.K)))

    def __call__(self, rhs, group_sizes):
        return megablox.gmm(self.w[...], rhs, group_sizes, tiling=(8, 8, 8), interpret=True)


class _Offset(toy.Experts):
    """gmm with a group_offset (a sharded group range): another kernel call, not adapted."""

    def __call__(self, x, group_sizes):
        offset = jnp.asarray(0, jnp.int32)
        return megablox.gmm(
            x, self.w[...], group_sizes, tiling=(8, 8, 8), group_offset=offset, interpret=True
        )


class _Kernel(nnx.Module):
    """A weight multiplied inside a Pallas kernel of its own, beside one in a plain product
    (before: ``w`` was silently left out, ``v`` adapted)."""

    def __init__(self):
        self.w = nnx.Param(jnp.ones((toy.K, toy.N)))
        self.v = nnx.Param(jnp.ones((toy.N, toy.N)))

    def __call__(self, x, _group_sizes):
        def kernel(x_ref, w_ref, o_ref):
            o_ref[...] = x_ref[...] @ w_ref[...]

        out = jax.ShapeDtypeStruct((x.shape[0], toy.N), x.dtype)
        return pl.pallas_call(kernel, out_shape=out, interpret=True)(x, self.w[...]) @ self.v[...]


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (_Lhs, r"megablox's gmm as its lhs"),
        (_Offset, r"Pallas kernel 'gmm' \(in a custom_vjp_call\)"),
        (_Kernel, r"Pallas kernel \(pallas_call\)"),
    ],
)
def test_weights_a_kernel_multiplies_are_refused_and_nothing_changes(layer, reason):
    """Never skipped as 'not a product': a refusal naming the layer, the weight and why, the
    model untouched (before: 'no nnx.Param of it is used by a product', or for a module with
    another adaptable weight, silently left out)."""
    model = toy.Model()
    model.experts = layer()
    x, sizes, _ = toy.data()
    inputs = (jnp.asarray(x), jnp.asarray(sizes))
    if layer is _Lhs:
        inputs = (jnp.ones((toy.G, toy.K, toy.N)), jnp.asarray(sizes))
    config = jaxlora.LoRAConfig(r=2, targets=["experts"])
    with pytest.raises(ValueError, match=rf"layer 'experts', weight 'w' .*{reason}"):
        jnnx.inject(model, config, nnx.Rngs(0), inputs=inputs)
    assert type(model.experts) is layer
    assert not nnx.state(model, nnx.LoRAParam)
