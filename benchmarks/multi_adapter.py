"""Many adapters in one batch: the cost of serving a batch that mixes 16 adapters.

The twin GPT of the main example (``examples/base/gpt_docs.json``'s config), a batch of 16
sequences × 128 tokens, r=8 on query and value, fp32. Contenders, all jitted (Linen):

- ``base``: the base model alone (no adapter);
- ``single``: the whole batch on one adapter (``jaxlora.intercept``);
- ``mixed``: each of the 16 sequences on its own adapter of a 16-adapter stack
  (``jaxlora.intercept_stack``), in one forward;
- ``mixed_same``: the stack mechanism with every sequence on one adapter (same index);
- ``separate``: 16 forwards of one sequence each, each on its own adapter (one compiled
  function, the adapter as its argument): what serving one adapter at a time costs.

Compiled FLOPs (XLA's ``cost_analysis``) of the LoRA branch (the forward minus the base's) are
compared with the analytic count: per adapted layer and token, 2·(in·r + r·out) for the two
products, r for the scale and out for adding the branch to the base output.

    python benchmarks/multi_adapter.py [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from common import compiled_cost, interleaved_medians, write

import jaxlora
from jaxlora.models import gpt as jgpt

CARD = Path(__file__).resolve().parents[1] / "examples" / "base" / "gpt_docs.json"
N_ADAPTERS, BATCH, R = 16, 16, 8
CONFIG = jaxlora.LoRAConfig(r=R, alpha=16, targets=["query", "value"])


def _adapter(base, seed: int):
    """An adapter with non-zero A and B (B = 0 at init would be the base)."""
    params = jaxlora.inject(base, CONFIG, jax.random.key(seed))
    key = iter(jax.random.split(jax.random.key(1000 + seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jax.random.normal(next(key), v.shape) * 0.02 if p[-1].key == "lora_b" else v,
        params,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (checks it runs)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 21
    cfg = jgpt.GPTConfig(**json.loads(CARD.read_text())["config"])
    model = jgpt.GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (BATCH, cfg.block_size), 0, cfg.vocab_size)
    base = model.init(jax.random.key(1), tokens[:1])["params"]
    adapters = [jaxlora.split(_adapter(base, i))[0] for i in range(N_ADAPTERS)]
    stack = jaxlora.stack_adapters(
        [(jaxlora.combine(a, base), CONFIG) for a in adapters], capacity=N_ADAPTERS
    )
    mixed_index = jnp.arange(BATCH) % N_ADAPTERS
    same_index = jnp.zeros(BATCH, jnp.int32)

    def plain(base, tokens):
        return model.apply({"params": base}, tokens)

    @jaxlora.intercept(CONFIG)
    def single(adapter, base, tokens):
        return model.apply({"params": jaxlora.combine(adapter, base)}, tokens)

    def mixed(stack, base, tokens, index):
        with jaxlora.intercept_stack(stack, index):
            return model.apply({"params": base}, tokens)

    f_plain, f_single, f_mixed = jax.jit(plain), jax.jit(single), jax.jit(mixed)

    def separate():
        return [f_single(adapters[i], base, tokens[i : i + 1]) for i in range(BATCH)]

    t = interleaved_medians(
        {
            "base": lambda: f_plain(base, tokens),
            "single": lambda: f_single(adapters[0], base, tokens),
            "mixed": lambda: f_mixed(stack, base, tokens, mixed_index),
            "mixed_same": lambda: f_mixed(stack, base, tokens, same_index),
            "separate": separate,
        },
        repeats=repeats,
    )
    flops = {
        "base": compiled_cost(plain, base, tokens)["flops"],
        "single": compiled_cost(single, adapters[0], base, tokens)["flops"],
        "mixed": compiled_cost(mixed, stack, base, tokens, mixed_index)["flops"],
    }
    d, n_tokens, layers = cfg.d_model, BATCH * cfg.block_size, 2 * cfg.n_layer
    branch = layers * n_tokens * (2 * (d * R + R * d) + R + d)
    rows = []
    for name in ("base", "single", "mixed", "mixed_same", "separate"):
        row = {
            "contender": name,
            "time_ms": 1e3 * t[name],
            "vs_single": t[name] / t["single"],
        }
        if name in flops:
            row["flops"] = flops[name]
            if name != "base":
                row["branch_flops_vs_analytic"] = (flops[name] - flops["base"]) / branch
        rows.append(row)
    write(
        "multi_adapter",
        rows,
        f"{N_ADAPTERS} adapters in one batch: twin GPT (d={d}, {cfg.n_layer} layers), batch "
        f"{BATCH}x{cfg.block_size}, r={R} on query/value, fp32 (analytic branch: "
        f"{branch:,} FLOPs)",
        [
            ("contender", "contender"),
            ("time_ms", "time (ms)"),
            ("vs_single", "× single adapter"),
            ("flops", "compiled FLOPs"),
            ("branch_flops_vs_analytic", "branch FLOPs / analytic"),
        ],
    )


if __name__ == "__main__":
    main()
