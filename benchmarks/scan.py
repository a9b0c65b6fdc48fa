"""Q5: scanned vs unrolled layers with LoRA — compile time, step time, one base for many adapters.

Model: the twin GPT (d=96, 4 heads, byte vocabulary; batch 8 × 64) with L = 4, 12, 24 blocks,
unrolled (``GPT``: L copies of the block in the HLO) and ``nn.scan``ned (``ScanGPT``: one
block). LoRA r=8, alpha=16 on query and value; one jitted ``freeze_base(adamw)`` step.
Reported per L: lower+compile time of the step, optimized HLO size (lines), median step time,
and for the scanned model the live device bytes of one base with one and with two adapters.

    python benchmarks/scan.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import interleaved_medians, nbytes, write

import jaxlora
from jaxlora.models import gpt as jgpt

R, ALPHA, TARGETS = 8, 16, ["query", "value"]
BATCH, SEQ = 8, 64


def _step(model, config, tx):
    @jax.jit
    @jaxlora.intercept(config)
    def step(params, opt_state, tokens):
        def loss_fn(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            labels = tokens[:, 1:]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _measure(model, params, config, tokens) -> tuple[dict, callable]:
    tx = jaxlora.freeze_base(optax.adamw(1e-3))
    opt_state = tx.init(params)
    step = _step(model, config, tx)
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, tokens).compile()
    compile_s = time.perf_counter() - start
    hlo_lines = compiled.as_text().count("\n")
    state = {"params": params, "opt_state": opt_state}

    def run():
        state["params"], state["opt_state"], loss = compiled(
            state["params"], state["opt_state"], tokens
        )
        return loss

    return {"compile_s": compile_s, "hlo_lines": hlo_lines}, run


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    depths = (4, 12) if args.quick else (4, 12, 24)
    repeats = 5 if args.quick else 11
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (BATCH, SEQ + 1)))
    rows = []
    for depth in depths:
        cfg = jgpt.GPTConfig(n_layer=depth, d_model=96, n_head=4, block_size=SEQ)
        unrolled_model, scan_model = jgpt.GPT(cfg), jgpt.ScanGPT(cfg)
        base = unrolled_model.init(jax.random.key(0), tokens[:, :-1])["params"]
        unrolled = jaxlora.inject(base, config, jax.random.key(1))
        scanned = jgpt.stack_blocks(unrolled, depth)
        costs, runs = {}, {}
        for name, model, params in (
            ("unrolled", unrolled_model, unrolled),
            ("scanned", scan_model, scanned),
        ):
            costs[name], runs[name] = _measure(model, params, config, tokens)
        times = interleaved_medians(runs, repeats=repeats, warmup=2)
        for name in ("unrolled", "scanned"):
            rows.append(
                {
                    "layers": depth,
                    "model": name,
                    "compile_s": costs[name]["compile_s"],
                    "hlo_lines": costs[name]["hlo_lines"],
                    "step_ms": times[name] * 1e3,
                }
            )
        del runs, costs
        rows[-1].update(_one_base_many_adapters(scan_model, tokens, config))
    write(
        "scan",
        rows,
        "Scanned vs unrolled twin GPT with LoRA (r=8 on query/value): freeze_base(adamw) step",
        [
            ("layers", "L"),
            ("model", "model"),
            ("compile_s", "lower+compile (s)"),
            ("hlo_lines", "optimized HLO lines"),
            ("step_ms", "step (ms)"),
            ("base_mb", "base (MB)"),
            ("adapter_kb", "one adapter (kB)"),
            ("second_adapter_kb", "live bytes added by a 2nd adapter (kB)"),
        ],
    )


def _one_base_many_adapters(model, tokens, config) -> dict:
    """Live device bytes: one scanned base, then a second adapter for it (never a 2nd base)."""
    import gc

    gc.collect()
    base = jaxlora.split(
        jaxlora.inject(
            model.init(jax.random.key(0), tokens[:, :-1])["params"],
            config,
            jax.random.key(1),
            layouts=jaxlora.layouts(model, tokens[:, :-1]),
        )
    )[1]
    layouts = jaxlora.layouts(model, tokens[:, :-1])
    first = jaxlora.split(jaxlora.inject(base, config, jax.random.key(2), layouts=layouts))[0]
    gc.collect()
    before = _live_bytes()
    second = jaxlora.split(jaxlora.inject(base, config, jax.random.key(3), layouts=layouts))[0]
    gc.collect()
    added = _live_bytes() - before
    assert nbytes(second) == nbytes(first)
    return {
        "base_mb": nbytes(base) / 1e6,
        "adapter_kb": nbytes(first) / 1e3,
        "second_adapter_kb": added / 1e3,
    }


if __name__ == "__main__":
    main()
