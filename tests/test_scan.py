"""Scanned / stacked layers (issue 14): LoRA on ``nn.scan``ned Linen blocks and ``nnx.vmap``-made
NNX blocks, against the unrolled twin GPT with the same weights."""

from __future__ import annotations

import importlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora.models import gpt as jgpt

jax.config.update("jax_default_matmul_precision", "highest")

CFG = jgpt.GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, d_model=16)
LORA = dict(r=4, alpha=8, targets=["query", "value", "fc"])
SEQ = 12


def _tokens(seed: int, n: int = 4) -> jnp.ndarray:
    starts = np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, 1))
    return jnp.asarray((starts + np.arange(SEQ + 1)) % CFG.vocab_size)


def _random_b(params, seed: int = 3):
    """Non-zero lora_b everywhere, so the adapter changes the output."""
    key = jax.random.key(seed)

    def perturb(path, x):
        if jax.tree_util.keystr(path).endswith("['lora_b']"):
            k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) % 2**31)
            return jax.random.normal(k, x.shape, x.dtype) * 0.1
        return x

    return jax.tree_util.tree_map_with_path(perturb, params)


def _twins(remat: bool = False):
    """(unrolled GPT, its adapted params, ScanGPT, its adapted params): same base weights,
    the scanned adapter the stack of the unrolled one."""
    tokens = _tokens(0)[:, :-1]
    base = jgpt.GPT(CFG).init(jax.random.key(0), tokens)["params"]
    config = jaxlora.LoRAConfig(**LORA)
    unrolled = _random_b(jaxlora.inject(base, config, jax.random.key(1)))
    scan_model = jgpt.ScanGPT(CFG, remat=remat)
    scanned = jgpt.stack_blocks(unrolled, CFG.n_layer)
    return jgpt.GPT(CFG), unrolled, scan_model, scanned, config


def _scan_inject(config, remat=False, **kwargs):
    tokens = _tokens(0)[:, :-1]
    model = jgpt.ScanGPT(CFG, remat=remat)
    base = model.init(jax.random.key(0), tokens)["params"]
    layouts = jaxlora.layouts(model, tokens)
    return model, base, jaxlora.inject(base, config, jax.random.key(1), layouts=layouts, **kwargs)


def _loss(model, config):
    @jaxlora.intercept(config)
    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss


def _max_err(a, b) -> float:
    # tree.map also checks that the two trees have the same structure
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


# ----------------------------------------------------------------------------- Linen: inject


@pytest.mark.parametrize("remat", [False, True])
def test_inject_gives_stacked_independent_adapters(remat):
    config = jaxlora.LoRAConfig(**LORA)
    model, base, params = _scan_inject(config, remat=remat)
    tokens = _tokens(0)[:, :-1]
    layout = jaxlora.layouts(model, tokens)["blocks.attn.query"]
    assert (layout.stack, layout.scan, layout.ndim) == (1, "blocks", 2)
    query = params["blocks"]["attn"]["query"]
    assert query["lora_a"].shape == (CFG.n_layer, CFG.d_model, 4)
    assert query["lora_b"].shape == (CFG.n_layer, 4, CFG.d_model)
    assert params["head"] == base["head"]  # untargeted
    a = np.asarray(query["lora_a"])
    bound = 1 / np.sqrt(CFG.d_model)  # kaiming_uniform(a=√5): U(±1/√in), per layer
    assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.5 * bound
    for i in range(CFG.n_layer):
        for j in range(i):
            assert not np.allclose(a[i], a[j])  # each layer drawn from its own key
    assert not np.any(np.asarray(query["lora_b"]))
    # starts equal to the base
    with jaxlora.intercept(config):
        y = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(y, model.apply({"params": base}, tokens))


def test_stacked_kernel_without_layouts_is_refused():
    _, base, _ = _scan_inject(jaxlora.LoRAConfig(**LORA))
    with pytest.raises(TypeError, match=r"'blocks\.attn\.query' has a 3-D kernel \(3, 16, 16\)"):
        jaxlora.inject(base, jaxlora.LoRAConfig(**LORA), jax.random.key(1))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_matches_unrolled_logits_grads_and_adamw(remat):
    model, unrolled, scan_model, scanned, config = _twins(remat)
    tokens = _tokens(1)
    logits_u = jaxlora.intercept(config)(model.apply)({"params": unrolled}, tokens[:, :-1])
    logits_s = jaxlora.intercept(config)(scan_model.apply)({"params": scanned}, tokens[:, :-1])
    assert float(jnp.max(jnp.abs(logits_u - logits_s))) < 1e-5
    base_logits = model.apply({"params": jaxlora.split(unrolled)[1]}, tokens[:, :-1])
    assert float(jnp.max(jnp.abs(logits_u - base_logits))) > 1e-3  # the adapter matters

    grad_u = jax.grad(_loss(model, config))(unrolled, tokens)
    grad_s = jax.grad(_loss(scan_model, config))(scanned, tokens)
    assert _max_err(jgpt.stack_blocks(grad_u, CFG.n_layer), grad_s) < 1e-5

    tx = jaxlora.freeze_base(optax.adamw(1e-2))

    def train(model, params):
        loss_fn = _loss(model, config)

        @jax.jit
        def step(params, state, tokens):
            grads = jax.grad(loss_fn)(params, tokens)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        for i in range(20):
            params, state = step(params, state, _tokens(10 + i))
        return params

    trained_u, trained_s = train(model, unrolled), train(scan_model, scanned)
    assert _max_err(jgpt.stack_blocks(trained_u, CFG.n_layer), trained_s) < 1e-4
    moved = _max_err(jaxlora.split(trained_s)[0], jaxlora.split(scanned)[0])
    assert moved > 1e-3  # the adapter trained
    # the base is bit-identical
    jax.tree.map(
        np.testing.assert_array_equal, jaxlora.split(trained_s)[1], jaxlora.split(scanned)[1]
    )


def test_merge_and_unmerge_per_layer():
    _, unrolled, scan_model, scanned, config = _twins()
    tokens = _tokens(2)[:, :-1]
    merged, record = jaxlora.merge(scanned, alpha=config.alpha, record=True)
    assert "lora_a" not in merged["blocks"]["attn"]["query"]
    with jaxlora.intercept(config):
        want = scan_model.apply({"params": scanned}, tokens)
    assert float(jnp.max(jnp.abs(scan_model.apply({"params": merged}, tokens) - want))) < 1e-5
    # each layer's merged kernel is that layer's alone (closed form, numpy)
    q = jax.tree.map(np.asarray, scanned["blocks"]["attn"]["query"])
    for i in range(CFG.n_layer):
        expected = q["kernel"][i] + 2.0 * q["lora_a"][i] @ q["lora_b"][i]
        np.testing.assert_allclose(
            merged["blocks"]["attn"]["query"]["kernel"][i], expected, rtol=0, atol=1e-6
        )
    # the unrolled twin's merge, stacked, is the same
    merged_u = jgpt.stack_blocks(jaxlora.merge(unrolled, alpha=config.alpha), CFG.n_layer)
    assert _max_err(merged_u, merged) < 1e-6
    back = jaxlora.unmerge(merged, record)
    assert _max_err(back, scanned) < 1e-6


def test_partition_specs_partition_the_layer_axis_as_the_kernel():
    _, _, _, scanned, _ = _twins()
    base_specs = {"blocks": {"attn": {"query": {"kernel": P("layers", "fsdp", "tensor")}}}}
    specs = jaxlora.partition_specs(scanned, base_specs)["blocks"]["attn"]["query"]
    assert specs["lora_a"] == P("layers", "fsdp", None)
    assert specs["lora_b"] == P("layers", None, "tensor")


class _BoxedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        return x + nn.Dense(8, kernel_init=init, name="fc")(x), None


class _BoxedScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            _BoxedBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return blocks(name="blocks")(x, None)[0]


def test_boxed_metadata_gets_the_layer_axis_name():
    model, x = _BoxedScan(), jnp.ones((2, 8))
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["fc"])
    params = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    spec = nn.get_partition_spec(params)["params"]["blocks"]["fc"]
    assert spec["kernel"] == P("layers", "embed", "mlp")
    assert spec["lora_a"] == P("layers", "embed", None)
    assert spec["lora_b"] == P("layers", None, "mlp")
    params = jax.tree.map(lambda v: v, params)
    fc = nn.meta.unbox(params["params"]["blocks"]["fc"])
    assert fc["lora_a"].shape == (3, 8, 2)
    b = jnp.full((3, 2, 8), 0.1)
    params["params"]["blocks"]["fc"]["lora_b"] = params["params"]["blocks"]["fc"][
        "lora_b"
    ].replace_boxed(b)
    with jaxlora.intercept(config):
        y = model.apply(params, x)  # the scan strips the layer axis name from the adapter too
    merged = jaxlora.merge(nn.meta.unbox(params), alpha=4.0)
    assert float(jnp.max(jnp.abs(model.apply(merged, x) - y))) < 1e-5


class _Bf16Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        dense = nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="fc")
        return x + dense(x), None


class _Bf16Scan(nn.Module):
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            _Bf16Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return blocks(name="blocks")(x, None)[0]


def test_mixed_precision_stacked():
    """A bf16 base computing in bf16 (dtype=bf16) gets fp32 adapters, as unstacked; the scan
    carry keeps its dtype. (A layer with dtype=None is promoted to fp32 by fp32 adapters, as
    unstacked, which a scan's carry refuses: JAX's own error.)"""
    model, x = _Bf16Scan(), jnp.ones((2, 8), jnp.bfloat16)
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["fc"])
    layouts = jaxlora.layouts(model, x)
    params = jaxlora.inject(variables, config, jax.random.key(1), layouts=layouts)["params"]
    fc = params["blocks"]["fc"]
    assert fc["kernel"].dtype == jnp.bfloat16
    assert fc["lora_a"].dtype == fc["lora_b"].dtype == jnp.float32
    params["blocks"]["fc"]["lora_b"] = jnp.full((3, 2, 8), 0.25, jnp.float32)
    with jaxlora.intercept(config):
        y = model.apply({"params": params}, x)
    assert y.dtype == jnp.bfloat16
    merged = jaxlora.merge(params, alpha=4)
    assert merged["blocks"]["fc"]["kernel"].dtype == jnp.bfloat16
    y_merged = model.apply({"params": merged}, x)
    # within a few bf16 roundings of the output scale (merging rounds the kernel to bf16)
    assert float(jnp.max(jnp.abs(y_merged.astype(jnp.float32) - y.astype(jnp.float32)))) < 0.1
    assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - model.apply(variables, x)))) > 0.5


# ---------------------------------------------------- Linen: per-layer paths and patterns


def test_uniform_patterns_are_used_by_inject_and_intercept():
    config = jaxlora.LoRAConfig(
        r=4, alpha=8, targets=["query"], rank_pattern={"query": 2}, alpha_pattern={"query": 6}
    )
    model, _, params = _scan_inject(config)
    assert params["blocks"]["attn"]["query"]["lora_a"].shape == (CFG.n_layer, CFG.d_model, 2)
    params = _random_b(params)
    tokens = _tokens(0)[:, :-1]
    with jaxlora.intercept(config):
        y = model.apply({"params": params}, tokens)
    merged = jaxlora.merge(params, alpha=6.0)  # scale 6 / 2
    assert float(jnp.max(jnp.abs(model.apply({"params": merged}, tokens) - y))) < 1e-5


@pytest.mark.parametrize(
    "pattern, match",
    [
        (dict(rank_pattern={"blocks.1.attn.query": 2}), r"'blocks\.1\.attn\.query': \(2, 8\.0\)"),
        (dict(alpha_pattern={"blocks.2.attn.query": 3}), r"'blocks\.2\.attn\.query': \(4, 3\.0\)"),
        # uniform per layer, but not matching the stack path that intercept looks up
        (dict(rank_pattern={r"blocks\.\d\.attn\.query": 2}), r"stack path's \(4, 8\.0\)"),
    ],
)
def test_per_layer_patterns_that_break_the_stack_are_refused(pattern, match):
    config = jaxlora.LoRAConfig(r=4, alpha=8, targets=["query"], **pattern)
    with pytest.raises(ValueError, match=r"inject: layer 'blocks\.attn\.query': .*" + match):
        _scan_inject(config)


def test_layer_names_place_the_index():
    config = jaxlora.LoRAConfig(
        r=4, alpha=8, targets=["query"], rank_pattern={"blocks_1.attn.query": 2}
    )
    # default naming (blocks.1.attn.query): the key names no layer, a typo
    with pytest.raises(ValueError, match=r"'blocks_1\.attn\.query' matches none of the adapted"):
        _scan_inject(config)
    with pytest.raises(ValueError, match=r"'blocks_1\.attn\.query': \(2, 8\.0\)"):
        _scan_inject(config, layer_names={"blocks": "blocks_{i}"})
    with pytest.raises(ValueError, match=r"must be a string holding '\{i\}'"):
        _scan_inject(config, layer_names={"blocks": "blocks"})


def test_per_layer_targets_all_or_none():
    full = jaxlora.LoRAConfig(r=4, targets=r"blocks\.\d+\.attn\.query")
    _, _, params = _scan_inject(full)
    assert "lora_a" in params["blocks"]["attn"]["query"]
    part = jaxlora.LoRAConfig(r=4, targets=r"blocks\.[01]\.attn\.query")
    with pytest.raises(
        ValueError,
        match=r"match only some layers of the stacked layer 'blocks\.attn\.query' "
        r"\(blocks\.0\.attn\.query, blocks\.1\.attn\.query of 3\)",
    ):
        _scan_inject(part)


def test_stacked_adapter_on_an_unscanned_call_is_refused():
    """A stacked tree given to an operation that reads per-layer shapes is refused, not
    misread (the layer axis is not an input axis)."""
    _, _, _, scanned, _ = _twins()
    from jaxlora import kinds

    with pytest.raises(ValueError, match="stacked over 1 leading layer axis"):
        kinds.check_layer(scanned["blocks"]["attn"]["query"], "layer 'blocks.attn.query'")


# ------------------------------------------------------------------------------------- NNX


def _nnx_twins():
    """(unrolled NnxGPT, NnxScanGPT), same base weights, injected alike, the scanned adapter
    the stack of the unrolled one (non-zero lora_b)."""
    from flax import nnx

    import jaxlora.nnx

    _, unrolled_params, _, _, config = _twins()
    base = jaxlora.split(unrolled_params)[1]
    unrolled = jgpt.load_nnx(jgpt.NnxGPT(CFG, rngs=nnx.Rngs(0)), base)
    scanned = jgpt.load_nnx(
        jgpt.NnxScanGPT(CFG, rngs=nnx.Rngs(0)), jgpt.stack_blocks(base, CFG.n_layer)
    )
    jaxlora.nnx.inject(unrolled, config, nnx.Rngs(1))
    jaxlora.nnx.inject(scanned, config, nnx.Rngs(2))
    adapter = jaxlora.split(unrolled_params)[0]  # the Linen twin's adapter, random lora_b
    jgpt.load_nnx(unrolled, adapter)
    jgpt.load_nnx(scanned, jgpt.stack_blocks(adapter, CFG.n_layer))
    return unrolled, scanned, config


def _nnx_adapter(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))


def test_nnx_inject_on_vmapped_blocks():
    """Used to give (16, r) adapters to (L, 16, 16) kernels and crash in nnx.scan after
    changing the model."""
    from flax import nnx

    import jaxlora.nnx

    model = jgpt.NnxScanGPT(CFG, rngs=nnx.Rngs(0))
    tokens = _tokens(0)[:, :-1]
    before = model(tokens)
    config = jaxlora.LoRAConfig(r=4, alpha=8, targets=["query", "fc"], dropout=0.1)
    jaxlora.nnx.inject(model, config, nnx.Rngs(1))
    query = model.blocks.attn.query
    assert query.lora_a.shape == (CFG.n_layer, CFG.d_model, 4)
    assert query.lora_b.shape == (CFG.n_layer, 4, CFG.d_model)
    a = np.asarray(query.lora_a[...])
    assert not np.allclose(a[0], a[1]) and np.all(np.abs(a) <= 1 / np.sqrt(CFG.d_model))
    model.eval()
    np.testing.assert_array_equal(model(tokens), before)
    model.train()
    assert model(tokens).shape == before.shape  # dropout: a stacked rng stream per layer


def test_nnx_scanned_matches_unrolled_logits_grads_adamw_and_merge():
    from flax import nnx

    import jaxlora.nnx

    unrolled, scanned, _ = _nnx_twins()
    tokens = _tokens(1)
    base_before = nnx.to_pure_dict(nnx.state(scanned, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    assert float(jnp.max(jnp.abs(unrolled(tokens[:, :-1]) - scanned(tokens[:, :-1])))) < 1e-5

    def loss(model, tokens):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    diff = nnx.DiffState(0, nnx.LoRAParam)
    grad_u = nnx.to_pure_dict(nnx.grad(loss, argnums=diff)(unrolled, tokens))
    grad_s = nnx.to_pure_dict(nnx.grad(loss, argnums=diff)(scanned, tokens))
    assert _max_err(jgpt.stack_blocks(grad_u, CFG.n_layer), grad_s) < 1e-5

    def train(model):
        optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

        @nnx.jit
        def step(model, optimizer, tokens):
            optimizer.update(model, nnx.grad(loss, argnums=diff)(model, tokens))

        for i in range(20):
            step(model, optimizer, _tokens(10 + i))

    train(unrolled)
    train(scanned)
    trained = jgpt.stack_blocks(_nnx_adapter(unrolled), CFG.n_layer)
    assert _max_err(trained, _nnx_adapter(scanned)) < 1e-4
    base_after = nnx.to_pure_dict(nnx.state(scanned, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)

    want = scanned(tokens[:, :-1])
    jaxlora.nnx.merge(scanned)
    assert type(scanned.blocks.attn.query) is nnx.Linear
    assert scanned.blocks.attn.query.kernel.shape == (CFG.n_layer, CFG.d_model, CFG.d_model)
    assert float(jnp.max(jnp.abs(scanned(tokens[:, :-1]) - want))) < 1e-5


def test_nnx_stack_refusals_change_nothing():
    from flax import nnx

    import jaxlora.nnx

    model = jgpt.NnxScanGPT(CFG, rngs=nnx.Rngs(0))
    bad = [
        (
            jaxlora.LoRAConfig(r=4, targets=["query"], rank_pattern={"blocks.1.attn.query": 2}),
            r"inject: layer 'blocks\.attn\.query': .*'blocks\.1\.attn\.query': \(2, 2\.0\)",
        ),
        (
            jaxlora.LoRAConfig(r=4, targets=r"blocks\.[02]\.attn\.query"),
            r"match only some layers of the stacked layer 'blocks\.attn\.query'",
        ),
    ]
    for config, match in bad:
        with pytest.raises(ValueError, match=match):
            jaxlora.nnx.inject(model, config, nnx.Rngs(1))
        assert type(model.blocks.attn.query) is nnx.Linear
        assert not hasattr(model, "lora_config")
    # the torch twin's naming of the same layers
    config = jaxlora.LoRAConfig(r=4, targets=r"blocks_\d+\.attn\.query")
    jaxlora.nnx.inject(model, config, nnx.Rngs(1), layer_names={"blocks": "blocks_{i}"})
    assert model.blocks.attn.query.lora_a.shape == (CFG.n_layer, CFG.d_model, 4)


def _live_bytes() -> int:
    import gc

    gc.collect()
    return sum(x.nbytes for x in jax.live_arrays())


def test_two_adapters_share_one_scanned_base_without_recompiling():
    """The peer's failure mode (MaxText + qwix under scan_layers copies the decoder stack per
    adapter): here a second adapter adds only its own bytes, and switching adapters under one
    jitted function does not trace again."""
    tokens = _tokens(0)[:, :-1]
    config = jaxlora.LoRAConfig(**LORA)
    model, _, params = _scan_inject(config)
    layouts = jaxlora.layouts(model, tokens)
    adapter_1, base = jaxlora.split(params)
    del params
    traces = []

    @jax.jit
    @jaxlora.intercept(config)
    def forward(adapter, base, tokens):
        traces.append(1)
        return model.apply({"params": jaxlora.combine(adapter, base)}, tokens)

    y1 = forward(adapter_1, base, tokens)
    key = jax.random.key(7)
    before = _live_bytes()
    params_2 = jaxlora.inject(base, config, key, layouts=layouts)
    adapter_2 = _random_b(jaxlora.split(params_2)[0])
    del params_2
    after = _live_bytes()
    lora_bytes = sum(x.nbytes for x in jax.tree.leaves(adapter_2))
    assert all(
        path[-1].key in ("lora_a", "lora_b")
        for path, _ in jax.tree_util.tree_leaves_with_path(adapter_2)
    )
    assert after - before == lora_bytes  # not a second base
    assert sum(x.nbytes for x in jax.tree.leaves(base)) > 5 * lora_bytes  # a copy would show
    y2 = forward(adapter_2, base, tokens)
    y1_again = forward(adapter_1, base, tokens)
    assert len(traces) == 1  # switching adapters does not recompile
    np.testing.assert_array_equal(y1, y1_again)
    assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-3


def test_nnx_stacked_adapter_takes_the_layer_axis_sharding_name():
    """A stack made with nnx.vmap(transform_metadata={PARTITION_NAME: 'layers'}) over a
    partitioned kernel: the adapter is stacked with the same leading axis name (before, inject
    crashed unpacking the kernel's three names)."""
    from flax import nnx
    from jax.sharding import Mesh

    import jaxlora.nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
            self.fc = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(rngs):
                return Block(rngs)

            self.blocks = create(rngs)

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("layers", "embed", "mlp"))
    with jax.set_mesh(mesh):
        model = Model(nnx.Rngs(0))
        jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["fc"]), nnx.Rngs(1))
        fc = model.blocks.fc
        names = {n: getattr(fc, n).get_metadata()["out_sharding"] for n in ("lora_a", "lora_b")}
    assert fc.lora_a.shape == (3, 8, 2) and fc.lora_b.shape == (3, 2, 16)
    assert names == {"lora_a": ("layers", "embed", None), "lora_b": ("layers", None, "mlp")}


def test_nnx_inject_failing_late_restores_weights(monkeypatch):
    """PiSSA writes the residual while a layer is built; if a later layer fails, every weight
    is put back and no layer is replaced."""
    from flax import nnx

    import jaxlora.nnx

    nnx_inject = importlib.import_module("jaxlora.nnx.inject")  # the module, not the function
    model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 8, rngs=nnx.Rngs(1)))
    kernels = [np.asarray(layer.kernel[...]) for layer in model.layers]
    real, calls = nnx_inject._per_layer, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the second layer failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(nnx_inject, "_per_layer", second_fails)
    config = jaxlora.LoRAConfig(r=2, targets=["layers.0", "layers.1"], init="pissa")
    with pytest.raises(RuntimeError, match="second layer failed"):
        jaxlora.nnx.inject(model, config, nnx.Rngs(2))
    assert [type(layer) for layer in model.layers] == [nnx.Linear, nnx.Linear]
    for layer, kernel in zip(model.layers, kernels, strict=True):
        np.testing.assert_array_equal(np.asarray(layer.kernel[...]), kernel)
    assert not hasattr(model, "lora_config")
