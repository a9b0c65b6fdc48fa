"""Q3: one training step with Adam — full fine-tune vs LoRA, across frameworks.

Models: a 4-layer 1024-wide MLP (n=2048 rows) and the twin GPT of the main example (batch 16
× 128 bytes). Contenders: JAX full fine-tune; JAX LoRA (``inject`` + ``intercept`` +
``freeze_base``, one jit); jaxlora's NNX LoRA and Flax's own ``nnx.LoRALinear`` (both
``nnx.Optimizer(wrt=nnx.LoRAParam)``, functional form); torchlora reference; PEFT. LoRA
everywhere: r=8 on every MLP layer / on query and value.
Reported: median step time, compiled FLOPs, XLA temp memory and XLA's total (arguments + temp +
outputs: a full fine-tune's new params and optimizer state are outputs), optimizer-state bytes.

    python benchmarks/train_step.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from common import compiled_cost, interleaved_medians, nbytes, torch_sync, write
from flax import linen as nn
from flax import nnx

import jaxlora
import jaxlora.nnx
import torchlora
from jaxlora.host import KEEP_BYTES, keep_freed_memory
from jaxlora.models import gpt as jgpt
from torchlora.models import gpt as tgpt

LR = 1e-3
N, D, LAYERS, R = 2048, 1024, 4, 8
BASE_CARD = Path(__file__).resolve().parents[1] / "examples" / "base" / "gpt_docs.json"


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = nn.Dense(D, name=f"fc{i}")(x)
            x = jax.nn.relu(x) if i < LAYERS - 1 else x
        return x


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        for i in range(LAYERS):
            setattr(self, f"fc{i}", nnx.Linear(D, D, rngs=rngs))

    def __call__(self, x):
        for i in range(LAYERS):
            x = getattr(self, f"fc{i}")(x)
            x = jax.nn.relu(x) if i < LAYERS - 1 else x
        return x


class FlaxLoraMLP(nnx.Module):
    """The MLP built from Flax's own ``nnx.LoRALinear`` (the NNX LoRA a user might pick)."""

    def __init__(self, rngs):
        for i in range(LAYERS):
            setattr(self, f"fc{i}", nnx.LoRALinear(D, D, lora_rank=R, rngs=rngs))

    def __call__(self, x):
        return NnxMLP.__call__(self, x)


def flax_lora_gpt(cfg) -> nnx.Module:
    """The NNX twin GPT with Flax's own ``nnx.LoRALinear`` as query and value."""
    model = jgpt.NnxGPT(cfg, rngs=nnx.Rngs(0))
    rngs = nnx.Rngs(1)
    for i in range(cfg.n_layer):
        attn = getattr(model, f"blocks_{i}").attn
        for name in ("query", "value"):
            setattr(attn, name, nnx.LoRALinear(cfg.d_model, cfg.d_model, lora_rank=R, rngs=rngs))
    return model


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(LAYERS):
            self.add_module(f"fc{i}", torch.nn.Linear(D, D))

    def forward(self, x):
        for i in range(LAYERS):
            x = getattr(self, f"fc{i}")(x)
            x = torch.relu(x) if i < LAYERS - 1 else x
        return x


def mse(out, y):
    return jnp.mean((out - y) ** 2)


def gpt_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def jax_steps(apply, loss, params, config, batch):
    """Full and LoRA step functions of a Linen model, each as one jit."""

    def make(tx, lora):
        def step(params, opt_state, *batch):
            def objective(p):
                return loss(apply({"params": p}, batch[0]), batch[-1])

            if lora:
                with jaxlora.intercept(config):
                    grads = jax.grad(objective)(params)
            else:
                grads = jax.grad(objective)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return step

    lora_params = jaxlora.inject(params, config, jax.random.key(1))
    out = {}
    for name, tx, p, lora in (
        ("JAX full fine-tune", optax.adam(LR), params, False),
        ("JAX LoRA (freeze_base)", jaxlora.freeze_base(optax.adam(LR)), lora_params, True),
    ):
        step, state = make(tx, lora), tx.init(p)
        cost = compiled_cost(step, p, state, *batch)
        jitted = jax.jit(step)
        out[name] = dict(
            fn=lambda jitted=jitted, p=p, state=state: jitted(p, state, *batch),
            flops=cost["flops"],
            temp_bytes=cost["temp_bytes"],
            total_bytes=cost["total_bytes"],
            opt_bytes=nbytes(state),
            sync=jax.block_until_ready,
        )
    out["_lora_params"] = lora_params
    return out


def nnx_step(model, loss, batch):
    tx = optax.adam(LR)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def step(state, *batch):
        model, optimizer = nnx.merge(graphdef, state)
        grads = nnx.grad(
            lambda m: loss(m(batch[0]), batch[-1]), argnums=nnx.DiffState(0, nnx.LoRAParam)
        )(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    opt_bytes = nbytes(nnx.state(optimizer, nnx.optimizer.OptState))
    cost = compiled_cost(step, state, *batch)
    return dict(
        fn=lambda: step(state, *batch),
        flops=cost["flops"],
        temp_bytes=cost["temp_bytes"],
        total_bytes=cost["total_bytes"],
        opt_bytes=opt_bytes,
        sync=jax.block_until_ready,
    )


def torch_step(model, loss, batch):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step():
        out = loss(model(batch[0]), batch[-1])
        opt.zero_grad()
        out.backward()
        opt.step()

    step()  # creates the optimizer state
    opt_bytes = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    return dict(fn=step, opt_bytes=opt_bytes, sync=torch_sync)


def mlp_contenders():
    x = jax.random.normal(jax.random.key(0), (N, D))
    y = jax.random.normal(jax.random.key(1), (N, D))
    model = MLP()
    params = model.init(jax.random.key(2), x)["params"]
    config = jaxlora.LoRAConfig(r=R, alpha=2 * R, targets=r"fc\d")
    c = jax_steps(model.apply, mse, params, config, (x, y))
    lora_params = c.pop("_lora_params")
    nnx_model = NnxMLP(nnx.Rngs(0))
    jaxlora.nnx.inject(nnx_model, config, nnx.Rngs(1))
    c["jaxlora.nnx LoRA (wrt=LoRAParam)"] = nnx_step(nnx_model, mse, (x, y))
    c["Flax nnx.LoRALinear (wrt=LoRAParam)"] = nnx_step(FlaxLoraMLP(nnx.Rngs(0)), mse, (x, y))
    tx, ty = torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y))
    tmodel = torchlora.inject(TorchMLP(), torchlora.LoRAConfig(r=R, alpha=2 * R, targets=r"fc\d"))
    c["torchlora reference"] = torch_step(tmodel, torch.nn.functional.mse_loss, (tx, ty))
    c.update(
        peft_contender(
            TorchMLP(), [f"fc{i}" for i in range(LAYERS)], torch.nn.functional.mse_loss, (tx, ty)
        )
    )
    lora_bytes = nbytes(jaxlora.split(lora_params)[0])
    return c, lora_bytes, analytic_mlp_flops()


def analytic_mlp_flops() -> float:
    def mm(a, b):
        return 2 * N * a * b

    forward = LAYERS * (mm(D, D) + mm(D, R) + mm(R, D))
    backward = LAYERS * (mm(R, D) + 2 * mm(D, R)) + (LAYERS - 1) * (mm(D, D) + mm(R, D))
    return forward + backward


def peft_contender(base, targets, loss, batch):
    try:
        import peft
    except ImportError:
        return {}
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets)
    )
    return {"PEFT": torch_step(model, loss, batch)}


def gpt_contenders():
    cfg = jgpt.GPTConfig(**json.loads(BASE_CARD.read_text())["config"])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (16, cfg.block_size + 1))
    model = jgpt.GPT(cfg)
    params = model.init(jax.random.key(2), tokens[:, :-1])["params"]
    config = jaxlora.LoRAConfig(r=R, alpha=2 * R, targets=["query", "value"])
    batch = (tokens[:, :-1], tokens)
    c = jax_steps(model.apply, gpt_loss, params, config, batch)
    lora_params = c.pop("_lora_params")
    nnx_model = jgpt.NnxGPT(cfg, rngs=nnx.Rngs(0))
    jaxlora.nnx.inject(nnx_model, config, nnx.Rngs(1))
    c["jaxlora.nnx LoRA (wrt=LoRAParam)"] = nnx_step(nnx_model, gpt_loss, batch)
    c["Flax nnx.LoRALinear (wrt=LoRAParam)"] = nnx_step(flax_lora_gpt(cfg), gpt_loss, batch)
    ttok = torch.from_numpy(tokens)

    def torch_loss(logits, tokens):
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )

    tbase = tgpt.GPT(tgpt.GPTConfig(**cfg.__dict__))
    tmodel = torchlora.inject(
        copy.deepcopy(tbase), torchlora.LoRAConfig(r=R, alpha=2 * R, targets=["query", "value"])
    )
    c["torchlora reference"] = torch_step(tmodel, torch_loss, (ttok[:, :-1], ttok))
    c.update(peft_contender(tbase, ["query", "value"], torch_loss, (ttok[:, :-1], ttok)))
    return c, nbytes(jaxlora.split(lora_params)[0]), None


def gemm_floor(peft_ms: float | None, lora_flops: float, repeats: int) -> list[dict]:
    """How fast this machine multiplies the MLP's dominant (2048, 1024) @ (1024, 1024) GEMM in
    each engine, and what that bounds: no LoRA step can run faster than its compiled FLOPs at
    the best GEMM rate measured, so PEFT's time over that floor is the largest speedup over
    PEFT that any implementation could reach here."""
    x, k = jnp.ones((N, D)), jnp.ones((D, D))
    tx, tk = torch.ones(N, D), torch.ones(D, D)
    jax_gemm = jax.jit(jnp.matmul)

    def torch_gemm():
        with torch.no_grad():
            return tx @ tk

    times = interleaved_medians(
        {"JAX (XLA)": lambda: jax_gemm(x, k), "torch": torch_gemm},
        repeats=3 * repeats,
        warmup=3,
        syncs={"JAX (XLA)": jax.block_until_ready, "torch": torch_sync},
    )
    flops = 2.0 * N * D * D
    rows = [
        {"what": f"{name} GEMM ({N}, {D}) @ ({D}, {D})", "ms": 1e3 * t, "gflops": flops / t / 1e9}
        for name, t in times.items()
    ]
    floor = lora_flops / (flops / min(times.values()))
    rows.append({"what": "LoRA step floor: compiled FLOPs ÷ best GEMM rate", "ms": 1e3 * floor})
    if peft_ms is not None:
        rows.append(
            {
                "what": "PEFT step ÷ that floor: the most any LoRA step could beat PEFT by here",
                "ms": peft_ms,
                "ratio": peft_ms / (1e3 * floor),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave glibc's malloc thresholds alone (see jaxlora.host.keep_freed_memory)",
    )
    args = parser.parse_args()
    kept = False if args.malloc_default else keep_freed_memory()
    print(f"glibc malloc keeps freed memory up to {KEEP_BYTES} bytes: {kept}")
    repeats = 5 if args.quick else 15
    rows = []
    for model_name, build in (
        ("MLP 4x1024, n=2048", mlp_contenders),
        ("twin GPT 3x96, 16x128 bytes", gpt_contenders),
    ):
        contenders, lora_bytes, minimum = build()
        times = interleaved_medians(
            {k: v["fn"] for k, v in contenders.items()},
            repeats=repeats,
            warmup=2,
            syncs={k: v["sync"] for k, v in contenders.items()},
        )
        full = times["JAX full fine-tune"]
        for name, c in contenders.items():
            rows.append(
                {
                    "model": model_name,
                    "contender": name,
                    "time_ms": 1e3 * times[name],
                    "vs_jax_full": times[name] / full,
                    "flops": c.get("flops"),
                    "flops_vs_min": c["flops"] / minimum
                    if minimum and "LoRA" in name and "flops" in c
                    else None,
                    "opt_state_bytes": c["opt_bytes"],
                    "opt_vs_2x_lora": c["opt_bytes"] / (2 * lora_bytes)
                    if "full" not in name
                    else None,
                    "temp_mb": c["temp_bytes"] / 1e6 if "temp_bytes" in c else None,
                    "total_mb": c["total_bytes"] / 1e6 if "total_bytes" in c else None,
                }
            )
    mlp = {row["contender"]: row for row in rows if row["model"].startswith("MLP")}
    peft_ms = mlp["PEFT"]["time_ms"] if "PEFT" in mlp else None
    floor = gemm_floor(peft_ms, mlp["JAX LoRA (freeze_base)"]["flops"], repeats)
    write(
        "train_step",
        rows,
        f"Train step with Adam (median of {repeats})",
        [
            ("model", "model"),
            ("contender", "contender"),
            ("time_ms", "time (ms)"),
            ("vs_jax_full", "÷ JAX full"),
            ("flops", "compiled FLOPs"),
            ("flops_vs_min", "FLOPs ÷ analytic min"),
            ("opt_state_bytes", "opt. state (B)"),
            ("opt_vs_2x_lora", "opt. state ÷ 2×LoRA"),
            ("temp_mb", "XLA temp (MB)"),
            ("total_mb", "XLA args + temp + outputs (MB)"),
        ],
    )
    write(
        "train_step_floor",
        floor,
        f"GEMM-bound floor of the MLP LoRA step (median of {3 * repeats})",
        [("what", "measure"), ("ms", "time (ms)"), ("gflops", "GFLOP/s"), ("ratio", "ratio")],
    )


if __name__ == "__main__":
    main()
