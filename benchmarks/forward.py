"""Q1 and Q2: the cost of a LoRA layer's forward pass, unmerged and merged.

Unmerged: ``LoRADense`` vs ``nn.Dense``, ``jaxlora.nnx.LoRALinear`` and Flax's own
``nnx.LoRALinear`` vs ``nnx.Linear``, ``torchlora.Linear``
vs ``nn.Linear``, and PEFT's LoRA Linear vs ``nn.Linear`` (when peft is installed), at
n=2048 tokens, in=out=1024, r in {1, 8, 64}, fp32; each ratio to its own plain layer beside the
FLOP ratio 1 + r(in+out)/(in·out). Merged: the merged tree under plain ``nn.Dense`` — compiled
FLOPs and time against the plain layer.

    python benchmarks/forward.py [--quick]
"""

from __future__ import annotations

import argparse

import jax
import torch
from common import compiled_cost, interleaved_medians, torch_sync, write
from flax import linen as nn
from flax import nnx

import jaxlora
import torchlora
from jaxlora.nnx import LoRALinear

N, D = 2048, 1024


def jax_rows(r: int, repeats: int) -> list[dict]:
    x = jax.random.normal(jax.random.key(0), (N, D))
    dense, lora = nn.Dense(D), jaxlora.LoRADense(D, r)
    params = lora.init(jax.random.key(1), x)
    params["params"]["lora_b"] = jax.random.normal(jax.random.key(2), (r, D)) * 0.01
    plain_params = {"params": {k: params["params"][k] for k in ("kernel", "bias")}}
    merged = jaxlora.merge(params, alpha=None)
    f_plain, f_lora = jax.jit(dense.apply), jax.jit(lora.apply)

    t = interleaved_medians(
        {
            "linen_plain": lambda: f_plain(plain_params, x),
            "linen_lora": lambda: f_lora(params, x),
            "linen_merged": lambda: f_plain(merged, x),
        },
        repeats=repeats,
    )
    # NNX in its functional form (split once, jit over the state): no per-call graph traversal.
    nnx_fns = {}
    for name, module in (
        ("nnx_plain", nnx.Linear(D, D, rngs=nnx.Rngs(0))),
        ("nnx_lora", LoRALinear(D, D, r=r, rngs=nnx.Rngs(0))),
        ("flax_lora", nnx.LoRALinear(D, D, lora_rank=r, rngs=nnx.Rngs(0))),
    ):
        graphdef, state = nnx.split(module)
        fn = jax.jit(lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x))
        nnx_fns[name] = lambda fn=fn, state=state: fn(state, x)
    t.update(interleaved_medians(nnx_fns, repeats=repeats))
    flops = {
        name: compiled_cost(fn, p, x)["flops"]
        for name, fn, p in (
            ("plain", dense.apply, plain_params),
            ("lora", lora.apply, params),
            ("merged", dense.apply, merged),
        )
    }
    return [
        {
            "layer": "jaxlora.LoRADense vs nn.Dense",
            "r": r,
            "time_ms": 1e3 * t["linen_lora"],
            "plain_ms": 1e3 * t["linen_plain"],
            "ratio": t["linen_lora"] / t["linen_plain"],
            "flop_ratio": flops["lora"] / flops["plain"],
        },
        {
            "layer": "jaxlora.nnx.LoRALinear vs nnx.Linear",
            "r": r,
            "time_ms": 1e3 * t["nnx_lora"],
            "plain_ms": 1e3 * t["nnx_plain"],
            "ratio": t["nnx_lora"] / t["nnx_plain"],
        },
        {
            "layer": "Flax's nnx.LoRALinear vs nnx.Linear",
            "r": r,
            "time_ms": 1e3 * t["flax_lora"],
            "plain_ms": 1e3 * t["nnx_plain"],
            "ratio": t["flax_lora"] / t["nnx_plain"],
        },
        {
            "layer": "merged tree under nn.Dense",
            "r": r,
            "time_ms": 1e3 * t["linen_merged"],
            "plain_ms": 1e3 * t["linen_plain"],
            "ratio": t["linen_merged"] / t["linen_plain"],
            "flop_ratio": flops["merged"] / flops["plain"],
        },
    ]


def torch_rows(r: int, repeats: int) -> list[dict]:
    x = torch.randn(N, D)
    plain = torch.nn.Linear(D, D)
    lora = torchlora.Linear.from_linear(plain, r, copy=True)
    contenders = {"plain": lambda: plain(x), "torchlora": lambda: lora(x)}
    try:
        import peft

        peft_model = peft.get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(D, D)),
            peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"]),
        )
        contenders["peft"] = lambda: peft_model(x)
    except ImportError:
        pass
    with torch.no_grad():
        t = interleaved_medians(
            contenders, repeats=repeats, syncs={k: torch_sync for k in contenders}
        )
    rows = [
        {
            "layer": "torchlora.Linear vs nn.Linear",
            "r": r,
            "time_ms": 1e3 * t["torchlora"],
            "plain_ms": 1e3 * t["plain"],
            "ratio": t["torchlora"] / t["plain"],
        }
    ]
    if "peft" in t:
        rows.append(
            {
                "layer": "PEFT LoRA Linear vs nn.Linear",
                "r": r,
                "time_ms": 1e3 * t["peft"],
                "plain_ms": 1e3 * t["plain"],
                "ratio": t["peft"] / t["plain"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 7 if args.quick else 51
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for r in (1, 8, 64):
        analytic = 1 + r * (D + D) / (D * D)
        for row in jax_rows(r, repeats) + torch_rows(r, repeats):
            row["analytic_flop_ratio"] = 1.0 if row["layer"].startswith("merged") else analytic
            rows.append(row)
    write(
        "forward",
        rows,
        f"Forward pass, n={N} tokens, in=out={D}, fp32 (median of {repeats})",
        [
            ("layer", "layer"),
            ("r", "r"),
            ("time_ms", "time (ms)"),
            ("plain_ms", "plain (ms)"),
            ("ratio", "time ratio"),
            ("flop_ratio", "compiled FLOP ratio"),
            ("analytic_flop_ratio", "analytic FLOP ratio"),
        ],
    )


if __name__ == "__main__":
    main()
