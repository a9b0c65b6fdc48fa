"""MoE experts held as one weight W (E, D, F) in scanned stacks and with traced expert indices
(issue #13). The one product rule: expert and layer axes both lead the factors, ``lora_a``
(L, E, D, r) and ``lora_b`` (L, E, r, F).

- Slice views (a per-expert loop ``W[i]``) inside ``nnx.vmap`` + ``nnx.scan`` and ``nn.scan``
  stacks: against the unrolled twin holding the same weights (1e-6 of the output's scale),
  against a float64 numpy closed form, merged per layer and expert, and PEFT files with one
  torch module per layer per expert (``HFLinear(experts=...)``), bit-identical to the twin's
  and read back exactly.
- Traced indices (routing by a gather: ``jnp.take(W, idx, axis=0)``, ``W[idx]``, ``W[i]`` with
  ``i`` traced): the factors are gathered with the same indices, the branch is
  ``x·A[idx]·B[idx]``; against the closed form, against the static-index (slice view) module
  with the same factors, gradients, merge, files; inside a scanned stack too. What does not fit
  the rule is refused naming the layer, the weight and the reason, changing nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import jaxlora
from jaxlora import LoRAConfig
from jaxlora import nnx as jnnx
from tests._nnx_stacks import ScannedLayers, UnrolledLayers

jax.config.update("jax_default_matmul_precision", "highest")

L, E, D, R, ALPHA = 2, 3, 4, 2, 3.0
S = ALPHA / R
RNG = np.random.default_rng(0)
WS = (RNG.normal(size=(L, E, D, D)) * 0.4).astype(np.float32)  # one (E, D, D) per layer
X = RNG.normal(size=(2, E, D)).astype(np.float32)  # (batch, expert, D): expert i's rows
CONFIG = LoRAConfig(r=R, alpha=ALPHA, targets=["moe"])


def _rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _merged(w, a, b):
    """W + s·a b per expert, float64 (one layer's or a stack's: the expert axis is -3)."""
    return np.asarray(w, np.float64) + S * np.einsum("...edr,...erf->...edf", a, b)


def _stack_forward(x, ws, as_, bs):
    """The stacked residual MoE layers in float64: x[:, e] += x[:, e] @ (W + s·a b)[l, e]."""
    h = np.asarray(x, np.float64)
    for layer in range(L):
        h = h + np.einsum("bed,edf->bef", h, _merged(ws[layer], as_[layer], bs[layer]))
    return h


def _random_factors(seed: int):
    rng = np.random.default_rng(seed)
    a = (rng.normal(size=(L, E, D, R)) * 0.5).astype(np.float32)
    return a, (rng.normal(size=(L, E, R, D)) * 0.5).astype(np.float32)


def _paths(template: str) -> dict:
    """The path_map: layer i's JAX module → torch expert e's ``…experts.{e}.proj``."""
    return {
        template.format(i=i): jaxlora.HFLinear(
            "unused", experts=f"model.layers.{i}.experts.{{}}.proj"
        )
        for i in range(L)
    }


def _files(directory) -> dict:
    return load_file(str(directory / "adapter_model.safetensors"))


def _assert_files_per_layer_per_expert(tensors, a, b):
    assert len(tensors) == 2 * L * E
    for i in range(L):
        for e in range(E):
            key = f"base_model.model.model.layers.{i}.experts.{e}"
            np.testing.assert_array_equal(tensors[f"{key}.proj.lora_A.weight"], a[i, e].T)
            np.testing.assert_array_equal(tensors[f"{key}.proj.lora_B.weight"], b[i, e].T)


# ------------------------------------------------------------ slice views in an NNX stack


class NnxExperts(nnx.Module):
    """tunix Qwen3 ``MoELayer``'s CPU path: ``w[i]`` (static i) then a product per expert."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (E, D, D)))

    def __call__(self, x):
        return x + jnp.stack([x[:, i] @ self.w[i] for i in range(E)], axis=1)


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.moe = NnxExperts(rngs)

    def __call__(self, x):
        return self.moe(x)


class NnxScanned(ScannedLayers):
    block, length = NnxBlock, L


class NnxUnrolled(UnrolledLayers):
    block, length = NnxBlock, L


def _nnx_fill(model, a, b):
    """Puts WS and the factors (L, …) into a scanned model, or layer by layer into its twin."""
    if isinstance(model, NnxScanned):
        moe = model.layers.moe
        moe.w[...], moe.lora_a[...], moe.lora_b[...] = map(jnp.asarray, (WS, a, b))
        return
    for i, block in enumerate(model.layers):
        block.moe.w[...], block.moe.lora_a[...] = jnp.asarray(WS[i]), jnp.asarray(a[i])
        block.moe.lora_b[...] = jnp.asarray(b[i])


def _nnx_twins():
    a, b = _random_factors(1)
    twins = []
    for make in (NnxScanned, NnxUnrolled):
        model = make(nnx.Rngs(0))
        jnnx.inject(model, CONFIG, nnx.Rngs(2), inputs=(jnp.asarray(X),))
        _nnx_fill(model, a, b)
        twins.append(model)
    return (*twins, a, b)


def test_nnx_slice_views_in_a_scanned_stack_match_the_unrolled_twin_and_closed_form():
    """Used to be refused: 'slice views (W[i] per product) inside a scanned stack of layers
    are not supported yet'."""
    scanned, unrolled, a, b = _nnx_twins()
    moe = scanned.layers.moe
    assert moe.lora_roles.matches(jaxlora.oplevel.Roles((E, D, D), (0,), (1,), (2,)))
    assert (moe.lora_a.shape, moe.lora_b.shape) == ((L, E, D, R), (L, E, R, D))
    want = _stack_forward(X, WS, a, b)
    got = scanned(jnp.asarray(X))
    assert _rel_err(got, want) < 1e-6
    assert _rel_err(got, unrolled(jnp.asarray(X))) < 1e-6
    assert _rel_err(_stack_forward(X, WS, 0 * a, b), want) > 1e-2  # the adapters matter

    diff = nnx.DiffState(0, nnx.LoRAParam)
    loss = lambda m: jnp.sum(m(jnp.asarray(X)) ** 2)  # noqa: E731
    grad_s = nnx.grad(loss, argnums=diff)(scanned)["layers"]["moe"]
    grad_u = nnx.grad(loss, argnums=diff)(unrolled)["layers"]
    for name in ("lora_a", "lora_b"):
        stacked = np.stack([np.asarray(grad_u[i]["moe"][name][...]) for i in range(L)])
        assert _rel_err(grad_s[name][...], stacked) < 1e-6

    jnnx.merge(scanned)
    assert type(scanned.layers.moe) is NnxExperts
    merged = np.asarray(scanned.layers.moe.w[...])
    assert _rel_err(merged, _merged(WS, a, b)) < 1e-6  # per layer and expert
    assert _rel_err(scanned(jnp.asarray(X)), want) < 1e-6


def test_nnx_stack_files_have_each_layer_and_expert_and_read_back_exactly(tmp_path):
    scanned, unrolled, a, b = _nnx_twins()
    path_map = _paths("layers.{i}.moe")
    jnnx.save_adapter(scanned, tmp_path / "scanned", path_map=path_map)
    jnnx.save_adapter(unrolled, tmp_path / "unrolled", path_map=path_map)
    tensors = _files(tmp_path / "scanned")
    _assert_files_per_layer_per_expert(tensors, a, b)
    twin = _files(tmp_path / "unrolled")
    assert sorted(twin) == sorted(tensors)
    for key, value in twin.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)

    fresh = NnxScanned(nnx.Rngs(0))
    jnnx.inject(fresh, CONFIG, nnx.Rngs(7), inputs=(jnp.asarray(X),))
    jnnx.load_adapter(fresh, tmp_path / "unrolled", path_map=path_map)
    np.testing.assert_array_equal(fresh.layers.moe.lora_a[...], a)
    np.testing.assert_array_equal(fresh.layers.moe.lora_b[...], b)


# ----------------------------------------------------------- slice views in a Linen nn.scan


class LinenExperts(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), (E, D, D))
        return x + jnp.stack([x[:, i] @ w[i] for i in range(E)], axis=1)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return LinenExperts(name="moe")(x), None


class LinenScanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L
        )
        return stack(name="layers")(x, None)[0]


class LinenUnrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = LinenBlock(name=f"layers_{i}")(x)
        return x


NAMES = {"layers": "layers_{i}"}


def _linen_twins():
    a, b = _random_factors(3)
    x = jnp.asarray(X)
    out = []
    for model in (LinenScanned(), LinenUnrolled()):
        base = model.init(jax.random.key(0), x)["params"]
        params = jaxlora.inject(base, CONFIG, jax.random.key(1), layouts=jaxlora.layouts(model, x))
        if isinstance(model, LinenScanned):
            params["layers"]["moe"].update(w=jnp.asarray(WS), lora_a=a, lora_b=b)
        else:
            for i in range(L):
                params[f"layers_{i}"]["moe"].update(w=jnp.asarray(WS[i]), lora_a=a[i], lora_b=b[i])
        out += [model, params]
    return (*out, a, b)


def test_linen_slice_views_in_nn_scan_match_the_unrolled_twin_merge_and_files(tmp_path):
    scanned_model, scanned, unrolled_model, unrolled, a, b = _linen_twins()
    node = scanned["layers"]["moe"]
    assert (node["lora_a"].shape, node["lora_b"].shape) == ((L, E, D, R), (L, E, R, D))
    want = _stack_forward(X, WS, a, b)
    x = jnp.asarray(X)
    with jaxlora.intercept(CONFIG):
        got = scanned_model.apply({"params": scanned}, x)
        twin = unrolled_model.apply({"params": unrolled}, x)
    assert _rel_err(got, want) < 1e-6 and _rel_err(got, twin) < 1e-6

    merged = jaxlora.merge(scanned, alpha=ALPHA)
    assert _rel_err(merged["layers"]["moe"]["w"], _merged(WS, a, b)) < 1e-6
    assert _rel_err(scanned_model.apply({"params": merged}, x), want) < 1e-6

    path_map = _paths("layers_{i}.moe")
    jaxlora.save_adapter(scanned, tmp_path / "s", CONFIG, path_map=path_map, layer_names=NAMES)
    jaxlora.save_adapter(unrolled, tmp_path / "u", CONFIG, path_map=path_map)
    tensors = _files(tmp_path / "s")
    _assert_files_per_layer_per_expert(tensors, a, b)
    assert sorted(tensors) == sorted(_files(tmp_path / "u"))
    fresh = jaxlora.inject(
        scanned_model.init(jax.random.key(0), x)["params"],
        CONFIG,
        jax.random.key(9),
        layouts=jaxlora.layouts(scanned_model, x),
    )
    loaded = jaxlora.load_adapter(fresh, tmp_path / "u", path_map=path_map, layer_names=NAMES)
    np.testing.assert_array_equal(loaded["layers"]["moe"]["lora_a"], a)
    np.testing.assert_array_equal(loaded["layers"]["moe"]["lora_b"], b)


# ------------------------------------------------------------------------ traced indices

T = 6
W = WS[0]
ROWS = RNG.normal(size=(T, D)).astype(np.float32)  # tokens
IDX = np.array([2, 0, 1, 1, 2, 0], np.int32)  # each token's expert (traced)

GATHERS: dict[str, Callable] = {
    "take": lambda w, x, idx: jnp.einsum("td,tdf->tf", x, jnp.take(w, idx, axis=0)),
    "getitem": lambda w, x, idx: jnp.einsum("td,tdf->tf", x, w[idx]),
    "take_through_transposes": lambda w, x, idx: jnp.einsum(
        "td,tfd->tf", x, jnp.take(jnp.swapaxes(w, 0, 2), idx, axis=2).transpose(2, 0, 1)
    ),
    "take_rows_batched": lambda w, x, idx: jnp.einsum(
        "btd,btdf->btf", x.reshape(2, 3, D), w[idx.reshape(2, 3)]
    ).reshape(T, D),
}
SCALARS: dict[str, Callable] = {  # one traced expert for all tokens
    "getitem_scalar": lambda w, x, i: x @ w[i],
    "take_scalar": lambda w, x, i: x @ jnp.take(w, i, axis=0),
    "dynamic_index_in_dim": lambda w, x, i: x @ jax.lax.dynamic_index_in_dim(w, i, 0, False),
}


class Routed(nnx.Module):
    """``w`` (E, D, D) gathered per token by a traced index: ``use(w, x, idx)``."""

    def __init__(self, use: Callable, w=W):
        self.w = nnx.Param(jnp.asarray(w))
        self.use = use

    def __call__(self, x, idx):
        return self.use(self.w[...], x, idx)


class Model(nnx.Module):
    def __init__(self, moe: nnx.Module):
        self.moe = moe

    def __call__(self, *args):
        return self.moe(*args)


def _routed(use, idx=IDX, seed=1) -> Model:
    model = Model(Routed(use))
    inputs = (jnp.asarray(ROWS), jnp.asarray(idx))
    return jnnx.inject(model, CONFIG, nnx.Rngs(seed), inputs=inputs)


def _set_factors(layer, seed=4):
    a, b = (f[0] for f in _random_factors(seed))
    layer.lora_a[...], layer.lora_b[...] = jnp.asarray(a), jnp.asarray(b)
    return a.astype(np.float64), b.astype(np.float64)


@pytest.mark.parametrize("form", list(GATHERS))
def test_a_gathered_weight_gets_the_gathered_factors(form):
    """Used to be refused: 'used only by a gather (an index that is traced, ...)'."""
    model = _routed(GATHERS[form])
    layer = model.moe
    assert layer.lora_roles.matches(jaxlora.oplevel.Roles((E, D, D), (0,), (1,), (2,)))
    assert (layer.lora_a.shape, layer.lora_b.shape) == ((E, D, R), (E, R, D))
    idx = jnp.asarray(IDX)
    np.testing.assert_array_equal(model(ROWS, idx), Routed(GATHERS[form])(ROWS, idx))
    a, b = _set_factors(layer)
    want = np.einsum("td,tdf->tf", ROWS.astype(np.float64), _merged(W, a, b)[IDX])
    assert _rel_err(jax.jit(lambda m, x, i: m(x, i))(model, ROWS, idx), want) < 1e-6


@pytest.fixture(scope="module")
def routed():
    """A routed module (``w[idx]``) with random factors, traced once for all routings."""
    model = _routed(GATHERS["getitem"], seed=3)
    return model, _set_factors(model.moe, seed=11)


@settings(max_examples=8, deadline=None)
@given(routing=st.lists(st.integers(-E, E - 1), min_size=T, max_size=T))
def test_any_routing_gathers_each_tokens_expert(routed, routing):
    """Every routing (negative indices count from the end, as jnp normalizes them) on one
    trace: token t meets W[idx_t] + s·a[idx_t] b[idx_t]."""
    model, (a, b) = routed
    idx = np.asarray(routing, np.int32)
    want = np.einsum("td,tdf->tf", ROWS.astype(np.float64), _merged(W, a, b)[idx % E])
    assert _rel_err(model(ROWS, jnp.asarray(idx)), want) < 1e-6


@pytest.mark.parametrize("form", list(SCALARS))
def test_a_traced_scalar_index_picks_one_experts_factors(form):
    model = _routed(SCALARS[form], idx=np.int32(0))
    assert model.moe.lora_a.shape == (E, D, R)
    a, b = _set_factors(model.moe)
    for i in range(E):  # one trace, every index (and a negative one, normalized by jnp)
        want = ROWS.astype(np.float64) @ _merged(W, a, b)[i]
        assert _rel_err(model(ROWS, jnp.int32(i)), want) < 1e-6
        assert _rel_err(model(ROWS, jnp.int32(i - E)), want) < 1e-6


def test_gathered_equals_the_static_index_module_grads_and_merge():
    """The per-expert loop ``x[:, i] @ w[i]`` (slice views) and the routed gather of the same
    rows: same roles, same numbers, same gradients, same merge."""
    static = Model(NnxExperts(nnx.Rngs(0)))
    static.moe.w[...] = jnp.asarray(W)
    jnnx.inject(static, CONFIG, nnx.Rngs(1), inputs=(jnp.asarray(X),))
    rows, idx = X.reshape(2 * E, D), jnp.asarray(np.tile(np.arange(E, dtype=np.int32), 2))
    routed = _routed(GATHERS["take"], idx=idx)
    assert static.moe.lora_roles.matches(routed.moe.lora_roles)
    a, b = _set_factors(routed.moe)
    _set_factors(static.moe)
    want = np.asarray(static(jnp.asarray(X))) - X  # NnxExperts adds its input
    assert _rel_err(routed(rows, idx), want.reshape(2 * E, D)) < 1e-6

    g = np.random.default_rng(5).normal(size=(2, E, D)).astype(np.float32)
    diff = nnx.DiffState(0, nnx.LoRAParam)
    grad_s = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(X)) * g), argnums=diff)(static)
    grad_r = nnx.grad(lambda m: jnp.sum(m(rows, idx) * g.reshape(2 * E, D)), argnums=diff)(routed)
    # closed form: d/dW[e] sum(y·g) = G[e] = sum over e's tokens of xᵀ g
    big_g = np.einsum("bed,bef->edf", X.astype(np.float64), g)
    ga, gb = S * np.einsum("edf,erf->edr", big_g, b), S * np.einsum("edr,edf->erf", a, big_g)
    for name, want_g in (("lora_a", ga), ("lora_b", gb)):
        assert _rel_err(grad_r["moe"][name][...], want_g) < 1e-6
        assert _rel_err(grad_s["moe"][name][...], want_g) < 1e-6

    np.testing.assert_array_equal(routed.moe.delta(), static.moe.delta())
    y = np.asarray(routed(rows, idx))
    jnnx.merge(routed)
    assert type(routed.moe) is Routed
    assert _rel_err(routed.moe.w[...], _merged(W, a, b)) < 1e-6
    assert _rel_err(routed(rows, idx), y) < 1e-6


def test_a_traced_index_per_expert_loop_is_one_adapter():
    """``w[jnp.int32(i)]`` / ``jnp.take(w, i)`` per expert (a gather each): several products,
    each through its own traced index, one adapter (used to be refused as a gather or
    dynamic_slice)."""
    loops = {
        "dynamic_slice": lambda w, x, _: jnp.stack(
            [x[:, i] @ w[jnp.int32(i)] for i in range(E)], axis=1
        ),
        "take": lambda w, x, _: jnp.stack(
            [x[:, i] @ jnp.take(w, i, axis=0) for i in range(E)], axis=1
        ),
    }
    for use in loops.values():
        model = Model(Routed(use))
        jnnx.inject(model, CONFIG, nnx.Rngs(1), inputs=(jnp.asarray(X), None))
        a, b = _set_factors(model.moe)
        want = np.einsum("bed,edf->bef", X.astype(np.float64), _merged(W, a, b))
        assert _rel_err(model(jnp.asarray(X), None), want) < 1e-6


def test_gathered_files_are_per_expert_and_read_back_exactly(tmp_path):
    model = _routed(GATHERS["getitem"])
    a, b = _set_factors(model.moe)
    path_map = {"moe": jaxlora.HFLinear("unused", experts="moe.experts.{}.proj")}
    jnnx.save_adapter(model, tmp_path, path_map=path_map)
    tensors = _files(tmp_path)
    assert len(tensors) == 2 * E
    for e in range(E):
        key = f"base_model.model.moe.experts.{e}.proj"
        np.testing.assert_array_equal(tensors[f"{key}.lora_A.weight"], a[e].T.astype(np.float32))
        np.testing.assert_array_equal(tensors[f"{key}.lora_B.weight"], b[e].T.astype(np.float32))
    other = _routed(GATHERS["getitem"], seed=9)
    jnnx.load_adapter(other, tmp_path, path_map=path_map)
    np.testing.assert_array_equal(other.moe.lora_a[...], a.astype(np.float32))
    np.testing.assert_array_equal(other.moe.lora_b[...], b.astype(np.float32))


class LinenRouted(nn.Module):
    @nn.compact
    def __call__(self, x, idx):
        w = self.param("w", lambda key: jnp.asarray(W))
        return jnp.einsum("td,tdf->tf", x, jnp.take(w, idx, axis=0))


class LinenRoutedModel(nn.Module):
    @nn.compact
    def __call__(self, x, idx):
        return LinenRouted(name="moe")(x, idx)


def test_linen_gathered_weight_matches_the_closed_form_and_merge():
    model, args = LinenRoutedModel(), (jnp.asarray(ROWS), jnp.asarray(IDX))
    variables = model.init(jax.random.key(0), *args)
    layouts = jaxlora.layouts(model, *args)
    params = jaxlora.inject(variables, CONFIG, jax.random.key(1), layouts=layouts)["params"]
    a, b = (f[0].astype(np.float64) for f in _random_factors(6))
    params["moe"].update(lora_a=jnp.asarray(a, jnp.float32), lora_b=jnp.asarray(b, jnp.float32))
    want = np.einsum("td,tdf->tf", ROWS.astype(np.float64), _merged(W, a, b)[IDX])
    with jaxlora.intercept(CONFIG):
        got = jax.jit(lambda p, x, i: model.apply({"params": p}, x, i))(params, *args)
    assert _rel_err(got, want) < 1e-6
    merged = jaxlora.merge({"params": params}, alpha=ALPHA)
    assert _rel_err(model.apply(merged, *args), want) < 1e-6


class NnxRoutedBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.moe = Routed(GATHERS["take"], w=jax.random.normal(rngs.params(), (E, D, D)))

    def __call__(self, x, idx):
        return x + self.moe(x, idx)


class NnxRoutedScanned(ScannedLayers):
    block, length = NnxRoutedBlock, L

    def __call__(self, x, idx):
        @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
        def body(x, block, idx):
            return block(x, idx)

        return body(x, self.layers, idx)


def test_a_gathered_weight_in_a_scanned_stack_matches_the_closed_form_and_merges():
    model = NnxRoutedScanned(nnx.Rngs(0))
    args = (jnp.asarray(ROWS), jnp.asarray(IDX))
    jnnx.inject(model, CONFIG, nnx.Rngs(1), inputs=args)
    moe = model.layers.moe
    assert (moe.lora_a.shape, moe.lora_b.shape) == ((L, E, D, R), (L, E, R, D))
    a, b = _random_factors(8)
    moe.w[...], moe.lora_a[...], moe.lora_b[...] = map(jnp.asarray, (WS, a, b))
    h = ROWS.astype(np.float64)
    for layer in range(L):
        h = h + np.einsum("td,tdf->tf", h, _merged(WS[layer], a[layer], b[layer])[IDX])
    assert _rel_err(model(*args), h) < 1e-6
    jnnx.merge(model)
    assert _rel_err(model.layers.moe.w[...], _merged(WS, a, b)) < 1e-6
    assert _rel_err(model(*args), h) < 1e-6


REFUSED = {
    "gathered_axis_free": (
        lambda w, x, idx: jnp.einsum("sd,tdf->stf", x, w[idx]).sum(0),
        r"axes its traced index \(gather\) adds are contracted or free",
    ),
    "partial_dynamic_slice": (
        lambda w, x, idx: jnp.einsum(
            "td,edf->tf", x, jax.lax.dynamic_slice(w, (idx[0], 0, 0), (2, D, D))
        ),
        r"dynamic_slice \(taking 2 entries of its axis 0",
    ),
    "static_slice_after_gather": (
        lambda w, x, idx: x @ w[idx][0],
        r"a static slice of the weight gathered by a traced index",
    ),
    "gather_after_static_slice": (
        lambda w, x, idx: jnp.einsum("td,tdf->tf", x, w[1:2][idx * 0]),
        r"a traced index into a statically sliced weight",
    ),
    "two_products_in_different_roles": (
        lambda w, x, idx: jnp.einsum("td,tdf->tf", x, w[idx]) + jnp.einsum("tf,tdf->td", x, w[idx]),
        r"traced-index views enter their products in different roles",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_gathers_name_the_layer_weight_reason_and_change_nothing(case):
    use, reason = REFUSED[case]
    model = Model(Routed(use))
    before = nnx.to_pure_dict(nnx.state(model))
    with pytest.raises(ValueError, match=rf"layer 'moe'.*weight 'w' \(3, 4, 4\).*({reason})"):
        jnnx.inject(model, CONFIG, nnx.Rngs(0), inputs=(jnp.asarray(ROWS), jnp.asarray(IDX)))
    assert type(model.moe) is Routed
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)


# ------------------------------------------- per-layer targets and patterns, NNX product stacks

QKV = ("q", "o", "mlp")


def _kinds(model) -> dict:
    return {n: type(getattr(model.layers, n)).__name__ for n in QKV}


PER_LAYER_ACCEPTED = {
    "every_layer_listed": dict(targets=["layers.0.q", "layers.1.q", "layers.2.q"]),
    "every_layer_by_regex": dict(targets=r"layers\.\d+\.q"),
    "uniform_rank_pattern": dict(targets=["q"], rank_pattern={r"layers(\.\d+)?\.q": 1}),
}


@pytest.mark.parametrize("case", list(PER_LAYER_ACCEPTED))
def test_per_layer_targets_and_patterns_choose_a_product_stack(case):
    """Used to be refused: the per-layer paths of an NNX product stack were unknown when
    targets and patterns were matched ('targets ... match no layer', 'rank_pattern key
    'layers.1.q' matches none')."""
    from tests.test_oplevel_scan import NnxScanned, _inputs

    x = _inputs()
    model = NnxScanned(nnx.Rngs(0))
    before = model(x)
    jnnx.inject(model, LoRAConfig(r=2, **PER_LAYER_ACCEPTED[case]), nnx.Rngs(1), inputs=(x,))
    assert _kinds(model) == {"q": "LoRANnxEinsum", "o": "NnxEinsum", "mlp": "Linear"}
    r = 1 if "rank" in case else 2
    assert model.layers.q.lora_a.shape == (3, 4, r)  # (L, D, r): one r for the whole stack
    np.testing.assert_array_equal(model(x), before)


PER_LAYER_REFUSED = {
    "one_layer_targeted": (
        dict(targets=["layers.1.q"]),
        r"match only some layers of the stacked layer 'layers\.q' \(layers\.1\.q of 3\)",
    ),
    "one_layer_alpha": (
        dict(targets=["q"], alpha_pattern={"layers.2.q": 5}),
        r"layer 'layers\.q'.*'layers\.2\.q': \(2, 5\.0\).*one r and one alpha",
    ),
    "a_layer_that_is_not_there": (
        dict(targets=["q"], rank_pattern={"layers.9.q": 1}),
        r"rank_pattern key 'layers\.9\.q' matches none of the adapted layers.*layers\.2\.q",
    ),
}


@pytest.mark.parametrize("case", list(PER_LAYER_REFUSED))
def test_per_layer_targets_that_split_a_product_stack_are_refused(case):
    from tests.test_oplevel_scan import NnxScanned, _inputs

    options, message = PER_LAYER_REFUSED[case]
    model = NnxScanned(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model))
    with pytest.raises(ValueError, match=message):
        jnnx.inject(model, LoRAConfig(r=2, **options), nnx.Rngs(1), inputs=(_inputs(),))
    assert _kinds(model) == {"q": "NnxEinsum", "o": "NnxEinsum", "mlp": "Linear"}
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)


def test_a_target_matching_nothing_lists_only_the_paths_that_exist():
    """A module adapted at its product could be a stack until traced, so targets are matched
    against the per-layer paths it would have as one too; the refusal used to list all of
    them (tunix Gemma3's (V, D) embedding: 'embedder.0' … 'embedder.127', thousands of
    names that do not exist)."""
    from tests.test_oplevel_scan import NnxUnrolled, _inputs

    model = NnxUnrolled(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model))
    with pytest.raises(ValueError, match="match no layer") as err:
        jnnx.inject(model, LoRAConfig(r=2, targets=["qq"]), nnx.Rngs(1), inputs=(_inputs(),))
    listed = str(err.value).split("the layer paths are: ")[1].split(", ")
    assert set(listed) == {
        ".".join(map(str, path)) for path, _ in nnx.iter_modules(model) if path
    }, listed
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)


def test_per_layer_names_a_product_module_would_have_as_a_stack_do_not_choose_it():
    """Unrolled layers (nnx.List): 'layers.1.q' could have been layer 0 of a stack at
    'layers.{i}.1.q'; traced, it is not a stack, so a target matching only that name leaves
    it alone."""
    from tests.test_oplevel_scan import NnxUnrolled, _inputs

    model = NnxUnrolled(nnx.Rngs(0))
    jnnx.inject(model, LoRAConfig(r=2, targets=r".*\.0\..*"), nnx.Rngs(1), inputs=(_inputs(),))
    kinds = [[type(getattr(b, n)).__name__ for n in QKV] for b in model.layers]
    assert kinds[0] == ["LoRANnxEinsum", "LoRANnxEinsum", "LoRALinear"]
    assert kinds[1] == kinds[2] == ["NnxEinsum", "NnxEinsum", "Linear"]


def test_one_expert_indexed_by_a_traced_index_is_a_slice_view():
    """E = 1: ``w[i]`` (traced i) takes the whole weight (dynamic_slice clamps i to 0) and the
    squeeze after it is index 0 of the expert axis."""
    model = _routed(SCALARS["getitem_scalar"], idx=np.int32(0))
    one = Model(Routed(SCALARS["getitem_scalar"], w=W[:1]))
    jnnx.inject(one, CONFIG, nnx.Rngs(1), inputs=(jnp.asarray(ROWS), jnp.int32(0)))
    assert one.moe.lora_roles.matches(jaxlora.oplevel.Roles((1, D, D), (0,), (1,), (2,)))
    a, b = _set_factors(model.moe)
    one.moe.lora_a[...], one.moe.lora_b[...] = model.moe.lora_a[...][:1], model.moe.lora_b[...][:1]
    want = ROWS.astype(np.float64) @ _merged(W, a, b)[0]
    assert _rel_err(one(ROWS, jnp.int32(0)), want) < 1e-6
