"""Op-level LoRA in Linen (``layouts`` → ``inject`` → ``intercept``): a weight of any module
that enters one product, e.g. tunix's einsum projection or transformers' ``FlaxConv1D``.

The references are closed forms in numpy float64: the same product with the weight replaced
by ``W + s·delta``, the delta and the gradients written per case as einsums over the factors'
own letters (``CASES``), independently of ``jaxlora.oplevel``'s role rule. fp32 tolerance:
2e-5 of the output's scale.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jaxlora

R, ALPHA = 2, 6.0
S = ALPHA / R
TOL = 2e-5


class FlaxConv1D(nn.Module):
    """transformers 4.57's ``FlaxConv1D`` (modeling_flax_gpt2.py), copied: kernel (out, in)."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, inputs):
        inputs = jnp.asarray(inputs, self.dtype)
        kernel = self.param(
            "kernel", jax.nn.initializers.normal(stddev=0.02), (self.features, inputs.shape[-1])
        )
        kernel = jnp.asarray(kernel.transpose(), self.dtype)
        y = jax.lax.dot_general(
            inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision
        )
        if self.use_bias:
            bias = self.param("bias", jax.nn.initializers.zeros, (self.features,))
            bias = jnp.asarray(bias, self.dtype)
            y = y + bias
        return y


class Einsum(nn.Module):
    """tunix's ``Einsum`` (Linen twin): ``jnp.einsum(eqn, x, w)``."""

    eqn: str
    shape: tuple[int, ...]
    weight_first: bool = False

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.5), self.shape)
        return jnp.einsum(self.eqn, w, x) if self.weight_first else jnp.einsum(self.eqn, x, w)


def _einsum_case(eqn, shape, x_shape, delta_eqn, grad_eqn, weight_first=False):
    """A row of CASES for an ``Einsum``: its numpy forward is ``eqn`` again, the operands in
    the module's order."""

    def forward(x, w):
        return np.einsum(eqn, w, x) if weight_first else np.einsum(eqn, x, w)

    make = functools.partial(Einsum, eqn, shape, weight_first=weight_first)
    return (make, x_shape, forward, delta_eqn, grad_eqn)


# name: (module, input shape, numpy forward f(x, W), delta "A,B->W", gradient of W "x,G->W")
CASES = {
    "conv1d": (
        functools.partial(FlaxConv1D, 3),
        (2, 5, 4),
        lambda x, w: x @ w.T,
        "ir,ro->oi",
        "bti,bto->oi",
    ),
    "q_proj": _einsum_case("BTD,DNH->BTNH", (4, 2, 3), (2, 5, 4), "Dr,rNH->DNH", "BTD,BTNH->DNH"),
    "o_proj": _einsum_case(
        "BTNH,NHD->BTD", (2, 3, 4), (2, 5, 2, 3), "NHr,rD->NHD", "BTNH,BTD->NHD"
    ),
    "gemma_q": _einsum_case("BTD,NDH->BTNH", (2, 4, 3), (2, 5, 4), "Dr,rNH->NDH", "BTD,BTNH->NDH"),
    "weight_first": _einsum_case(
        "DF,BD->BF", (4, 3), (5, 4), "Dr,rF->DF", "BD,BF->DF", weight_first=True
    ),
    "experts": _einsum_case("EBD,EDF->EBF", (2, 4, 3), (2, 5, 4), "EDr,ErF->EDF", "EBD,EBF->EDF"),
}


class Wrap(nn.Module):
    """The module under test as a submodule 'proj', with a Dense after it (a known kind)."""

    make: Any

    @nn.compact
    def __call__(self, x):
        return self.make(name="proj")(x)


def _setup(case: str, targets=("proj",), seed=0):
    make, shape, *_ = CASES[case]
    model = Wrap(make)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
    variables = model.init(jax.random.key(seed), x)
    # FlaxConv1D's init is tiny (std 0.02): redraw every base leaf at unit scale
    variables = jax.tree.map(
        lambda v: jnp.asarray(np.random.default_rng(7).standard_normal(v.shape), v.dtype),
        variables,
    )
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=list(targets))
    lay = jaxlora.layouts(model, x)
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=lay)
    node = dict(lora["params"]["proj"])
    node["lora_b"] = jnp.asarray(
        np.random.default_rng(3).standard_normal(node["lora_b"].shape), jnp.float32
    )
    lora = {"params": {**lora["params"], "proj": node}}
    return model, x, variables, lora, config


def _numpy(case, x, node):
    _, _, forward, delta_eqn, _grad_eqn = CASES[case]
    w_name = "kernel" if case == "conv1d" else "w"
    a, b = (np.asarray(node[n], np.float64) for n in ("lora_a", "lora_b"))
    w = np.asarray(node[w_name], np.float64) + S * np.einsum(delta_eqn, a, b)
    y = forward(np.asarray(x, np.float64), w)
    if case == "conv1d":
        y = y + np.asarray(node["bias"], np.float64)
    return y, w_name


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_closed_form(case):
    model, x, _, lora, config = _setup(case)
    node = lora["params"]["proj"]
    want, w_name = _numpy(case, x, node)
    g_out = np.random.default_rng(5).standard_normal(want.shape)

    def loss(params):
        with jaxlora.intercept(config):
            return jnp.sum(model.apply(params, x) * g_out)

    with jaxlora.intercept(config):
        y = model.apply(lora, x)
    scale = np.abs(want).max()
    np.testing.assert_allclose(y, want, atol=TOL * scale)
    grads = jax.jit(jax.grad(loss))(lora)["params"]["proj"]
    _, _, _, delta_eqn, grad_eqn = CASES[case]
    g_w = np.einsum(grad_eqn, np.asarray(x, np.float64), g_out)
    a_l, b_l, w_l = delta_eqn.replace("->", ",").split(",")
    a, b = (np.asarray(node[n], np.float64) for n in ("lora_a", "lora_b"))
    want_a = S * np.einsum(f"{w_l},{b_l}->{a_l}", g_w, b)
    want_b = S * np.einsum(f"{a_l},{w_l}->{b_l}", a, g_w)
    np.testing.assert_allclose(grads["lora_a"], want_a, atol=TOL * np.abs(want_a).max())
    np.testing.assert_allclose(grads["lora_b"], want_b, atol=TOL * np.abs(want_b).max())
    np.testing.assert_allclose(grads[w_name], g_w, atol=TOL * np.abs(g_w).max())


@pytest.mark.parametrize(
    ("case", "a_shape", "b_shape"),
    [
        ("conv1d", (4, R), (R, 3)),
        ("q_proj", (4, R), (R, 2, 3)),
        ("gemma_q", (4, R), (R, 2, 3)),
        ("experts", (2, 4, R), (2, R, 3)),
    ],
)
def test_inject_shapes_and_init(case, a_shape, b_shape):
    model, x, variables, _, config = _setup(case)
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    node = lora["params"]["proj"]
    assert (node["lora_a"].shape, node["lora_b"].shape) == (a_shape, b_shape)
    np.testing.assert_array_equal(node["lora_b"], 0)  # starts equal to the base
    n_in = 4  # the contracted size D (or in)
    assert 0 < float(jnp.abs(node["lora_a"]).max()) <= 1 / np.sqrt(n_in)
    with jaxlora.intercept(config):
        np.testing.assert_array_equal(model.apply(lora, x), model.apply(variables, x))


@pytest.mark.parametrize("case", ["conv1d", "gemma_q", "experts"])
def test_merge_equals_unmerged_and_unmerge_restores(case):
    model, x, variables, lora, config = _setup(case)
    with jaxlora.intercept(config):
        y = model.apply(lora, x)
    merged, record = jaxlora.merge(lora, alpha=ALPHA, record=True)
    assert set(merged["params"]["proj"]) == set(variables["params"]["proj"])
    np.testing.assert_allclose(model.apply(merged, x), y, atol=TOL * np.abs(y).max())
    back = jaxlora.unmerge(merged, record)
    assert jax.tree.structure(back) == jax.tree.structure(lora)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(lora), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_unmerge_is_exact_on_exact_values():
    """Dyadic values (multiples of 1/8, small): every sum and product is exact in fp32, so
    merge then unmerge gives the kernel bit for bit, and merge adds exactly s·(a b)ᵀ."""
    _model, _x, _variables, lora, _ = _setup("conv1d")
    rng = np.random.default_rng(11)
    node = dict(lora["params"]["proj"])
    for name in ("kernel", "lora_a", "lora_b"):
        node[name] = jnp.asarray(rng.integers(-8, 8, node[name].shape) / 8, jnp.float32)
    lora = {"params": {**lora["params"], "proj": node}}
    merged, record = jaxlora.merge(lora, alpha=4.0, record=True)
    want = np.asarray(node["kernel"]) + 2.0 * (np.asarray(node["lora_a"]) @ node["lora_b"]).T
    np.testing.assert_array_equal(merged["params"]["proj"]["kernel"], want)
    back = jaxlora.unmerge(merged, record)
    np.testing.assert_array_equal(back["params"]["proj"]["kernel"], node["kernel"])


def _dense_twin(lora):
    """The same layer as an nn.Dense: kernel = FlaxConv1D's kernelᵀ, the same a and b."""
    node = lora["params"]["proj"]
    dense = {
        "kernel": node["kernel"].T,
        "bias": node["bias"],
        "lora_a": node["lora_a"],
        "lora_b": node["lora_b"],
    }
    return {"params": {"proj": dense}}


def test_conv1d_equals_dense_with_transposed_kernel():
    """A second, independent reference: jaxlora's nn.Dense LoRA path."""
    model, x, _, lora, config = _setup("conv1d")
    dense_model = Wrap(lambda name: nn.Dense(3, name=name))
    twin = _dense_twin(lora)

    def loss(m, p):
        with jaxlora.intercept(config):
            return jnp.sum(jnp.sin(m.apply(p, x)))

    with jaxlora.intercept(config):
        y = model.apply(lora, x)
        np.testing.assert_allclose(y, dense_model.apply(twin, x), atol=TOL * np.abs(y).max())
    g = jax.grad(lambda p: loss(model, p))(lora)["params"]["proj"]
    g_dense = jax.grad(lambda p: loss(dense_model, p))(twin)["params"]["proj"]
    for name in ("lora_a", "lora_b", "bias"):
        np.testing.assert_allclose(g[name], g_dense[name], atol=TOL * np.abs(g[name]).max())
    np.testing.assert_allclose(
        g["kernel"].T, g_dense["kernel"], atol=TOL * np.abs(g["kernel"]).max()
    )


def test_freeze_base_trains_only_the_adapter():
    model, x, _, lora, config = _setup("q_proj")
    target = jnp.asarray(np.random.default_rng(9).standard_normal((2, 5, 2, 3)), jnp.float32)
    tx = jaxlora.freeze_base(optax.adam(1e-2))

    @jax.jit
    def step(params, state):
        def loss(p):
            with jaxlora.intercept(config):
                return jnp.mean((model.apply(p, x) - target) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params, state = lora, tx.init(lora)
    losses = []
    for _ in range(5):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(params["params"]["proj"]["w"], lora["params"]["proj"]["w"])
    assert not np.array_equal(params["params"]["proj"]["lora_a"], lora["params"]["proj"]["lora_a"])


class JitCall(nn.Module):
    """A third-party pattern: the top-level ``__call__`` wrapped by ``nn.jit``."""

    @nn.jit
    @nn.compact
    def __call__(self, x):
        return FlaxConv1D(3, name="proj")(x)


def test_under_nn_jit_whatever_ran_first():
    _, x, _, lora, config = _setup("conv1d")
    model = JitCall()
    want, _ = _numpy("conv1d", x, lora["params"]["proj"])
    plain = model.apply(lora, x)  # outside intercept first: nn.jit caches that trace
    with jaxlora.intercept(config):
        y = jax.jit(model.apply)(lora, x)
    np.testing.assert_allclose(y, want, atol=TOL * np.abs(want).max())
    assert not np.allclose(plain, want, atol=1e-3)
    assert set(jaxlora.layouts(model, x)) == {"proj"}


def test_bf16_compute_fp32_adapters():
    _model, x, _, lora, config = _setup("conv1d")
    bf16 = Wrap(lambda name: FlaxConv1D(3, dtype=jnp.bfloat16, name=name))
    want, _ = _numpy("conv1d", x, lora["params"]["proj"])

    def loss(p):
        with jaxlora.intercept(config):
            return jnp.sum(bf16.apply(p, x).astype(jnp.float32))

    with jaxlora.intercept(config):
        y = bf16.apply(lora, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(y), want, atol=2e-2 * np.abs(want).max())
    grads = jax.grad(loss)(lora)["params"]["proj"]
    assert grads["lora_a"].dtype == grads["lora_b"].dtype == jnp.float32


def test_partition_specs_follow_the_weight_axis_by_axis():
    _, _, _, lora, _ = _setup("gemma_q")  # w (N, D, H): contracted D, free (N, H)
    specs = jaxlora.partition_specs(lora, {"params": {"proj": {"w": P("heads", "fsdp", None)}}})
    node = specs["params"]["proj"]
    assert (node["lora_a"], node["lora_b"]) == (P("fsdp", None), P(None, "heads", None))
    _, _, _, lora, _ = _setup("conv1d")  # kernel (out, in)
    specs = jaxlora.partition_specs(lora, {"params": {"proj": {"kernel": P("tp", "fsdp")}}})
    node = specs["params"]["proj"]
    assert (node["lora_a"], node["lora_b"]) == (P("fsdp", None), P(None, "tp"))
    # the spec tree matches the params tree, so it can be used with jax.tree.map / device_put
    assert jax.tree.structure(specs, is_leaf=lambda s: isinstance(s, P)) is not None
    jax.tree.map(lambda s, v: None, specs, lora, is_leaf=lambda s: isinstance(s, P))


class NonLinear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x @ jnp.tanh(self.param("w", nn.initializers.normal(), (4, 3)))


class TwoProducts(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (4, 4))
        return x @ w + (2 * x) @ w.T


class CalledTwice(nn.Module):
    @nn.compact
    def __call__(self, x):
        proj = Einsum("BD,DF->BF", (4, 4), name="proj")
        return proj(proj(x))


REFUSED = {
    "non_linear": (lambda: Wrap(lambda name: NonLinear(name=name)), "used only by tanh"),
    "two_products": (lambda: Wrap(lambda name: TwoProducts(name=name)), "used by 2 products"),
    "called_twice": (CalledTwice, "called 2 times in one forward"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_inject_refuses_naming_path_and_reason(case):
    make, reason = REFUSED[case]
    model = make()
    x = jnp.ones((5, 4))
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=1, targets=["proj"])
    with pytest.raises(TypeError, match=rf"layer 'proj' holds .*cannot be adapted.*{reason}"):
        jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))


def test_inject_without_layouts_says_to_pass_them():
    _model, _x, variables, _, config = _setup("q_proj")
    with pytest.raises(TypeError, match=r"layer 'proj' holds .*layouts=jaxlora.layouts"):
        jaxlora.inject(variables, config, jax.random.key(1))


def test_intercept_refuses_a_call_that_uses_the_weight_otherwise():
    """The adapter was made for one product; a call (other inputs) with another is refused."""
    model, x, _, lora, config = _setup("q_proj")
    node = dict(lora["params"]["proj"])
    marker = node["lora_roles"]
    wrong = jaxlora.product.ProductRoles("w", jaxlora.oplevel.Roles((4, 2, 3), (), (1,), (0, 2)))
    node["lora_roles"] = wrong
    with pytest.raises(ValueError, match="layer 'proj'.*shape"):
        with jaxlora.intercept(config):
            model.apply({"params": {"proj": node}}, x)
    node["lora_roles"] = marker
    with pytest.raises(ValueError, match="layer 'proj' has r=2 .* config gives it r=3"):
        with jaxlora.intercept(jaxlora.LoRAConfig(r=3, targets=["proj"])):
            model.apply({"params": {"proj": node}}, x)


def test_save_adapter_writes_product_adapters_as_torch_linears(tmp_path):
    """(Until product adapters were written, save refused them; now) a FlaxConv1D's adapter is
    PEFT's Linear: lora_A (r, in) = lora_a.T, lora_B (out, r) = lora_b.T; a per-expert adapter
    (batch axes) has no PEFT Linear and is refused, writing nothing."""
    from safetensors.numpy import load_file

    _, _, _, lora, config = _setup("conv1d")
    jaxlora.save_adapter(lora, tmp_path / "a", config=config)
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    node = lora["params"]["proj"]
    np.testing.assert_array_equal(
        tensors["base_model.model.proj.lora_A.weight"], np.asarray(node["lora_a"]).T
    )
    np.testing.assert_array_equal(
        tensors["base_model.model.proj.lora_B.weight"], np.asarray(node["lora_b"]).T
    )
    _, _, _, experts, config = _setup("experts")
    with pytest.raises(ValueError, match=r"layer 'proj'.*batch"):
        jaxlora.save_adapter(experts, tmp_path / "b", config=config)
    assert not (tmp_path / "b").exists()


class WithChild(nn.Module):
    """A module with its own weight and a Dense child: both targeted."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (4, 4))
        return nn.Dense(3, name="child")(x @ w)


def test_intercept_refuses_a_product_module_whose_submodules_are_adapted_too():
    model = Wrap(lambda name: WithChild(name=name))
    x = jnp.ones((5, 4))
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=1, targets=["proj", "proj.child"])
    layouts = jaxlora.layouts(model, x)
    with pytest.raises(ValueError, match=r"inject: layer 'proj' is adapted .* \['proj.child'\]"):
        jaxlora.inject(variables, config, jax.random.key(1), layouts=layouts)  # up front
    # nested by two inject calls: refused when called
    lora = variables
    for target in ("proj", "proj.child"):
        one = jaxlora.LoRAConfig(r=1, targets=[target])
        lora = jaxlora.inject(lora, one, jax.random.key(1), layouts=layouts)
    assert "lora_roles" in lora["params"]["proj"]
    with pytest.raises(ValueError, match=r"layer 'proj' is adapted .* submodules \['child'\]"):
        with jaxlora.intercept(config):
            model.apply(lora, x)
    # each alone is applied
    for target in ("proj", "proj.child"):
        one = jaxlora.LoRAConfig(r=1, targets=[target])
        lora = jaxlora.inject(variables, one, jax.random.key(1), layouts=jaxlora.layouts(model, x))
        with jaxlora.intercept(one):
            np.testing.assert_array_equal(model.apply(lora, x), model.apply(variables, x))


class Partitioned(nn.Module):
    """tunix-style q_proj whose weight carries logical axis names."""

    @nn.compact
    def __call__(self, x):
        init = nn.with_partitioning(nn.initializers.normal(), ("heads", "embed", None))
        return jnp.einsum("BTD,NDH->BTNH", x, self.param("w", init, (2, 4, 3)))


def test_boxed_weight_gives_boxed_adapters_with_its_axis_names():
    model = Wrap(lambda name: Partitioned(name=name))
    x = jnp.ones((2, 5, 4))
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"])
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    specs = nn.get_partition_spec(lora)["params"]["proj"]
    assert (specs["lora_a"], specs["lora_b"]) == (P("embed", None), P(None, "heads", None))
    with jaxlora.intercept(config):
        np.testing.assert_array_equal(model.apply(lora, x), model.apply(variables, x))


@settings(max_examples=12, deadline=None)
@given(
    order=st.permutations("DFG"),
    sizes=st.tuples(*[st.integers(2, 4)] * 3),
    weight_first=st.booleans(),
)
def test_any_axis_order_matches_closed_form(order, sizes, weight_first):
    """W's contracted axis D and free axes F, G in any order, W on either side: forward and
    merge against the closed form (delta 'Dr,r<free>' with the free axes in W's order)."""
    size = dict(zip("DFG", sizes, strict=True))
    w_axes = "".join(order)
    eqn = f"{w_axes},BD->BFG" if weight_first else f"BD,{w_axes}->BFG"
    shape = tuple(size[c] for c in w_axes)
    model = Wrap(functools.partial(Einsum, eqn, shape, weight_first=weight_first))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, size["D"])), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=1, alpha=2.0, targets=["proj"])
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    node = dict(lora["params"]["proj"])
    assert node["lora_a"].shape == (size["D"], 1)
    free = w_axes.replace("D", "")  # lora_b's free axes keep W's own order
    assert node["lora_b"].shape == (1, *(size[c] for c in free))
    node["lora_b"] = jnp.asarray(np.random.default_rng(1).standard_normal(node["lora_b"].shape))
    lora = {"params": {"proj": node}}
    delta = 2.0 * np.einsum(f"Dr,r{free}->{w_axes}", node["lora_a"], node["lora_b"])
    w = np.asarray(node["w"], np.float64) + delta
    want = np.einsum(f"BD,{w_axes}->BFG", np.asarray(x, np.float64), w)
    with jaxlora.intercept(config):
        y = model.apply(lora, x)
    np.testing.assert_allclose(y, want, atol=TOL * np.abs(want).max())
    merged = jaxlora.merge(lora, alpha=2.0)
    np.testing.assert_allclose(merged["params"]["proj"]["w"], w, atol=1e-6 * np.abs(w).max())
