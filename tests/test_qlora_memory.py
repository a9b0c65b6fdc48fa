"""QLoRA memory, measured deterministically: bytes per quantized element against
bitsandbytes' closed form, the compiled argument bytes of a QLoRA train step against the
bf16-base LoRA step's, and optimizer state for adapter leaves only (Linen and NNX).
``benchmarks/qlora.py`` reports the same quantities on a 235M-parameter model.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
import jaxlora.nnx
from jaxlora.models import gpt as jgpt
from jaxlora.quant import QuantizedWeight, quantize, quantize_base

TARGETS = ["query", "key", "value", "out", "fc", "proj"]
CONFIG = jaxlora.LoRAConfig(r=4, alpha=8, targets=TARGETS)
# d_model 96: every kernel ends in a partial block of 64 only if its size is not a multiple of
# 64 (96 * 96 = 9216 is); fc is 96 x 384 = 36864 elements = 576 blocks, so double quantization
# needs 3 nested blocks of 256, the last one partial.
GPT = jgpt.GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=4, d_model=96)
TOKENS = jax.ShapeDtypeStruct((2, 17), jnp.int32)


def closed_form_bytes(n: int, quant_type: str, blocksize: int, double_quant: bool) -> int:
    """What bitsandbytes 0.50's quantization state holds for n elements, its code tables
    aside (they are constants here, not per-weight state): 4-bit, ceil(n/2) packed bytes and
    one float32 absmax per block; with double quantization (``compress_statistics``) a uint8
    code per block, one float32 scale per 256 blocks and the float32 offset (the mean of the
    absmax); int8, one byte per element and a float32 absmax per block."""
    blocks = math.ceil(n / blocksize)
    if quant_type == "int8":
        return n + 4 * blocks
    if double_quant:
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4
    return math.ceil(n / 2) + 4 * blocks


def _nbytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    ("options", "limit"),
    [
        (dict(quant_type="nf4"), 0.5 + 4 / 64),
        (dict(quant_type="fp4"), 0.5 + 4 / 64),
        (dict(quant_type="nf4", double_quant=True), 0.5 + 1 / 64 + 4 / (64 * 256)),
        (dict(quant_type="int8"), 1 + 4 / 4096),
    ],
    ids=["nf4", "fp4", "nf4-double-quant", "int8"],
)
@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300))
def test_bytes_per_element_equal_the_closed_form(options, limit, rows, cols):
    w = jnp.asarray(np.random.default_rng(rows * cols).normal(size=(rows, cols)), jnp.bfloat16)
    q = quantize(w, **options)
    n = rows * cols
    assert _nbytes(q) == closed_form_bytes(n, q.quant_type, q.blocksize, q.double_quant)
    # Per element: the large-n limit plus the rounding up to whole bytes and blocks (under 1
    # byte for the nibbles, 4 for the absmax, 1 + 4 for a partial nested block, 4 for the
    # offset): under 10 bytes in all.
    assert limit <= _nbytes(q) / n < limit + 10 / n


def test_large_weight_bytes_per_element_approach_the_limit():
    # Shapes only (jax.eval_shape): the stored arrays of a 4096 x 4096 weight.
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    n = 4096 * 4096
    got = {
        name: _nbytes(jax.eval_shape(lambda w, o=options: quantize(w, **o), w)) / n
        for name, options in {
            "nf4": {},
            "nf4-dq": {"double_quant": True},
            "int8": {"quant_type": "int8"},
        }.items()
    }
    assert got["nf4"] == 0.5 + 4 / 64  # 0.5625
    assert got["nf4-dq"] == 0.5 + 1 / 64 + 4 / (64 * 256) + 4 / n  # 0.515869...
    assert got["int8"] == 1 + 4 / 4096


def _linen_steps():
    """Abstract params and the compiled memory of the bf16-base LoRA and QLoRA steps."""
    model = jgpt.GPT(GPT)

    def build():
        variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        return jaxlora.inject(variables, CONFIG, jax.random.key(1))["params"]

    adapter, base = jaxlora.split(jax.eval_shape(build))
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), base)
    params = jaxlora.combine(adapter, base)
    tx = jaxlora.freeze_base(optax.adam(1e-3))

    def step(params, opt_state, tokens, quant=None):
        def loss(p):
            variables = {"params": p} if quant is None else {"params": p, "quant": quant}
            with jaxlora.intercept(CONFIG):
                logits = model.apply(variables, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), tokens[:, 1:]
            ).mean()

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def memory(params, quant=None):
        opt_state = jax.eval_shape(tx.init, params)
        args = (params, opt_state, TOKENS) + (() if quant is None else (quant,))
        return jax.jit(step).lower(*args).compile().memory_analysis(), opt_state

    q = jax.eval_shape(lambda p: quantize_base({"params": p}, TARGETS), params)
    return adapter, memory(params)[0], (q, *memory(q["params"], q["quant"]))


def test_linen_qlora_step_arguments_are_smaller_by_the_closed_form():
    adapter, bf16, (q, qlora, opt_state) = _linen_steps()
    kernels = jax.tree.leaves(q["quant"], is_leaf=lambda x: isinstance(x, QuantizedWeight))
    assert len(kernels) == 6 * GPT.n_layer
    saving = sum(
        2 * math.prod(k.shape) - closed_form_bytes(math.prod(k.shape), "nf4", 64, False)
        for k in kernels
    )
    # XLA's argument size is the sum of the entry parameters' buffers, each exactly its
    # shape's bytes (no padding on the host), so the difference is exact: no slack needed.
    assert bf16.argument_size_in_bytes - qlora.argument_size_in_bytes == saving
    expected = _nbytes((q, opt_state, TOKENS))
    assert qlora.argument_size_in_bytes == expected
    # The optimizer state is Adam's two moments of the adapter and its step counter(s):
    # nothing of the quantized (or any frozen) base.
    moments = [leaf for leaf in jax.tree.leaves(opt_state) if leaf.ndim > 0]
    assert sorted(m.shape for m in moments) == sorted(
        2 * [a.shape for a in jax.tree.leaves(adapter)]
    )
    assert all(m.dtype == jnp.float32 for m in moments)
    assert _nbytes(moments) == 2 * _nbytes(adapter)


def _nnx_state(quantized: bool):
    def build():
        model = jgpt.NnxGPT(GPT, rngs=nnx.Rngs(0))
        jaxlora.nnx.inject(model, CONFIG, nnx.Rngs(1))
        frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen))
        if quantized:
            jaxlora.nnx.quantize_base(model, TARGETS)
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)

    model, optimizer = nnx.eval_shape(build)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)

        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(
                m(tokens[:, :-1]).astype(jnp.float32), tokens[:, 1:]
            ).mean()

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    compiled = jax.jit(step).lower(state, TOKENS).compile()
    return model, optimizer, compiled.memory_analysis()


def test_nnx_qlora_step_arguments_are_smaller_by_the_closed_form():
    _, _, bf16 = _nnx_state(quantized=False)
    model, optimizer, qlora = _nnx_state(quantized=True)
    kernels = [
        v.get_value()
        for v in jax.tree.leaves(
            nnx.state(model, jaxlora.nnx.QuantizedKernel),
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    ]
    assert len(kernels) == 6 * GPT.n_layer
    saving = sum(
        2 * math.prod(k.shape) - closed_form_bytes(math.prod(k.shape), "nf4", 64, False)
        for k in kernels
    )
    assert bf16.argument_size_in_bytes - qlora.argument_size_in_bytes == saving
    adapter = nnx.state(model, nnx.LoRAParam)
    moments = [
        leaf
        for leaf in jax.tree.leaves(nnx.state(optimizer, nnx.optimizer.OptState))
        if leaf.ndim > 0
    ]
    assert sorted(m.shape for m in moments) == sorted(
        2 * [a.shape for a in jax.tree.leaves(adapter)]
    )
    assert _nbytes(moments) == 2 * _nbytes(adapter)
