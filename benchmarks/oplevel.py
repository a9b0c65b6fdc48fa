"""Q9: what does LoRA at an einsum cost, and how does jaxlora compare with qwix on tunix?

Part 1 (any environment). One attention-style projection ``x (B, T, D) → (B, T, N, H)``,
written two ways: a custom module that calls ``jnp.einsum('BTD,DNH->BTNH', x, w)`` (adapted
at its product: jaxlora's op-level rule) and Flax's ``DenseGeneral(features=(N, H))`` (adapted
as a known layer kind). Same shapes, same r, Linen and NNX: forward time, Adam train step time
(adapter only), compiled FLOPs of each beside the analytic minimum. The claim under test: an
einsum adapted at its product costs what the equivalent DenseGeneral adapter costs.

Part 2 (needs tunix and qwix: run it with the third-party venv, ``.venv-thirdparty/bin/python
benchmarks/oplevel.py``). tunix 0.1.7's NNX Llama3 with LoRA r=8 on q/k/v/o and the MLP,
adapted by jaxlora (``jaxlora.nnx.inject(..., inputs=...)``) and by qwix 0.1.8
(``qwix.apply_lora_to_model``) from the same base: forward time, Adam train step time, compiled
FLOPs and XLA memory (arguments, temp, outputs) of the train step.

    python benchmarks/oplevel.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from common import compiled_cost, interleaved_medians, write
from flax import nnx

import jaxlora
from jaxlora import nnx as jnnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: its tests
from tests.test_oplevel_cost import LinenNet, NnxNet, analytic_flops

B, T, D, N, H, R = 8, 128, 1024, 16, 64, 8


# ---------------------------------------------------------------- part 1: einsum vs DenseGeneral
# The two ways of writing the projection, as tests/test_oplevel_cost.py asserts their FLOPs.
SHAPE = (D, N, H)


def _nonzero_b(tree):
    """B = 0 at init would let XLA prove nothing; give the adapters real values."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            jax.random.normal(jax.random.key(2), leaf.shape, leaf.dtype) * 0.01
            if "lora_b" in jax.tree_util.keystr(path)
            else leaf
        ),
        tree,
    )


def _linen(kind: str, x):
    model = LinenNet(kind, SHAPE)
    config = jaxlora.LoRAConfig(r=R, alpha=16, targets=["proj"])
    variables = model.init(jax.random.key(0), x)
    params = jaxlora.inject(
        variables["params"], config, jax.random.key(1), layouts=jaxlora.layouts(model, x)
    )
    adapter, frozen = jaxlora.split(_nonzero_b(params))

    def forward(adapter, x):
        with jaxlora.intercept(config):
            return model.apply({"params": jaxlora.combine(adapter, frozen)}, x)

    return forward, adapter


def _nnx(kind: str, x):
    model = NnxNet(kind, nnx.Rngs(0), SHAPE)
    config = jaxlora.LoRAConfig(r=R, alpha=16, targets=["proj"])
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(x,))
    graph, adapter, rest = nnx.split(model, nnx.LoRAParam, ...)
    adapter = _nonzero_b(adapter)

    def forward(adapter, x):
        return nnx.merge(graph, adapter, rest)(x)

    return forward, adapter


def _step_of(forward, adapter):
    tx = optax.adam(1e-3)

    def step(adapter, state, x):
        grads = jax.grad(lambda a: jnp.mean(forward(a, x) ** 2))(adapter)
        updates, state = tx.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state

    return step, tx.init(adapter)


def part1(quick: bool) -> None:
    x = jax.random.normal(jax.random.key(3), (B, T, D))
    repeats = 7 if quick else 21
    rows = []
    for api, build in (("Linen", _linen), ("NNX", _nnx)):
        fns, costs = {}, {}
        for kind in ("einsum", "DenseGeneral"):
            forward, adapter = build(kind, x)
            step, state = _step_of(forward, adapter)
            fwd = jax.jit(forward)
            stp = jax.jit(step)
            fns[(kind, "forward")] = lambda f=fwd, a=adapter: f(a, x)
            fns[(kind, "train step")] = lambda s=stp, a=adapter, st=state: s(a, st, x)
            costs[(kind, "forward")] = compiled_cost(forward, adapter, x)
            costs[(kind, "train step")] = compiled_cost(step, adapter, state, x)
        names = {f"{k[0]} {k[1]}": v for k, v in fns.items()}
        times = interleaved_medians(names, repeats=repeats)
        for what in ("forward", "train step"):
            ein, den = times[f"einsum {what}"], times[f"DenseGeneral {what}"]
            minimum = analytic_flops(B * T, SHAPE, R, what == "train step")
            rows.append(
                {
                    "api": api,
                    "what": what,
                    "einsum_ms": ein * 1e3,
                    "dense_ms": den * 1e3,
                    "ratio": ein / den,
                    "einsum_flops_ratio": costs[("einsum", what)]["flops"] / minimum,
                    "dense_flops_ratio": costs[("DenseGeneral", what)]["flops"] / minimum,
                }
            )
    write(
        "oplevel_einsum",
        rows,
        f"LoRA at an einsum vs DenseGeneral: x ({B}, {T}, {D}) → ({N}, {H}), r={R}, fp32 "
        f"(median of {repeats})",
        [
            ("api", "API"),
            ("what", "what"),
            ("einsum_ms", "einsum, op-level (ms)"),
            ("dense_ms", "DenseGeneral (ms)"),
            ("ratio", "time ratio"),
            ("einsum_flops_ratio", "einsum FLOPs / analytic"),
            ("dense_flops_ratio", "DenseGeneral FLOPs / analytic"),
        ],
    )


# ---------------------------------------------------------------- part 2: tunix Llama3, vs qwix
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama_inputs(batch: int, length: int, vocab: int):
    tokens = jax.random.randint(jax.random.key(4), (batch, length), 0, vocab, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
    return tokens, (tokens, positions, None, mask)


def _nnx_contender(model, inputs, tokens):
    graph, adapter, rest = nnx.split(model, nnx.LoRAParam, ...)
    adapter = _nonzero_b(adapter)

    def forward(adapter, tokens_in):
        return nnx.merge(graph, adapter, rest)(tokens_in, *inputs[1:])[0]

    tx = optax.adam(1e-3)

    def step(adapter, state, tokens_in):
        def loss_fn(a):
            logits = forward(a, tokens_in)[:, :-1]
            labels = tokens_in[:, 1:]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss_fn)(adapter)
        updates, state = tx.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state

    return forward, step, adapter, tx.init(adapter)


def part2(quick: bool) -> None:
    import qwix
    from tunix.models.llama3 import model as llama3

    config = llama3.ModelConfig(
        num_layers=2 if quick else 4,
        vocab_size=4096,
        embed_dim=512,
        hidden_dim=1536,
        num_heads=8,
        head_dim=64,
        num_kv_heads=4,
        rope_theta=1_000_000,
        norm_eps=1e-5,
    )
    tokens, inputs = _llama_inputs(4, 128, config.vocab_size)
    base = llama3.Llama3(config, rngs=nnx.Rngs(0))

    ours = copy.deepcopy(base)
    jnnx.inject(
        ours, jaxlora.LoRAConfig(r=R, alpha=16, targets=TARGETS), nnx.Rngs(1), inputs=inputs
    )
    provider = qwix.LoraProvider(module_path=".*(" + "|".join(TARGETS) + ")", rank=R, alpha=16.0)
    theirs = qwix.apply_lora_to_model(copy.deepcopy(base), provider, *inputs, rngs=nnx.Rngs(1))

    fns, costs, counts = {}, {}, {}
    for name, model in (("jaxlora", ours), ("qwix", theirs)):
        forward, step, adapter, state = _nnx_contender(model, inputs, tokens)
        fwd, stp = jax.jit(forward), jax.jit(step)
        fns[f"{name} forward"] = lambda f=fwd, a=adapter: f(a, tokens)
        fns[f"{name} train step"] = lambda s=stp, a=adapter, st=state: s(a, st, tokens)
        costs[(name, "forward")] = compiled_cost(forward, adapter, tokens)
        costs[(name, "train step")] = compiled_cost(step, adapter, state, tokens)
        counts[name] = sum(x.size for x in jax.tree.leaves(adapter))
    repeats = 5 if quick else 15
    times = interleaved_medians(fns, repeats=repeats)
    rows = []
    for name in ("jaxlora", "qwix"):
        for what in ("forward", "train step"):
            cost = costs[(name, what)]
            rows.append(
                {
                    "who": name,
                    "what": what,
                    "ms": times[f"{name} {what}"] * 1e3,
                    "vs_qwix": times[f"{name} {what}"] / times[f"qwix {what}"],
                    "gflops": cost["flops"] / 1e9,
                    "temp_mb": cost["temp_bytes"] / 2**20,
                    "total_mb": cost["total_bytes"] / 2**20,
                    "adapter_params": counts[name],
                }
            )
    write(
        "oplevel_tunix_qwix",
        rows,
        f"tunix Llama3 ({config.num_layers}×{config.embed_dim}, MLP {config.hidden_dim}, "
        f"vocab {config.vocab_size}), batch 4×128, LoRA r={R} on q/k/v/o + MLP, fp32: jaxlora vs "
        f"qwix (median of {repeats})",
        [
            ("who", "adapted by"),
            ("what", "what"),
            ("ms", "time (ms)"),
            ("vs_qwix", "time / qwix"),
            ("gflops", "compiled GFLOPs"),
            ("temp_mb", "XLA temp (MiB)"),
            ("total_mb", "args + temp + outputs (MiB)"),
            ("adapter_params", "adapter params"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    part1(args.quick)
    if importlib.util.find_spec("tunix") and importlib.util.find_spec("qwix"):
        part2(args.quick)
    else:
        print(
            "part 2 (tunix Llama3: jaxlora vs qwix) needs tunix and qwix: run "
            "`.venv-thirdparty/bin/python benchmarks/oplevel.py` (the venv .ci/thirdparty builds)"
        )


if __name__ == "__main__":
    main()
