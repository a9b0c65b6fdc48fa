"""Issue 15 on the JAX side: unusual models and bad inputs give the right numbers or a clear
refusal that changes nothing (Linen inject/intercept/merge/freeze_base, NNX inject/merge)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
import jaxlora.nnx
from _loracore.config import INITS
from jaxlora.merge import fingerprint
from jaxlora.nnx import LoRAConv, LoRAEmbed, LoRALinear, LoRALinearGeneral

X = jax.random.normal(jax.random.key(7), (3, 6))


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _lora_linear_reference(x, kernel, bias, a, b, scale) -> np.ndarray:
    """x @ K + bias + scale · (x @ a) @ b, in float64."""
    x = _np(x)
    out = x @ _np(kernel) + scale * (x @ _np(a)) @ _np(b)
    return out if bias is None else out + _np(bias)


# NNX: subclasses with their own forward ------------------------------------------------


class Doubled(nnx.Linear):
    def __call__(self, x):
        return 2 * super().__call__(x)


class Renamed(nnx.Linear):  # no forward of its own: the LoRA layer computes the same thing
    pass


class Pair(nnx.Module):
    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, x):
        return self.second(self.first(x))


def test_nnx_refuses_a_linear_subclass_with_its_own_call_and_changes_nothing():
    model = Pair(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), Doubled(6, 4, rngs=nnx.Rngs(1)))
    before = model(X)
    config = jaxlora.LoRAConfig(r=2, targets=["first", "second"])
    with pytest.raises(TypeError, match=r"layer 'second' is a Doubled, an nnx.Linear subclass "):
        jaxlora.nnx.inject(model, config, nnx.Rngs(2))
    assert type(model.first) is nnx.Linear and type(model.second) is Doubled
    assert not hasattr(model, "lora_config")
    np.testing.assert_array_equal(model(X), before)


def test_nnx_accepts_a_linear_subclass_without_its_own_call():
    model = Pair(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), Renamed(6, 4, rngs=nnx.Rngs(1)))
    jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, alpha=6, targets=["second"]), nnx.Rngs(2))
    layer = model.second
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), layer.lora_b.shape)
    h = _np(model.first(X))
    leaves = [layer.kernel[...], layer.bias[...], layer.lora_a[...], layer.lora_b[...]]
    expected = _lora_linear_reference(h, *leaves, 3.0)
    np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "base",
    [
        lambda: type("MyConv", (nnx.Conv,), {})(3, 4, (3,), rngs=nnx.Rngs(0)),
        lambda: type("MyEmbed", (nnx.Embed,), {})(10, 4, rngs=nnx.Rngs(0)),
        lambda: type("MyGeneral", (nnx.LinearGeneral,), {})(6, (2, 2), rngs=nnx.Rngs(0)),
    ],
    ids=["conv", "embed", "linear_general"],
)
def test_nnx_names_a_subclass_of_the_other_kinds_as_such(base):
    model = Pair(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), base())
    with pytest.raises(TypeError, match=r"layer 'second' is a My\w+ \(a subclass of nnx\.\w+\)"):
        config = jaxlora.LoRAConfig(r=1, targets=["first", "second"])
        jaxlora.nnx.inject(model, config, nnx.Rngs(1))
    assert type(model.first) is nnx.Linear


# NNX: tied layers ------------------------------------------------------------------


class Tied(nnx.Module):
    def __init__(self):
        self.a = nnx.Linear(6, 6, rngs=nnx.Rngs(0))
        self.b = self.a  # one module object under two paths
        self.head = nnx.Linear(6, 2, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.head(self.b(jax.nn.relu(self.a(x))))


def test_nnx_inject_keeps_a_tie_and_merge_too():
    model = Tied()
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["a", "b"])
    jaxlora.nnx.inject(model, config, nnx.Rngs(2))
    assert isinstance(model.a, LoRALinear) and model.a is model.b
    layer = model.a
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), layer.lora_b.shape)
    leaves = [layer.kernel[...], layer.bias[...], layer.lora_a[...], layer.lora_b[...]]
    h = np.maximum(_lora_linear_reference(X, *leaves, 2.0), 0)
    h = _lora_linear_reference(h, *leaves, 2.0)
    expected = h @ _np(model.head.kernel[...]) + _np(model.head.bias[...])
    np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-5)
    assert jaxlora.nnx.trainable_parameters(model).trainable == 2 * (6 + 6)  # one adapter

    jaxlora.nnx.merge(model)
    assert type(model.a) is nnx.Linear and model.a is model.b
    np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-5)


def test_nnx_inject_refuses_a_tie_targeted_under_one_path_and_changes_nothing():
    model = Tied()
    before = model(X)
    with pytest.raises(ValueError, match=r"reachable \(tied\) as 'a', 'b'.*match only \['a'\]"):
        jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["a", "head"]), nnx.Rngs(0))
    config = jaxlora.LoRAConfig(r=2, targets=["a", "b"], rank_pattern={"b": 1})
    with pytest.raises(ValueError, match=r"tied.*different \(r, alpha\)"):
        jaxlora.nnx.inject(model, config, nnx.Rngs(0))
    assert type(model.a) is nnx.Linear and type(model.head) is nnx.Linear
    np.testing.assert_array_equal(model(X), before)


class LinenTied(nn.Module):
    def setup(self):
        self.a = nn.Dense(6)
        self.b = self.a

    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))


def test_linen_has_one_params_path_for_a_tied_layer_and_adapts_every_call():
    model = LinenTied()
    variables = model.init(jax.random.key(0), X)
    assert list(variables["params"]) == ["a"]  # Linen ties by scope: no second copy to break
    with pytest.raises(ValueError, match="match no layer; the layer paths are: a"):
        jaxlora.inject(variables, jaxlora.LoRAConfig(r=2, targets=["b"]), jax.random.key(1))
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["a"])
    lora = jaxlora.inject(variables, config, jax.random.key(1))
    p = lora["params"]["a"]
    p["lora_b"] = jax.random.normal(jax.random.key(2), p["lora_b"].shape)
    with jaxlora.intercept(config):
        y = model.apply(lora, X)
    leaves = [p["kernel"], p["bias"], p["lora_a"], p["lora_b"]]
    h = np.maximum(_lora_linear_reference(X, *leaves, 2.0), 0)
    np.testing.assert_allclose(y, _lora_linear_reference(h, *leaves, 2.0), rtol=1e-5, atol=1e-5)


# Linen: subclasses under intercept -------------------------------------------------


class PostDense(nn.Dense):
    """Calls nn.Dense's forward through super() and then does something of its own."""

    @nn.compact
    def __call__(self, x):
        return jax.nn.relu(super().__call__(x)) - 0.5


class OwnDense(nn.Dense):
    """Computes its own product from the kernel: intercept cannot add the branch to it."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        return jnp.tanh(x @ kernel)


def _linen_adapted(layer, r, alpha, use_rslora=False):
    model = nn.Sequential([layer])
    variables = model.init(jax.random.key(0), X)
    config = jaxlora.LoRAConfig(r=r, alpha=alpha, use_rslora=use_rslora, targets=["layers_0"])
    lora = jaxlora.inject(variables, config, jax.random.key(1))
    p = lora["params"]["layers_0"]
    p["lora_b"] = jax.random.normal(jax.random.key(2), p["lora_b"].shape)
    return model, config, lora, p


@settings(max_examples=15, deadline=None)
@given(r=st.integers(1, 4), alpha=st.sampled_from([None, 1.0, 8.0]), rslora=st.booleans())
def test_linen_dense_subclass_calling_super_gets_the_branch_exactly_once(r, alpha, rslora):
    model, config, lora, p = _linen_adapted(PostDense(5), r, alpha, rslora)
    with jaxlora.intercept(config):
        y = model.apply(lora, X)
    scale = jaxlora.scaling(r, alpha, use_rslora=rslora)
    inner = _lora_linear_reference(X, p["kernel"], p["bias"], p["lora_a"], p["lora_b"], scale)
    np.testing.assert_allclose(y, np.maximum(inner, 0) - 0.5, rtol=1e-5, atol=1e-5)
    merged = jaxlora.merge(lora, alpha=alpha, use_rslora=rslora)
    np.testing.assert_allclose(model.apply(merged, X), y, rtol=1e-5, atol=1e-5)


def test_linen_dense_subclass_with_its_own_product_is_refused_when_called():
    model, config, lora, _ = _linen_adapted(OwnDense(5), 2, 4.0)
    with jaxlora.intercept(config):
        with pytest.raises(
            ValueError,
            match=r"layer 'layers_0' is a OwnDense holding LoRA leaves whose __call__ never "
            r"calls Dense.__call__",
        ):
            model.apply(lora, X)
        with pytest.raises(ValueError, match="never calls Dense.__call__"):
            jax.jit(model.apply)(lora, X)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: jaxlora.LoRADense(5, 2, 4.0),
        lambda: jaxlora.LoRADenseGeneral((2, 3), r=2, alpha=4.0),
    ],
    ids=["LoRADense", "LoRADenseGeneral"],
)
def test_jaxlora_linen_layers_are_left_alone_by_intercept(layer):
    model = nn.Sequential([layer()])
    variables = model.init(jax.random.key(0), X)
    p = variables["params"]["layers_0"]
    p["lora_b"] = jax.random.normal(jax.random.key(2), p["lora_b"].shape)
    plain = model.apply(variables, X)
    with jaxlora.intercept(jaxlora.LoRAConfig(r=2, alpha=4.0, targets=["layers_0"])):
        np.testing.assert_allclose(model.apply(variables, X), plain, rtol=1e-6, atol=1e-6)
    flat_b = _np(p["lora_b"]).reshape(2, -1)
    expected = _lora_linear_reference(
        X, _np(p["kernel"]).reshape(6, -1), _np(p["bias"]).reshape(-1), p["lora_a"], flat_b, 2.0
    )
    np.testing.assert_allclose(_np(plain).reshape(3, -1), expected, rtol=1e-5, atol=1e-5)


# Linen: variables with other collections -------------------------------------------


class Normed(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(6, name="proj")(x)
        return nn.BatchNorm(use_running_average=not train, name="norm")(x)


def test_linen_inject_adapts_only_the_params_collection():
    model = Normed()
    variables = model.init(jax.random.key(0), X)
    # A collection holding its own copy of a layer (e.g. an EMA of the weights) must not be
    # adapted: the model reads LoRA only from 'params'.
    variables = {**variables, "ema": {"proj": dict(variables["params"]["proj"])}}
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["proj"])
    lora = jaxlora.inject(variables, config, jax.random.key(1))
    assert set(lora) == {"params", "batch_stats", "ema"}
    assert set(lora["params"]["proj"]) == {"kernel", "bias", "lora_a", "lora_b"}
    assert lora["batch_stats"] is variables["batch_stats"] and lora["ema"] is variables["ema"]
    assert set(lora["ema"]["proj"]) == {"kernel", "bias"}
    with pytest.raises(ValueError, match=r"the layer paths are: proj, norm") as error:
        jaxlora.inject(variables, jaxlora.LoRAConfig(r=2, targets=["nope"]), jax.random.key(1))
    assert "batch_stats" not in str(error.value) and "ema" not in str(error.value)

    p = lora["params"]["proj"]
    p["lora_b"] = jax.random.normal(jax.random.key(2), p["lora_b"].shape)
    with jaxlora.intercept(config):
        y, updates = model.apply(lora, X, train=True, mutable=["batch_stats"])
    h = _lora_linear_reference(X, p["kernel"], p["bias"], p["lora_a"], p["lora_b"], 2.0)
    mean = updates["batch_stats"]["norm"]["mean"]
    np.testing.assert_allclose(mean, 0.01 * h.mean(0), rtol=1e-5, atol=1e-6)  # momentum 0.99
    normed = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
    np.testing.assert_allclose(y, normed, rtol=1e-4, atol=1e-4)


# freeze_base: the params tree changed since init ------------------------------------


def test_freeze_base_refuses_a_tree_changed_since_init_eagerly_and_under_jit():
    model = Normed()
    variables = model.init(jax.random.key(0), X)
    config = jaxlora.LoRAConfig(r=2, targets=["proj"])
    first = jaxlora.inject(variables, config, jax.random.key(1))["params"]
    tx = jaxlora.freeze_base(optax.adam(1e-2))
    state = tx.init(first)
    # A layer injected after tx.init: a different tree, and the state was not re-made.
    extra = {"kernel": jnp.ones((6, 2)), "lora_a": jnp.ones((6, 1)), "lora_b": jnp.ones((1, 2))}
    other = {**first, "extra": extra}
    message = r"added: \['extra'\]\['kernel'\].*The params tree changed since tx.init"
    with pytest.raises(ValueError, match=message):
        tx.update(other, state, other)
    with pytest.raises(ValueError, match=message):
        jax.jit(tx.update)(other, state, other)
    updates, _ = jax.jit(tx.update)(first, state, first)  # the unchanged tree still works
    assert float(jnp.abs(updates["proj"]["kernel"]).sum()) == 0.0
    assert float(jnp.abs(updates["proj"]["lora_a"]).sum()) > 0.0


# Bad rng / rngs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "rng",
    [None, 3, jnp.ones(2), jnp.zeros(3, jnp.uint32), jax.random.split(jax.random.key(0))],
    ids=["None", "int", "float_array", "wrong_shape", "several_keys"],
)
def test_linen_inject_refuses_a_bad_rng(rng):
    variables = Normed().init(jax.random.key(0), X)
    with pytest.raises(TypeError, match=r"inject: rng must be a jax.random.key\(seed\) or "):
        jaxlora.inject(variables, jaxlora.LoRAConfig(r=2, targets=["proj"]), rng)


def test_linen_inject_takes_typed_and_raw_keys_alike():
    variables = Normed().init(jax.random.key(0), X)
    config = jaxlora.LoRAConfig(r=2, targets=["proj"])
    typed = jaxlora.inject(variables, config, jax.random.key(5))
    raw = jaxlora.inject(variables, config, jax.random.PRNGKey(5))
    jax.tree.map(np.testing.assert_array_equal, typed, raw)


@pytest.mark.parametrize("rngs", [None, 0, jax.random.key(0)], ids=["None", "int", "key"])
def test_nnx_refuses_bad_rngs_and_changes_nothing(rngs):
    model = Pair(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 4, rngs=nnx.Rngs(1)))
    with pytest.raises(TypeError, match=r"inject: rngs must be an nnx.Rngs \(e.g. nnx.Rngs\(0\)\)"):
        jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["first"]), rngs)
    assert type(model.first) is nnx.Linear and not hasattr(model, "lora_config")
    with pytest.raises(TypeError, match=r"from_linear: rngs must be an nnx.Rngs"):
        LoRALinear.from_linear(model.first, r=2, rngs=rngs)
    with pytest.raises(TypeError, match=r"LoRAConv.from_base: rngs must be an nnx.Rngs"):
        LoRAConv.from_base(nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0)), r=2, rngs=rngs)


# NNX init names ----------------------------------------------------------------------


def _bases():
    return {
        LoRALinearGeneral: nnx.LinearGeneral(6, (2, 3), rngs=nnx.Rngs(0)),
        LoRAConv: nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0)),
        LoRAEmbed: nnx.Embed(10, 4, rngs=nnx.Rngs(0)),
    }


@pytest.mark.parametrize("init", ["kaimin", "Kaiming", "pisa", "", None])
def test_nnx_layers_refuse_a_misspelled_init_naming_the_allowed_values(init):
    linear = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    allowed = str(INITS).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"from_linear: init must be one of {allowed}, got"):
        LoRALinear.from_linear(linear, r=2, init=init, rngs=nnx.Rngs(1))
    for cls, base in _bases().items():
        with pytest.raises(ValueError, match=rf"{cls.__name__}.from_base: init must be one of "):
            cls.from_base(base, r=2, init=init, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"init must be one of \('kaiming', 'gaussian'\)"):
        LoRAEmbed(10, 4, r=2, init=init, rngs=nnx.Rngs(0))


def test_nnx_embed_and_conv_refuse_weight_inits_naming_the_allowed_values():
    for cls in (LoRAConv, LoRAEmbed):
        message = r"init must be one of \('kaiming', 'gaussian'\), got 'pissa'"
        with pytest.raises(ValueError, match=message):
            cls.from_base(_bases()[cls], r=2, init="pissa", rngs=nnx.Rngs(1))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_nnx_linear_general_constructed_with_a_weight_init_applies_it(init):
    plain = nnx.LinearGeneral(6, (2, 3), rngs=nnx.Rngs(0))
    layer = LoRALinearGeneral(6, (2, 3), r=2, alpha=4, init=init, rngs=nnx.Rngs(0))
    w0 = _np(plain.kernel[...]).reshape(6, 6)
    delta = 2.0 * _np(layer.lora_a[...]) @ _np(layer.lora_b[...]).reshape(2, 6)
    residual = _np(layer.kernel[...]).reshape(6, 6)
    np.testing.assert_allclose(residual + delta, w0, atol=1e-5)  # the output is unchanged
    assert np.linalg.matrix_rank(delta) == 2 and np.abs(delta).max() > 0.1  # not kaiming's B = 0
    if init == "pissa":  # the adapter takes the top-2 singular directions off the residual
        singular = np.linalg.svd(residual, compute_uv=False)[:4]
        np.testing.assert_allclose(singular, np.linalg.svd(w0, compute_uv=False)[2:], atol=1e-5)
    np.testing.assert_allclose(layer(X), plain(X), rtol=1e-5, atol=1e-5)


# unmerge: only what merge produced ------------------------------------------------------


def _two_layer_lora():
    model = nn.Sequential([nn.Dense(6), nn.Dense(4)])
    variables = model.init(jax.random.key(0), X)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["layers_0", "layers_1"])
    lora = jaxlora.inject(variables, config, jax.random.key(1))
    for name in ("layers_0", "layers_1"):
        p = lora["params"][name]
        p["lora_b"] = jax.random.normal(jax.random.key(2), p["lora_b"].shape)
    return lora


def test_unmerge_refuses_a_tree_that_merge_did_not_return():
    lora = _two_layer_lora()
    merged, record = jaxlora.merge(lora, alpha=4, record=True)
    adapter, base = jaxlora.split(lora)
    with pytest.raises(ValueError, match=r"layer 'layers_0': the kernel is not the one merge "):
        jaxlora.unmerge(base, record)  # never merged
    other, _ = jaxlora.merge(lora, alpha=8, record=True)  # merged with another alpha
    with pytest.raises(ValueError, match="the kernel is not the one merge returned"):
        jaxlora.unmerge(other, record)
    changed = jax.tree.map(lambda v: v, merged)
    kernel = changed["params"]["layers_1"]["kernel"]
    changed["params"]["layers_1"]["kernel"] = kernel.at[0, 0].add(1e-3)
    with pytest.raises(ValueError, match=r"layer 'layers_1': the kernel is not the one merge"):
        jaxlora.unmerge(changed, record)  # changed after the merge
    with pytest.raises(TypeError, match=r"unmerge needs the record that merge\(params, alpha="):
        jaxlora.unmerge(merged, adapter)  # the old (adapter, alpha) call's positional half
    restored = jaxlora.unmerge(merged, record)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), restored, lora)


def test_merge_record_passes_through_jit_and_a_wrong_tree_unmerges_to_nan_there():
    lora = _two_layer_lora()
    merged, record = jax.jit(lambda p: jaxlora.merge(p, alpha=4, record=True))(lora)
    plain = jax.jit(lambda p: jaxlora.merge(p, alpha=4))(lora)  # still a plain tree
    jax.tree.map(np.testing.assert_array_equal, plain, merged)
    restored = jax.jit(jaxlora.unmerge)(merged, record)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), restored, lora)
    _, base = jaxlora.split(lora)
    wrong = jax.jit(jaxlora.unmerge)(base, record)  # cannot raise inside jit: never shifted
    assert np.isnan(_np(wrong["params"]["layers_0"]["kernel"])).all()
    assert np.isnan(_np(wrong["params"]["layers_1"]["kernel"])).all()


@settings(max_examples=25, deadline=None)
@given(
    index=st.integers(0, 35),
    value=st.floats(-1e3, 1e3, allow_nan=False, width=32),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
)
def test_fingerprint_changes_with_any_one_element_and_is_the_same_under_jit(index, value, dtype):
    x = jax.random.normal(jax.random.key(0), (6, 6)).astype(dtype)
    assert int(fingerprint(x)) == int(jax.jit(fingerprint)(x))
    y = x.reshape(-1).at[index].set(value).reshape(6, 6)
    same_bits = np.asarray(x).view(np.uint8).tobytes() == np.asarray(y).view(np.uint8).tobytes()
    assert (int(fingerprint(y)) == int(fingerprint(x))) == same_bits


@settings(max_examples=10, deadline=None)
@given(r=st.integers(1, 4), alpha=st.sampled_from([None, 0.5, 16.0]), rslora=st.booleans())
def test_merge_then_unmerge_restores_any_config(r, alpha, rslora):
    model = nn.Sequential([nn.Dense(6), nn.Dense(4)])
    variables = model.init(jax.random.key(0), X)
    targets = ["layers_0", "layers_1"]
    config = jaxlora.LoRAConfig(r=r, alpha=alpha, use_rslora=rslora, targets=targets)
    lora = jaxlora.inject(variables, config, jax.random.key(1))
    for name in ("layers_0", "layers_1"):
        p = lora["params"][name]
        p["lora_b"] = jax.random.normal(jax.random.key(2), p["lora_b"].shape)
    merged, record = jaxlora.merge(lora, alpha=alpha, use_rslora=rslora, record=True)
    scale = jaxlora.scaling(r, alpha, use_rslora=rslora)
    p = lora["params"]["layers_0"]
    expected = _np(p["kernel"]) + scale * _np(p["lora_a"]) @ _np(p["lora_b"])
    np.testing.assert_allclose(merged["params"]["layers_0"]["kernel"], expected, atol=1e-5)
    restored = jaxlora.unmerge(merged, record)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, lora)
