"""Linen paths that used to give silently wrong numbers (issue #13): ``nn.jit``'s trace cache
against ``intercept`` and ``layouts``, nested ``intercept``s, and modules that hold LoRA leaves
but are not layers jaxlora adapts (a FlaxConv1D-style (out, in) kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxlora

X = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)), jnp.float32)
CONFIG = jaxlora.LoRAConfig(r=2, alpha=6, targets=["hidden", "out"])
SCALE = 6 / 2


def _mlp(hidden, out, x):
    return out(jnp.tanh(hidden(x)))


def _models(style: str):
    """(a model whose LoRA layers run under ``nn.jit`` per ``style``, its twin without it).
    Fresh classes per call: nn.jit's trace cache lives with the decorated function."""

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _mlp(nn.Dense(8, name="hidden"), nn.Dense(3, name="out"), x)

    class JitCall(nn.Module):  # the third-party model's pattern: the top-level __call__
        @nn.jit
        @nn.compact
        def __call__(self, x):
            return _mlp(nn.Dense(8, name="hidden"), nn.Dense(3, name="out"), x)

    jit_dense = nn.jit(nn.Dense)

    class JitLayers(nn.Module):  # nn.jit of the layer class itself
        @nn.compact
        def __call__(self, x):
            return _mlp(jit_dense(8, name="hidden"), jit_dense(3, name="out"), x)

    return {"call": JitCall, "layers": JitLayers}[style](), Plain()


def _adapted(model, nonzero_b: bool):
    variables = model.init(jax.random.key(0), X)
    variables = jaxlora.inject(variables, CONFIG, jax.random.key(1))
    if nonzero_b:  # so the branch shows in the output
        variables = jax.tree_util.tree_map_with_path(
            lambda p, v: v + 0.5 if p[-1].key == "lora_b" else v, variables
        )
    return variables


def _numpy_forward(params, lora: bool):
    """The closed form: tanh(x K1 + b1 + s x a1 b1') K2 + b2 + s h a2 b2'."""

    def dense(node, x):
        y = x @ np.asarray(node["kernel"]) + np.asarray(node["bias"])
        if lora:
            y = y + SCALE * (x @ np.asarray(node["lora_a"])) @ np.asarray(node["lora_b"])
        return y

    h = np.tanh(dense(params["hidden"], np.asarray(X)))
    return dense(params["out"], h)


def _loss(model, variables):
    return jnp.mean((model.apply(variables, X) - Y) ** 2)


def _train(model, variables, steps: int = 3):
    """SGD on the LoRA leaves under intercept, inside jax.jit; the loss of each step."""

    @jax.jit
    def step(variables):
        with jaxlora.intercept(CONFIG):
            loss, grads = jax.value_and_grad(lambda v: _loss(model, v))(variables)
        mask = jaxlora.lora_mask(variables)
        new = jax.tree.map(lambda v, g, m: v - 0.5 * g if m else v, variables, grads, mask)
        return new, loss

    losses = []
    for _ in range(steps):
        variables, loss = step(variables)
        losses.append(float(loss))
    return variables, losses


@pytest.mark.parametrize("style", ["call", "layers"])
def test_nn_jit_eval_outside_then_train_inside(style):
    """The reported case: an eval outside intercept cached nn.jit's trace without the branch,
    and the train step inside reused it (loss constant, lora_b stuck at zero)."""
    model, plain = _models(style)
    variables = _adapted(model, nonzero_b=False)
    np.testing.assert_allclose(
        model.apply(variables, X), _numpy_forward(variables["params"], False), atol=1e-5
    )
    trained, losses = _train(model, variables)
    twin, twin_losses = _train(plain, variables)
    np.testing.assert_allclose(losses, twin_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for path in ("hidden", "out"):
        assert np.abs(np.asarray(trained["params"][path]["lora_b"])).max() > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), trained, twin)
    with jaxlora.intercept(CONFIG):
        np.testing.assert_allclose(
            model.apply(trained, X), _numpy_forward(trained["params"], True), atol=1e-5
        )


@pytest.mark.parametrize("style", ["call", "layers"])
def test_nn_jit_inside_then_outside(style):
    """The reverse order: a trace made inside intercept must not add the branch outside."""
    model, _ = _models(style)
    variables = _adapted(model, nonzero_b=True)
    params = variables["params"]
    with jaxlora.intercept(CONFIG):
        np.testing.assert_allclose(
            model.apply(variables, X), _numpy_forward(params, True), atol=1e-5
        )
    np.testing.assert_allclose(model.apply(variables, X), _numpy_forward(params, False), atol=1e-5)
    with jaxlora.intercept(CONFIG):  # and back: the traced-with-branch one again
        np.testing.assert_allclose(
            jax.jit(model.apply)(variables, X), _numpy_forward(params, True), atol=1e-5
        )


def test_nn_jit_traces_follow_the_config():
    """Two configs with different alphas give two traces (the scale is traced in)."""
    model, _ = _models("call")
    variables = _adapted(model, nonzero_b=True)
    other = jaxlora.LoRAConfig(r=2, alpha=2, targets=CONFIG.targets)
    with jaxlora.intercept(CONFIG):
        y = model.apply(variables, X)
    with jaxlora.intercept(other):
        y_other = model.apply(variables, X)
    np.testing.assert_allclose(y, _numpy_forward(variables["params"], True), atol=1e-5)
    assert not np.allclose(y, y_other)


@pytest.mark.parametrize("style", ["call", "layers"])
def test_layouts_after_init_and_twice(style):
    """layouts() after model.init (which cached nn.jit's trace) returned {}."""
    model, plain = _models(style)
    model.init(jax.random.key(0), X)
    expected = {"hidden": jaxlora.Layout("linear", 1, 2), "out": jaxlora.Layout("linear", 1, 2)}
    assert jaxlora.layouts(model, X) == expected
    assert jaxlora.layouts(model, X) == expected
    assert jaxlora.layouts(plain, X) == expected


def test_nested_intercept_is_refused():
    """Two intercepts around one call added each branch twice."""
    model, _ = _models("call")
    variables = _adapted(model, nonzero_b=True)
    with jaxlora.intercept(CONFIG):
        y = model.apply(variables, X)
        with pytest.raises(ValueError, match="already active"), jaxlora.intercept(CONFIG):
            pass
    np.testing.assert_allclose(y, _numpy_forward(variables["params"], True), atol=1e-5)
    with jaxlora.intercept(CONFIG):  # the refused one left nothing behind
        np.testing.assert_allclose(model.apply(variables, X), y, atol=1e-6)


class Conv1D(nn.Module):
    """Hugging Face's FlaxConv1D: kernel (out, in), used as x @ kernelᵀ."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.5), (self.features, x.shape[-1]))
        return x @ kernel.T


class SetupConv1D(nn.Module):
    features: int

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.normal(0.5), (self.features, 4))

    def __call__(self, x):
        return x @ self.kernel.T


class Compact(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="proj")(Conv1D(6, name="c_attn")(x))


class Setup(nn.Module):
    def setup(self):
        self.c_attn = SetupConv1D(6)
        self.proj = nn.Dense(3)

    def __call__(self, x):
        return self.proj(self.c_attn(x))


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="proj")(nn.remat(Conv1D)(6, name="c_attn")(x))


class JitCall(nn.Module):
    @nn.jit
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="proj")(Conv1D(6, name="c_attn")(x))


CONV1D = {"compact": Compact, "setup": Setup, "remat": Remat, "jit_call": JitCall}
C_ATTN = jaxlora.LoRAConfig(r=2, targets=["c_attn"])


@pytest.mark.parametrize("how", ["eager", "jax.jit"])
@pytest.mark.parametrize("name", list(CONV1D))
def test_unsupported_module_holding_lora_refuses_the_call(name, how):
    """inject guesses a Dense (in, out) layout for a 2-D kernel; the call then refuses, naming
    the path and class, whatever ran before (nn.jit: an eval outside intercept first)."""
    model = CONV1D[name]()
    variables = model.init(jax.random.key(0), X)
    lora = jaxlora.inject(variables, C_ATTN, jax.random.key(1))
    np.testing.assert_array_equal(model.apply(lora, X), model.apply(variables, X))
    apply = jax.jit(model.apply) if how == "jax.jit" else model.apply
    with pytest.raises(ValueError, match=r"layer 'c_attn' is a \w*Conv1D holding LoRA leaves"):
        with jaxlora.intercept(C_ATTN):
            apply(lora, X)


@pytest.mark.parametrize("name", list(CONV1D))
def test_inject_with_layouts_adapts_conv1d_at_its_product(name):
    """With layouts (the inputs), a FlaxConv1D-style module is adapted at the product its
    (out, in) kernel enters (jaxlora.product): lora_a (in, r), lora_b (r, out), never a guessed
    Dense layout. (Until op-level LoRA, inject refused it here.)"""
    model = CONV1D[name]()
    variables = model.init(jax.random.key(0), X)
    layouts = jaxlora.layouts(model, X)
    assert set(layouts) == {"proj", "c_attn"}
    assert layouts["c_attn"].roles.matches(jaxlora.oplevel.Roles((6, 4), (), (1,), (0,)))
    both = jaxlora.inject(
        variables,
        jaxlora.LoRAConfig(r=2, targets=["proj", "c_attn"]),
        jax.random.key(1),
        layouts=layouts,
    )
    assert jnp.shape(both["params"]["proj"]["lora_a"]) == (6, 2)
    assert jnp.shape(both["params"]["c_attn"]["lora_a"]) == (4, 2)
    assert jnp.shape(both["params"]["c_attn"]["lora_b"]) == (2, 6)


def test_inject_with_layouts_that_miss_a_layer_refuses():
    """A hand-written layouts dict that does not describe a matched layer: no guess either."""
    model = Compact()
    variables = model.init(jax.random.key(0), X)
    layouts = {"c_attn": jaxlora.Layout("linear", 1, 2)}
    with pytest.raises(TypeError, match="layer 'proj' holds .* layouts given do not describe it"):
        jaxlora.inject(
            variables, jaxlora.LoRAConfig(r=2, targets=["proj"]), jax.random.key(1), layouts=layouts
        )


class ScanBody(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return Conv1D(4, name="c_attn")(h), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        return stack(name="blocks")(x, None)[0]


def test_scanned_conv1d_is_adapted_at_its_product_and_dense_leaves_there_refuse_the_call():
    """With layouts, a stacked (L, out, in) Conv1D kernel is adapted at its product, one
    layer's adapter stacked in front (lora_a (L, in, r), lora_b (L, r, out)), and computes
    each layer's x @ (kernelᵀ + s·a b) (it was refused before op-level adapters in scans); a
    tree that has Dense-layout LoRA leaves there (written by hand or by another tool, no
    lora_roles) is refused when called inside the scan."""
    model = Scanned()
    variables = model.init(jax.random.key(0), X)
    config = jaxlora.LoRAConfig(r=2, targets=["blocks.c_attn"])
    adapted = jaxlora.inject(
        variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, X)
    )
    layer = adapted["params"]["blocks"]["c_attn"]
    assert (jnp.shape(layer["lora_a"]), jnp.shape(layer["lora_b"])) == ((2, 4, 2), (2, 2, 4))
    b = np.random.default_rng(1).standard_normal((2, 2, 4))
    layer["lora_b"] = jnp.asarray(b, jnp.float32)
    kernel, a = (np.asarray(layer[n], np.float64) for n in ("kernel", "lora_a"))
    want = np.asarray(X, np.float64)
    for i in range(2):
        want = want @ kernel[i].T + (want @ a[i]) @ b[i]
    with jaxlora.intercept(config):
        got = jax.jit(model.apply)(adapted, X)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    node = variables["params"]["blocks"]["c_attn"]
    lora = {"lora_a": jnp.ones((2, 4, 2)), "lora_b": jnp.ones((2, 2, 4))}
    params = {"blocks": {"c_attn": {**node, **lora}}}
    with pytest.raises(ValueError, match=r"layer 'blocks.c_attn' is a Conv1D holding LoRA leaves"):
        with jaxlora.intercept(config):
            jax.jit(model.apply)({"params": params}, X)


class OwnLoRA(nn.Module):
    @nn.jit
    @nn.compact
    def __call__(self, x):
        return jaxlora.LoRADense(3, 2, alpha=6, name="out")(x)


def test_jaxlora_layer_under_nn_jit_adds_its_branch_once():
    """jaxlora's own layers add their branch themselves: intercept leaves them alone, in
    either order with an nn.jit trace made outside it."""
    model = OwnLoRA()
    variables = model.init(jax.random.key(0), X)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.5 if p[-1].key == "lora_b" else v, variables["params"]
    )
    node = jax.tree.map(np.asarray, params["out"])
    x = np.asarray(X)
    expected = x @ node["kernel"] + node["bias"] + SCALE * (x @ node["lora_a"]) @ node["lora_b"]
    np.testing.assert_allclose(model.apply({"params": params}, X), expected, atol=1e-5)
    with jaxlora.intercept(jaxlora.LoRAConfig(r=2, alpha=6, targets=["out"])):
        np.testing.assert_allclose(model.apply({"params": params}, X), expected, atol=1e-5)
