"""QLoRA on op-level weights (an einsum weight, ``x @ kernel.T``): the quantized base is stored
as the torch Linear the weight is, (out, in) = (prod free, prod contracted) in the weight's
own axis order (``jaxlora.quant._layout``), and dequantized to the weight's own shape in the
forward pass, where the module's own product runs on it.

References: the Linear layout written out per case in numpy (``TORCH``), independently of
the role rule; outputs against the product in float64 with the dequantized weight. Bytes
against bitsandbytes and outputs against PEFT on ``Linear4bit``: parity_tests/
test_qlora_oplevel_peft.py. fp32 tolerance: 2e-5 of the output's scale (sums of ≤ 64 terms
in another association).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
from flax import linen as lnn
from flax import nnx

import jaxlora
from jaxlora import nnx as jnnx
from jaxlora.quant import QuantizedWeight, dequantize, quantize, quantize_base
from tests import _nnx_products as products
from tests._nnx_products import Conv1DLike, Holder, einsum_case
from tests._train import linen_adam_steps, nnx_lora_step

R, ALPHA = 4, 8.0
S = ALPHA / R
TOL = 2e-5
D, N, H, K = 64, 2, 32, 2


class Einsum(products.Einsum):
    fan_in = D  # every weight over sqrt(D), whatever its first axis


class WeightFirst(products.WeightFirst):
    fan_in = D


# name: (module factory, input shape, weight name, delta einsum over (A, B), product in numpy)
CASES = {
    "llama_q": einsum_case(Einsum, "BTD,DNH->BTNH", (D, N, H), (2, 5, D), "dr,rnh->dnh"),
    "llama_o": einsum_case(Einsum, "BTNH,NHD->BTD", (N, H, D), (2, 5, N, H), "nhr,rd->nhd"),
    "gemma_kv": einsum_case(Einsum, "BSD,CKDH->CBSKH", (2, K, D, H), (2, 5, D), "dr,rckh->ckdh"),
    "weight_first": einsum_case(WeightFirst, "NDH,BTD->BTNH", (N, D, H), (2, 5, D), "dr,rnh->ndh"),
    "conv1d": (
        lambda r: Conv1DLike(D, 48, r),
        (2, 5, D),
        "ir,ro->oi",
        None,  # x @ w.T + bias
    ),
}
# The torch Linear weight (out, in) each case's weight is, written out by hand.
TORCH = {
    "llama_q": lambda w: w.reshape(D, N * H).T,
    "llama_o": lambda w: w.reshape(N * H, D).T,
    "gemma_kv": lambda w: w.transpose(0, 1, 3, 2).reshape(2 * K * H, D),
    "weight_first": lambda w: w.transpose(0, 2, 1).reshape(N * H, D),
    "conv1d": lambda w: w,
}
OPTIONS = {
    "nf4": {},
    "fp4": {"quant_type": "fp4"},
    "nf4_double": {"double_quant": True},
    "int8": {"quant_type": "int8", "blocksize": 256},
}


def _weight_name(layer) -> str:
    return "kernel" if isinstance(layer, Conv1DLike) else "w"


def _injected(name: str, dropout: float = 0.0, **options):
    """(model, x, the float weight): adapted at its product, B nonzero, then quantized."""
    make, shape, _, _ = CASES[name]
    model = Holder(make(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), shape)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"], dropout=dropout)
    jnnx.inject(model, config, nnx.Rngs(2), inputs=(x,))
    layer = model.proj
    layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(3), layer.lora_b.shape)
    floats = np.asarray(getattr(layer, _weight_name(layer))[...])
    jnnx.quantize_base(model, config, **options)
    return model, x, floats


def _dequantized(name: str, layer) -> np.ndarray:
    """The weight the packed base stands for, brought back by hand from the torch layout."""
    var = getattr(layer, _weight_name(layer))
    linear, shape = np.asarray(dequantize(var.get_value()), np.float64), var.shape
    back = {
        "llama_q": lambda m: m.T.reshape(shape),
        "llama_o": lambda m: m.T.reshape(shape),
        "gemma_kv": lambda m: m.reshape(2, K, H, D).transpose(0, 1, 3, 2),
        "weight_first": lambda m: m.reshape(N, H, D).transpose(0, 2, 1),
        "conv1d": lambda m: m,
    }
    return back[name](linear)


def _reference(name: str, layer, x, w: np.ndarray) -> np.ndarray:
    """The module's product in float64 with ``w + s·delta``."""
    _, _, delta_eqn, product = CASES[name]
    a, b = (np.asarray(v[...], np.float64) for v in (layer.lora_a, layer.lora_b))
    w = w + S * np.einsum(delta_eqn, a, b)
    x = np.asarray(x, np.float64)
    if product is None:
        return x @ w.T + np.asarray(layer.bias[...], np.float64)
    return product(x, w)


def _close(got, want, tol=TOL) -> None:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(np.abs(want).max(), 1.0))


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("name", list(CASES))
def test_stored_as_the_torch_linear_and_forward_is_the_closed_form(name, options):
    model, x, floats = _injected(name, **OPTIONS[options])
    layer = model.proj
    var = getattr(layer, _weight_name(layer))
    assert isinstance(var, jnnx.QuantizedKernel) and not isinstance(var, nnx.Param)
    assert var.shape == floats.shape  # the weight it stands for
    q = var.get_value()
    want = quantize(jnp.asarray(np.ascontiguousarray(TORCH[name](floats))), **OPTIONS[options])
    assert isinstance(q, QuantizedWeight) and q.shape == want.shape
    np.testing.assert_array_equal(q.packed, want.packed)
    np.testing.assert_array_equal(q.absmax, want.absmax)
    expected = _reference(name, layer, x, _dequantized(name, layer))
    _close(model(x), expected)
    _close(nnx.jit(lambda m, x: m(x))(model, x), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_the_base_path_is_the_modules_own_product_on_the_dequantized_weight(name):
    # B = 0: the output is exactly (bit for bit) the original module on the dequantized weight.
    model, x, _ = _injected(name)
    layer = model.proj
    layer.lora_b[...] = jnp.zeros_like(layer.lora_b[...])
    plain = CASES[name][0](nnx.Rngs(0))
    weight = jnp.asarray(_dequantized(name, layer), jnp.float32)
    getattr(plain, _weight_name(plain))[...] = weight
    if isinstance(plain, Conv1DLike):
        plain.bias[...] = layer.bias[...]
    np.testing.assert_array_equal(model(x), plain(x))


def test_a_bfloat16_weight_is_dequantized_in_bfloat16():
    model = Holder(Einsum("BTD,DNH->BTNH", (D, N, H), nnx.Rngs(0), dtype=jnp.bfloat16))
    x = jax.random.normal(jax.random.key(1), (2, 5, D)).astype(jnp.bfloat16)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"])
    jnnx.inject(model, config, nnx.Rngs(2), inputs=(x,))
    jnnx.quantize_base(model, config)
    q = model.proj.w.get_value()
    assert q.dtype == jnp.bfloat16 and model.proj.w.dtype == jnp.bfloat16
    weight = dequantize(q).T.reshape(D, N, H)  # bfloat16, B = 0
    y = model(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, jnp.einsum("BTD,DNH->BTNH", x, weight))


@pytest.mark.parametrize("name", ["llama_q", "conv1d"])
def test_training_never_touches_the_packed_base(name):
    model, x, _ = _injected(name, dropout=0.1)
    layer = model.proj
    var = getattr(layer, _weight_name(layer))
    before = jax.tree.map(np.array, var.get_value())
    target = jax.random.normal(jax.random.key(5), model(x).shape)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    assert not any(
        isinstance(leaf, jnnx.QuantizedKernel)
        for leaf in jax.tree.leaves(
            nnx.state(optimizer), is_leaf=lambda v: isinstance(v, nnx.Variable)
        )
    )

    model.train()
    losses = []
    for _ in range(10):
        loss, grads = nnx_lora_step(model, optimizer, x, target)
        losses.append(float(loss))
        assert sorted(grads["proj"]) == ["lora_a", "lora_b"]
    assert losses[-1] < losses[0]
    after = getattr(model.proj, _weight_name(model.proj)).get_value()
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(new), old)
        assert np.asarray(new).dtype == old.dtype


@pytest.mark.parametrize("name", list(CASES))
def test_merge_is_the_dequantized_weight_plus_delta(name):
    model, x, floats = _injected(name)
    layer = model.proj
    unmerged = np.asarray(model(x), np.float64)
    deq = _dequantized(name, layer)
    want = _reference(name, layer, x, deq)
    a, b = (np.asarray(v[...], np.float64) for v in (layer.lora_a, layer.lora_b))
    merged_want = deq + S * np.einsum(CASES[name][2], a, b)
    jnnx.merge(model)
    weight = getattr(model.proj, _weight_name(model.proj))
    assert type(weight) is nnx.Param and not isinstance(model.proj, jnnx.OpAdapter)
    _close(weight[...], merged_want, 1e-6)
    _close(model(x), want)
    _close(unmerged, want)
    # Against merging into the unquantized weight: the quantization error alone (NF4: at
    # most 0.152·absmax of its block, bounded here by the weight's largest magnitude).
    assert np.abs(np.asarray(weight[...]) - (floats + (merged_want - deq))).max() <= (
        0.153 * np.abs(floats).max()
    )


@pytest.mark.parametrize("options", ["nf4", "nf4_double", "int8"])
@pytest.mark.parametrize("name", ["llama_q", "llama_o", "conv1d"])
def test_merge_requantize_keeps_a_quantized_base_in_the_same_layout(name, options):
    model, x, _ = _injected(name, **OPTIONS[options])
    layer = model.proj
    deq = _dequantized(name, layer)
    a, b = (np.asarray(v[...], np.float64) for v in (layer.lora_a, layer.lora_b))
    # The float merge (checked against float64 in the test above), re-quantized by hand in
    # the Linear layout: what the stored base must be, bit for bit.
    merged = np.asarray(layer.merged_weight())
    _close(merged, deq + S * np.einsum(CASES[name][2], a, b), 1e-6)
    float_output = _reference(name, layer, x, deq)
    jnnx.merge(model, requantize=True)
    assert isinstance(model.proj, jnnx.OpAdapter)
    var = getattr(model.proj, _weight_name(model.proj))
    assert isinstance(var, jnnx.QuantizedKernel) and var.shape == deq.shape
    want = quantize(jnp.asarray(np.ascontiguousarray(TORCH[name](merged))), **OPTIONS[options])
    for got, expected in zip(jax.tree.leaves(var.get_value()), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(model.proj.lora_b[...], 0)
    requantized = _dequantized(name, model.proj)
    _close(model(x), _reference(name, model.proj, x, requantized))
    # One more quantization error than the float merge: within the NF4 bound of the weight.
    assert np.abs(requantized - merged).max() <= 0.153 * np.abs(merged).max()
    assert np.abs(np.asarray(model(x)) - float_output).max() > 0  # it did re-round


def test_adapter_files_do_not_hold_the_base_and_round_trip(tmp_path):
    model, x, _ = _injected("llama_q")
    jnnx.save_adapter(model, tmp_path / "q", path_map={"proj": "q_proj"})
    plain, _, _ = _injected("llama_q")  # the same adapter, never quantized, saved the same way
    plain.proj.w = nnx.Param(jnp.asarray(_dequantized("llama_q", plain.proj), jnp.float32))
    jnnx.save_adapter(plain, tmp_path / "p", path_map={"proj": "q_proj"})
    # The same tensors, metadata and config (safetensors orders its metadata freely).
    files = [safetensors.safe_open(tmp_path / d / "adapter_model.safetensors", "np") for d in "qp"]
    assert files[0].metadata() == files[1].metadata()
    assert (
        sorted(files[0].keys())
        == sorted(files[1].keys())
        == [
            "base_model.model.q_proj.lora_A.weight",
            "base_model.model.q_proj.lora_B.weight",
        ]
    )
    for key in files[0].keys():
        np.testing.assert_array_equal(files[0].get_tensor(key), files[1].get_tensor(key))
    config = "adapter_config.json"
    assert (tmp_path / "q" / config).read_text() == (tmp_path / "p" / config).read_text()
    other, _, _ = _injected("llama_q")
    other.proj.lora_b[...] = jnp.zeros_like(other.proj.lora_b[...])
    jnnx.load_adapter(other, tmp_path / "q", path_map={"proj": "q_proj"})
    np.testing.assert_array_equal(other.proj.lora_b[...], model.proj.lora_b[...])
    assert isinstance(other.proj.w, jnnx.QuantizedKernel)
    np.testing.assert_array_equal(other(x), model(x))


class Experts(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3, D, 6)))

    def __call__(self, x):
        return jnp.einsum("EBD,EDF->EBF", x, self.w[...])


class Mixed(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.experts = Experts(rngs)
        self.q = Einsum("BTD,DNH->BTNH", (D, N, H), rngs)

    def __call__(self, x):
        return self.experts(x), self.q(x)


def test_batch_axes_are_quantized_per_expert():
    # Refused before issue 16's MoE support; now each expert is its own Linear (6, D), its
    # arrays stacked in front (the whole story: tests/test_qlora_moe.py).
    model = Mixed(nnx.Rngs(0))
    config = jaxlora.LoRAConfig(r=R, targets=["q", "experts"])
    jnnx.inject(model, config, nnx.Rngs(2), inputs=(jnp.ones((3, 5, D)),))
    floats = np.asarray(model.experts.w[...])
    jnnx.quantize_base(model, config)
    q = model.experts.w.get_value()
    assert model.experts.w.shape == (3, D, 6) and q.shape == (6, D)
    for e in range(3):
        want = quantize(jnp.asarray(np.ascontiguousarray(floats[e].T)))
        np.testing.assert_array_equal(q.packed[e], want.packed)
        np.testing.assert_array_equal(q.absmax[e], want.absmax)


# ---- Linen: product adapters (lora_roles) and nn.DenseGeneral, the same stored layout ----


class LinenEinsum(lnn.Module):
    """tunix's ``Einsum`` (Linen twin)."""

    eqn: str
    shape: tuple[int, ...]

    @lnn.compact
    def __call__(self, x):
        return jnp.einsum(self.eqn, x, self.param("w", lnn.initializers.normal(0.2), self.shape))


class FlaxConv1D(lnn.Module):
    """transformers' ``FlaxConv1D``: kernel (out, in), ``x @ kernel.T + bias``."""

    features: int

    @lnn.compact
    def __call__(self, x):
        kernel = self.param("kernel", lnn.initializers.normal(0.2), (self.features, x.shape[-1]))
        return x @ kernel.T + self.param("bias", lnn.initializers.normal(0.2), (self.features,))


class LinenBlock(lnn.Module):
    """An einsum q (D, N, H), a DenseGeneral o over (N, H), a FlaxConv1D, a DenseGeneral
    q-like (D → (N, H)) and a plain Dense: every Linen route to a quantized weight."""

    @lnn.compact
    def __call__(self, x):
        q = LinenEinsum("BTD,DNH->BTNH", (D, N, H), name="q_einsum")(x)
        y = lnn.DenseGeneral(D, axis=(-2, -1), name="o_general")(q)
        z = lnn.DenseGeneral((N, H), name="q_general")(FlaxConv1D(D, name="fc")(y))
        return lnn.Dense(8, name="out")(z.reshape(*z.shape[:-2], N * H))


LINEN_TARGETS = ["q_einsum", "o_general", "fc", "q_general", "out"]
# The torch Linear weight (out, in) of each layer, written out by hand from its float weight.
LINEN_TORCH = {
    "q_einsum": ("w", lambda w: w.reshape(D, N * H).T),
    "o_general": ("kernel", lambda w: w.reshape(N * H, D).T),
    "fc": ("kernel", lambda w: w),
    "q_general": ("kernel", lambda w: w.reshape(D, N * H).T),
    "out": ("kernel", lambda w: w.T),
}
LINEN_BACK = {
    "q_einsum": lambda m: m.T.reshape(D, N, H),
    "o_general": lambda m: m.T.reshape(N, H, D),
    "fc": lambda m: m,
    "q_general": lambda m: m.T.reshape(D, N, H),
    "out": lambda m: m.T,
}


def _linen(targets=tuple(LINEN_TARGETS), **options):
    """(model, x, config, adapted float variables, quantized variables); B nonzero."""
    model = LinenBlock()
    x = jax.random.normal(jax.random.key(1), (2, 3, D))
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=list(targets))
    lora = jaxlora.inject(variables, config, jax.random.key(2), layouts=jaxlora.layouts(model, x))
    params = dict(lora["params"])
    for i, name in enumerate(targets):
        b = params[name]["lora_b"]
        params[name] = {
            **params[name],
            "lora_b": 0.3 * jax.random.normal(jax.random.key(i), b.shape),
        }
    lora = {"params": params}
    return model, x, config, lora, quantize_base(lora, config, **options)


def _linen_reference(quantized, x) -> np.ndarray:
    """The block in float64 with each layer's dequantized weight (brought back by hand from
    the Linear layout) plus s·delta."""
    params = quantized["params"]

    def weight(name):
        linear = np.asarray(dequantize(quantized["quant"][name][LINEN_TORCH[name][0]]), np.float64)
        node = params[name]
        a, b = (np.asarray(node[n], np.float64) for n in ("lora_a", "lora_b"))
        w = LINEN_BACK[name](linear)
        a2, b2 = a.reshape(-1, R), b.reshape(R, -1)
        delta = (a2 @ b2).reshape(w.shape) if name != "fc" else (a2 @ b2).T
        return w + S * delta

    def bias(name):
        return np.asarray(params[name]["bias"], np.float64)

    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", x, weight("q_einsum"))
    y = np.einsum("btnh,nhd->btd", q, weight("o_general")) + bias("o_general")
    f = y @ weight("fc").T + bias("fc")
    z = np.einsum("btd,dnh->btnh", f, weight("q_general")) + bias("q_general")
    return z.reshape(2, 3, N * H) @ weight("out") + bias("out")


@pytest.mark.parametrize("options", list(OPTIONS))
def test_linen_stored_as_the_torch_linear_and_forward_is_the_closed_form(options):
    model, x, config, lora, quantized = _linen(**OPTIONS[options])
    for name, (weight, torch_layout) in LINEN_TORCH.items():
        assert weight not in quantized["params"][name]  # out of params: not a parameter
        q = quantized["quant"][name][weight]
        float_weight = np.asarray(lora["params"][name][weight])
        want = quantize(
            jnp.asarray(np.ascontiguousarray(torch_layout(float_weight))), **OPTIONS[options]
        )
        assert q.shape == want.shape
        for got, expected in zip(jax.tree.leaves(q), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(got, expected)
    expected = _linen_reference(quantized, x)
    with jaxlora.intercept(config):
        _close(model.apply(quantized, x), expected)

    @jax.jit
    def apply(variables, x):
        with jaxlora.intercept(config):
            return model.apply(variables, x)

    _close(apply(quantized, x), expected)


def test_linen_base_path_is_the_modules_own_product():
    # B = 0 everywhere: bit for bit the plain model on the dequantized weights.
    model, x, config, _, quantized = _linen()
    params = {
        k: {**v, "lora_b": jnp.zeros_like(v["lora_b"])} for k, v in quantized["params"].items()
    }
    zeroed = {**quantized, "params": params}
    with jaxlora.intercept(config):
        got = model.apply(zeroed, x)
    plain = jaxlora.quant.dequantize_base(quantized)["params"]
    plain = {
        k: {n: v for n, v in node.items() if not n.startswith("lora_")} for k, node in plain.items()
    }
    np.testing.assert_array_equal(got, model.apply({"params": plain}, x))


def test_linen_training_never_touches_the_packed_base():
    model, x, config, _, quantized = _linen()
    frozen = quantized["quant"]
    before = jax.tree.map(np.array, frozen)
    target = jax.random.normal(jax.random.key(5), (2, 3, 8))
    _, _, losses, grads = linen_adam_steps(model, config, quantized, x, target, steps=10)
    assert losses[-1] < losses[0]
    for name in LINEN_TARGETS:  # no gradient exists for a base weight: it is not in params
        assert LINEN_TORCH[name][0] not in grads[name]
    jax.tree.map(np.testing.assert_array_equal, frozen, before)
    assert jax.tree.structure(frozen) == jax.tree.structure(before)


@pytest.mark.parametrize("options", ["nf4", "nf4_double"])
def test_linen_merge_and_requantize(options):
    model, x, config, _, quantized = _linen(**OPTIONS[options])
    with jaxlora.intercept(config):
        unmerged = np.asarray(model.apply(quantized, x))
    merged = jaxlora.merge(quantized, alpha=ALPHA)
    assert "quant" not in merged
    _close(model.apply(merged, x), _linen_reference(quantized, x))
    _close(unmerged, _linen_reference(quantized, x))
    requantized = jaxlora.merge(quantized, alpha=ALPHA, requantize=True)
    for name, (weight, torch_layout) in LINEN_TORCH.items():
        assert sorted(requantized["params"][name]) == sorted(
            n for n in merged["params"][name] if n != weight
        )
        want = quantize(
            jnp.asarray(
                np.ascontiguousarray(torch_layout(np.asarray(merged["params"][name][weight])))
            ),
            **OPTIONS[options],
        )
        for got, expected in zip(
            jax.tree.leaves(requantized["quant"][name][weight]), jax.tree.leaves(want), strict=True
        ):
            np.testing.assert_array_equal(got, expected)
    # No adapter is left: the layers (an einsum module too) run their re-quantized base.
    with jaxlora.intercept(config):
        got = model.apply(requantized, x)
    plain = jaxlora.quant.dequantize_base(requantized)
    np.testing.assert_array_equal(got, model.apply(plain, x))
    # Each weight within one more quantization error of the float merge (NF4: 0.152·absmax
    # of its block, at most the weight's largest magnitude).
    for name, (weight, _) in LINEN_TORCH.items():
        float_merge = np.asarray(merged["params"][name][weight])
        error = np.abs(np.asarray(plain["params"][name][weight]) - float_merge).max()
        assert 0 < error <= 0.153 * np.abs(float_merge).max()


def test_linen_adapter_files_do_not_hold_the_base_and_round_trip(tmp_path):
    # Product adapters (lora_roles) are written as PEFT Linears; Linen's load_adapter does not
    # read them yet (with or without a quantized base), so the round trip is on the Dense and
    # DenseGeneral layers, whose quantized weights stand in by their own shapes.
    *_, config, lora, quantized = _linen()
    jaxlora.save_adapter(quantized, tmp_path / "q", config)
    jaxlora.save_adapter(lora, tmp_path / "p", config)  # the float model: the same file
    files = [safetensors.safe_open(tmp_path / d / "adapter_model.safetensors", "np") for d in "qp"]
    assert sorted(files[0].keys()) == sorted(files[1].keys())
    assert len(files[0].keys()) == 2 * len(LINEN_TARGETS)
    for key in files[0].keys():
        np.testing.assert_array_equal(files[0].get_tensor(key), files[1].get_tensor(key))
    *_, config, _, quantized = _linen(targets=("o_general", "q_general", "out"))
    jaxlora.save_adapter(quantized, tmp_path / "d", config)
    zeroed = {
        k: {n: jnp.zeros_like(v) if n in ("lora_a", "lora_b") else v for n, v in node.items()}
        for k, node in quantized["params"].items()
    }
    loaded = jaxlora.load_adapter({**quantized, "params": zeroed}, tmp_path / "d")
    assert loaded["quant"] is quantized["quant"]
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], quantized["params"])


class LinenExperts(lnn.Module):
    @lnn.compact
    def __call__(self, x):
        return LinenEinsum("EBD,EDF->EBF", (3, D, 6), name="experts")(x)


def test_linen_batch_axes_are_quantized_per_expert_and_unknown_stacks_refused():
    model, x = LinenExperts(), jnp.ones((3, 5, D))
    config = jaxlora.LoRAConfig(r=R, targets=["experts"])
    variables = model.init(jax.random.key(0), x)
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    # Refused before issue 16's MoE support; now one Linear (6, D) per expert.
    q = quantize_base(lora, config)["quant"]["experts"]["w"]
    floats = np.asarray(lora["params"]["experts"]["w"])
    assert q.shape == (6, D) and q.packed.shape[0] == 3
    for e in range(3):
        want = quantize(jnp.asarray(np.ascontiguousarray(floats[e].T)))
        np.testing.assert_array_equal(q.packed[e], want.packed)
    # An nn.scan stack (a leading layer axis on the kernel and its adapter).
    stacked = {
        "params": {
            "layers": {
                "kernel": jnp.ones((3, D, 8)),
                "lora_a": jnp.ones((3, D, R)),
                "lora_b": jnp.zeros((3, R, 8)),
            }
        }
    }
    # is quantized layer by layer since issue 16's scan support (tests/test_qlora_scan.py)
    q = quantize_base(stacked, ["layers"])["quant"]["layers"]
    assert q["stack"].axis == 0 and q["kernel"].absmax.shape[0] == 3
    with pytest.raises(ValueError, match=r"'layers' has a kernel of shape .*nn.scan"):
        quantize_base({"params": {"layers": {"kernel": jnp.ones((3, D, 8))}}}, ["layers"])


def test_linen_a_weight_both_in_params_and_quant_is_refused_at_the_call():
    model, x, config, lora, quantized = _linen()
    both = {**quantized, "params": {**quantized["params"], "q_einsum": lora["params"]["q_einsum"]}}
    with (
        jaxlora.intercept(config),
        pytest.raises(ValueError, match="'q_einsum' has a 'w' both in 'params' and in 'quant'"),
    ):
        model.apply(both, x)
