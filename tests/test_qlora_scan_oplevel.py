"""QLoRA on op-level (product) adapters inside scanned stacks (issue 16 with the op-level scan
work): MaxText-like Linen ``nn.scan`` layers of einsum projections and a ``FlaxConv1D``
(params on axis 0, 1 or -1, ``'quant'`` always on axis 0) and tunix-like NNX ``Einsum``
layers built by ``nnx.vmap`` and run by ``nnx.scan``. Each quantized layer is its unrolled
quantized twin's, bit for bit, and bitsandbytes' bytes for that layer's torch Linear; the
scanned model computes the twin's outputs and adapter gradients (1e-6 of their scale, fp32),
optax steps leave the packed bytes identical, merges (float and re-quantized) and adapter
files are the twin's per layer. A scan slicing ``'quant'`` on any axis but 0 is refused (the
int8 case whose sizes let it pass silently before: out == L and in == blocksize); nested
scans stay refused by name. PEFT on the bitsandbytes twin:
``parity_tests/test_qlora_scan_parity.py``."""

from __future__ import annotations

import functools

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn
from flax import nnx

import jaxlora
import jaxlora.nnx
from jaxlora.quant import dequantize, dequantize_base, quantize_base
from tests._scan_twins import adam_trained, assert_same_files, bits, layer_of
from tests.test_oplevel_linen import FlaxConv1D
from tests.test_oplevel_scan import (
    CONFIG,
    NAMES,
    NNX_CONFIG,
    Block,
    D,
    H,
    L,
    N,
    Unrolled,
    _injected,
    _inputs,
    _nnx_twins,
    _pure,
    _stack_layers,
)
from tests.test_scan_axis import _arrays, _fill, _random_b, _stacked

jax.config.update("jax_default_matmul_precision", "highest")

QUANTIZED = ["q", "o", "c", "mlp"]  # three product adapters and a Dense, one scanned layer
OPTIONS = {
    "nf4": dict(quant_type="nf4"),
    "nf4-dq": dict(quant_type="nf4", double_quant=True),
    "int8": dict(quant_type="int8", blocksize=64),
}
# Each layer's weight as the torch Linear (out, in) bitsandbytes quantizes, by hand.
TORCH = {
    "q": ("w", lambda w: w.reshape(D, N * H).T),
    "o": ("w", lambda w: w.reshape(N * H, D).T),
    "c": ("kernel", lambda w: w),  # FlaxConv1D holds (out, in)
    "mlp": ("kernel", lambda w: w.T),
}


class QScanned(nn.Module):
    """``tests.test_oplevel_scan.Block`` scanned with params on ``axis``, 'quant' on 0."""

    axis: int = 0

    @nn.compact
    def __call__(self, x):
        axes = {"params": self.axis, "quant": 0}
        stack = nn.scan(Block, variable_axes=axes, split_rngs={"params": True}, length=L)
        return stack(name="layers")(x, None)[0]


@functools.cache
def _linen(axis: int, name: str):
    """(unrolled float params, unrolled quantized, scanned quantized, layouts): the same
    weights and adapters (lora_b nonzero), the scanned stack's params on ``axis``."""
    x = _inputs()
    unrolled = _random_b(_injected(Unrolled(), x))
    model = QScanned(axis)
    layouts = jaxlora.layouts(model, x)
    scanned = _fill(_injected(model, x), _stacked(unrolled, (L,), axis))
    options = OPTIONS[name]
    q_unrolled = quantize_base({"params": unrolled}, QUANTIZED, **options)
    q_scanned = quantize_base({"params": scanned}, QUANTIZED, layouts=layouts, **options)
    return unrolled, q_unrolled, q_scanned, layouts


def _same_bits(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


def _close(a, b, rel=1e-6):
    leaves_b = jax.tree.leaves(b)
    scale = max(float(jnp.max(jnp.abs(y))) for y in leaves_b)
    assert scale > 1e-3
    for x, y in zip(jax.tree.leaves(a), leaves_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=rel * scale)


def _restack(tree, axis):
    return _stacked(tree, (L,), axis)["layers"]


def _check_bnb(q, float_weight, layer, options):
    """``q`` (one layer's QuantizedWeight) holds bitsandbytes' bytes of the torch Linear."""
    weight = torch.from_numpy(np.array(TORCH[layer][1](np.asarray(float_weight)), copy=True))
    if options["quant_type"] == "int8":
        codes, state = bnbf.quantize_blockwise(weight, blocksize=options["blocksize"])
        np.testing.assert_array_equal(np.asarray(q.packed), codes.numpy())
        np.testing.assert_array_equal(bits(q.absmax), bits(state.absmax))
        return
    double = options.get("double_quant", False)
    packed, state = bnbf.quantize_4bit(
        weight, quant_type=options["quant_type"], compress_statistics=double
    )
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy())
    if double:  # the offset: torch.mean's summation order (tests/test_qlora_bnb.py)
        offset = np.float32(state.offset.item())
        assert abs(float(q.offset) - offset) <= 4 * np.spacing(offset)
    else:
        np.testing.assert_array_equal(bits(q.absmax), bits(state.absmax))


# --------------------------------------------------------------------------------- Linen


# (params axis, format) pairs: each twin is built once (functools.cache) for all tests.
CASES = [(0, "nf4"), (1, "nf4-dq"), (-1, "int8")]


@pytest.mark.parametrize(("axis", "name"), CASES)
def test_linen_each_layer_is_its_unrolled_twin_and_bitsandbytes(axis, name):
    """Used to be refused ("stacked (nn.scan, layer axis 0) ... which this operation does
    not handle")."""
    floats, q_unrolled, q_scanned, _ = _linen(axis, name)
    for layer, (weight, _) in TORCH.items():
        entry = q_scanned["quant"]["layers"][layer]
        assert entry["stack"].axis == axis and entry["stack_index"].shape == (L, 1, 1, 1)
        assert weight not in q_scanned["params"]["layers"][layer]
        for i in range(L):
            one = layer_of(entry[weight], i)
            _same_bits(one, q_unrolled["quant"][f"layers_{i}"][layer][weight])
            _check_bnb(one, floats[f"layers_{i}"][layer][weight], layer, OPTIONS[name])


@pytest.mark.parametrize(("axis", "name"), CASES)
def test_linen_scanned_equals_unrolled_outputs(axis, name):
    """Adapter gradients: the optax test below (its steps equal the twin's)."""
    _, q_unrolled, q_scanned, _ = _linen(axis, name)
    x = _inputs(1)
    with jaxlora.intercept(CONFIG):
        expected = Unrolled().apply(q_unrolled, x)
        got = jax.jit(QScanned(axis).apply)(q_scanned, x)
        # each layer runs its own dequantized weights: the float twin of those computes it
        floats = Unrolled().apply(dequantize_base(q_unrolled), x)
    _close(got, expected)
    _close(floats, expected)


def test_linen_optax_steps_keep_the_packed_stack_bit_identical():
    _, q_unrolled, q_scanned, _ = _linen(1, "nf4-dq")
    before = jax.tree.map(np.array, q_scanned["quant"])
    runs = (("u", Unrolled(), q_unrolled), ("s", QScanned(1), q_scanned))
    trained = adam_trained(runs, CONFIG, _inputs)
    _same_bits(q_scanned["quant"], jax.tree.map(jnp.asarray, before))
    _close(_arrays(trained["s"]["layers"]), _restack(trained["u"], 1), rel=1e-5)


def test_linen_merge_and_requantize_per_layer():
    axis = 1
    _, q_unrolled, q_scanned, _ = _linen(axis, "nf4-dq")
    floats_u = jaxlora.merge(q_unrolled, alpha=CONFIG.alpha)
    floats_s = jaxlora.merge(q_scanned, alpha=CONFIG.alpha)
    _close(_arrays(floats_s["params"]["layers"]), _restack(floats_u["params"], axis))
    merged_u = jaxlora.merge(q_unrolled, alpha=CONFIG.alpha, requantize=True)
    merged_s = jaxlora.merge(q_scanned, alpha=CONFIG.alpha, requantize=True)
    for layer, (weight, _) in TORCH.items():
        entry = merged_s["quant"]["layers"][layer]
        assert entry["stack"].axis == axis
        for i in range(L):
            _same_bits(layer_of(entry[weight], i), merged_u["quant"][f"layers_{i}"][layer][weight])
    x = _inputs(2)
    with jaxlora.intercept(CONFIG):
        _close(QScanned(axis).apply(merged_s, x), Unrolled().apply(merged_u, x))


def test_linen_adapter_files_are_the_unrolled_twins_per_layer_and_load_back(tmp_path):
    _, q_unrolled, q_scanned, _ = _linen(0, "nf4")
    jaxlora.save_adapter(q_unrolled, tmp_path / "u", CONFIG)
    jaxlora.save_adapter(q_scanned, tmp_path / "s", CONFIG, layer_names=NAMES)
    assert_same_files(tmp_path / "s", tmp_path / "u", "base_model.model.layers_2.q.lora_A.weight")
    # the twin's file into the scanned quantized model holding other (zero) adapters
    zero = lambda p, v: jnp.zeros_like(v) if "lora_" in jax.tree_util.keystr(p) else v  # noqa: E731
    fresh = {**q_scanned, "params": jax.tree_util.tree_map_with_path(zero, q_scanned["params"])}
    loaded = jaxlora.load_adapter(fresh, tmp_path / "u", layer_names=NAMES)
    assert loaded["quant"] is q_scanned["quant"]
    _same_bits(jaxlora.split(loaded["params"])[0], jaxlora.split(q_scanned["params"])[0])
    x = _inputs(3)
    with jaxlora.intercept(CONFIG):
        _close(QScanned(0).apply(loaded, x), Unrolled().apply(q_unrolled, x))


# ------------------------------------------------------ 'quant' sliced on another axis


class Probe(nn.Module):
    """One layer: a Dense or a FlaxConv1D (adapted at its product) with L out features: int8
    codes (L, L, 64) and scales (L, L) in blocks of 64, which nn.scan can slice on axis 1."""

    product: bool

    @nn.compact
    def __call__(self, x, _):
        layer = FlaxConv1D(L, name="p") if self.product else nn.Dense(L, name="p")
        return x, layer(x)


class ProbeScan(nn.Module):
    product: bool
    quant_axis: int = 0

    @nn.compact
    def __call__(self, x):
        axes = {"params": 0, "quant": self.quant_axis}
        stack = nn.scan(Probe, variable_axes=axes, split_rngs={"params": True}, length=L)
        return stack(self.product, name="layers")(x, None)[1]


PROBE = jaxlora.LoRAConfig(r=1, alpha=2, targets=["p"])


def _probe(product: bool):
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 64)), jnp.float32)
    model = ProbeScan(product)
    variables = model.init(jax.random.key(0), x)
    layouts = jaxlora.layouts(model, x)
    variables = _random_b(jaxlora.inject(variables, PROBE, jax.random.key(1), layouts=layouts))
    q = quantize_base(variables, PROBE, quant_type="int8", blocksize=64, layouts=layouts)
    assert q["quant"]["layers"]["p"]["kernel"].packed.shape == (L, L, 64)
    return x, q


def _probe_reference(x, q):
    """Each layer's output from its own dequantized Linear weight (out, in) plus the branch
    s·x a b (a Dense's and a FlaxConv1D's adapter alike: a (in, r), b (r, out); s = 2)."""
    node, entry = q["params"]["layers"]["p"], q["quant"]["layers"]["p"]
    x = np.asarray(x, np.float64)
    outs = []
    for i in range(L):
        linear = np.asarray(dequantize(layer_of(entry["kernel"], i)), np.float64)  # (L, 64)
        a, b = (np.asarray(node[n][i], np.float64) for n in ("lora_a", "lora_b"))
        outs.append(x @ linear.T + 2.0 * (x @ a @ b) + np.asarray(node["bias"][i]))
    return np.stack(outs)


@pytest.mark.parametrize("product", [False, True], ids=["dense", "product"])
def test_a_scan_slicing_quant_off_axis_0_is_refused_where_int8_sizes_let_it_pass(product):
    """The int8 case out == L, in == blocksize: sliced on axis 1 (or -2) every quantized array
    has one layer's shapes, so it used to run silently on a column of all layers' codes."""
    x, q = _probe(product)
    before = jax.tree.map(np.array, q)
    with jaxlora.intercept(PROBE):
        got = ProbeScan(product, 0).apply(q, x)
        np.testing.assert_allclose(got, _probe_reference(x, q), rtol=0, atol=1e-5)
        for axis in (1, -2):
            with pytest.raises(
                ValueError,
                match=r"layer 'layers.p' is called inside an nn.scan that slices the 'quant' "
                r"collection on an axis other than 0.*variable_axes=\{'params': k, 'quant': 0\}",
            ):
                ProbeScan(product, axis).apply(q, x)
        for axis in (2, -3):  # Flax cannot slice every array there: its own error
            with pytest.raises((ValueError, IndexError)):
                ProbeScan(product, axis).apply(q, x)
    _same_bits(q, jax.tree.map(jnp.asarray, before))


def test_a_stacked_quant_entry_without_its_layer_index_is_refused():
    x, q = _probe(True)
    entry = dict(q["quant"]["layers"]["p"])
    del entry["stack_index"]
    old = {**q, "quant": {"layers": {"p": entry}}}
    with pytest.raises(ValueError, match=r"layer 'layers.p' must hold its 'stack_index' \(3, 1"):
        dequantize_base(old)
    with pytest.raises(ValueError, match=r"layer 'layers.p' must hold its 'stack_index'"):
        jaxlora.merge(old, alpha=PROBE.alpha)
    with pytest.raises(ValueError, match=r"layer 'layers.p' must hold its 'stack_index'"):
        with jaxlora.intercept(PROBE):
            ProbeScan(True).apply(old, x)


# ------------------------------------------------------------------------- nested scans


class Inner(nn.Module):
    product: bool

    @nn.compact
    def __call__(self, x, _):
        stack = nn.scan(
            Probe, variable_axes={"params": 0, "quant": 0}, split_rngs={"params": True}, length=2
        )
        return stack(self.product, name="sub")(x, None)[0], None


class Nested(nn.Module):
    """MaxText-like scanned blocks of scanned sublayers: weights (L, 2, …)."""

    product: bool

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Inner, variable_axes={"params": 0, "quant": 0}, split_rngs={"params": True}, length=L
        )
        return stack(self.product, name="blocks")(x, None)[0]


@pytest.mark.parametrize("product", [False, True], ids=["dense", "product"])
def test_nested_scans_stay_refused_by_name_and_change_nothing(product):
    x = jnp.ones((2, 64))
    model = Nested(product)
    variables = model.init(jax.random.key(0), x)
    layouts = jaxlora.layouts(model, x)
    before = jax.tree.map(np.array, variables)
    with pytest.raises(TypeError, match=r"'blocks.sub.p'.*only one stacking transform"):
        jaxlora.inject(variables, PROBE, jax.random.key(1), layouts=layouts)
    shapes = r"\(3, 2, (3, 64|64, 3)\)"  # FlaxConv1D (out, in), Dense (in, out)
    match = rf"'blocks.sub.p' has a kernel of shape {shapes} (stacked over 2|and no adapter)"
    with pytest.raises(ValueError, match=match):
        quantize_base(variables, PROBE, layouts=layouts)
    _same_bits(variables, jax.tree.map(jnp.asarray, before))


# ----------------------------------------------------------------------------------- NNX


def _nnx_quant(model):
    return nnx.to_pure_dict(nnx.state(model, jaxlora.nnx.QuantizedKernel))


@functools.cache
def _nnx_float():
    unrolled, scanned = _nnx_twins()
    return nnx.split(unrolled), nnx.split(scanned)


def _nnx(name: str):
    """The twins of tests/test_oplevel_scan.py (Einsum q, o and a Linear per layer; the
    scanned ones nnx.vmap-made), quantized alike."""
    unrolled, scanned = (nnx.merge(*parts) for parts in _nnx_float())
    for model in (unrolled, scanned):
        jaxlora.nnx.quantize_base(model, NNX_CONFIG, **OPTIONS[name])
    return unrolled, scanned


def test_nnx_vmapped_product_stack_is_its_unrolled_twin_trains_and_merges_per_layer():
    """Used to be refused ("an nnx.vmap stack cannot be quantized")."""
    name = "nf4-dq"
    unrolled, scanned = _nnx(name)
    weight = scanned.layers.q.w
    assert isinstance(weight, jaxlora.nnx.QuantizedKernel)
    assert weight.shape == (L, D, N, H) and weight.layer_axis == 0
    _same_bits(_nnx_quant(scanned), _stack_layers(_nnx_quant(unrolled)))
    floats = nnx.to_pure_dict(_nnx_float()[1][1])["layers"]  # the float stack
    for i in range(L):
        for layer in ("q", "o"):
            one = layer_of(getattr(scanned.layers, layer).w.get_value(), i)
            float_weight = layer_of(floats[layer]["w"], i)
            assert float_weight.shape == getattr(scanned.layers, layer).lora_roles.shape
            _check_bnb(one, float_weight, layer, OPTIONS[name])
    _close(scanned(_inputs(1)), unrolled(_inputs(1)))
    # training (its steps equal the twin's: the adapters' gradients are) and merging
    before = jax.tree.map(np.array, _nnx_quant(scanned))
    diff = nnx.DiffState(0, nnx.LoRAParam)
    loss = lambda m, x: jnp.mean(m(x) ** 2)  # noqa: E731
    for model in (unrolled, scanned):
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
        assert not [v for v in jax.tree.leaves(nnx.state(optimizer)) if v.dtype == jnp.uint8]

        @nnx.jit
        def step(model, optimizer, x):
            optimizer.update(model, nnx.grad(loss, argnums=diff)(model, x))

        for i in range(3):
            step(model, optimizer, _inputs(10 + i))
    _same_bits(_nnx_quant(scanned), jax.tree.map(jnp.asarray, before))
    adapter = lambda m: _pure(m, nnx.LoRAParam)  # noqa: E731
    _close(adapter(scanned), _stack_layers(adapter(unrolled)), rel=1e-5)
    # the same adapter on both (training left float32 noise between them), to merge alike
    state = nnx.state(unrolled, nnx.LoRAParam)
    layers = adapter(scanned)["layers"]
    nnx.replace_by_pure_dict(state, {"layers": {i: layer_of(layers, i) for i in range(L)}})
    nnx.update(unrolled, state)
    x = _inputs(2)
    floats = [jaxlora.nnx.merge(nnx.clone(m)) for m in (unrolled, scanned)]
    assert type(floats[1].layers.q).__name__ == "NnxEinsum"
    _close(_pure(floats[1]), _stack_layers(_pure(floats[0])))
    _close(floats[1](x), floats[0](x))
    jaxlora.nnx.merge(unrolled, requantize=True)
    jaxlora.nnx.merge(scanned, requantize=True)
    _same_bits(_nnx_quant(scanned), _stack_layers(_nnx_quant(unrolled)))
    assert isinstance(scanned.layers.q, jaxlora.nnx.OpAdapter)  # lora_b now zero
    _close(scanned(x), unrolled(x))


def test_nnx_adapter_files_of_a_quantized_product_stack_are_the_unrolled_twins(tmp_path):
    unrolled, scanned = _nnx("nf4")
    jaxlora.nnx.save_adapter(unrolled, tmp_path / "u")
    jaxlora.nnx.save_adapter(scanned, tmp_path / "s")
    assert_same_files(tmp_path / "s", tmp_path / "u", "base_model.model.layers.2.q.lora_A.weight")
