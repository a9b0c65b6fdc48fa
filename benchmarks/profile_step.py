"""Where the time of the twin GPT's LoRA train step goes, op by op, in JAX and in torch.

The main example's step (twin GPT 3x96, batch 16x128, LoRA r=8 on query/value, AdamW):
- JAX: the compiled step run under ``jax.profiler.trace``; every XLA op's time is summed per
  step and grouped by the JAX operation it came from (the HLO ``op_name`` with the layer index
  removed, ``jvp(...)`` = forward pass, ``transpose(jvp(...))`` = backward pass) and the kind
  of XLA op. XLA:CPU runs independent ops concurrently on its threads, so the summed op time
  can exceed the step's wall time.
- torch: ``torch.profiler`` over the same number of steps, self CPU time per aten op.

    python benchmarks/profile_step.py [--steps 10] [--top 25]

Writes ``results/profile_step.md``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import resource
import tempfile

import jax
import numpy as np
import optax
import torch
from common import OUT, machine
from train_step import BASE_CARD, R

import jaxlora
import torchlora
from jaxlora.host import KEEP_BYTES, keep_freed_memory
from jaxlora.models import gpt as jgpt
from torchlora.models import gpt as tgpt


def setup():
    cfg = jgpt.GPTConfig(**json.loads(BASE_CARD.read_text())["config"])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (16, cfg.block_size + 1))
    return cfg, tokens.astype(np.int32)


def jax_step(cfg, tokens):
    model = jgpt.GPT(cfg)
    params = model.init(jax.random.key(2), tokens[:, :-1])["params"]
    config = jaxlora.LoRAConfig(r=R, alpha=2 * R, targets=["query", "value"])
    params = jaxlora.inject(params, config, jax.random.key(1))
    tx = jaxlora.freeze_base(optax.adamw(1e-3, weight_decay=0.01))

    @jax.jit
    @jaxlora.intercept(config)
    def step(params, opt_state, tokens):
        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step, (params, tx.init(params), tokens)


def hlo_ops(text: str) -> dict[str, tuple[str, str]]:
    """XLA op name -> (op kind, JAX op_name with layer indices and the jit prefix removed)."""
    ops = {}
    for line in text.splitlines():
        m = re.match(r"\s+(?:ROOT )?%(\S+) = \S+? ([\w-]+)\(", line)
        if m:
            where = re.search(r'op_name="([^"]*)"', line)
            name = where.group(1) if where else ""
            name = re.sub(r"blocks_\d+", "blocks_N", re.sub(r"^jit\(\w+\)/", "", name))
            kind = re.sub(r"[\d.]+$", "", m.group(1))
            ops[m.group(1)] = (kind, name)
    return ops


def profile_jax(step, args, steps: int) -> list[tuple[float, str, str]]:
    ops = hlo_ops(step.lower(*args).compile().as_text())
    for _ in range(3):
        jax.block_until_ready(step(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(step(*args))
        (trace,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))["traceEvents"]
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in ops:
            total[ops[e["name"]]] += e.get("dur", 0) / 1e3 / steps
    return [(ms, kind, name) for (kind, name), ms in total.most_common()]


def torch_step(cfg, tokens):
    model = tgpt.GPT(tgpt.GPTConfig(**cfg.__dict__))
    torchlora.inject(model, torchlora.LoRAConfig(r=R, alpha=2 * R, targets=["query", "value"]))
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01
    )
    t = torch.from_numpy(tokens.astype(np.int64))

    def step():
        logits = model(t[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def profile_torch(step, steps: int) -> list[tuple[float, str, str]]:
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    rows = [
        (e.self_cpu_time_total / 1e3 / steps, "aten", e.key)
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0
    ]
    return sorted(rows, reverse=True)


def rusage(step, steps: int) -> tuple[float, float, float]:
    """User and system CPU ms and minor page faults per call of ``step`` (after 3 warm-ups):
    the profilers' op times include, in whichever op first touches a freshly mapped buffer,
    the kernel's time to fault in and zero its pages; this shows that time on its own."""
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (
        1e3 * (after.ru_utime - before.ru_utime) / steps,
        1e3 * (after.ru_stime - before.ru_stime) / steps,
        (after.ru_minflt - before.ru_minflt) / steps,
    )


def table(title: str, rows: list[tuple[float, str, str]], top: int) -> list[str]:
    total = sum(ms for ms, _, _ in rows)
    lines = [f"#### {title}: {total:.1f} ms of op time per step", ""]
    lines += ["| ms / step | share | op kind | op (JAX: where it came from) |", "|---|---|---|---|"]
    for ms, kind, name in rows[:top]:
        lines.append(f"| {ms:.2f} | {ms / total:.0%} | {kind} | `{name or '—'}` |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave glibc's malloc thresholds alone (see jaxlora.host.keep_freed_memory)",
    )
    args = parser.parse_args()
    kept = False if args.malloc_default else keep_freed_memory()
    cfg, tokens = setup()
    step, step_args = jax_step(cfg, tokens)
    tstep = torch_step(cfg, tokens)
    lines = [
        "### Twin GPT LoRA train step, op by op",
        "",
        f"Machine: {machine()}; {args.steps} steps profiled; glibc malloc keeps freed memory "
        f"up to {KEEP_BYTES} bytes: {kept}.",
        "",
        "| engine | user CPU ms / step | system CPU ms / step | minor page faults / step |",
        "|---|---|---|---|",
    ]
    for name, fn in (
        ("JAX", lambda: jax.block_until_ready(step(*step_args))),
        ("torch", tstep),
    ):
        user, system, faults = rusage(fn, args.steps)
        lines.append(f"| {name} | {user:.1f} | {system:.1f} | {faults:.0f} |")
    lines.append("")
    lines += table("JAX (XLA ops)", profile_jax(step, step_args, args.steps), args.top)
    torch_rows = profile_torch(tstep, args.steps)
    lines += table("torch (aten ops, self CPU time)", torch_rows, args.top)
    OUT.mkdir(exist_ok=True)
    (OUT / "profile_step.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
