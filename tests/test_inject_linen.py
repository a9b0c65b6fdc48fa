"""jaxlora.inject / intercept on unmodified Linen models."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jaxlora

N, D, L, R = 128, 1024, 4, 8


class MLP(nn.Module):
    width: int = D
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        dense = nn.remat(nn.Dense) if self.remat else nn.Dense
        for i in range(L):
            x = dense(self.width, name=f"fc{i}")(x)
            if i < L - 1:
                x = jax.nn.relu(x)
        return x


def _adapted(width=32, remat=False, config=None):
    model = MLP(width, remat)
    x = jax.random.normal(jax.random.key(0), (8, width))
    variables = model.init(jax.random.key(0), x)
    config = config or jaxlora.LoRAConfig(r=4, alpha=8, targets=["fc1", "fc3"])
    lora = jaxlora.inject(variables, config, jax.random.key(1))
    for name in ("fc1", "fc3"):
        shape = lora["params"][name]["lora_b"].shape
        lora["params"][name]["lora_b"] = jax.random.normal(jax.random.key(2), shape)
    return model, x, variables, lora, config


def _reference(variables, lora, x, scale):
    """The LoRA formula in numpy over the MLP, layer by layer."""
    h = np.asarray(x, np.float64)
    for i in range(L):
        p = {k: np.asarray(v, np.float64) for k, v in lora["params"][f"fc{i}"].items()}
        out = h @ p["kernel"] + p["bias"]
        if "lora_a" in p:
            out = out + scale * h @ p["lora_a"] @ p["lora_b"]
        h = np.maximum(out, 0) if i < L - 1 else out
    return h


def test_inject_adds_leaves_and_intercept_applies_them():
    model, x, variables, lora, config = _adapted()
    assert set(lora["params"]["fc1"]) == {"kernel", "bias", "lora_a", "lora_b"}
    assert set(lora["params"]["fc0"]) == {"kernel", "bias"}
    assert lora["params"]["fc1"]["lora_a"].shape == (32, 4)
    a = np.asarray(lora["params"]["fc1"]["lora_a"])
    assert np.abs(a).max() <= 1 / np.sqrt(32)  # kaiming_uniform(a=√5), as torch
    np.testing.assert_array_equal(
        lora["params"]["fc1"]["kernel"], variables["params"]["fc1"]["kernel"]
    )
    with jaxlora.intercept(config):
        y = model.apply(lora, x)
    np.testing.assert_allclose(y, _reference(variables, lora, x, 2.0), rtol=1e-5, atol=1e-5)
    fresh = jaxlora.inject(variables, config, jax.random.key(1))
    with jaxlora.intercept(config):
        np.testing.assert_array_equal(model.apply(fresh, x), model.apply(variables, x))


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_jit_remat_grad_and_merge(remat):
    model, x, variables, lora, config = _adapted(remat=remat)

    @jax.jit
    @jaxlora.intercept(config)
    def loss(params):
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    expected = _reference(variables, lora, x, 2.0)
    np.testing.assert_allclose(loss(lora["params"]), np.sum(expected**2), rtol=1e-5)
    grads = jax.grad(loss)(lora["params"])
    assert float(jnp.abs(grads["fc1"]["lora_a"]).sum()) > 0
    merged = jaxlora.merge(lora, alpha=config.alpha)
    assert jax.tree.structure(merged) == jax.tree.structure(variables)
    np.testing.assert_allclose(model.apply(merged, x), expected, rtol=1e-5, atol=1e-5)


def test_per_layer_init_does_not_depend_on_other_targets():
    model = MLP(32)
    variables = model.init(jax.random.key(0), jnp.ones((1, 32)))
    one = jaxlora.inject(variables, jaxlora.LoRAConfig(r=2, targets=["fc1"]), jax.random.key(3))
    two = jaxlora.inject(
        variables, jaxlora.LoRAConfig(r=2, targets=["fc1", "fc2"]), jax.random.key(3)
    )
    np.testing.assert_array_equal(one["params"]["fc1"]["lora_a"], two["params"]["fc1"]["lora_a"])


def test_dropout_in_intercept():
    config = jaxlora.LoRAConfig(r=4, alpha=8, targets=["fc1", "fc3"], dropout=0.5)
    model, x, variables, lora, _ = _adapted(config=config)
    with jaxlora.intercept(config):
        y_eval = model.apply(lora, x)
    np.testing.assert_allclose(y_eval, _reference(variables, lora, x, 2.0), rtol=1e-5, atol=1e-5)
    with jaxlora.intercept(config, deterministic=False):
        y1 = model.apply(lora, x, rngs={"dropout": jax.random.key(1)})
        y2 = model.apply(lora, x, rngs={"dropout": jax.random.key(2)})
        assert not np.allclose(y1, y2)
        with pytest.raises(Exception, match="dropout"):
            model.apply(lora, x)  # no 'dropout' rng given


def test_freeze_base_train_step_flops_are_the_analytic_minimum():
    """Factored branch + freeze_base under one jit: no kernel gradients are computed."""
    model = MLP()
    x, y = jnp.ones((N, D)), jnp.zeros((N, D))
    base = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoRAConfig(r=R, targets=r"fc\d")
    params = jaxlora.inject(base, config, jax.random.key(1))

    def step_fn(tx, lora):
        def step(params, opt_state):
            def loss(p):
                return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

            if lora:
                with jaxlora.intercept(config):
                    grads = jax.grad(loss)(params)
            else:
                grads = jax.grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return step

    def flops(params, tx, lora):
        lowered = jax.jit(step_fn(tx, lora)).lower(params, tx.init(params))
        return lowered.compile().cost_analysis()["flops"]

    full = flops(base, optax.adam(1e-3), False)
    lora = flops(params, jaxlora.freeze_base(optax.adam(1e-3)), True)

    def mm(a, b):
        return 2 * N * a * b

    # Forward: base + both LoRA matmuls per layer. Backward: dB, dy·Bᵀ and dA per layer, and
    # the input gradient (through W0 and the LoRA path) for every layer but the first.
    forward = L * (mm(D, D) + mm(D, R) + mm(R, D))
    backward = L * (mm(R, D) + mm(D, R) + mm(D, R)) + (L - 1) * (mm(D, D) + mm(R, D))
    minimum = forward + backward
    assert minimum <= lora <= 1.02 * minimum, lora / minimum
    full_matmuls = L * 2 * mm(D, D) + (L - 1) * mm(D, D)  # forward, dW, dX
    assert 0.63 < lora / full < 0.66 and full >= full_matmuls


def _dot_output_shapes(hlo: str) -> list[tuple[int, ...]]:
    """The shapes of the optimized HLO's dot outputs as laid out in memory (row-major order of
    the layout: ``f32[48,4]{0,1}`` is a (4, 48) array)."""
    shapes = []
    for dims, layout in re.findall(r"= f32\[([\d,]*)\]\{([\d,]*)\} dot\(", hlo):
        dims, minor_to_major = dims.split(","), layout.split(",")
        shapes.append(tuple(int(dims[int(i)]) for i in reversed(minor_to_major)))
    return shapes


@pytest.mark.parametrize("kind", ["dense", "dense_general"])
def test_lora_a_gradient_is_computed_rank_first(kind):
    """``a``'s gradient is the wide (r, in) product ``duᵀ @ x``, never a tall (in, r) dot: XLA:CPU
    runs the tall form through a slow path (4.4 ms vs 0.5 ms at n=2048, in=1024, r=8), which
    alone made the MLP LoRA step 0.72× instead of 0.68× of the full fine-tune."""
    n, d_in, d_out, r = 64, 48, 40, 4

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            if kind == "dense":
                return nn.Dense(d_out, name="fc")(x)
            return nn.DenseGeneral(d_out, axis=(-2, -1), name="fc")(x)

    model = One()
    if kind == "dense":
        x = jax.random.normal(jax.random.key(0), (n, d_in))
        tall = [(d_in, r)]
    else:  # contracts two input axes: a is (6, 8, r)
        x = jax.random.normal(jax.random.key(0), (n, 6, 8))
        tall = [(6, 8, r), (48, r)]
    config = jaxlora.LoRAConfig(r=r, targets=["fc"])
    base = model.init(jax.random.key(1), x)["params"]
    layouts = jaxlora.layouts(model, x) if kind == "dense_general" else None
    params = jaxlora.inject({"params": base}, config, jax.random.key(2), layouts=layouts)
    lora, frozen = jaxlora.split(params)

    def loss(lora):
        with jaxlora.intercept(config):
            return jnp.sum(model.apply(jaxlora.combine(lora, frozen), x) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(lora).compile().as_text()
    shapes = _dot_output_shapes(hlo)
    assert shapes, hlo  # the test reads the dots it checks
    assert (r, d_in) in shapes or (r, 6, 8) in shapes, shapes
    assert not [s for s in shapes if s in tall], shapes


def test_lora_b_gradient_never_runs_with_both_operands_transposed():
    """``b``'s gradient reads ``x a`` rank-first, whatever layout XLA gives the output gradient.
    Here ``dY`` comes out of a head transpose, as the twin GPT's query and value gradients do
    from its attention; left to autodiff, XLA:CPU ran ``hᵀ dY`` on a column-major copy of
    ``dY`` with both operands transposed, a slow dot (0.63 ms vs 0.07 ms at n=2048, out=96,
    r=8). The gradients must still be those of the plain formula."""
    b, t, heads, hd, r = 4, 32, 4, 8, 4
    d = heads * hd

    class Proj(nn.Module):
        @nn.compact
        def __call__(self, x):
            v = nn.Dense(d, name="value")(x)
            return v.reshape(b, t, heads, hd).transpose(0, 2, 3, 1)  # (b, h, hd, t)

    x = jax.random.normal(jax.random.key(0), (b, t, d))
    weights = jax.random.normal(jax.random.key(1), (b, heads, hd, t))
    model, config = Proj(), jaxlora.LoRAConfig(r=r, alpha=2 * r, targets=["value"])
    params = jaxlora.inject(model.init(jax.random.key(2), x), config, jax.random.key(3))
    params = jax.tree.map(lambda p: p + 0.1, params)  # b ≠ 0: every gradient term counts
    lora, frozen = jaxlora.split(params)

    def loss(lora):
        with jaxlora.intercept(config):
            return jnp.sum(jnp.sin(model.apply(jaxlora.combine(lora, frozen), x)) * weights)

    hlo = jax.jit(jax.grad(loss)).lower(lora).compile().as_text()
    contracted = r"dot\(.*?lhs_contracting_dims=\{(\d+)\}, rhs_contracting_dims=\{(\d+)\}"
    dots = re.findall(contracted, hlo)
    assert dots, hlo  # the test reads the dots it checks
    assert ("0", "1") not in dots, hlo

    layer = params["params"]["value"]

    def plain(a, b_):
        v = x @ layer["kernel"] + layer["bias"] + (x @ a) * 2.0 @ b_
        return jnp.sum(jnp.sin(v.reshape(b, t, heads, hd).transpose(0, 2, 3, 1)) * weights)

    expected = jax.grad(plain, argnums=(0, 1))(layer["lora_a"], layer["lora_b"])
    got = jax.grad(loss)(lora)["params"]["value"]
    for name, want in zip(("lora_a", "lora_b"), expected, strict=True):
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_inject_errors():
    model = MLP(32)
    variables = model.init(jax.random.key(0), jnp.ones((1, 32)))
    with pytest.raises(ValueError, match=r"match no layer; the layer paths are: fc0, fc1, fc2"):
        jaxlora.inject(variables, jaxlora.LoRAConfig(r=2, targets=["query"]), jax.random.key(0))
    with pytest.raises(ValueError, match=r"inject: layer 'fc1': r must be in \[1, min"):
        jaxlora.inject(variables, jaxlora.LoRAConfig(r=64, targets=["fc1"]), jax.random.key(0))
    injected = jaxlora.inject(
        variables, jaxlora.LoRAConfig(r=2, targets=["fc1"]), jax.random.key(0)
    )
    with pytest.raises(ValueError, match="layer 'fc1' already has LoRA leaves"):
        jaxlora.inject(injected, jaxlora.LoRAConfig(r=2, targets=["fc1"]), jax.random.key(0))
    with pytest.raises(TypeError, match="LoRAConfig"):
        jaxlora.inject(variables, {"r": 2}, jax.random.key(0))


class Unsupported(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3,), feature_group_count=2, name="grouped")(x)
        x = nn.ConvTranspose(4, (3,), name="transpose")(x)
        return nn.DenseGeneral(8, name="heads")(x)


def test_unsupported_layers_are_errors_not_silence():
    model, x = Unsupported(), jnp.ones((1, 5, 4))
    variables = model.init(jax.random.key(0), x)
    shapes = jaxlora.layouts(model, x)
    assert set(shapes) == {"heads"}  # grouped and transposed convs are not adaptable
    for target in ("grouped", "transpose"):
        with pytest.raises(TypeError, match=rf"'{target}' has a 3-D kernel .* say which axes"):
            jaxlora.inject(variables, jaxlora.LoRAConfig(r=2, targets=[target]), jax.random.key(0))
        with pytest.raises(TypeError, match=rf"'{target}' holds .*cannot be adapted; supported"):
            jaxlora.inject(
                variables,
                jaxlora.LoRAConfig(r=2, targets=[target]),
                jax.random.key(0),
                layouts=shapes,
            )
    # A leaf pair placed by hand beside a kernel that no supported layer uses is reported
    # when that layer is called.
    params = jax.tree.map(lambda v: v, variables["params"])
    params["transpose"]["lora_a"] = jnp.ones((3, 8, 2))
    params["transpose"]["lora_b"] = jnp.ones((1, 2, 4))
    with jaxlora.intercept(jaxlora.LoRAConfig(r=2, targets=["transpose"])):
        with pytest.raises(
            ValueError,
            match=r"layer 'transpose' is a ConvTranspose holding LoRA leaves \(called as "
            r"__call__\); only these layers are adapted: nn.Dense",
        ):
            model.apply({"params": params}, x)


class ScannedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        def body(mdl, carry, _):
            return nn.Dense(carry.shape[-1])(carry), None

        scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(self, x, None)[0]


def test_scanned_kernels_are_rejected():
    model = ScannedMLP()
    variables = model.init(jax.random.key(0), jnp.ones((2, 8)))
    paths = [
        ".".join(str(getattr(k, "key", k)) for k in p)
        for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
    ]
    layer = paths[0].rsplit(".", 1)[0]
    config = jaxlora.LoRAConfig(r=2, targets=[layer])
    # Stacked kernels need layouts (tests/test_scan.py); this scan of a function over the
    # parent module has no scanned submodule to name per-layer paths after: refused.
    with pytest.raises(TypeError, match="nn.scan's layer axes"):
        jaxlora.inject(variables, config, jax.random.key(0))
    layouts = jaxlora.layouts(model, jnp.ones((2, 8)))
    with pytest.raises(TypeError, match="no submodule is the scanned one"):
        jaxlora.inject(variables, config, jax.random.key(0), layouts=layouts)


def test_trainable_parameter_report():
    _, _, _, lora, _ = _adapted()
    report = jaxlora.trainable_parameters(lora)
    assert report.trainable == 2 * 4 * (32 + 32)
    assert report.total == sum(v.size for v in jax.tree.leaves(lora))
    assert f"{report.percent:.4f}" in str(report)


def test_switching_adapters_does_not_recompile():
    model, x, _, lora, config = _adapted()
    adapter_1, base = jaxlora.split(lora)
    adapter_2 = jax.tree_util.tree_map_with_path(  # -B: the opposite update
        lambda path, v: -v if path[-1].key == "lora_b" else v, adapter_1
    )

    @jax.jit
    @jaxlora.intercept(config)
    def forward(adapter, base, x):
        return model.apply(jaxlora.combine(adapter, base), x)

    y1, y2 = forward(adapter_1, base, x), forward(adapter_2, base, x)
    assert not np.allclose(y1, y2)
    for adapter in (adapter_1, adapter_2, adapter_1):
        forward(adapter, base, x)
    assert forward._cache_size() == 1


class SetupModel(nn.Module):
    """A setup-style model with a second method: both must see the adapters."""

    def setup(self):
        self.fc = nn.Dense(8)
        self.out = nn.Dense(4)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.fc(x)))

    def encode(self, x):
        return self.fc(x)


def test_setup_models_and_other_methods():
    model, x = SetupModel(), jax.random.normal(jax.random.key(0), (3, 6))
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["fc", "out"])
    lora = jaxlora.inject(model.init(jax.random.key(1), x), config, jax.random.key(2))
    for name, width in (("fc", 8), ("out", 4)):
        lora["params"][name]["lora_b"] = jax.random.normal(jax.random.key(3), (2, width))
    merged = jaxlora.merge(lora, alpha=config.alpha)
    with jaxlora.intercept(config):
        y = model.apply(lora, x)
        encoded = model.apply(lora, x, method=SetupModel.encode)
    np.testing.assert_allclose(y, model.apply(merged, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        encoded, model.apply(merged, x, method=SetupModel.encode), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(y, model.apply(jaxlora.split(lora)[1], x))  # adapters did act
