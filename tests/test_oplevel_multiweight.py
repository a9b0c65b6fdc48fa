"""Several adapted weights in one NNX module (issue #13, item 1): a gated MLP holding ``w_gate``
(D, F), ``w_up`` (D, F) and ``w_down`` (F, D), each used by its own einsum (tunix's MoE and
some Gemma FeedForwards hold such params in one module).

Each weight gets its own adapter, ``<weight>_lora_a`` / ``<weight>_lora_b``; a module with one
adapted weight keeps ``lora_a`` / ``lora_b``. Checked against closed-form numpy (the branch at
each product is ``scaling · x a b`` with that product's x), merge, freezing with optax, bf16
compute with fp32 adapters, ``target_parameters`` (PEFT's: weights chosen by name), files
(exact round trip), ``from_qwix`` on a hand-built qwix-style state, and the refusals, each
leaving the model unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlora import LoRAConfig
from jaxlora import nnx as jnnx
from tests._gated_mlp import ALPHA, WEIGHTS, D, F, R, S, base_and_input, reference, silu
from tests._qwix_rule import QwixRule
from tests._train import nnx_lora_step

BASE, X = base_and_input(cast_before_scale=True)


class GatedMLP(nnx.Module):
    def __init__(self, dtype=jnp.float32):
        for name, value in BASE.items():
            setattr(self, name, nnx.Param(jnp.asarray(value, dtype)))

    def __call__(self, x):
        g = jnp.einsum("btd,df->btf", x, self.w_gate[...])
        u = jnp.einsum("btd,df->btf", x, self.w_up[...])
        return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, self.w_down[...])


class Block(nnx.Module):
    def __init__(self, dtype=jnp.float32):
        self.mlp = GatedMLP(dtype)
        self.head = nnx.Linear(D, 3, rngs=nnx.Rngs(3))

    def __call__(self, x):
        return self.head(self.mlp(x))


def _reference(factors: dict, x=X, scale=S) -> np.ndarray:
    return reference(BASE, factors, x, scale)


def _injected(config=None, dtype=jnp.float32, param_dtype=jnp.float32) -> Block:
    model = Block(dtype)
    config = config or LoRAConfig(r=R, alpha=ALPHA, targets=["mlp"])
    jnnx.inject(model, config, nnx.Rngs(1), param_dtype=param_dtype, inputs=(jnp.asarray(X),))
    return model


def _randomize(layer, seed=7) -> dict:
    """Random non-zero factors for every adapted weight of ``layer``; returns them."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in layer.lora_weights:
        a_var, b_var = layer.factors(name)
        a = rng.normal(size=a_var.shape).astype(np.float32)
        b = rng.normal(size=b_var.shape).astype(np.float32)
        a_var[...], b_var[...] = jnp.asarray(a, a_var.dtype), jnp.asarray(b, b_var.dtype)
        out[name] = (a, b)
    return out


def _lora_shapes(model) -> dict:
    return jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))


def test_one_adapter_per_weight_named_by_weight():
    model = _injected()
    assert _lora_shapes(model)["mlp"] == {
        "w_down_lora_a": (F, R),
        "w_down_lora_b": (R, D),
        "w_gate_lora_a": (D, R),
        "w_gate_lora_b": (R, F),
        "w_up_lora_a": (D, R),
        "w_up_lora_b": (R, F),
    }
    assert model.mlp.lora_weights == WEIGHTS
    # Starts equal to the base (B = 0), to rounding of the same sums.
    np.testing.assert_allclose(
        np.asarray(model.mlp(jnp.asarray(X))), _reference({}), rtol=1e-5, atol=1e-6
    )


def test_branch_at_each_product_is_closed_form():
    model = _injected()
    factors = _randomize(model.mlp)
    got = np.asarray(model.mlp(jnp.asarray(X)))
    want = _reference(factors)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # Each weight's adapter is applied at its own product only.
    for name in WEIGHTS:
        solo = _injected()
        a_var, b_var = solo.mlp.factors(name)
        a_var[...], b_var[...] = (jnp.asarray(f) for f in factors[name])
        one = np.asarray(solo.mlp(jnp.asarray(X)))
        ref = _reference({name: factors[name]})
        np.testing.assert_allclose(one, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_merge_equals_unmerged_and_gives_the_plain_module():
    model = _injected()
    _randomize(model.mlp)
    before = np.asarray(model(jnp.asarray(X)))
    jnnx.merge(model)
    assert type(model.mlp) is GatedMLP
    assert not nnx.state(model, nnx.LoRAParam)
    after = np.asarray(model(jnp.asarray(X)))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_freeze_with_optax_trains_every_adapter_and_keeps_the_base_bit_identical():
    model = _injected()
    base = {n: np.asarray(getattr(model.mlp, n)[...]).copy() for n in WEIGHTS}
    head = np.asarray(model.head.kernel[...]).copy()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    target = jnp.ones((2, 3, 3))

    losses = [float(nnx_lora_step(model, optimizer, jnp.asarray(X), target)[0]) for _ in range(5)]
    assert losses[-1] < losses[0]
    for name in WEIGHTS:
        np.testing.assert_array_equal(np.asarray(getattr(model.mlp, name)[...]), base[name])
        assert np.abs(np.asarray(model.mlp.factors(name)[1][...])).max() > 0  # B trained
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), head)


def test_bf16_compute_with_fp32_adapters():
    model = _injected(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(f.dtype == jnp.float32 for n in WEIGHTS for f in model.mlp.factors(n))
    factors = _randomize(model.mlp)
    got = model.mlp(jnp.asarray(X, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    want = _reference(factors)
    # bf16 has 8 bits of mantissa: a few 2^-8 of the output scale through three products.
    assert np.abs(np.asarray(got, np.float32) - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize(
    "entries,adapted,names",
    [
        (["mlp.w_gate"], ("w_gate",), ("lora_a", "lora_b")),
        (["mlp.w_gate", "w_down"], ("w_down", "w_gate"), None),
    ],
    ids=["one-weight-keeps-lora_a", "two-weights"],
)
def test_target_parameters_chooses_weights_by_name(entries, adapted, names):
    config = LoRAConfig(r=R, alpha=ALPHA, targets=[], target_parameters=entries)
    model = _injected(config)
    assert model.mlp.lora_weights == adapted
    keys = set(_lora_shapes(model)["mlp"])
    want = {*names} if names else {f"{w}_lora_{x}" for w in adapted for x in "ab"}
    assert keys == want
    assert "head" not in _lora_shapes(model)
    factors = _randomize(model.mlp)
    want_y = _reference(factors)
    np.testing.assert_allclose(
        np.asarray(model.mlp(jnp.asarray(X))), want_y, rtol=1e-5, atol=1e-5 * np.abs(want_y).max()
    )


def test_target_parameters_round_trips_through_peft_config():
    config = LoRAConfig(r=R, alpha=ALPHA, targets=[], target_parameters=["mlp.w_gate"])
    assert config.to_peft()["target_parameters"] == ["mlp.w_gate"]
    assert LoRAConfig.from_peft(config.to_peft()) == config
    assert "target_parameters" not in LoRAConfig(targets=["q"]).to_peft()


class Shared(nnx.Module):  # one weight in two products; a scale used elementwise
    def __init__(self):
        self.w = nnx.Param(jnp.asarray(BASE["w_gate"]))
        self.v = nnx.Param(jnp.asarray(BASE["w_up"]))
        self.scale = nnx.Param(jnp.ones((F,)))

    def __call__(self, x):
        return (x @ self.w[...] + jnp.einsum("btd,df->btf", x, self.w[...])) * self.scale[...] + (
            x @ self.v[...]
        )


class SharedModel(nnx.Module):
    def __init__(self):
        self.mlp = Shared()

    def __call__(self, x):
        return self.mlp(x)


REFUSALS = {
    "typo": (
        Block,
        LoRAConfig(r=R, targets=[], target_parameters=["mlp.w_gat"]),
        r"target_parameters entry 'mlp.w_gat' matches no weight .*mlp\.w_gate",
    ),
    "bad-entry": (Block, None, r"non-empty string naming a weight .*got \[''\]"),
    "known-kind": (
        Block,
        LoRAConfig(r=R, targets=[], target_parameters=["head.kernel"]),
        r"layer 'head' is a Linear, adapted as a layer of its own kind",
    ),
    "not-a-product": (
        SharedModel,
        LoRAConfig(r=R, targets=[], target_parameters=["mlp.scale"]),
        r"layer 'mlp', weight 'scale' \(12,\): used only by broadcast_in_dim; target_param",
    ),
    "two-products": (
        SharedModel,
        LoRAConfig(r=R, targets=["mlp"]),
        r"layer 'mlp', weight 'w' \(8, 12\): used by 2 products",
    ),
    "two-products-by-name": (
        SharedModel,
        LoRAConfig(r=R, targets=[], target_parameters=["mlp.w"]),
        r"layer 'mlp', weight 'w' \(8, 12\): used by 2 products",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_change_nothing(case):
    make, config, message = REFUSALS[case]
    if config is None:
        with pytest.raises(ValueError, match=message):
            LoRAConfig(r=R, targets=[], target_parameters=["w_gate", ""])
        return
    model = make()
    before = nnx.to_pure_dict(nnx.state(model))
    with pytest.raises(ValueError, match=message):
        jnnx.inject(model, config, nnx.Rngs(0), inputs=(jnp.asarray(X),))
    assert type(model.mlp) in (GatedMLP, Shared)
    after = nnx.to_pure_dict(nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, after, before)


def test_single_weight_properties_refuse_a_multi_weight_module():
    model = _injected()
    with pytest.raises(ValueError, match=r"several adapted weights \['w_down', 'w_gate', 'w_up'\]"):
        _ = model.mlp.lora_weight
    assert type(model.mlp).__name__ == "LoRAGatedMLP"


def test_files_round_trip_exactly_and_map_each_weight(tmp_path):
    model = _injected()
    factors = _randomize(model.mlp)
    path_map = {f"mlp.{w}": f"mlp.{w.removeprefix('w_')}_proj" for w in WEIGHTS}
    jnnx.save_adapter(model, tmp_path, path_map=path_map)
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for w in WEIGHTS:
        key = f"base_model.model.mlp.{w.removeprefix('w_')}_proj"
        np.testing.assert_array_equal(tensors[f"{key}.lora_A.weight"], factors[w][0].T)
        np.testing.assert_array_equal(tensors[f"{key}.lora_B.weight"], factors[w][1].T)
    other = _injected()
    jnnx.load_adapter(other, tmp_path, path_map=path_map)
    for w in WEIGHTS:
        for got, want in zip(other.mlp.factors(w), factors[w], strict=True):
            np.testing.assert_array_equal(np.asarray(got[...]), want)
    assert other.mlp.alpha == ALPHA


def test_load_refuses_different_alphas_for_one_module(tmp_path):
    model = _injected()
    _randomize(model.mlp)
    jnnx.save_adapter(model, tmp_path)
    import json

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"mlp.w_up": 5.0}
    # The weights file embeds its config: both are rewritten through the writer.
    from jaxlora.adapter import write_adapter

    tensors = load_tensors(tmp_path)
    write_adapter(tmp_path, tensors, config)
    other = _injected()
    before = nnx.to_pure_dict(nnx.state(other, nnx.Param))
    with pytest.raises(ValueError, match="different alphas"):
        jnnx.load_adapter(other, tmp_path)
    after = nnx.to_pure_dict(nnx.state(other, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert other.mlp.alpha == ALPHA


def load_tensors(directory):
    from safetensors.numpy import load_file

    return load_file(directory / "adapter_model.safetensors")


Rule = functools.partial(QwixRule, module_path="mlp", rank=R, alpha=ALPHA)


@pytest.mark.parametrize("weights", [WEIGHTS, ("w_up",)], ids=["all", "one"])
def test_from_qwix_reads_a_multi_weight_state(weights):
    rng = np.random.default_rng(3)
    shapes = {"w_gate": ((D, R), (R, F)), "w_up": ((D, R), (R, F)), "w_down": ((F, R), (R, D))}
    factors = {w: tuple(rng.normal(size=s).astype(np.float32) for s in shapes[w]) for w in weights}
    lora = {
        "mlp": {
            f"{w}{suffix}": f
            for w in weights
            for suffix, f in zip(("_lora_a", "_lora_b"), factors[w], strict=True)
        }
    }
    model = Block()
    jnnx.from_qwix(model, lora, [Rule()], inputs=(jnp.asarray(X),))
    assert model.mlp.lora_weights == tuple(sorted(weights))
    want = _reference(factors)  # qwix's scaling: alpha / rank
    got = np.asarray(model.mlp(jnp.asarray(X)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


class _Stacked(nnx.Module):
    """Two GatedMLP layers built by nnx.vmap (each weight stacked in front), run by nnx.scan."""

    def __init__(self):
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(scale):
            mlp = GatedMLP()
            for name in WEIGHTS:
                getattr(mlp, name)[...] = getattr(mlp, name)[...] * scale
            return mlp

        self.layers = make(jnp.asarray([1.0, -0.5]))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, mlp):
            return x + mlp(x)

        return body(x, self.layers)


def test_a_stack_of_multi_weight_modules_gets_per_layer_adapters_per_weight(tmp_path):
    """Several adapted weights in a module of an nnx.vmap stack run by nnx.scan: each weight's
    factors carry the layer axis; outputs, merge and the per-layer file keys
    ('layers.1.w_up') equal the closed form of each layer's own adapters."""
    model = _Stacked()
    config = LoRAConfig(r=R, alpha=ALPHA, targets=["layers"])
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(jnp.asarray(X),))
    mlp = model.layers
    assert mlp.w_gate_lora_a.shape == (2, D, R) and mlp.w_down_lora_b.shape == (2, R, D)
    for i, name in enumerate(WEIGHTS):  # non-zero B, distinct per weight and layer
        var_b = getattr(mlp, f"{name}_lora_b")
        var_b[...] = jax.random.normal(jax.random.key(i), var_b.shape) * 0.3
    factors = {
        layer: {
            n: tuple(np.asarray(getattr(mlp, f"{n}_lora_{f}")[...])[layer] for f in "ab")
            for n in WEIGHTS
        }
        for layer in range(2)
    }
    x = X.astype(np.float64)
    for layer, sign in enumerate((1.0, -0.5)):
        base = {n: BASE[n] * sign for n in WEIGHTS}

        def product(inp, name, layer=layer, base=base):
            a, b = factors[layer][name]
            return inp @ base[name] + S * (inp @ a) @ b

        x = x + product(silu(product(x, "w_gate")) * product(x, "w_up"), "w_down")
    got = np.asarray(model(jnp.asarray(X)), np.float64)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5 * np.abs(x).max())

    jnnx.save_adapter(model, tmp_path, config)
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.layers.1.w_up.lora_A.weight"
    np.testing.assert_array_equal(tensors[key], factors[1]["w_up"][0].T)

    jnnx.merge(model)
    assert type(model.layers) is GatedMLP
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(X))), x, rtol=1e-5, atol=1e-5 * np.abs(x).max()
    )
