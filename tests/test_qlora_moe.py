"""QLoRA on MoE expert weights and on modules with several adapted weights (issue #16 with
issue #13's experts): a weight with batch axes in its product (batched experts
'bed,edf->bef', or one static slice ``w[i]`` per expert as tunix's Qwen3 ``MoELayer`` runs on
CPU) is E torch Linears, one per expert (``experts.{e}.proj``), so each expert is quantized
alone as its own Linear (out, in) = (prod free, prod contracted): its blocks never straddle
two experts, its bytes are those a bitsandbytes ``Linear4bit`` holds for that expert. The
experts' arrays are stacked in front of one ``QuantizedWeight`` (one expert's metadata). An
NNX module with several adapted weights (``<weight>_lora_a``) has each weight quantized as
its own Linear.

References: each expert's torch Linear written out by hand in numpy (``LINEARS``); its bytes
against ``jaxlora.quant.quantize`` of that Linear (bit-equal to bitsandbytes: parity_tests/
test_qlora_bnb.py; per expert against bitsandbytes and PEFT on ``Linear4bit`` experts:
parity_tests/test_qlora_moe_parity.py); outputs against closed-form float64 numpy on the
weights dequantized expert by expert with the public ``dequantize`` (an independent path
from the layer's batched dequantization). fp32 tolerance: 2e-5 of the output's scale (sums
of ≤ 40 terms in another association, as tests/test_qlora_oplevel.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
from jaxlora import nnx as jnnx
from jaxlora.oplevel import Roles
from jaxlora.quant import QuantizedWeight, _layout, dequantize, quantize, quantize_base
from tests._train import linen_adam_steps

# 720 elements per expert: 11.25 nf4 blocks of 64, 2.8 int8 blocks of 256, so quantizing the
# experts as one flat array would give blocks straddling two experts (other bytes).
E, D, F, R, ALPHA = 3, 40, 18, 2, 4.0
S = ALPHA / R
TOL = 2e-5
RNG = np.random.default_rng(0)
W = (RNG.normal(size=(E, D, F)) / np.sqrt(D)).astype(np.float32)
X = RNG.normal(size=(2, E, D)).astype(np.float32)  # (batch, expert, D): expert e's rows
OPTIONS = {
    "nf4": {},
    "fp4": {"quant_type": "fp4"},
    "nf4_double": {"double_quant": True},
    "int8": {"quant_type": "int8", "blocksize": 256},
}


class Batched(nnx.Module):
    """The experts as one batched product: w (E, D, F), batch axis 0."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(W))

    def __call__(self, x):
        return jnp.einsum("bed,edf->bef", x, self.w[...])


class Sliced(nnx.Module):
    """tunix's CPU loop: ``x[:, e] @ w[e]`` per expert (slice views)."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(W))

    def __call__(self, x):
        return jnp.stack([x[:, e] @ self.w[e] for e in range(E)], axis=1)


class TorchLayout(nnx.Module):
    """w (E, F, D), each expert held as torch's (out, in): ``x[:, e] @ w[e].T``."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(np.transpose(W, (0, 2, 1))))

    def __call__(self, x):
        return jnp.stack([x[:, e] @ self.w[e].T for e in range(E)], axis=1)


class MiddleAxis(nnx.Module):
    """w (D, E, F) indexed on its middle axis, ``w[:, e]``: batch axis 1."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(np.transpose(W, (1, 0, 2))))

    def __call__(self, x):
        return jnp.stack([x[:, e] @ self.w[:, e] for e in range(E)], axis=1)


class Model(nnx.Module):
    def __init__(self, moe: nnx.Module):
        self.moe = moe

    def __call__(self, *inputs):
        return self.moe(*inputs)


CASES = {"batched": Batched, "sliced": Sliced, "torch_layout": TorchLayout, "middle": MiddleAxis}
# Expert e's torch Linear weight (out, in) = (F, D), written out by hand from the weight.
LINEARS = {
    "batched": lambda w, e: w[e].T,
    "sliced": lambda w, e: w[e].T,
    "torch_layout": lambda w, e: w[e],
    "middle": lambda w, e: w[:, e].T,
}


def _expert(q: QuantizedWeight, e: int) -> QuantizedWeight:
    return jax.tree.map(lambda t: t[e], q)


def _randomize(layer, seed: int = 3) -> None:
    """Nonzero B for every adapted weight (inject starts it at zero)."""
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    for weight in layer.lora_weights:
        lora_b = layer.factors(weight)[1]
        lora_b[...] = 0.5 * jax.random.normal(next(keys), lora_b.shape)


def _injected(moe: nnx.Module, **options) -> tuple[Model, dict[str, np.ndarray]]:
    """(model adapted at its product with B nonzero, then quantized; its float weights)."""
    model = Model(moe)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["moe"])
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(jnp.asarray(X),))
    _randomize(model.moe)
    floats = {w: np.asarray(getattr(model.moe, w)[...]) for w in model.moe.lora_weights}
    jnnx.quantize_base(model, config, **options)
    return model, floats


def _expert_matrices(q: QuantizedWeight) -> list[np.ndarray]:
    """Each expert's (in, out) = (D, F) matrix: its Linear dequantized alone, transposed."""
    return [np.asarray(dequantize(_expert(q, e)), np.float64).T for e in range(E)]


def _factors(layer, weight: str = "w") -> tuple[np.ndarray, np.ndarray]:
    a, b = layer.factors(weight) if len(layer.lora_weights) > 1 else (layer.lora_a, layer.lora_b)
    return np.asarray(a[...], np.float64), np.asarray(b[...], np.float64)


def _closed_form(matrices: list[np.ndarray], a, b, x=X) -> np.ndarray:
    """y[:, e] = x[:, e] @ (M_e + s·a[e] b[e]) in float64."""
    x = np.asarray(x, np.float64)
    return np.stack([x[:, e] @ (m + S * a[e] @ b[e]) for e, m in enumerate(matrices)], axis=1)


def _close(got, want, tol=TOL) -> None:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(np.abs(want).max(), 1.0))


def _assert_experts_are_their_linears(q: QuantizedWeight, linears: list[np.ndarray], options):
    assert isinstance(q, QuantizedWeight) and q.shape == linears[0].shape
    for e, linear in enumerate(linears):
        want = quantize(jnp.asarray(np.ascontiguousarray(linear)), **options)
        got = _expert(q, e)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize(
    ("case", "options"),
    [
        *((c, "nf4") for c in CASES),
        ("sliced", "nf4_double"),
        ("batched", "int8"),
    ],
)
def test_each_expert_is_its_own_linear_and_forward_is_the_closed_form(case, options):
    model, floats = _injected(CASES[case](), **OPTIONS[options])
    var = model.moe.w
    assert isinstance(var, jnnx.QuantizedKernel) and not isinstance(var, nnx.Param)
    assert var.shape == floats["w"].shape and var.layer_axis is None
    q = var.get_value()
    linears = [LINEARS[case](floats["w"], e) for e in range(E)]
    _assert_experts_are_their_linears(q, linears, OPTIONS[options])
    want = _closed_form(_expert_matrices(q), *_factors(model.moe))
    _close(model(jnp.asarray(X)), want)
    _close(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(X)), want)


class Routed(nnx.Module):
    """Experts routed by a traced index (``jnp.take``, a gather): token t uses expert idx[t]."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(W))

    def __call__(self, x, idx):
        return jnp.einsum("td,tdf->tf", x, jnp.take(self.w[...], idx, axis=0))


def test_experts_routed_by_a_traced_index_are_quantized_per_expert_and_gathered():
    # x·(M + s·A B)[idx] with M each expert's own Linear dequantized alone.
    rows, idx = X.reshape(-1, D), jnp.asarray([0, 2, 1, 2, 0, 1])
    model = Model(Routed())
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["moe"])
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(jnp.asarray(rows), idx))
    _randomize(model.moe)
    jnnx.quantize_base(model, config)
    q = model.moe.w.get_value()
    _assert_experts_are_their_linears(q, [W[e].T for e in range(E)], {})
    a, b = _factors(model.moe)
    merged = np.stack(_expert_matrices(q)) + S * np.einsum("edr,erf->edf", a, b)
    want = np.einsum("td,tdf->tf", rows.astype(np.float64), merged[np.asarray(idx)])
    _close(nnx.jit(lambda m, x, i: m(x, i))(model, jnp.asarray(rows), idx), want)


@pytest.mark.parametrize("case", ["batched", "sliced"])
def test_the_base_path_is_the_modules_own_product_on_the_dequantized_experts(case):
    # B = 0: bit for bit the original module on the weight dequantized expert by expert.
    model, _ = _injected(CASES[case]())
    model.moe.lora_b[...] = jnp.zeros_like(model.moe.lora_b[...])
    plain = CASES[case]()
    plain.w[...] = jnp.asarray(np.stack(_expert_matrices(model.moe.w.get_value())), jnp.float32)
    np.testing.assert_array_equal(model(jnp.asarray(X)), plain(jnp.asarray(X)))


def test_a_bfloat16_expert_weight_is_dequantized_per_expert_in_bfloat16():
    moe = Batched()
    moe.w = nnx.Param(jnp.asarray(W, jnp.bfloat16))
    model, _ = _injected(moe)
    model.moe.lora_b[...] = jnp.zeros_like(model.moe.lora_b[...])
    q = model.moe.w.get_value()
    assert q.dtype == jnp.bfloat16 and model.moe.w.dtype == jnp.bfloat16
    weight = jnp.stack([dequantize(_expert(q, e)).T for e in range(E)])  # bfloat16
    x = jnp.asarray(X, jnp.bfloat16)
    y = model(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, jnp.einsum("bed,edf->bef", x, weight))


@pytest.mark.parametrize(("case", "options"), [("sliced", "nf4_double"), ("batched", "int8")])
def test_merge_and_requantize_per_expert(case, options):
    model, _ = _injected(CASES[case](), **OPTIONS[options])
    layer = model.moe
    matrices = _expert_matrices(layer.w.get_value())
    a, b = _factors(layer)
    want = _closed_form(matrices, a, b)
    merged = np.asarray(layer.merged_weight())
    by_expert = [LINEARS[case](merged, e) for e in range(E)]  # (F, D) each, by hand
    for e, m in enumerate(matrices):
        _close(by_expert[e].T, m + S * a[e] @ b[e], 1e-6)
    # The float merge: the original module type with the merged weight.
    plain_model, _ = _injected(CASES[case](), **OPTIONS[options])
    jnnx.merge(plain_model)
    assert type(plain_model.moe) is CASES[case] and type(plain_model.moe.w) is nnx.Param
    np.testing.assert_array_equal(plain_model.moe.w[...], merged)
    _close(plain_model(jnp.asarray(X)), want)
    # Re-quantized: each expert's merged Linear quantized alone, B zero.
    jnnx.merge(model, requantize=True)
    assert isinstance(model.moe, jnnx.OpAdapter)
    _assert_experts_are_their_linears(model.moe.w.get_value(), by_expert, OPTIONS[options])
    np.testing.assert_array_equal(model.moe.lora_b[...], 0)
    requantized = _expert_matrices(model.moe.w.get_value())
    _close(model(jnp.asarray(X)), _closed_form(requantized, a, 0 * b))
    # One more quantization error than the float merge (NF4: 0.152·absmax of a block).
    for e, m in enumerate(requantized):
        assert np.abs(m - by_expert[e].T).max() <= 0.153 * np.abs(merged).max()


class MoE(nnx.Module):
    """tunix's Qwen3 ``MoELayer`` on CPU, routing aside: three expert weights in one module,
    gate_proj/up_proj (E, D, F) and down_proj (E, F, D), each sliced per expert."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        shapes = {"gate_proj": (E, D, F), "up_proj": (E, D, F), "down_proj": (E, F, D)}
        for name, shape in shapes.items():
            value = rng.normal(size=shape) / np.sqrt(shape[1])
            setattr(self, name, nnx.Param(jnp.asarray(value, jnp.float32)))

    def __call__(self, x):
        ys = []
        for e in range(E):
            h = jax.nn.silu(x[:, e] @ self.gate_proj[e]) * (x[:, e] @ self.up_proj[e])
            ys.append(h @ self.down_proj[e])
        return jnp.stack(ys, axis=1)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _moe_reference(layer, x=X) -> np.ndarray:
    """The MoE in float64, each expert's weights dequantized alone plus s·a[e] b[e]."""
    weights = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        a, b = _factors(layer, name)
        matrices = _expert_matrices(getattr(layer, name).get_value())
        weights[name] = [m + S * a[e] @ b[e] for e, m in enumerate(matrices)]
    x = np.asarray(x, np.float64)
    ys = []
    for e in range(E):
        h = _silu(x[:, e] @ weights["gate_proj"][e]) * (x[:, e] @ weights["up_proj"][e])
        ys.append(h @ weights["down_proj"][e])
    return np.stack(ys, axis=1)


@pytest.mark.parametrize("options", ["nf4", "nf4_double"])
def test_a_moe_with_three_expert_weights_quantizes_each_as_its_experts_linears(options):
    model, floats = _injected(MoE(), **OPTIONS[options])
    layer = model.moe
    assert layer.lora_weights == ("down_proj", "gate_proj", "up_proj")
    for name, w in floats.items():  # torch's experts.{e}.<name>.weight = w[e].T
        _assert_experts_are_their_linears(
            getattr(layer, name).get_value(), [w[e].T for e in range(E)], OPTIONS[options]
        )
    _close(model(jnp.asarray(X)), _moe_reference(layer))
    _close(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(X)), _moe_reference(layer))


def test_training_a_quantized_moe_never_touches_the_packed_experts():
    model, _ = _injected(MoE(), double_quant=True)
    packed = {w: getattr(model.moe, w).get_value() for w in model.moe.lora_weights}
    before = jax.tree.map(np.array, packed)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    state_vars = jax.tree.leaves(
        nnx.state(optimizer), is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
    assert not any(isinstance(v, jnnx.QuantizedKernel) for v in state_vars)
    target = jnp.asarray(np.random.default_rng(5).normal(size=(2, E, D)), jnp.float32)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(jnp.asarray(X)) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss, grads

    losses = []
    for _ in range(5):
        loss, grads = step(model, optimizer)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert sorted(grads["moe"]) == sorted(
        f"{w}_lora_{f}" for w in ("down_proj", "gate_proj", "up_proj") for f in "ab"
    )
    after = {w: getattr(model.moe, w).get_value() for w in model.moe.lora_weights}
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert np.asarray(new).dtype == old.dtype
        np.testing.assert_array_equal(np.asarray(new), old)
    _close(model(jnp.asarray(X)), _moe_reference(model.moe))  # the trained factors


def test_a_moe_merge_requantizes_every_expert_weight():
    model, _ = _injected(MoE())
    layer = model.moe
    merged = {w: np.asarray(layer.merged_weight(w)) for w in layer.lora_weights}
    want = _moe_reference(layer)
    jnnx.merge(model, requantize=True)
    for name, m in merged.items():
        _assert_experts_are_their_linears(
            getattr(model.moe, name).get_value(), [m[e].T for e in range(E)], {}
        )
        np.testing.assert_array_equal(model.moe.factors(name)[1][...], 0)
    _close(model(jnp.asarray(X)), _moe_reference(model.moe))
    assert np.abs(np.asarray(model(jnp.asarray(X))) - want).max() > 0  # it did re-round


class GatedMLP(nnx.Module):
    """Several weights without experts: w_gate, w_up (D, F), w_down (F, D)."""

    def __init__(self):
        rng = np.random.default_rng(1)
        for name, shape in {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}.items():
            value = rng.normal(size=shape) / np.sqrt(shape[0])
            setattr(self, name, nnx.Param(jnp.asarray(value, jnp.float32)))

    def __call__(self, x):
        g = jnp.einsum("btd,df->btf", x, self.w_gate[...])
        u = jnp.einsum("btd,df->btf", x, self.w_up[...])
        return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, self.w_down[...])


def test_a_module_with_several_weights_quantizes_each_as_its_own_linear():
    # Refused by name before ("quantizing the base of such a module is not implemented").
    model, floats = _injected(GatedMLP(), quant_type="fp4")
    layer = model.moe
    deq = {}
    for name, w in floats.items():
        q = getattr(layer, name).get_value()
        want = quantize(jnp.asarray(np.ascontiguousarray(w.T)), quant_type="fp4")
        for g, x in zip(jax.tree.leaves(q), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(x))
        a, b = _factors(layer, name)
        deq[name] = np.asarray(dequantize(q), np.float64).T + S * a @ b
    x = np.asarray(X, np.float64)
    h = _silu(x @ deq["w_gate"]) * (x @ deq["w_up"])
    _close(model(jnp.asarray(X)), h @ deq["w_down"])
    merged = {w: np.asarray(layer.merged_weight(w)) for w in layer.lora_weights}
    jnnx.merge(model, requantize=True)
    for name, m in merged.items():
        want = quantize(jnp.asarray(np.ascontiguousarray(m.T)), quant_type="fp4")
        np.testing.assert_array_equal(getattr(model.moe, name).get_value().packed, want.packed)
        np.testing.assert_array_equal(model.moe.factors(name)[1][...], 0)


EXPERTS = jaxlora.HFLinear("moe", experts="moe.experts.{}.proj")


@pytest.mark.parametrize("case", ["sliced", "batched"])
def test_adapter_files_per_expert_do_not_hold_the_base_and_round_trip(tmp_path, case):
    model, _ = _injected(CASES[case]())
    jnnx.save_adapter(model, tmp_path / "q", path_map={"moe": EXPERTS})
    twin = Model(CASES[case]())  # the same adapter on the float weight
    jnnx.inject(
        twin, jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["moe"]), nnx.Rngs(1), inputs=(X,)
    )
    twin.moe.lora_a[...], twin.moe.lora_b[...] = model.moe.lora_a[...], model.moe.lora_b[...]
    jnnx.save_adapter(twin, tmp_path / "p", path_map={"moe": EXPERTS})
    files = [safetensors.safe_open(tmp_path / d / "adapter_model.safetensors", "np") for d in "qp"]
    assert files[0].metadata() == files[1].metadata()
    keys = sorted(files[0].keys())
    assert keys == sorted(files[1].keys()) and len(keys) == 2 * E
    assert keys[0] == "base_model.model.moe.experts.0.proj.lora_A.weight"
    for key in keys:
        np.testing.assert_array_equal(files[0].get_tensor(key), files[1].get_tensor(key))
    other, _ = _injected(CASES[case]())
    other.moe.lora_b[...] = jnp.zeros_like(other.moe.lora_b[...])
    packed = jax.tree.map(np.array, other.moe.w.get_value())
    jnnx.load_adapter(other, tmp_path / "q", path_map={"moe": EXPERTS})
    np.testing.assert_array_equal(other.moe.lora_b[...], model.moe.lora_b[...])
    jax.tree.map(np.testing.assert_array_equal, other.moe.w.get_value(), packed)
    np.testing.assert_array_equal(other(jnp.asarray(X)), model(jnp.asarray(X)))


# ---- Linen: a product adapter (lora_roles) with batch axes, the same stored layout ----


class LinenExperts(nn.Module):
    sliced: bool

    @nn.compact
    def __call__(self, x):
        w = self.param("w", lambda key: jnp.asarray(W))
        if self.sliced:
            return jnp.stack([x[:, e] @ w[e] for e in range(E)], axis=1)
        return jnp.einsum("bed,edf->bef", x, w)


class LinenModel(nn.Module):
    sliced: bool

    @nn.compact
    def __call__(self, x):
        return LinenExperts(self.sliced, name="moe")(x)


def _linen(sliced: bool, **options):
    model, x = LinenModel(sliced), jnp.asarray(X)
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["moe"])
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    node = dict(lora["params"]["moe"])
    node["lora_b"] = 0.5 * jax.random.normal(jax.random.key(3), node["lora_b"].shape)
    lora = {"params": {"moe": node}}
    return model, config, lora, quantize_base(lora, config, **options)


def _linen_reference(quantized) -> np.ndarray:
    node = quantized["params"]["moe"]
    a, b = (np.asarray(node[n], np.float64) for n in ("lora_a", "lora_b"))
    return _closed_form(_expert_matrices(quantized["quant"]["moe"]["w"]), a, b)


@pytest.mark.parametrize(("sliced", "options"), [(False, "nf4"), (True, "nf4_double")])
def test_linen_experts_quantized_per_expert_forward_merge_requantize(sliced, options):
    model, config, _, quantized = _linen(sliced, **OPTIONS[options])
    assert "w" not in quantized["params"]["moe"]  # out of params: not a parameter
    q = quantized["quant"]["moe"]["w"]
    _assert_experts_are_their_linears(q, [W[e].T for e in range(E)], OPTIONS[options])
    want = _linen_reference(quantized)

    @jax.jit
    def apply(variables):
        with jaxlora.intercept(config):
            return model.apply(variables, jnp.asarray(X))

    _close(apply(quantized), want)
    merged = jaxlora.merge(quantized, alpha=ALPHA)
    assert "quant" not in merged
    _close(model.apply(merged, jnp.asarray(X)), want)
    requantized = jaxlora.merge(quantized, alpha=ALPHA, requantize=True)
    float_merge = np.asarray(merged["params"]["moe"]["w"])
    _assert_experts_are_their_linears(
        requantized["quant"]["moe"]["w"], [float_merge[e].T for e in range(E)], OPTIONS[options]
    )
    with jaxlora.intercept(config):
        got = model.apply(requantized, jnp.asarray(X))
    plain = jaxlora.quant.dequantize_base(requantized)
    np.testing.assert_array_equal(got, model.apply(plain, jnp.asarray(X)))


def test_linen_training_never_touches_the_packed_experts_and_files_round_trip(tmp_path):
    model, config, _, quantized = _linen(True)
    frozen = quantized["quant"]
    before = jax.tree.map(np.array, frozen)
    target = jnp.asarray(np.random.default_rng(5).normal(size=(2, E, F)), jnp.float32)
    params, _, losses, grads = linen_adam_steps(
        model, config, quantized, jnp.asarray(X), target, steps=5
    )
    assert losses[-1] < losses[0] and "w" not in grads["moe"]
    jax.tree.map(np.testing.assert_array_equal, frozen, before)
    trained = {**quantized, "params": params}
    jaxlora.save_adapter(trained, tmp_path, config, path_map={"moe": EXPERTS})
    *_, fresh = _linen(True)
    loaded = jaxlora.load_adapter(fresh, tmp_path, path_map={"moe": EXPERTS})
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], params)
    assert loaded["quant"] is fresh["quant"]


# ---- the one layout function, on any batch-axis placement, and what stays refused ----


# Two batch axes (2, 3), two contracted (5, 3), one free (10): every permutation of them gives
# six experts whose Linears are (10, 15), so the examples share their compiled quantizers.
AXES = (2, 3, 5, 3, 10)


@settings(max_examples=10, deadline=None)
@given(order=st.permutations(range(5)), quant_type=st.sampled_from(["nf4", "fp4", "int8"]))
def test_layout_quantizes_each_expert_as_its_linear_wherever_the_batch_axes_are(order, quant_type):
    shape = tuple(AXES[i] for i in order)
    at = {axis: position for position, axis in enumerate(order)}
    batch = tuple(sorted(at[i] for i in (0, 1)))
    contracted = tuple(sorted(at[i] for i in (2, 3)))
    roles = Roles(shape, batch, contracted, (at[4],))
    seed = sum(p * 10**k for k, p in enumerate(order))
    weight = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    options = {"quant_type": quant_type, "blocksize": 64}
    q = _layout.quantize_weight(jnp.asarray(weight), roles, **options)
    back = np.asarray(_layout.dequantize_weight(q, roles))
    # By hand: the expert index runs over the batch axes' indices in C order (the weight's
    # own axis order); its Linear is its slice (free, then contracted axes in their order).
    grid = list(np.ndindex(*(shape[a] for a in batch)))
    assert len(grid) == 6 and q.shape == (10, 15) and np.asarray(q.absmax).shape[0] == 6
    for e, index in enumerate(grid):
        pick: list = [slice(None)] * len(shape)
        for a, i in zip(batch, index, strict=True):
            pick[a] = i
        expert = weight[tuple(pick)]  # the other axes, in the weight's order
        rest = [a for a in range(len(shape)) if a not in batch]
        free = rest.index(at[4])
        linear = np.moveaxis(expert, free, 0).reshape(10, 15)
        want = quantize(jnp.asarray(linear), **options)
        np.testing.assert_array_equal(_expert(q, e).packed, want.packed)
        np.testing.assert_array_equal(_expert(q, e).absmax, want.absmax)
        kept = [n for k, n in enumerate(expert.shape) if k != free]  # the contracted axes
        deq = np.asarray(dequantize(want)).reshape(expert.shape[free], *kept)
        expected = np.moveaxis(deq, 0, free)
        np.testing.assert_array_equal(back[tuple(pick)], expected)


def test_a_quantized_expert_weight_with_the_wrong_expert_count_is_refused_at_the_call():
    model, config, _, quantized = _linen(False)
    q = quantized["quant"]["moe"]["w"]
    two = jax.tree.map(lambda t: t[:2], q)  # 2 experts' arrays for a 3-expert weight
    bad = {**quantized, "quant": {"moe": {**quantized["quant"]["moe"], "w": two}}}
    with (
        jaxlora.intercept(config),
        pytest.raises(ValueError, match=r"layer 'moe'.*batch axes \(0,\).*3 stacked.*hold 2"),
    ):
        model.apply(bad, jnp.asarray(X))
    nnx_model, _ = _injected(Batched())
    one = _expert(nnx_model.moe.w.get_value(), 0)  # one expert's arrays
    nnx_model.moe.w = jnnx.QuantizedKernel(one, roles=nnx_model.moe.lora_roles)
    with pytest.raises(ValueError, match=r"batch axes \(0,\).*hold 1"):
        nnx_model(jnp.asarray(X))
