"""A toy MoE expert layer that runs megablox's grouped matmul (``gmm``, Pallas interpret mode)
inside a ``shard_map`` when a mesh is set, and a dense per-expert loop otherwise; its closed
form in numpy; and, run as a script with 2 simulated CPU devices (tests/test_gmm.py does), the
adapted layer with the weight sharded on the experts, the contracted or the free axis against
the closed form. Prints a JSON report.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/gmm_sharded.py
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.tpu import megablox
from jax.sharding import PartitionSpec as P

G, K, N, M, R, ALPHA = 4, 16, 8, 32, 2, 4.0
SIZES = np.array([8, 8, 0, 16], np.int32)  # an empty group; 16 rows per half
# (x, w, group_sizes) in-specs, out-spec, psum axis: the weight sharded on its experts (each
# device's rows are its own experts'), on its contracted axis (a psum after), on its free axis.
LAYOUTS = {
    "experts": ((P("d"), P("d"), P("d")), P("d"), None),
    "contracted": ((P(None, "d"), P(None, "d"), P()), P(), "d"),
    "free": ((P(), P(None, None, "d"), P()), P(None, "d"), None),
}
TRACED: list = []  # one entry per trace of the gmm path


class Experts(nnx.Module):
    """``w`` (G, K, N) (``transpose``: (G, N, K), megablox's transpose_rhs): row block g of x
    times expert g."""

    def __init__(self, *, transpose: bool = False, layout: str = "experts", seed: int = 0):
        shape = (G, N, K) if transpose else (G, K, N)
        self.w = nnx.Param(jax.random.normal(jax.random.key(seed), shape) * 0.3)
        self.transpose, self.layout = transpose, layout

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        w = self.w[...]
        if jax.sharding.get_abstract_mesh().empty:
            ids = jnp.repeat(jnp.arange(G), group_sizes, total_repeat_length=x.shape[0])
            rows = jnp.arange(x.shape[0]) < group_sizes.sum()
            out = 0
            for g in range(G):
                wg = w[g].T if self.transpose else w[g]
                out = out + jnp.where(((ids == g) & rows)[:, None], x @ wg, 0.0)
            return out
        TRACED.append(self.layout)
        gmm = functools.partial(
            megablox.gmm, tiling=(8, 8, 8), transpose_rhs=self.transpose, interpret=True
        )
        specs, out_spec, psum = LAYOUTS[self.layout]

        def body(x, w, sizes):
            y = gmm(x, w, sizes, preferred_element_type=x.dtype)
            return y if psum is None else jax.lax.psum(y, psum)

        return jax.shard_map(body, in_specs=specs, out_specs=out_spec, check_vma=False)(
            x, w, group_sizes
        )


class Model(nnx.Module):
    def __init__(self, **options):
        self.experts = Experts(**options)

    def __call__(self, x, group_sizes):
        return self.experts(x, group_sizes)


def data(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, group sizes, an output cotangent)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(M, K)).astype(np.float32), SIZES, rng.normal(size=(M, N))


def closed_form(w, a, b, scale, x, sizes, cot, transpose: bool):
    """(y, d lora_a, d lora_b) of ``sum(y * cot)`` in float64: y = x_g (W_g + s A_g B_g) per
    group g (W_g transposed for transpose_rhs), covering all rows."""
    w, a, b, x, cot = (np.asarray(v, np.float64) for v in (w, a, b, x, cot))
    y, da, db = np.zeros((len(x), N)), np.zeros_like(a), np.zeros_like(b)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        wg = w[g].T if transpose else w[g]
        y[rows] = x[rows] @ (wg + scale * a[g] @ b[g])
        da[g] = scale * x[rows].T @ cot[rows] @ b[g].T
        db[g] = scale * (x[rows] @ a[g]).T @ cot[rows]
        start += size
    return y, da, db


def adapted(model: Model, x, sizes, cot):
    """(y, d lora_a, d lora_b) of the adapted model (lora_b set nonzero by the caller)."""

    def loss(model):
        y = model(x, sizes)
        return jnp.sum(y * cot), y

    diff = nnx.DiffState(0, nnx.LoRAParam)
    grads, y = nnx.grad(loss, argnums=diff, has_aux=True)(model)
    return (
        np.asarray(y),
        np.asarray(grads.experts.lora_a[...]),
        np.asarray(grads.experts.lora_b[...]),
    )


def injected(**options) -> Model:
    import jaxlora
    from jaxlora import nnx as jnnx

    x, sizes, _ = data()
    model = Model(**options)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["experts"])
    jnnx.inject(model, config, nnx.Rngs(3), inputs=(jnp.asarray(x), jnp.asarray(sizes)))
    b = model.experts.lora_b
    b[...] = jax.random.normal(jax.random.key(4), b.shape) * 0.5
    return model


def errors(model: Model, transpose: bool) -> list[float]:
    """Relative errors of (y, d lora_a, d lora_b) against the closed form."""
    x, sizes, cot = data()
    got = adapted(model, jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(cot, jnp.float32))
    e = model.experts
    want = closed_form(e.w[...], e.lora_a[...], e.lora_b[...], e.scaling, x, sizes, cot, transpose)
    return [float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want, strict=True)]


def main() -> None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
    report = {}
    for layout in LAYOUTS:
        model = injected(layout=layout)
        with jax.set_mesh(mesh):
            report[layout] = errors(model, transpose=False)
    report["traced"] = list(TRACED)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
