"""Slice views (issue #13): a weight whose static slices ``W[i]`` each enter a product of their
own, as an MoE layer's per-expert loop does (tunix's Qwen3 ``MoELayer`` on CPU:
``w.value[i]`` then ``einsum('BTD,DF->BTF', …)`` per expert), is ONE adapter with the sliced
axes as batch axes: ``lora_a`` (E, D, r), ``lora_b`` (E, r, F), the layout of the true batched
product 'bed,edf->bef', and the branch at expert i's product uses ``lora_a[i]``, ``lora_b[i]``.

References: closed-form numpy in float64 (``W[i] + s·a[i] b[i]`` per slice) and the batched
einsum module with the same factors; gradients against ``jax.grad`` of the closed form written
with einsums over the factors. Every other use of slices is refused by ``inject`` naming the
layer, the weight and the reason, leaving the model unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn
from flax import nnx
from safetensors.numpy import load_file

import jaxlora
from jaxlora import LoRAConfig
from jaxlora import nnx as jnnx
from tests._train import nnx_lora_step

E, D, F, R, ALPHA = 3, 4, 5, 2, 3.0
S = ALPHA / R
TOL = 2e-5
RNG = np.random.default_rng(0)
W = RNG.normal(size=(E, D, F)).astype(np.float32)
X = RNG.normal(size=(2, E, D)).astype(np.float32)  # (batch, expert, D): expert i's rows


class Experts(nnx.Module):
    """``w`` (E, D, F) used per expert through ``take(w, i)`` (one index form)."""

    def __init__(self, take: Callable, w=W, experts=range(E)):
        self.w = nnx.Param(jnp.asarray(w))
        self.take, self.experts = take, tuple(experts)

    def __call__(self, x):
        ys = [x[:, i] @ self.take(self.w[...], i) for i in self.experts]
        return jnp.stack(ys, axis=1)


class Batched(nnx.Module):
    """The same experts as one batched product: the layout a slice view must share."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(W))

    def __call__(self, x):
        return jnp.einsum("bed,edf->bef", x, self.w[...])


class Model(nnx.Module):
    def __init__(self, moe: nnx.Module):
        self.moe = moe

    def __call__(self, x):
        return self.moe(x)


TAKES = {
    "int": lambda w, i: w[i],
    "negative": lambda w, i: w[i - E],
    "ellipsis": lambda w, i: w[i, ...],
    "index_in_dim": lambda w, i: jax.lax.index_in_dim(w, i, keepdims=False),
    "slice_then_reshape": lambda w, i: w[i : i + 1].reshape(D, F),
    "at_get": lambda w, i: w.at[i].get(),
    "cast_first": lambda w, i: w.astype(jnp.float32)[i],
    "through_transposes": lambda w, i: jnp.transpose(w, (0, 2, 1))[i].T,
}


def _injected(moe: nnx.Module, *, x=X, seed=1) -> Model:
    model = Model(moe)
    config = LoRAConfig(r=R, alpha=ALPHA, targets=["moe"])
    return jnnx.inject(model, config, nnx.Rngs(seed), inputs=(jnp.asarray(x),))


def _randomize(layer, seed=3) -> tuple[np.ndarray, np.ndarray]:
    layer.lora_b[...] = jnp.asarray(
        np.random.default_rng(seed).normal(size=layer.lora_b.shape), jnp.float32
    )
    return np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...], np.float64)


def _closed_form(x, w, a, b) -> np.ndarray:
    """y[:, i] = x[:, i] @ (W[i] + s·a[i] b[i]) in float64."""
    merged = np.asarray(w, np.float64) + S * np.einsum("edr,erf->edf", a, b)
    return np.einsum("bed,edf->bef", np.asarray(x, np.float64), merged)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("form", list(TAKES))
def test_each_index_form_is_one_adapter_per_expert(form):
    model = _injected(Experts(TAKES[form]))
    layer = model.moe
    assert layer.lora_a.shape == (E, D, R) and layer.lora_b.shape == (E, R, F)
    assert layer.lora_roles.matches(jaxlora.oplevel.Roles((E, D, F), (0,), (1,), (2,)))
    np.testing.assert_array_equal(layer.lora_b[...], 0)
    np.testing.assert_array_equal(model(jnp.asarray(X)), Model(Experts(TAKES[form]))(X))
    a, b = _randomize(layer)
    _close(model(jnp.asarray(X)), _closed_form(X, W, a, b))


def test_same_layout_and_numbers_as_the_batched_product():
    sliced, batched = _injected(Experts(TAKES["int"])), _injected(Batched())
    assert sliced.moe.lora_roles.matches(batched.moe.lora_roles)
    _randomize(sliced.moe)
    batched.moe.lora_a[...] = sliced.moe.lora_a[...]
    batched.moe.lora_b[...] = sliced.moe.lora_b[...]
    _close(sliced(jnp.asarray(X)), np.asarray(batched(jnp.asarray(X)), np.float64))
    np.testing.assert_array_equal(sliced.moe.delta(), batched.moe.delta())


def test_gradients_match_the_closed_form():
    model = _injected(Experts(TAKES["int"]))
    a, b = _randomize(model.moe)
    g = np.random.default_rng(5).normal(size=(2, E, F))

    def loss(model):
        return jnp.sum(model(jnp.asarray(X)) * g)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)

    # d/dW[e] of sum(y * g) is G[e] = x[:, e]ᵀ g[:, e]; through W[e] + s·a[e] b[e]:
    big_g = np.einsum("bed,bef->edf", X.astype(np.float64), g)
    ga = S * np.einsum("edf,erf->edr", big_g, b)
    gb = S * np.einsum("edr,edf->erf", a, big_g)
    for got, want in ((grads["moe"]["lora_a"][...], ga), (grads["moe"]["lora_b"][...], gb)):
        _close(got, np.asarray(want))


def test_training_moves_only_the_adapters_and_merge_equals_unmerged():
    model = _injected(Experts(TAKES["int"]))
    optimizer = nnx.Optimizer(model, optax.adam(1e-1), wrt=nnx.LoRAParam)
    target = jnp.asarray(np.random.default_rng(6).normal(size=(2, E, F)), jnp.float32)

    losses = [float(nnx_lora_step(model, optimizer, jnp.asarray(X), target)[0]) for _ in range(5)]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(model.moe.w[...], W)  # the base, bit for bit
    assert all(float(jnp.abs(model.moe.lora_b[...][i]).max()) > 0 for i in range(E))
    y = np.asarray(model(jnp.asarray(X)), np.float64)
    a, b = (np.asarray(f[...], np.float64) for f in (model.moe.lora_a, model.moe.lora_b))
    _close(y, _closed_form(X, W, a, b))
    jnnx.merge(model)
    assert type(model.moe) is Experts and not nnx.state(model, nnx.LoRAParam)
    _close(model(jnp.asarray(X)), y)
    _close(model.moe.w[...], W + S * np.einsum("edr,erf->edf", a, b))


class SecondAxis(nnx.Module):
    """``w`` (D, E, F) indexed on axis 1: ``w[:, i]``."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(np.transpose(W, (1, 0, 2))))

    def __call__(self, x):
        return jnp.stack([x[:, i] @ self.w[:, i] for i in range(E)], axis=1)


def test_a_middle_axis_is_the_batch_axis_in_the_weights_own_order():
    model = _injected(SecondAxis())
    assert model.moe.lora_roles.batch == (1,)
    assert model.moe.lora_a.shape == (E, D, R) and model.moe.lora_b.shape == (E, R, F)
    a, b = _randomize(model.moe)
    _close(model(jnp.asarray(X)), _closed_form(X, W, a, b))
    want_delta = np.transpose(S * np.einsum("edr,erf->edf", a, b), (1, 0, 2))
    _close(model.moe.delta(), want_delta)


class Grid(nnx.Module):
    """``w`` (2, E, D, F) indexed on two axes, ``w[j, i]``: every (j, i) in one product."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(np.stack([W, 2 * W])))

    def __call__(self, x):
        return jnp.stack(
            [jnp.stack([x[:, i] @ self.w[j, i] for i in range(E)], 1) for j in range(2)], 1
        )


def test_two_indexed_axes():
    model = _injected(Grid())
    assert model.moe.lora_a.shape == (2, E, D, R) and model.moe.lora_b.shape == (2, E, R, F)
    _randomize(model.moe)
    a, b = (np.asarray(f[...], np.float64) for f in (model.moe.lora_a, model.moe.lora_b))
    want = np.stack([_closed_form(X, (j + 1) * W, a[j], b[j]) for j in range(2)], 1)
    _close(model(jnp.asarray(X)), want)


def test_one_expert_squeezed_without_a_slice():
    """With E = 1, ``w[0]`` lowers to a bare ``squeeze``: still index 0 of a batch axis."""
    model = _injected(Experts(TAKES["int"], w=W[:1], experts=[0]), x=X[:, :1])
    assert model.moe.lora_a.shape == (1, D, R)
    a, b = _randomize(model.moe)
    _close(model(jnp.asarray(X[:, :1])), _closed_form(X[:, :1], W[:1], a, b))


UNSQUEEZED = {"free": ("bd,edf->bef", False), "batch": ("ebd,edf->bef", True)}


class Unsqueezed(nnx.Module):
    """``w[i:i+1]`` (E kept as a size-1 axis) in its product, as a free or a batch axis."""

    def __init__(self, role):
        self.w = nnx.Param(jnp.asarray(W))
        self.equation, self.lift = UNSQUEEZED[role]

    def __call__(self, x):
        pick = (lambda v: v[None]) if self.lift else (lambda v: v)
        ys = [jnp.einsum(self.equation, pick(x[:, i]), self.w[i : i + 1]) for i in range(E)]
        return jnp.concatenate(ys, axis=1)


@pytest.mark.parametrize("role", list(UNSQUEEZED))
def test_a_kept_size_one_slice_axis_in_the_product(role):
    model = _injected(Unsqueezed(role))
    assert model.moe.lora_roles.matches(jaxlora.oplevel.Roles((E, D, F), (0,), (1,), (2,)))
    a, b = _randomize(model.moe)
    _close(model(jnp.asarray(X)), _closed_form(X, W, a, b))


class Uses(nnx.Module):
    """``w`` (E, D, D) used by ``use(w, x)`` (a refused pattern)."""

    def __init__(self, use):
        self.w = nnx.Param(jnp.asarray(RNG.normal(size=(E, D, D)).astype(np.float32)))
        self.use = use

    def __call__(self, x):
        return self.use(self.w[...], x)


def _per_expert(w, x, picks):
    return sum(jnp.sum(x[:, i] @ pick(w)) for i, pick in enumerate(picks))


REFUSALS = {
    "partial_slice": (
        lambda w, x: jnp.sum(jnp.einsum("bed,edf->bef", x[:, :2], w[:2])) + jnp.sum(x[:, 2] @ w[2]),
        r"partial slice \(0:2 of 3 on axis 0",
    ),
    "strided_slice": (
        lambda w, x: (
            jnp.sum(jnp.einsum("bed,edf->bef", x[:, ::2], w[::2])) + jnp.sum(x[:, 1] @ w[1])
        ),
        r"strided slice \(stride 2 on axis 0\)",
    ),
    "index_twice": (
        lambda w, x: (
            _per_expert(w, x, [lambda w: w[0], lambda w: w[1], lambda w: w[2]])
            + jnp.sum(x[:, 0] @ w[0])
        ),
        r"index \(0,\) on axes \(0,\) enters 2 products",
    ),
    "index_missing": (
        lambda w, x: _per_expert(w, x, [lambda w: w[0], lambda w: w[1]]),
        r"index \(2,\) on axes \(0,\) enters no product",
    ),
    "different_axes": (
        lambda w, x: _per_expert(w, x, [lambda w: w[0], lambda w: w[:, 1].T, lambda w: w[2]]),
        r"index it on different axes \[\(0,\), \(1,\)\]",
    ),
    "different_roles": (
        lambda w, x: _per_expert(w, x, [lambda w: w[0], lambda w: w[1].T, lambda w: w[2]]),
        r"slices enter their products in different roles",
    ),
    "also_unindexed": (
        lambda w, x: (
            _per_expert(w, x, [lambda w, i=i: w[i] for i in range(E)])
            + jnp.sum(jnp.einsum("bed,edf->bef", x, w))
        ),
        r"used by 4 products \(dot_general\), 1 of them without static indexing",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_layer_weight_reason_and_change_nothing(case):
    use, reason = REFUSALS[case]
    model = Model(Uses(use))
    before = nnx.to_pure_dict(nnx.state(model))
    config = LoRAConfig(r=R, targets=["moe"])
    with pytest.raises(ValueError, match=rf"layer 'moe'.*weight 'w' \(3, 4, 4\).*{reason}"):
        jnnx.inject(model, config, nnx.Rngs(0), inputs=(jnp.asarray(X),))
    assert type(model.moe) is Uses
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)


class LinenExperts(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", lambda key: jnp.asarray(W))
        return jnp.stack([x[:, i] @ w[i] for i in range(E)], axis=1)


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenExperts(name="moe")(x)


def test_linen_slice_views_match_the_closed_form_and_merge():
    model, x = LinenModel(), jnp.asarray(X)
    variables = model.init(jax.random.key(0), x)
    config = LoRAConfig(r=R, alpha=ALPHA, targets=["moe"])
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    node = dict(lora["params"]["moe"])
    assert node["lora_a"].shape == (E, D, R) and node["lora_b"].shape == (E, R, F)
    node["lora_b"] = jnp.asarray(np.random.default_rng(3).normal(size=(E, R, F)), jnp.float32)
    lora = {"params": {"moe": node}}
    with jaxlora.intercept(config):
        y = model.apply(lora, x)
    a, b = (np.asarray(node[n], np.float64) for n in ("lora_a", "lora_b"))
    _close(y, _closed_form(X, W, a, b))
    merged = jaxlora.merge(lora, alpha=ALPHA)
    _close(model.apply(merged, x), np.asarray(y, np.float64))


# Files: one torch Linear per expert (transformers' ``experts.{e}.proj``), each its own A, B.
EXPERTS = jaxlora.HFLinear("moe", experts="moe.experts.{}.proj")
EXPERT_PATHS = tuple(f"moe.experts.{e}.proj" for e in range(E))
MAPS = {
    "template": {"moe": EXPERTS},
    "paths_split": {"moe": jaxlora.HFLinear(EXPERT_PATHS, split=0)},
}


class TorchExperts(torch.nn.Module):
    """The torch twin: expert e a ``Linear(D, F)`` with weight ``W[e].T``."""

    def __init__(self):
        super().__init__()
        self.experts = torch.nn.ModuleList()
        for e in range(E):
            expert = torch.nn.Module()
            expert.proj = torch.nn.Linear(D, F, bias=False)
            with torch.no_grad():
                expert.proj.weight.copy_(torch.from_numpy(W[e].T.copy()))
            self.experts.append(expert)

    def forward(self, x):
        return torch.stack([self.experts[e].proj(x[:, e]) for e in range(E)], dim=1)


class TorchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = TorchExperts()

    def forward(self, x):
        return self.moe(x)


@pytest.mark.parametrize("moe", [lambda: Experts(TAKES["int"]), Batched], ids=["sliced", "batched"])
@pytest.mark.parametrize("kind", list(MAPS))
def test_file_writes_each_expert_and_reads_back_exactly(tmp_path, moe, kind):
    model = _injected(moe())
    a, b = (np.asarray(f, np.float32) for f in _randomize(model.moe))
    jnnx.save_adapter(model, tmp_path, path_map=MAPS[kind])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * E
    for e, path in enumerate(EXPERT_PATHS):
        np.testing.assert_array_equal(tensors[f"base_model.model.{path}.lora_A.weight"], a[e].T)
        np.testing.assert_array_equal(tensors[f"base_model.model.{path}.lora_B.weight"], b[e].T)
    other = _injected(moe(), seed=9)
    jnnx.load_adapter(other, tmp_path, path_map=MAPS[kind])
    np.testing.assert_array_equal(other.moe.lora_a[...], a)
    np.testing.assert_array_equal(other.moe.lora_b[...], b)


def test_peft_serves_the_jax_adapter_per_expert_and_back(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = _injected(Experts(TAKES["int"]))
    _randomize(model.moe)
    y = np.asarray(model(jnp.asarray(X)))
    jnnx.save_adapter(model, tmp_path / "jax", path_map=MAPS["template"])
    peft_model = PeftModel.from_pretrained(TorchModel(), str(tmp_path / "jax")).eval()
    with torch.no_grad():
        got = peft_model(torch.from_numpy(X)).numpy()
    _close(got, y.astype(np.float64))

    torch.manual_seed(0)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"])
    trained = get_peft_model(TorchModel(), config)
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    with torch.no_grad():
        want = trained(torch.from_numpy(X)).numpy()
    trained.save_pretrained(str(tmp_path / "torch"))
    other = _injected(Experts(TAKES["int"]), seed=9)
    jnnx.load_adapter(other, tmp_path / "torch", path_map=MAPS["template"])
    _close(other(jnp.asarray(X)), want.astype(np.float64))


FILE_REFUSALS = {
    "plain_path": (
        lambda: Experts(TAKES["int"]),
        {"moe": "moe.proj"},
        r"axis 0 \(size 3\) is a batch axis",
    ),
    "no_placeholder": (
        lambda: Experts(TAKES["int"]),
        {"moe": jaxlora.HFLinear("moe", experts="moe.experts.proj")},
        r"experts='moe.experts.proj' must be a torch path with one '\{\}'",
    ),
    "too_few_paths": (
        lambda: Experts(TAKES["int"]),
        {"moe": jaxlora.HFLinear(EXPERT_PATHS[:2], split=0)},
        r"axis 0 \(size 3\) is a batch axis",
    ),
    "two_batch_axes": (Grid, {"moe": EXPERTS}, r"axes \[0, 1\] are batch axes"),
}


@pytest.mark.parametrize("case", list(FILE_REFUSALS))
def test_file_refusals_name_the_layer_and_write_nothing(tmp_path, case):
    make, path_map, message = FILE_REFUSALS[case]
    model = _injected(make())
    with pytest.raises(ValueError, match=rf"layer 'moe', weight 'w' .*{message}"):
        jnnx.save_adapter(model, tmp_path / "out", path_map=path_map)
    assert not (tmp_path / "out").exists()


def test_linen_file_round_trip_per_expert(tmp_path):
    model, x = LinenModel(), jnp.asarray(X)
    variables = model.init(jax.random.key(0), x)
    config = LoRAConfig(r=R, alpha=ALPHA, targets=["moe"])
    layouts = jaxlora.layouts(model, x)
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=layouts)
    node = dict(lora["params"]["moe"])
    node["lora_b"] = jnp.asarray(np.random.default_rng(3).normal(size=(E, R, F)), jnp.float32)
    lora = {"params": {"moe": node}}
    jaxlora.save_adapter(lora, tmp_path, config, path_map={"moe": EXPERTS})
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(
        tensors["base_model.model.moe.experts.2.proj.lora_B.weight"],
        np.asarray(node["lora_b"][2]).T,
    )
    other = jaxlora.inject(variables, config, jax.random.key(5), layouts=layouts)
    loaded = jaxlora.load_adapter(other, tmp_path, path_map={"moe": EXPERTS})
    for name in ("lora_a", "lora_b"):
        np.testing.assert_array_equal(loaded["params"]["moe"][name], node[name])


def test_to_multi_refuses_slice_views_like_batched_products():
    """Many adapters per batch gather per example; an expert's rows are routed tokens."""
    model = _injected(Experts(TAKES["int"]))
    with pytest.raises(ValueError, match=r"layer 'moe'.*batch axes \[0\] in its product"):
        jnnx.to_multi(model, capacity=2)
    assert type(model.moe).__name__ == "LoRAExperts"
