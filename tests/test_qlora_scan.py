"""QLoRA on ``nn.scan`` stacks (issue 16 with issue 14): a scanned layer's quantized stack is its
L layers each quantized as the unrolled twin's layer is (bitsandbytes' bytes for that layer's
torch Linear), stacked in front; the scan slices ``'quant'`` on axis 0 whatever axis the params
are scanned on (0, or 1 as MaxText's ``param_scan_axis``). Against the unrolled quantized twin
with the same weights: outputs, adapter gradients, optax training, merges and adapter files.
PEFT on the bitsandbytes twin: ``parity_tests/test_qlora_scan_parity.py``."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn

import jaxlora
from jaxlora.quant import dequantize, quantize_base
from jaxlora.tree import RECORD_NAMES
from tests._scan_twins import adam_trained, assert_same_files, bits, layer_of
from tests._train import intercepted_loss

jax.config.update("jax_default_matmul_precision", "highest")

D, N, H, F, L = 64, 2, 32, 128, 3
CONFIG = jaxlora.LoRAConfig(r=4, alpha=8, targets=["query", "out", "fc"])
QUANTIZED = ["query", "out", "fc", "mlp"]  # mlp has no adapter: quantized by its layout
NAMES = {"layers": "layers_{i}"}
OPTIONS = {
    "nf4": dict(quant_type="nf4"),
    "fp4": dict(quant_type="fp4"),
    "nf4-dq": dict(quant_type="nf4", double_quant=True),
    "int8": dict(quant_type="int8", blocksize=256),
}


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        q = nn.DenseGeneral((N, H), name="query")(x)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(jax.nn.gelu(q))
        return x + nn.Dense(D, name="mlp")(jax.nn.relu(nn.Dense(F, name="fc")(x))), None


class Scanned(nn.Module):
    axis: int = 0
    scan_quant: bool = True

    @nn.compact
    def __call__(self, x):
        axes = {"params": self.axis, **({"quant": 0} if self.scan_quant else {})}
        stack = nn.scan(Layer, variable_axes=axes, split_rngs={"params": True}, length=L)
        return stack(name="layers")(x, None)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = Layer(name=f"layers_{i}")(x, None)
        return x


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, 5, D)), jnp.float32)


def _arrays(tree):
    return {
        k: _arrays(v) if isinstance(v, Mapping) else v
        for k, v in tree.items()
        if k not in RECORD_NAMES
    }


def _fill(injected, arrays):
    """``injected`` (records included) holding ``arrays``' values, shapes checked."""
    out = {}
    for key, value in injected.items():
        if isinstance(value, Mapping):
            out[key] = _fill(value, arrays[key])
        elif key in RECORD_NAMES:
            out[key] = value
        else:
            assert np.shape(value) == np.shape(arrays[key]), key
            out[key] = jnp.asarray(arrays[key])
    return out


def _twins(axis=0, options=None):
    """(unrolled quantized variables, scanned quantized variables, scanned layouts): the same
    float weights and adapters, lora_b non-zero; the scanned stack on ``axis``."""
    options = options or {}
    unrolled = Unrolled().init(jax.random.key(0), _x())
    unrolled = jaxlora.inject(
        unrolled, CONFIG, jax.random.key(1), layouts=jaxlora.layouts(Unrolled(), _x())
    )
    b_key = jax.random.key(2)
    unrolled = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            0.1
            * jax.random.normal(
                jax.random.fold_in(b_key, zlib.crc32(jax.tree_util.keystr(p).encode()) % 997),
                v.shape,
            )
            if jax.tree_util.keystr(p).endswith("['lora_b']")
            else v
        ),
        unrolled,
    )
    model = Scanned(axis)
    layouts = jaxlora.layouts(model, _x())
    scanned = jaxlora.inject(
        model.init(jax.random.key(5), _x()), CONFIG, jax.random.key(6), layouts=layouts
    )
    layers = [_arrays(unrolled["params"][f"layers_{i}"]) for i in range(L)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs, axis=axis), *layers)
    scanned = {"params": _fill(scanned["params"], {"layers": stacked})}
    q_unrolled = quantize_base(unrolled, QUANTIZED, **options)
    q_scanned = quantize_base(scanned, QUANTIZED, layouts=layouts, **options)
    return q_unrolled, q_scanned, layouts


def _same_bits(a, b):
    assert type(a) is type(b) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


def _linear(kernel, n_in):
    """A Flax kernel (in axes…, out axes…) as its torch Linear weight (out, in)."""
    k = np.asarray(kernel)
    return np.ascontiguousarray(k.reshape(int(np.prod(k.shape[:n_in])), -1).T)


IN_AXES = {"query": 1, "out": 2, "fc": 1, "mlp": 1}


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_layer_is_its_unrolled_twin_and_bitsandbytes(name, axis):
    options = OPTIONS[name]
    q_unrolled, q_scanned, _ = _twins(axis, options)
    assert sorted(q_scanned["params"]["layers"]["mlp"]) == ["bias"]
    for layer, n_in in IN_AXES.items():
        entry = q_scanned["quant"]["layers"][layer]
        assert entry["stack"].axis == axis
        stack = entry["kernel"]
        assert stack.absmax.shape[0] == L
        for i in range(L):
            twin = q_unrolled["quant"][f"layers_{i}"][layer]["kernel"]
            _same_bits(layer_of(stack, i), twin)
            float_kernel = _float_kernel(i, layer)
            weight = torch.from_numpy(_linear(float_kernel, n_in))
            if options["quant_type"] == "int8":
                codes, state = bnbf.quantize_blockwise(weight, blocksize=256)
                np.testing.assert_array_equal(np.asarray(stack.packed[i]), codes.numpy())
                np.testing.assert_array_equal(bits(stack.absmax[i]), bits(state.absmax))
                continue
            packed, state = bnbf.quantize_4bit(
                weight,
                quant_type=options["quant_type"],
                compress_statistics=options.get("double_quant", False),
            )
            np.testing.assert_array_equal(np.asarray(stack.packed[i]), packed.numpy())
            if options.get("double_quant"):  # the offset: torch.mean's order (test_qlora_bnb)
                offset = np.float32(state.offset.item())
                assert abs(float(stack.offset[i]) - offset) <= 4 * np.spacing(offset)
            else:
                np.testing.assert_array_equal(bits(stack.absmax[i]), bits(state.absmax))


def _float_kernel(i, layer):
    """Layer i's float kernel of the unrolled twin (before quantization)."""
    unrolled = Unrolled().init(jax.random.key(0), _x())
    return unrolled["params"][f"layers_{i}"][layer]["kernel"]


def _loss(model):
    return intercepted_loss(model, CONFIG)


def _restack(tree, axis):
    """The unrolled twin's per-layer tree stacked as the scan holds it (per-layer paths)."""
    layers = [_arrays(tree[f"layers_{i}"]) for i in range(L)]
    return jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *layers)


def _close(a, b, rel=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(float(jnp.max(jnp.abs(y))), 1e-30)
        np.testing.assert_allclose(x, y, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "int8"])
def test_scanned_equals_unrolled_outputs_and_adapter_grads(name, axis):
    q_unrolled, q_scanned, _ = _twins(axis, OPTIONS[name])
    x = _x(1)
    with jaxlora.intercept(CONFIG):
        expected = Unrolled().apply(q_unrolled, x)
        got = jax.jit(Scanned(axis).apply)(q_scanned, x)
    _close(got, expected)
    # the float twin of the dequantized base computes the same: the layers are dequantized
    dequantized = jaxlora.quant.dequantize_base(q_unrolled)
    with jaxlora.intercept(CONFIG):
        _close(Unrolled().apply(dequantized, x), expected)
    lora = lambda p: jaxlora.split(p)[0]  # noqa: E731
    g_u = lora(jax.grad(_loss(Unrolled()))(q_unrolled["params"], q_unrolled["quant"], x))
    g_s = lora(jax.grad(_loss(Scanned(axis)))(q_scanned["params"], q_scanned["quant"], x))
    _close(_arrays(g_s["layers"]), _restack(g_u, axis))


def test_optax_steps_keep_the_packed_stack_bit_identical():
    q_unrolled, q_scanned, _ = _twins(1, OPTIONS["nf4-dq"])
    before = jax.tree.map(np.array, q_scanned["quant"])
    runs = (("u", Unrolled(), q_unrolled), ("s", Scanned(1), q_scanned))
    trained = adam_trained(runs, CONFIG, _x)
    _same_bits(q_scanned["quant"], jax.tree.map(jnp.asarray, before))
    _close(_arrays(trained["s"]["layers"]), _restack(trained["u"], 1), rel=1e-5)


@pytest.mark.parametrize("axis", [0, 1])
def test_merge_and_requantize_per_layer(axis):
    options = OPTIONS["nf4-dq"]
    q_unrolled, q_scanned, _ = _twins(axis, options)
    floats_u = jaxlora.merge(q_unrolled, alpha=CONFIG.alpha)
    floats_s = jaxlora.merge(q_scanned, alpha=CONFIG.alpha)
    _close(_arrays(floats_s["params"]["layers"]), _restack(floats_u["params"], axis))
    merged_u = jaxlora.merge(q_unrolled, alpha=CONFIG.alpha, requantize=True)
    merged_s = jaxlora.merge(q_scanned, alpha=CONFIG.alpha, requantize=True)
    for layer in QUANTIZED:
        entry = merged_s["quant"]["layers"][layer]
        assert entry["stack"].axis == axis
        for i in range(L):
            twin = merged_u["quant"][f"layers_{i}"][layer]["kernel"]
            _same_bits(layer_of(entry["kernel"], i), twin)
        assert sorted(merged_s["params"]["layers"][layer]) == ["bias"]
    x = _x(2)
    with jaxlora.intercept(CONFIG):
        _close(Scanned(axis).apply(merged_s, x), Unrolled().apply(merged_u, x))


@pytest.mark.parametrize("axis", [0, 1])
def test_adapter_files_are_the_unrolled_twins_per_layer_and_load_back(tmp_path, axis):
    q_unrolled, q_scanned, layouts = _twins(axis)
    jaxlora.save_adapter(q_unrolled, tmp_path / "u", CONFIG)
    jaxlora.save_adapter(q_scanned, tmp_path / "s", CONFIG, layer_names=NAMES)
    key = "base_model.model.layers_2.query.lora_A.weight"
    assert_same_files(tmp_path / "s", tmp_path / "u", key)
    base = {"params": jaxlora.split(q_scanned["params"])[1], "quant": q_scanned["quant"]}
    loaded = jaxlora.load_adapter(base, tmp_path / "s", layer_names=NAMES, layouts=layouts)
    assert loaded["quant"] is q_scanned["quant"]
    x = _x(3)
    with jaxlora.intercept(CONFIG):
        _close(Scanned(axis).apply(loaded, x), Scanned(axis).apply(q_scanned, x))


def test_a_scan_that_does_not_slice_quant_is_refused_by_name():
    _, q_scanned, _ = _twins()
    with pytest.raises(ValueError, match=r"layers.query' has no 'kernel'.*'quant': 0"):
        with jaxlora.intercept(CONFIG):
            Scanned(0, scan_quant=False).apply(q_scanned, _x())


def test_a_stacked_quantized_weight_is_never_read_as_one_layer():
    _, q_scanned, _ = _twins()
    stack = q_scanned["quant"]["layers"]["query"]["kernel"]
    with pytest.raises(ValueError, match="a stack of 3 quantized weights"):
        dequantize(stack)
    # a stacked weight handed to an unscanned layer (its path, no scan) is refused at the call
    bias = q_scanned["params"]["layers"]["query"]["bias"][0]
    variables = {"params": {"query": {"bias": bias}}, "quant": {"query": {"kernel": stack}}}
    with pytest.raises(ValueError, match=r"'query' is called with .* a stack of 3 layers"):
        with jaxlora.intercept(jaxlora.LoRAConfig(r=4, targets=["query"])):
            One().apply(variables, _x())


class One(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral((N, H), name="query")(x)


def test_a_stack_without_adapter_or_layouts_is_refused_and_changes_nothing():
    model = Scanned(0)
    variables = model.init(jax.random.key(0), _x())
    with pytest.raises(
        ValueError, match=r"layer 'layers.mlp' has a kernel of shape \(3, 128, 64\)"
    ):
        quantize_base(variables, ["mlp"])
    assert "quant" not in variables
    assert jnp.shape(variables["params"]["layers"]["mlp"]["kernel"]) == (L, F, D)


# ------------------------------------------------------------------------------------- NNX


def _nnx_quantized(options):
    """(unrolled NnxGPT, NnxScanGPT built by nnx.vmap and run by nnx.scan): the twins of
    tests/test_scan.py (same weights, stacked adapter), their adapted layers quantized."""
    import jaxlora.nnx
    from tests.test_scan import _nnx_twins

    unrolled, scanned, config = _nnx_twins()
    for model in (unrolled, scanned):
        jaxlora.nnx.quantize_base(model, config, **options)
    return unrolled, scanned, config


def _nnx_quant(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, jaxlora.nnx.QuantizedKernel))


def _nnx_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "int8"])
def test_nnx_vmapped_stack_is_its_unrolled_twin_per_layer_in_bytes_logits_and_grads(name):
    from flax import nnx

    from jaxlora.models import gpt as jgpt
    from tests.test_scan import CFG, _tokens

    unrolled, scanned, _ = _nnx_quantized(OPTIONS[name])
    kernel = scanned.blocks.attn.query.kernel
    assert isinstance(kernel, jaxlora.nnx.QuantizedKernel)
    assert kernel.shape == (CFG.n_layer, CFG.d_model, CFG.d_model) and kernel.layer_axis == 0
    twin = jgpt.stack_blocks(_nnx_quant(unrolled), CFG.n_layer)
    ours = _nnx_quant(scanned)
    assert jax.tree.structure(ours) == jax.tree.structure(twin)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(twin), strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))
    tokens = _tokens(1)
    _close(scanned(tokens[:, :-1]), unrolled(tokens[:, :-1]))
    diff = nnx.DiffState(0, nnx.LoRAParam)
    grad_u = nnx.to_pure_dict(nnx.grad(_nnx_loss, argnums=diff)(unrolled, tokens))
    grad_s = nnx.to_pure_dict(nnx.grad(_nnx_loss, argnums=diff)(scanned, tokens))
    # 2e-6 of the largest gradient: this GPT's float (unquantized) scanned and unrolled twins
    # already differ by 5.7e-7 of it (measured: float32 order through softmax and layer norm).
    _close(grad_s, jgpt.stack_blocks(grad_u, CFG.n_layer), rel=2e-6)


def test_nnx_training_keeps_the_stack_bit_identical_and_merges_per_layer():
    from flax import nnx

    import jaxlora.nnx
    from jaxlora.models import gpt as jgpt
    from tests.test_scan import CFG, _tokens

    unrolled, scanned, _ = _nnx_quantized(OPTIONS["nf4-dq"])
    before = jax.tree.map(np.array, _nnx_quant(scanned))
    diff = nnx.DiffState(0, nnx.LoRAParam)
    for model in (unrolled, scanned):
        optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
        packed = [v for v in jax.tree.leaves(nnx.state(optimizer)) if v.dtype == jnp.uint8]
        assert not packed  # no optimizer state for the quantized base

        @nnx.jit
        def step(model, optimizer, tokens):
            optimizer.update(model, nnx.grad(_nnx_loss, argnums=diff)(model, tokens))

        for i in range(3):
            step(model, optimizer, _tokens(10 + i))
    for x, y in zip(jax.tree.leaves(_nnx_quant(scanned)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))
    adapter = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.LoRAParam))  # noqa: E731
    _close(adapter(scanned), jgpt.stack_blocks(adapter(unrolled), CFG.n_layer), rel=1e-5)
    # the same adapter on both (training left float32 noise between them), to merge alike
    jgpt.load_nnx(unrolled, jgpt.unstack_blocks(adapter(scanned)))
    tokens = _tokens(2)[:, :-1]
    # the float merge: per layer, the dequantized kernel plus the delta (nnx.Linear kernels)
    floats = [jaxlora.nnx.merge(nnx.clone(m)) for m in (unrolled, scanned)]
    kernels = [nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in floats]
    _close(kernels[1], jgpt.stack_blocks(kernels[0], CFG.n_layer))
    _close(floats[1](tokens), floats[0](tokens))
    jaxlora.nnx.merge(unrolled, requantize=True)
    jaxlora.nnx.merge(scanned, requantize=True)
    twin = jgpt.stack_blocks(_nnx_quant(unrolled), CFG.n_layer)
    for x, y in zip(jax.tree.leaves(_nnx_quant(scanned)), jax.tree.leaves(twin), strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))
    assert isinstance(scanned.blocks.attn.query, jaxlora.nnx.LoRALinear)  # lora_b now zero
    _close(scanned(tokens), unrolled(tokens))


def test_nnx_adapter_files_of_a_quantized_stack_are_the_unrolled_twins(tmp_path):
    import jaxlora.nnx

    unrolled, scanned, config = _nnx_quantized(OPTIONS["nf4"])
    jaxlora.nnx.save_adapter(unrolled, tmp_path / "u", config)
    jaxlora.nnx.save_adapter(scanned, tmp_path / "s", config, layer_names={"blocks": "blocks_{i}"})
    key = "base_model.model.blocks_2.attn.query.lora_A.weight"
    assert_same_files(tmp_path / "s", tmp_path / "u", key)


def test_nnx_a_stacked_kernel_outside_the_scan_is_the_stacked_weight():
    """Outside nnx.scan the QuantizedKernel stands for its (L, in, out) kernel, dequantized
    layer by layer; the raw stacked QuantizedWeight is never read as one layer."""
    from jaxlora.nnx.quant import kernel_value

    unrolled, scanned, _ = _nnx_quantized(OPTIONS["nf4"])
    kernel = scanned.blocks.mlp.fc.kernel
    stacked = kernel_value(kernel)
    for i in range(stacked.shape[0]):
        one = kernel_value(getattr(unrolled, f"blocks_{i}").mlp.fc.kernel)
        np.testing.assert_array_equal(stacked[i], one)
    with pytest.raises(ValueError, match="a stack of 3 quantized weights"):
        dequantize(kernel.get_value())
