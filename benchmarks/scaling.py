"""Q4: how the LoRA train step's time and memory grow with width and rank, beside full FT.

A 4-layer MLP, n=512 rows, Adam. Width 256…4096 at r=8, then r 1…256 at width 1024. Memory is
XLA's own accounting of the compiled step: arguments (params + optimizer state + batch) plus
temporaries. Writes ``results/scaling.{json,md,png}``.

    python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax
from common import OUT, compiled_cost, median_time, nbytes, write
from flax import linen as nn

import jaxlora

N, LAYERS = 512, 4


def mlp(width: int) -> nn.Module:
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(LAYERS):
                x = nn.Dense(width, name=f"fc{i}")(x)
                x = jax.nn.relu(x) if i < LAYERS - 1 else x
            return x

    return MLP()


def measure(width: int, r: int | None, repeats: int) -> dict:
    model = mlp(width)
    x = jax.random.normal(jax.random.key(0), (N, width))
    params = model.init(jax.random.key(1), x)["params"]
    config = jaxlora.LoRAConfig(r=r or 1, targets=r"fc\d")
    if r is not None:
        params = jaxlora.inject(params, config, jax.random.key(2))
    tx = jaxlora.freeze_base(optax.adam(1e-3)) if r else optax.adam(1e-3)

    def step(params, opt_state, x):
        def loss(p):
            return jnp.mean(model.apply({"params": p}, x) ** 2)

        if r:
            with jaxlora.intercept(config):
                grads = jax.grad(loss)(params)
        else:
            grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = tx.init(params)
    cost = compiled_cost(step, params, state, x)
    jitted = jax.jit(step)
    seconds = median_time(lambda: jitted(params, state, x), repeats=repeats, warmup=1)
    return {
        "width": width,
        "r": r if r else "full",
        "time_ms": 1e3 * seconds,
        "gflops": cost["flops"] / 1e9,
        "opt_state_mb": nbytes(state) / 1e6,
        "memory_mb": (cost["argument_bytes"] + cost["temp_bytes"]) / 1e6,
    }


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    by_width = [r for r in rows if r["sweep"] == "width"]
    for label, pick in (("full fine-tune", "full"), ("LoRA r=8", 8)):
        pts = [r for r in by_width if r["r"] == pick]
        axes[0].loglog([p["width"] for p in pts], [p["time_ms"] for p in pts], "o-", label=label)
        axes[1].loglog([p["width"] for p in pts], [p["memory_mb"] for p in pts], "o-", label=label)
    by_rank = [r for r in rows if r["sweep"] == "rank"]
    full = next(r for r in by_rank if r["r"] == "full")
    lora = [r for r in by_rank if r["r"] != "full"]
    axes[2].semilogx([p["r"] for p in lora], [p["time_ms"] for p in lora], "o-", label="LoRA")
    axes[2].axhline(full["time_ms"], color="gray", ls="--", label="full fine-tune")
    widths = sorted({p["width"] for p in by_width})
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
    axes[0].set(xlabel="width", ylabel="step time (ms)", title="time vs width (r=8)")
    axes[1].set(xlabel="width", ylabel="XLA args + temp (MB)", title="memory vs width (r=8)")
    axes[2].set(xlabel="rank r", ylabel="step time (ms)", title="time vs rank (width 1024)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sweep, fewer repeats")
    parser.add_argument("--plot-only", action="store_true", help="re-plot results/scaling.json")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((OUT / "scaling.json").read_text())["rows"])
        return
    repeats = 3 if args.quick else 7
    widths = (256, 1024, 2048) if args.quick else (256, 512, 1024, 2048, 4096)
    ranks = (1, 16, 256) if args.quick else (1, 4, 16, 64, 256)
    rows = []
    for width in widths:
        for r in (None, 8):
            rows.append({"sweep": "width", **measure(width, r, repeats)})
    for r in (None, *ranks):
        rows.append({"sweep": "rank", **measure(1024, r, repeats)})
    write(
        "scaling",
        rows,
        f"LoRA train step vs full fine-tune, 4-layer MLP, n={N} (median of {repeats})",
        [
            ("sweep", "sweep"),
            ("width", "width"),
            ("r", "r"),
            ("time_ms", "time (ms)"),
            ("gflops", "compiled GFLOPs"),
            ("opt_state_mb", "opt. state (MB)"),
            ("memory_mb", "XLA args + temp (MB)"),
        ],
    )
    plot(rows)


if __name__ == "__main__":
    main()
