"""Q6: what a quantized frozen base (QLoRA) saves in memory, and what dequantizing costs.

(a) Bytes per base parameter held by a quantized model, counted on the arrays
    ``quantize_base`` returns (packed codes + absmax + double-quant state) for NF4, NF4 with
    double quantization, FP4 and int8, beside bitsandbytes' closed form.
(b) Compiled memory (``jit(step).lower(...).compile().memory_analysis()``) of one Adam train
    step: full fine-tune (fp32 weights, fp32 Adam) vs LoRA on a bf16 base vs QLoRA (NF4,
    NF4 + double quant) on a twin GPT wide enough for the base to dominate (d_model 2048,
    4 blocks, vocab 8192: 235M parameters), Linen and NNX. Only compiled, never run: the
    inputs are ``jax.eval_shape`` stand-ins. LoRA (r=16) and quantization on every block
    linear layer (query, key, value, out, fc, proj); embeddings, LayerNorms and the head stay
    bf16, as Hugging Face's bitsandbytes loading leaves them (it skips the output layer).
    The step donates params and optimizer state, so outputs alias arguments: "sum − donated"
    subtracts the aliased bytes. Arguments are exact (asserted in tests/test_qlora_memory.py);
    temp depends on the backend: XLA's CPU backend computes every bf16 dot in f32 (all dots of
    the optimized HLO have f32 results), so there temp holds f32 copies of the bf16 (or
    dequantized) kernels, which a GPU/TPU does not need.
(c) Step time of QLoRA (NF4) vs LoRA on the bf16 base (the cost of dequantizing every
    quantized kernel on the fly, forward and backward) on a smaller twin GPT (d_model 768,
    2 blocks, 2x128 tokens), interleaved medians.

    python benchmarks/qlora.py [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import interleaved_medians, nbytes, write
from flax import nnx

import jaxlora
import jaxlora.nnx
from jaxlora.models import gpt as jgpt
from jaxlora.quant import QuantizedWeight, quantize_base

LR = 1e-3
R = 16
TARGETS = ["query", "key", "value", "out", "fc", "proj"]
BIG = jgpt.GPTConfig(vocab_size=8192, block_size=128, n_layer=4, n_head=16, d_model=2048)
SMALL = jgpt.GPTConfig(vocab_size=8192, block_size=128, n_layer=2, n_head=12, d_model=768)
BIG_BATCH, SMALL_BATCH = (4, 128), (2, 128)
FORMATS = {
    "NF4": dict(quant_type="nf4"),
    "NF4 + double quant": dict(quant_type="nf4", double_quant=True),
    "FP4": dict(quant_type="fp4"),
    "int8 (block 4096)": dict(quant_type="int8"),
}
CHECK_RUN_NOTE = (
    "Numbers from the author's one check run (--quick, machine shared with other jobs): "
    "timings are indicative only; the memory columns are deterministic."
)


def closed_form_bytes(n: int, quant_type: str, double_quant: bool = False) -> int:
    """Bytes bitsandbytes' ``quantize_4bit`` / ``quantize_blockwise`` state holds for ``n``
    elements, without its code tables (constants here): packed codes, float32 absmax per
    block; with double quantization uint8 absmax codes, a float32 scale per 256 of them and a
    float32 offset."""
    if quant_type == "int8":
        return n + 4 * -(-n // 4096)
    blocks = -(-n // 64)
    if double_quant:
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4
    return -(-n // 2) + 4 * blocks


def loss_fn(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]
    ).mean()


def _bf16(tree):
    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return (
                jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
                if _abstract(x)
                else x.astype(jnp.bfloat16)
            )
        return x

    return jax.tree.map(cast, tree)


def _abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def linen_variants(cfg, *, abstract: bool, formats=("NF4", "NF4 + double quant")):
    """{name: (step, args)} for the Linen twin GPT; each step is one jit-able function with
    params and optimizer state first (donated)."""
    model = jgpt.GPT(cfg)
    config = jaxlora.LoRAConfig(r=R, alpha=2 * R, targets=TARGETS)

    def build():
        variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        return variables["params"], jaxlora.inject(variables, config, jax.random.key(1))

    full, lora = jax.eval_shape(build) if abstract else build()
    adapter, base = jaxlora.split(lora["params"])
    bf16_lora = jaxlora.combine(adapter, _bf16(base))
    out = {}
    tx_full, tx_lora = optax.adam(LR), jaxlora.freeze_base(optax.adam(LR))

    def full_step(params, opt_state, tokens):
        grads = jax.grad(lambda p: loss_fn(model.apply({"params": p}, tokens[:, :-1]), tokens))(
            params
        )
        updates, opt_state = tx_full.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def lora_step(params, opt_state, tokens, quant=None):
        def objective(p):
            variables = {"params": p} if quant is None else {"params": p, "quant": quant}
            with jaxlora.intercept(config):
                return loss_fn(model.apply(variables, tokens[:, :-1]), tokens)

        grads = jax.grad(objective)(params)
        updates, opt_state = tx_lora.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    init = (lambda tx, p: jax.eval_shape(tx.init, p)) if abstract else (lambda tx, p: tx.init(p))
    out["full fine-tune (fp32, Adam)"] = (full_step, (full, init(tx_full, full)))
    out["LoRA, bf16 base"] = (lora_step, (bf16_lora, init(tx_lora, bf16_lora)))
    for name in formats:
        quantize = lambda p, opts=FORMATS[name]: quantize_base({"params": p}, TARGETS, **opts)  # noqa: E731
        q = jax.eval_shape(quantize, bf16_lora) if abstract else quantize(bf16_lora)
        out[f"QLoRA {name}"] = (lora_step, (q["params"], init(tx_lora, q["params"])), q["quant"])
    return out


def nnx_variants(cfg, formats=("NF4",)):
    """{name: (step, (state,))} for the NNX twin GPT, built abstractly (``nnx.eval_shape``)."""
    config = jaxlora.LoRAConfig(r=R, alpha=2 * R, targets=TARGETS)

    def build(bf16: bool, options: dict | None, lora: bool = True):
        model = jgpt.NnxGPT(cfg, rngs=nnx.Rngs(0))
        if lora:
            jaxlora.nnx.inject(model, config, nnx.Rngs(1))
        if bf16:
            nnx.update(model, _bf16(nnx.state(model, nnx.Not(nnx.LoRAParam))))
        if options is not None:
            jaxlora.nnx.quantize_base(model, TARGETS, **options)
        wrt = nnx.LoRAParam if lora else nnx.Param
        return model, nnx.Optimizer(model, optax.adam(LR), wrt=wrt)

    def make(bf16, options, lora=True):
        model, optimizer = nnx.eval_shape(lambda: build(bf16, options, lora))
        graphdef, state = nnx.split((model, optimizer))
        wrt = nnx.LoRAParam if lora else nnx.Param

        def step(state, tokens):
            model, optimizer = nnx.merge(graphdef, state)
            grads = nnx.grad(
                lambda m: loss_fn(m(tokens[:, :-1]), tokens), argnums=nnx.DiffState(0, wrt)
            )(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer))

        return step, (state,)

    out = {
        "full fine-tune (fp32, Adam)": make(False, None, lora=False),
        "LoRA, bf16 base": make(True, None),
    }
    for name in formats:
        out[f"QLoRA {name}"] = make(True, FORMATS[name])
    return out


def compiled_memory(step, donated: tuple, rest: tuple) -> dict[str, float]:
    n = len(donated)
    compiled = jax.jit(step, donate_argnums=tuple(range(n))).lower(*donated, *rest).compile()
    m = compiled.memory_analysis()
    row = {
        "args_mb": m.argument_size_in_bytes / 1e6,
        "temp_mb": m.temp_size_in_bytes / 1e6,
        "out_mb": m.output_size_in_bytes / 1e6,
    }
    row["sum_mb"] = row["args_mb"] + row["temp_mb"] + row["out_mb"]
    row["net_mb"] = row["sum_mb"] - m.alias_size_in_bytes / 1e6
    return row


def memory_rows() -> list[dict]:
    tokens = jax.ShapeDtypeStruct((BIG_BATCH[0], BIG_BATCH[1] + 1), jnp.int32)
    rows = []
    for api, variants in (
        ("Linen", linen_variants(BIG, abstract=True)),
        ("NNX", nnx_variants(BIG)),
    ):
        group = []
        for name, (step, donated, *quant) in variants.items():
            row = {
                "api": api,
                "contender": name,
                **compiled_memory(step, donated, (tokens, *quant)),
            }
            saving = _expected_saving((donated, quant))
            if saving:
                row["expected_saved_mb"] = saving / 1e6
            group.append(row)
            print(api, name, f"{row['args_mb']:.1f} MB arguments", flush=True)
        bf16 = next(row["args_mb"] for row in group if row["contender"] == "LoRA, bf16 base")
        for row in group:
            row["args_vs_bf16_lora"] = row["args_mb"] / bf16
            if "expected_saved_mb" in row:
                row["saved_mb"] = bf16 - row["args_mb"]
        rows += group
    return rows


def _expected_saving(args) -> float:
    """Argument bytes QLoRA should save over the bf16 base: 2 B per quantized element minus
    the closed-form quantized bytes, summed over the quantized kernels in ``args``."""
    weights = jax.tree.leaves(args, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return sum(
        2 * int(np.prod(q.shape))
        - closed_form_bytes(int(np.prod(q.shape)), q.quant_type, q.double_quant)
        for q in weights
        if isinstance(q, QuantizedWeight)
    )


def bytes_rows(params) -> list[dict]:
    """(a) on real arrays: every format on the same (bf16) block kernels."""
    rows = []
    for name, opts in FORMATS.items():
        quant = quantize_base({"params": params}, TARGETS, **opts)["quant"]
        weights = jax.tree.leaves(quant, is_leaf=lambda x: isinstance(x, QuantizedWeight))
        sizes = [int(np.prod(q.shape)) for q in weights]
        expected = sum(closed_form_bytes(n, weights[0].quant_type, "double" in name) for n in sizes)
        got, n = nbytes(quant), sum(sizes)
        rows.append(
            {
                "format": name,
                "bytes": got,
                "per_param": got / n,
                "closed_form_per_param": expected / n,
                "vs_bf16": got / (2 * n),
            }
        )
    rows.append({"format": "bf16 (for scale)", "bytes": 2 * n, "per_param": 2.0, "vs_bf16": 1.0})
    return rows


def time_rows(repeats: int) -> tuple[list[dict], list[dict]]:
    variants = linen_variants(SMALL, abstract=False, formats=("NF4",))
    tokens = jnp.asarray(
        np.random.default_rng(0).integers(0, SMALL.vocab_size, (SMALL_BATCH[0], SMALL_BATCH[1] + 1))
    )
    fns = {}
    for name in ("LoRA, bf16 base", "QLoRA NF4"):
        step, donated, *quant = variants[name]
        jitted = jax.jit(step)  # not donated: the same inputs are reused each call
        fns[name] = lambda jitted=jitted, d=donated, q=quant: jitted(*d, tokens, *q)
    times = interleaved_medians(fns, repeats=repeats, warmup=2)
    base = times["LoRA, bf16 base"]
    rows = [
        {"contender": name, "time_ms": 1e3 * t, "vs_bf16_lora": t / base}
        for name, t in times.items()
    ]
    params = variants["LoRA, bf16 base"][1][0]
    return rows, bytes_rows(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--check-run", action="store_true", help="label the tables as a check")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7  # (c) stays under 2 minutes on a 2-core CPU
    note = f" — {CHECK_RUN_NOTE}" if args.check_run else ""
    times, sizes = time_rows(repeats)
    write(
        "qlora_bytes",
        sizes,
        f"Bytes per base parameter, the block kernels of twin GPT {SMALL.n_layer}x{SMALL.d_model} "
        f"(bf16){note}",
        [
            ("format", "format"),
            ("bytes", "bytes"),
            ("per_param", "B / param"),
            ("closed_form_per_param", "bitsandbytes closed form"),
            ("vs_bf16", "÷ bf16"),
        ],
    )
    write(
        "qlora_time",
        times,
        f"QLoRA vs bf16-base LoRA step, twin GPT {SMALL.n_layer}x{SMALL.d_model}, "
        f"{SMALL_BATCH[0]}x{SMALL_BATCH[1]} tokens (median of {repeats}){note}",
        [("contender", "contender"), ("time_ms", "time (ms)"), ("vs_bf16_lora", "÷ bf16 LoRA")],
    )
    write(
        "qlora_memory",
        memory_rows(),
        f"Compiled memory of one Adam step, twin GPT {BIG.n_layer}x{BIG.d_model}, vocab "
        f"{BIG.vocab_size}, {BIG_BATCH[0]}x{BIG_BATCH[1]} tokens, r={R}{note}",
        [
            ("api", "API"),
            ("contender", "contender"),
            ("args_mb", "arguments (MB)"),
            ("temp_mb", "temp (MB)"),
            ("out_mb", "outputs (MB)"),
            ("sum_mb", "sum (MB)"),
            ("net_mb", "sum − donated (MB)"),
            ("args_vs_bf16_lora", "arguments ÷ bf16 LoRA"),
            ("saved_mb", "arguments saved (MB)"),
            ("expected_saved_mb", "closed-form saving (MB)"),
        ],
    )


if __name__ == "__main__":
    main()
