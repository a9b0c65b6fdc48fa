"""Several adapted weights in one Linen module (issue #13, item 1, the Linen side of
``tests/test_oplevel_multiweight.py``): a gated MLP holding ``w_gate`` (D, F), ``w_up`` (D, F)
and ``w_down`` (F, D), each used by its own einsum.

``layouts`` → ``inject`` → ``intercept``: each weight gets its own adapter,
``<weight>_lora_a`` / ``<weight>_lora_b`` (``jaxlora.tree.factor_names``), and the node one
``lora_roles`` record per weight; a module with one adapted weight keeps ``lora_a`` /
``lora_b``. Checked against closed-form numpy (float64: the branch at each product is
``scaling · (x a) b`` with that product's own x), merge/unmerge, ``freeze_base`` with optax,
partition specs, bf16 compute with fp32 adapters, ``target_parameters``, files (exact round
trip) and the refusals. fp32 tolerance: 1e-5 of the output's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import LoRAConfig
from jaxlora.product import ProductRoles, ProductsLayout
from tests._gated_mlp import ALPHA, WEIGHTS, D, F, R, S, base_and_input, reference
from tests._train import linen_adam_steps

TOL = 1e-5
BASE, X = base_and_input(cast_before_scale=False)
SPECS = {"w_gate": ("fsdp", "tp"), "w_up": ("fsdp", "tp"), "w_down": ("tp", "fsdp")}


class GatedMLP(nn.Module):
    """One module, three weights, each in its own einsum (compute in ``dtype``)."""

    dtype: jnp.dtype = jnp.float32
    partitioned: bool = False

    def weight(self, name: str) -> jax.Array:
        init = lambda *_: jnp.asarray(BASE[name])  # noqa: E731
        if self.partitioned:
            init = nn.with_partitioning(init, SPECS[name])
        return jnp.asarray(self.param(name, init), self.dtype)

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, self.dtype)
        g = jnp.einsum("btd,df->btf", x, self.weight("w_gate"))
        u = jnp.einsum("btd,df->btf", x, self.weight("w_up"))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, self.weight("w_down"))


class Block(nn.Module):
    dtype: jnp.dtype = jnp.float32
    partitioned: bool = False

    @nn.compact
    def __call__(self, x):
        h = GatedMLP(self.dtype, self.partitioned, name="mlp")(x)
        return nn.Dense(3, dtype=self.dtype, name="head")(h)


def _reference(factors: dict, x=X, scale=S) -> np.ndarray:
    return reference(BASE, factors, x, scale)


def _close(got, want, tol=TOL):
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


CONFIG = LoRAConfig(r=R, alpha=ALPHA, targets=["mlp"])


def _injected(config=CONFIG, *, dtype=jnp.float32, param_dtype=jnp.float32, partitioned=False):
    model = Block(dtype, partitioned)
    x = jnp.asarray(X, dtype)
    variables = model.init(jax.random.key(0), x)
    layouts = jaxlora.layouts(model, x)
    lora = jaxlora.inject(
        variables, config, jax.random.key(1), param_dtype=param_dtype, layouts=layouts
    )
    return model, variables, lora


def _randomize(lora, weights=WEIGHTS, seed=7):
    """The tree with random non-zero factors for ``weights``; returns (tree, {weight: (a, b)})."""
    rng = np.random.default_rng(seed)
    node = dict(lora["params"]["mlp"])
    factors = {}
    for name in weights:
        names = jaxlora.tree.factor_names(name if len(weights) > 1 else None)
        pair = []
        for leaf in names:
            value = rng.normal(size=jnp.shape(node[leaf])).astype(np.float32)
            node[leaf] = jnp.asarray(value, node[leaf].dtype)
            pair.append(value)
        factors[name] = tuple(pair)
    params = {**lora["params"], "mlp": node}
    return {**lora, "params": params}, factors


def _mlp(lora, config=CONFIG, x=X):
    with jaxlora.intercept(config):
        return GatedMLP().apply({"params": lora["params"]["mlp"]}, jnp.asarray(x))


def test_one_adapter_per_weight_named_by_weight():
    _, variables, lora = _injected()
    layout = jaxlora.layouts(Block(), jnp.asarray(X))["mlp"]
    assert isinstance(layout, ProductsLayout) and layout.weights == WEIGHTS
    node = lora["params"]["mlp"]
    shapes = {k: tuple(jnp.shape(v)) for k, v in node.items() if k != "lora_roles"}
    assert shapes == {
        **{w: BASE[w].shape for w in WEIGHTS},
        "w_down_lora_a": (F, R),
        "w_down_lora_b": (R, D),
        "w_gate_lora_a": (D, R),
        "w_gate_lora_b": (R, F),
        "w_up_lora_a": (D, R),
        "w_up_lora_b": (R, F),
    }
    assert [m.weight for m in node["lora_roles"]] == list(WEIGHTS)
    assert all(isinstance(m, ProductRoles) for m in node["lora_roles"])
    # The base weights are the same arrays, the head is untouched, and the model starts equal.
    for w in WEIGHTS:
        assert node[w] is variables["params"]["mlp"][w]
    assert set(lora["params"]["head"]) == {"kernel", "bias"}
    _close(_mlp(lora), _reference({}))
    # A weight's lora_a follows torch's kaiming_uniform(a=√5) on (r, in): U(±1/√in).
    for w in WEIGHTS:
        bound = 1 / np.sqrt(BASE[w].shape[0])
        a = np.asarray(node[f"{w}_lora_a"])
        assert np.abs(a).max() <= bound and np.abs(a).max() > bound / 2
    draws = [np.asarray(node[f"{w}_lora_a"]).ravel()[:4] for w in ("w_gate", "w_up")]
    assert not np.array_equal(*draws)  # each weight draws its own A


def test_branch_at_each_product_is_closed_form():
    _, _, lora = _injected()
    lora, factors = _randomize(lora)
    _close(_mlp(lora), _reference(factors))
    model = Block()
    with jaxlora.intercept(CONFIG):
        full = jax.jit(model.apply)(lora, jnp.asarray(X))
    head = lora["params"]["head"]
    want = _reference(factors) @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
    _close(full, want)
    # Each weight's adapter is applied at its own product only.
    for name in WEIGHTS:
        node = dict(lora["params"]["mlp"])
        for other in WEIGHTS:
            if other != name:
                node[f"{other}_lora_b"] = jnp.zeros_like(node[f"{other}_lora_b"])
        _close(_mlp({"params": {"mlp": node}}), _reference({name: factors[name]}))


def test_gradients_of_each_factor_match_float64_differences():
    """d loss / d lora_b of each weight (loss = sum(y · G)) in a random direction, against a
    central difference of the float64 reference (error O(eps²), far below fp32 rounding)."""
    _, _, lora = _injected()
    lora, factors = _randomize(lora)
    g = np.random.default_rng(5).normal(size=(2, 3, D))
    node = lora["params"]["mlp"]

    def loss(node):
        return jnp.sum(_mlp({"params": {"mlp": node}}) * g)

    grads = jax.grad(loss)(node)
    eps = 1e-4
    for w in WEIGHTS:
        direction = np.random.default_rng(9).normal(size=factors[w][1].shape)
        got = float(np.sum(np.asarray(grads[f"{w}_lora_b"], np.float64) * direction))
        plus, minus = (
            {**factors, w: (factors[w][0], factors[w][1] + sign * eps * direction)}
            for sign in (1, -1)
        )
        want = float(np.sum((_reference(plus) - _reference(minus)) * g)) / (2 * eps)
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want))


def test_merge_equals_unmerged_and_unmerge_restores():
    model, _, lora = _injected()
    lora, _ = _randomize(lora)
    with jaxlora.intercept(CONFIG):
        before = np.asarray(model.apply(lora, jnp.asarray(X)), np.float64)
    merged = jaxlora.merge(lora, alpha=CONFIG.alpha_for)
    assert set(merged["params"]["mlp"]) == set(WEIGHTS)
    _close(model.apply(merged, jnp.asarray(X)), before)
    node = lora["params"]["mlp"]
    for w in WEIGHTS:  # each weight + s · a b, in the weight's own layout
        a, b = (np.asarray(node[f"{w}_lora_{x}"], np.float64) for x in "ab")
        _close(merged["params"]["mlp"][w], BASE[w] + S * a @ b)
    merged, record = jaxlora.merge(lora, alpha=ALPHA, record=True)
    back = jaxlora.unmerge(merged, record)
    for w in WEIGHTS:
        np.testing.assert_allclose(back["params"]["mlp"][w], BASE[w], atol=1e-6)
        np.testing.assert_array_equal(
            back["params"]["mlp"][f"{w}_lora_a"], lora["params"]["mlp"][f"{w}_lora_a"]
        )
    assert back["params"]["mlp"]["lora_roles"] == lora["params"]["mlp"]["lora_roles"]
    # One weight changed since the merge: refused, not shifted.
    tampered = {**merged["params"]["mlp"], "w_up": merged["params"]["mlp"]["w_up"] + 1.0}
    with pytest.raises(ValueError, match="layer 'mlp': the kernel is not the one merge returned"):
        jaxlora.unmerge({**merged, "params": {**merged["params"], "mlp": tampered}}, record)
    # Under jit, the unmerged weights of a layer changed since are NaN, never silently shifted.
    nan = jax.jit(jaxlora.unmerge)(
        {**merged, "params": {**merged["params"], "mlp": tampered}}, record
    )
    assert np.isnan(np.asarray(nan["params"]["mlp"]["w_gate"])).all()
    jitted = jax.jit(jaxlora.unmerge)(merged, record)
    np.testing.assert_allclose(jitted["params"]["mlp"]["w_down"], BASE["w_down"], atol=1e-6)


def test_freeze_base_trains_every_adapter_and_keeps_the_base_bit_identical():
    model, variables, lora = _injected()
    mask = jaxlora.lora_mask(lora["params"])
    assert mask["mlp"]["lora_roles"] == lora["params"]["mlp"]["lora_roles"]  # no arrays: as is
    assert {k: v for k, v in mask["mlp"].items() if k != "lora_roles"} == {
        **dict.fromkeys(WEIGHTS, False),
        **{f"{w}_lora_{x}": True for w in WEIGHTS for x in "ab"},
    }
    adapter, base = jaxlora.split(lora["params"])
    assert set(adapter["mlp"]) == {"lora_roles", *(f"{w}_lora_{x}" for w in WEIGHTS for x in "ab")}
    assert set(base["mlp"]) == set(WEIGHTS)
    assert jaxlora.trainable_parameters(lora["params"]).trainable == 3 * R * (D + F)
    target = jnp.ones((2, 3, 3))
    params, _, losses, _ = linen_adam_steps(
        model, CONFIG, {"params": lora["params"]}, jnp.asarray(X), target, steps=5
    )
    assert losses[-1] < losses[0]
    for w in WEIGHTS:
        np.testing.assert_array_equal(np.asarray(params["mlp"][w]), BASE[w])
        assert np.abs(np.asarray(params["mlp"][f"{w}_lora_b"])).max() > 0  # B trained
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(params["head"][leaf], variables["params"]["head"][leaf])


def test_partition_specs_follow_each_weight():
    _, _, lora = _injected()
    base_specs = {"mlp": {w: P(*SPECS[w]) for w in WEIGHTS}}
    specs = jaxlora.partition_specs(lora["params"], base_specs)["mlp"]
    assert specs["w_gate_lora_a"] == P("fsdp", None) and specs["w_gate_lora_b"] == P(None, "tp")
    assert specs["w_down_lora_a"] == P("tp", None) and specs["w_down_lora_b"] == P(None, "fsdp")
    assert specs["w_up"] == P("fsdp", "tp")
    # Boxed params (nn.with_partitioning) get boxed factors from inject directly.
    _, _, boxed = _injected(partitioned=True)
    got = nn.get_partition_spec(boxed)["params"]["mlp"]
    assert got["w_up_lora_a"] == P("fsdp", None) and got["w_up_lora_b"] == P(None, "tp")
    assert got["w_down_lora_a"] == P("tp", None) and got["w_down_lora_b"] == P(None, "fsdp")
    unboxed, factors = _randomize(nn.meta.unbox(boxed))
    _close(_mlp(unboxed), _reference(factors))


def test_bf16_compute_with_fp32_adapters():
    _, _, lora = _injected(dtype=jnp.bfloat16)
    node = lora["params"]["mlp"]
    assert all(node[f"{w}_lora_{x}"].dtype == jnp.float32 for w in WEIGHTS for x in "ab")
    lora, factors = _randomize(lora)
    with jaxlora.intercept(CONFIG):
        got = GatedMLP(jnp.bfloat16).apply(
            {"params": lora["params"]["mlp"]}, jnp.asarray(X, jnp.bfloat16)
        )
    assert got.dtype == jnp.bfloat16
    want = _reference(factors)
    # bf16 has 8 bits of mantissa: a few 2^-8 of the output scale through three products.
    assert np.abs(np.asarray(got, np.float64) - want).max() < 0.05 * np.abs(want).max()
    # The merge is computed in fp32 and rounded once into the weight's (fp32) storage.
    merged = jaxlora.merge(lora, alpha=ALPHA)
    assert merged["params"]["mlp"]["w_up"].dtype == jnp.float32


@pytest.mark.parametrize(
    "entries,adapted",
    [(["mlp.w_gate"], ("w_gate",)), (["mlp.w_gate", "w_down"], ("w_down", "w_gate"))],
    ids=["one-weight-keeps-lora_a", "two-weights"],
)
def test_target_parameters_chooses_weights_by_name(entries, adapted):
    config = LoRAConfig(r=R, alpha=ALPHA, targets=[], target_parameters=entries)
    _, _, lora = _injected(config)
    node = lora["params"]["mlp"]
    lora_keys = {k for k in node if jaxlora.tree.is_lora_name(k)}
    if len(adapted) == 1:  # one adapted weight: today's names and record
        assert lora_keys == {"lora_a", "lora_b"}
        assert node["lora_roles"].weight == "w_gate"
    else:
        assert lora_keys == {f"{w}_lora_{x}" for w in adapted for x in "ab"}
        assert [m.weight for m in node["lora_roles"]] == list(adapted)
    assert set(lora["params"]["head"]) == {"kernel", "bias"}
    lora, factors = _randomize(lora, adapted)
    _close(_mlp(lora, config), _reference(factors))
    merged = jaxlora.merge(lora, alpha=ALPHA)
    _close(GatedMLP().apply({"params": merged["params"]["mlp"]}, jnp.asarray(X)), _mlp(lora))


class Scaled(nn.Module):  # two weights in products; a scale used elementwise
    @nn.compact
    def __call__(self, x):
        w = self.param("w", lambda *_: jnp.asarray(BASE["w_gate"]))
        v = self.param("v", lambda *_: jnp.asarray(BASE["w_up"]))
        scale = self.param("scale", nn.initializers.ones, (F,))
        return jnp.einsum("btd,df->btf", x, w) * scale + x @ v


class TwoProducts(nn.Module):  # one weight in two products
    @nn.compact
    def __call__(self, x):
        w = self.param("w", lambda *_: jnp.asarray(BASE["w_gate"]))
        v = self.param("v", lambda *_: jnp.asarray(BASE["w_up"]))
        return x @ w + jnp.einsum("btd,df->btf", x, w) + x @ v


def _wrap(cls):
    class Wrapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            return cls(name="mlp")(x)

    return Wrapped


REFUSALS = {
    "typo": (
        Block,
        LoRAConfig(r=R, targets=[], target_parameters=["mlp.w_gat"]),
        r"target_parameters entry 'mlp.w_gat' matches no weight .*mlp\.w_gate",
    ),
    "known-kind": (
        Block,
        LoRAConfig(r=R, targets=[], target_parameters=["head.kernel"]),
        r"layer 'head'.*names \['head.kernel'\], but layer 'head' is a Dense, adapted as a layer",
    ),
    "two-products": (
        _wrap(TwoProducts),
        LoRAConfig(r=R, targets=["mlp"]),
        r"layer 'mlp' holds .*cannot be adapted.*weight 'w' \(8, 12\): used by 2 products",
    ),
    "not-a-product": (
        _wrap(Scaled),
        LoRAConfig(r=R, targets=[], target_parameters=["mlp.scale"]),
        r"layer 'mlp', weight 'scale' \(12,\): used only by broadcast_in_dim; target_parameters",
    ),
    "two-products-by-name": (
        _wrap(TwoProducts),
        LoRAConfig(r=R, targets=[], target_parameters=["mlp.v"]),
        r"names \['mlp.v'\], but weight 'w' \(8, 12\): used by 2 products",
    ),
    "dora": (
        Block,
        LoRAConfig(r=R, targets=["mlp"], use_dora=True),
        r"layer 'mlp', weight 'w_down' is adapted at its weight's product, where use_dora=True",
    ),
    "dora-one-weight": (
        Block,
        LoRAConfig(r=R, targets=[], target_parameters=["mlp.w_up"], use_dora=True),
        r"layer 'mlp' is adapted at its weight's product, where use_dora=True is not",
    ),
    "rank-too-large": (
        Block,
        LoRAConfig(r=9, targets=["mlp"]),
        r"layer 'mlp', weight 'w_down'.*r must be in \[1, min\(in, out\)\] = \[1, 8\], got 9",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_layer_and_weight(case):
    make, config, message = REFUSALS[case]
    model = make()
    variables = model.init(jax.random.key(0), jnp.asarray(X))
    # inject is pure: a refusal returns nothing and leaves nothing half-changed
    with pytest.raises((ValueError, TypeError), match=message):
        jaxlora.inject(
            variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, jnp.asarray(X))
        )


def test_target_parameters_without_layouts_says_to_pass_them():
    variables = Block().init(jax.random.key(0), jnp.asarray(X))
    config = LoRAConfig(r=R, targets=[], target_parameters=["mlp.w_up"])
    with pytest.raises(ValueError, match=r"names \['mlp.w_up'\], weights found by tracing"):
        jaxlora.inject(variables, config, jax.random.key(1))


def test_targets_adapt_every_product_weight_of_a_module():
    """By targets, a module adapts every weight that enters one product (here 'w' and 'v'; the
    elementwise 'scale' is in none and stays as it is)."""
    model = _wrap(Scaled)()
    variables = model.init(jax.random.key(0), jnp.asarray(X))
    config = LoRAConfig(r=R, alpha=ALPHA, targets=["mlp"])
    lora = jaxlora.inject(
        variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, jnp.asarray(X))
    )
    node = dict(lora["params"]["mlp"])
    assert [m.weight for m in node["lora_roles"]] == ["v", "w"]
    assert {k for k in node if jaxlora.tree.is_lora_name(k)} == {
        "v_lora_a",
        "v_lora_b",
        "w_lora_a",
        "w_lora_b",
    }
    rng = np.random.default_rng(2)
    for k in ("v_lora_b", "w_lora_b"):
        node[k] = jnp.asarray(rng.normal(size=node[k].shape), jnp.float32)
    a = {w: np.asarray(node[f"{w}_lora_a"], np.float64) for w in "vw"}
    b = {w: np.asarray(node[f"{w}_lora_b"], np.float64) for w in "vw"}
    x = X.astype(np.float64)
    want = (x @ (BASE["w_gate"] + S * a["w"] @ b["w"])) + x @ (BASE["w_up"] + S * a["v"] @ b["v"])
    with jaxlora.intercept(config):
        got = model.apply({"params": {"mlp": node}}, jnp.asarray(X))
    _close(got, want)


def test_files_round_trip_exactly_and_map_each_weight(tmp_path):
    from safetensors.numpy import load_file

    _, _, lora = _injected()
    lora, factors = _randomize(lora)
    path_map = {f"mlp.{w}": f"mlp.{w.removeprefix('w_')}_proj" for w in WEIGHTS}
    jaxlora.save_adapter(lora, tmp_path, CONFIG, path_map=path_map)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(WEIGHTS)
    for w in WEIGHTS:
        key = f"base_model.model.mlp.{w.removeprefix('w_')}_proj"
        np.testing.assert_array_equal(tensors[f"{key}.lora_A.weight"], factors[w][0].T)
        np.testing.assert_array_equal(tensors[f"{key}.lora_B.weight"], factors[w][1].T)
    _, _, fresh = _injected()
    loaded = jaxlora.load_adapter(fresh, tmp_path, path_map=path_map)
    for w in WEIGHTS:
        for x, want in zip("ab", factors[w], strict=True):
            np.testing.assert_array_equal(loaded["params"]["mlp"][f"{w}_lora_{x}"], want)
    config = jaxlora.read_adapter_config(tmp_path)
    _close(_mlp(loaded, config), _reference(factors))
    # Without a path_map each weight is its own torch module, '<path>.<weight>'.
    jaxlora.save_adapter(lora, tmp_path / "plain", CONFIG)
    keys = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert "base_model.model.mlp.w_up.lora_A.weight" in keys


def test_load_refuses_different_alphas_for_one_module(tmp_path):
    import json

    from jaxlora.adapter import write_adapter

    _, _, lora = _injected()
    lora, _ = _randomize(lora)
    jaxlora.save_adapter(lora, tmp_path, CONFIG)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"mlp.w_up": 5.0}
    from safetensors.numpy import load_file

    write_adapter(tmp_path, load_file(tmp_path / "adapter_model.safetensors"), config)
    _, _, fresh = _injected()
    with pytest.raises(ValueError, match=r"layer 'mlp' have different alphas"):
        jaxlora.load_adapter(fresh, tmp_path)


def test_tree_records_are_checked():
    """A hand-made node whose factors the record does not name, or whose factors lack their
    record, is refused naming the leaves (never read in some other layout)."""
    _, _, lora = _injected()
    node = dict(lora["params"]["mlp"])
    node["w_extra_lora_a"] = jnp.ones((D, R))
    with pytest.raises(ValueError, match=r"layer 'mlp'.* also holds \['w_extra_lora_a'\]"):
        jaxlora.merge({"mlp": node}, alpha=ALPHA)
    del node["lora_roles"], node["w_extra_lora_a"]
    with pytest.raises(ValueError, match=r"layer 'mlp' holds \['w_down_lora_a'.* no 'lora_roles'"):
        jaxlora.merge({"mlp": node}, alpha=ALPHA)
    node = dict(lora["params"]["mlp"])
    node["w_up_lora_a"] = jnp.ones((D, R + 1))
    node["w_up_lora_b"] = jnp.ones((R + 1, F))
    with pytest.raises(ValueError, match=r"layer 'mlp': its weights' adapters have ranks \[2, 3\]"):
        jaxlora.merge({"mlp": node}, alpha=ALPHA)


def test_pissa_makes_each_weight_a_residual_and_merges_back():
    config = LoRAConfig(r=R, alpha=ALPHA, targets=["mlp"], init="pissa")
    _, _, lora = _injected(config)
    node = lora["params"]["mlp"]
    assert node["lora_init"].init == "pissa"
    with jaxlora.intercept(config):
        _close(GatedMLP().apply({"params": node}, jnp.asarray(X)), _reference({}))
    merged = jaxlora.merge(lora, alpha=ALPHA)["params"]["mlp"]
    for w in WEIGHTS:  # the residual W − s·B₀A₀, and merged back W
        assert np.abs(np.asarray(node[w]) - BASE[w]).max() > 1e-2
        np.testing.assert_allclose(merged[w], BASE[w], atol=1e-5)


def test_dropout_drops_each_products_branch_input_only():
    """With B zero the dropped-out branch adds nothing (the base sees the undropped x); with
    B non-zero and dropout active the output differs from the deterministic one."""
    config = LoRAConfig(r=R, alpha=ALPHA, targets=["mlp"], dropout=0.5)
    _, _, lora = _injected(config)
    rngs = {"dropout": jax.random.key(3)}
    node = {"params": lora["params"]["mlp"]}
    with jaxlora.intercept(config, deterministic=False):
        _close(GatedMLP().apply(node, jnp.asarray(X), rngs=rngs), _reference({}))
    lora, factors = _randomize(lora)
    node = {"params": lora["params"]["mlp"]}
    with jaxlora.intercept(config, deterministic=False):
        dropped = np.asarray(GatedMLP().apply(node, jnp.asarray(X), rngs=rngs), np.float64)
    assert np.abs(dropped - _reference(factors)).max() > 1e-3
