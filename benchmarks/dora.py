"""Q: what does DoRA cost over plain LoRA, in jaxlora and in PEFT?

One adapted Linear layer (n=2048 tokens, in=out=1024, fp32, r in {8, 64}), each contender with
LoRA and with DoRA (``use_dora=True``): the forward pass (eval, no dropout) and one training
step (forward, backward over the adapter only, AdamW update). Contenders: Linen ``nn.Dense``
through ``jaxlora.inject`` + ``intercept`` and NNX ``LoRALinear`` (each jitted), torchlora's
``Linear`` and PEFT's ``LoraConfig(use_dora=...)`` on ``nn.Linear`` (torch, eager). The
column "ratio" is DoRA's time over the same contender's LoRA time; for JAX the compiled FLOPs
of both are given too. DoRA recomputes ‖W + s·B A‖ (an in×out product) every call, which is
where its extra cost comes from, in PEFT as here.

    python benchmarks/dora.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import jax
import jax.numpy as jnp
import optax
import torch
from common import compiled_cost, interleaved_medians, torch_sync, write
from flax import linen as nn
from flax import nnx

import jaxlora
import torchlora
from jaxlora.nnx import LoRALinear

N, D = 2048, 1024


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="fc")(x)


def _linen(r: int, dora: bool, x: jax.Array):
    config = jaxlora.LoRAConfig(r=r, targets=["fc"], use_dora=dora)
    params = _Net().init(jax.random.key(0), x)["params"]
    params = jaxlora.inject(params, config, jax.random.key(1))
    params["fc"]["lora_b"] = jax.random.normal(jax.random.key(2), (r, D)) * 0.01
    adapter, frozen = jaxlora.split(params)

    def forward(adapter, x):
        with jaxlora.intercept(config):
            return _Net().apply({"params": jaxlora.combine(adapter, frozen)}, x)

    tx = optax.adamw(1e-3)

    def step(adapter, state, x):
        grads = jax.grad(lambda a: jnp.mean(forward(a, x) ** 2))(adapter)
        updates, state = tx.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state

    return forward, step, adapter, tx.init(adapter)


def _nnx(r: int, dora: bool, x: jax.Array):
    layer = LoRALinear(D, D, r=r, use_dora=dora, rngs=nnx.Rngs(0))
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (r, D)) * 0.01
    graph, adapter, rest = nnx.split(layer, nnx.LoRAParam, ...)

    def forward(adapter, x):
        return nnx.merge(graph, adapter, rest)(x)

    tx = optax.adamw(1e-3)

    def step(adapter, state, x):
        grads = jax.grad(lambda a: jnp.mean(forward(a, x) ** 2))(adapter)
        updates, state = tx.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state

    return forward, step, adapter, tx.init(adapter)


def jax_rows(r: int, repeats: int) -> list[dict]:
    x = jax.random.normal(jax.random.key(3), (N, D))
    fwd, steps, flops = {}, {}, {}
    for side, build in (("linen", _linen), ("nnx", _nnx)):
        for dora in (False, True):
            name = f"{side}_{'dora' if dora else 'lora'}"
            forward, step, adapter, state = build(r, dora, x)
            f, s = jax.jit(forward), jax.jit(step)
            fwd[name] = lambda f=f, a=adapter: f(a, x)
            steps[name] = lambda s=s, a=adapter, st=state: s(a, st, x)
            flops[name] = (
                compiled_cost(forward, adapter, x)["flops"],
                compiled_cost(step, adapter, state, x)["flops"],
            )
    t_fwd = interleaved_medians(fwd, repeats=repeats)
    t_step = interleaved_medians(steps, repeats=repeats)
    rows = []
    for side in ("linen", "nnx"):
        for what, times, i in (("forward", t_fwd, 0), ("train step", t_step, 1)):
            lora, dora = times[f"{side}_lora"], times[f"{side}_dora"]
            rows.append(
                {
                    "r": r,
                    "contender": f"jaxlora {side}",
                    "what": what,
                    "lora_ms": 1e3 * lora,
                    "dora_ms": 1e3 * dora,
                    "ratio": dora / lora,
                    "lora_flops": flops[f"{side}_lora"][i],
                    "dora_flops": flops[f"{side}_dora"][i],
                }
            )
    return rows


def _torch_models(r: int, dora: bool) -> dict[str, torch.nn.Module]:
    import peft

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(D, D))
    ours = torchlora.inject(
        copy.deepcopy(base), torchlora.LoRAConfig(r=r, targets=["0"], use_dora=dora)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"], use_dora=dora),
        )
    return {"torchlora": ours, "peft": theirs}


def torch_rows(r: int, repeats: int) -> list[dict]:
    x = torch.randn(N, D)
    fwd, steps = {}, {}
    for dora in (False, True):
        for name, model in _torch_models(r, dora).items():
            key = f"{name}_{'dora' if dora else 'lora'}"
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

            def forward(model=model):
                model.eval()
                with torch.no_grad():
                    return model(x)

            def step(model=model, opt=opt):
                model.train()
                opt.zero_grad()
                loss = (model(x) ** 2).mean()
                loss.backward()
                opt.step()
                return loss

            fwd[key], steps[key] = forward, step
    syncs = {k: torch_sync for k in fwd}
    t_fwd = interleaved_medians(fwd, repeats=repeats, syncs=syncs)
    t_step = interleaved_medians(steps, repeats=repeats, syncs=syncs)
    rows = []
    for name in ("torchlora", "peft"):
        for what, times in (("forward", t_fwd), ("train step", t_step)):
            lora, dora = times[f"{name}_lora"], times[f"{name}_dora"]
            rows.append(
                {
                    "r": r,
                    "contender": name,
                    "what": what,
                    "lora_ms": 1e3 * lora,
                    "dora_ms": 1e3 * dora,
                    "ratio": dora / lora,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--reps", type=int, default=None, help="repeats (overrides --quick)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args()
    repeats = args.reps or (7 if args.quick else 31)
    rows = []
    for r in args.ranks:
        rows += jax_rows(r, repeats) + torch_rows(r, repeats)
    write(
        "dora",
        rows,
        f"DoRA vs LoRA, one {D}x{D} Linear, n={N} tokens, fp32 (median of {repeats})",
        [
            ("r", "r"),
            ("contender", "contender"),
            ("what", "what"),
            ("lora_ms", "LoRA ms"),
            ("dora_ms", "DoRA ms"),
            ("ratio", "DoRA / LoRA"),
            ("lora_flops", "LoRA FLOPs"),
            ("dora_flops", "DoRA FLOPs"),
        ],
    )


if __name__ == "__main__":
    main()
