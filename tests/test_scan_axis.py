"""Linen stacks scanned on a layer axis other than 0: MaxText scans its decoder with
``nn.scan(..., variable_axes={"params": config.param_scan_axis})``, 1 by default, so a
DenseGeneral kernel (D→(N, H)) is (D, L, N, H). A MaxText-like scanned layer (DenseGeneral
q/k/v/out with heads, a Dense MLP, ``nn.remat`` inside the scan) against its unrolled twin
with the same weights: every layer of the twin is the scan's slice on that axis."""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora.tree import RECORD_NAMES

STACK_NAME = "lora_stack"  # the record beside an adapter stacked off axis 0
RECORDS = (*RECORD_NAMES, STACK_NAME)

jax.config.update("jax_default_matmul_precision", "highest")

TARGETS = ["query", "key", "value", "out", "fc", "mlp"]
NAMES = {"layers": "layers_{i}"}  # the unrolled twin's layer modules
# (D, N, H, F, L): MaxText-like sizes, and sizes that all coincide (L equal to every other
# axis, so no shape tells where the layer axis is)
MAXTEXT = (16, 2, 8, 32, 3)
COINCIDING = (4, 4, 4, 4, 4)


class Layer(nn.Module):
    dims: tuple

    @nn.compact
    def __call__(self, x, _):
        d, n, h, f, _ = self.dims
        q = nn.DenseGeneral((n, h), name="query")(x)
        k = nn.DenseGeneral((n, h), name="key")(x)
        v = nn.DenseGeneral((n, h), name="value")(x)
        p = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h), -1)
        o = jnp.einsum("bnts,bsnh->btnh", p, v)
        x = x + nn.DenseGeneral(d, axis=(-2, -1), name="out")(o)
        x = x + nn.Dense(d, name="mlp")(jax.nn.gelu(nn.Dense(f, name="fc")(x)))
        return x, None


class Scanned(nn.Module):
    dims: tuple
    axis: int
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        body = nn.remat(Layer, prevent_cse=False) if self.remat else Layer
        stack = nn.scan(
            body,
            variable_axes={"params": self.axis},
            split_rngs={"params": True},
            length=self.dims[-1],
        )
        return stack(self.dims, name="layers")(x, None)[0]


class Unrolled(nn.Module):
    dims: tuple

    @nn.compact
    def __call__(self, x):
        for i in range(self.dims[-1]):
            x, _ = Layer(self.dims, name=f"layers_{i}")(x, None)
        return x


def _inputs(dims, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(2, 5, dims[0])), jnp.float32)


def _random_b(params, seed: int = 3):
    """Non-zero lora_b everywhere, so the adapter changes the output."""
    key = jax.random.key(seed)

    def perturb(path, x):
        if jax.tree_util.keystr(path).endswith("['lora_b']"):
            k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
            return jax.random.normal(k, x.shape, x.dtype) * 0.2
        return x

    return jax.tree_util.tree_map_with_path(perturb, params)


def _arrays(tree):
    """The tree without its records (they hold no arrays)."""
    return {
        k: _arrays(v) if isinstance(v, Mapping) else v for k, v in tree.items() if k not in RECORDS
    }


def _stacked(unrolled, dims, axis: int):
    """The unrolled twin's layers stacked on ``axis``, as nn.scan lays out its params."""
    layers = [_arrays(unrolled[f"layers_{i}"]) for i in range(dims[-1])]
    return {"layers": jax.tree.map(lambda *xs: np.stack(xs, axis=axis), *layers)}


def _fill(scanned, stacked):
    """``scanned`` (as inject made it: records included) holding ``stacked``'s arrays; their
    shapes must agree (inject laid the adapter out as nn.scan stacks the twin's)."""
    out = {}
    for key, value in scanned.items():
        if isinstance(value, Mapping):
            out[key] = _fill(value, stacked[key])
        elif key in RECORDS:
            out[key] = value
        else:
            assert np.shape(value) == np.shape(stacked[key]), key
            out[key] = jnp.asarray(stacked[key])
    return out


def _rel_err(y, want) -> float:
    """The largest difference relative to the output's scale (fp32 rounding: ~1e-7)."""
    return float(jnp.max(jnp.abs(y - want)) / jnp.max(jnp.abs(want)))


def _max_err(a, b) -> float:
    # tree.map also checks that the two trees have the same structure
    errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), _arrays(a), _arrays(b))
    return max(jax.tree.leaves(errs))


def _twins(dims=MAXTEXT, axis=1, remat=False):
    """(unrolled model, its adapted params, scanned model, its adapted params, config, x): the
    same base and adapter weights, the scanned tree the twin's stacked on ``axis``."""
    x = _inputs(dims)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=TARGETS)
    unrolled_model = Unrolled(dims)
    base_u = unrolled_model.init(jax.random.key(0), x)["params"]
    layouts_u = jaxlora.layouts(unrolled_model, x)
    unrolled = _random_b(jaxlora.inject(base_u, config, jax.random.key(1), layouts=layouts_u))
    model = Scanned(dims, axis, remat)
    base_s = model.init(jax.random.key(0), x)["params"]
    injected = jaxlora.inject(base_s, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    return (
        unrolled_model,
        unrolled,
        model,
        _fill(injected, _stacked(unrolled, dims, axis)),
        config,
        x,
    )


def _loss(model, config, target):
    @jaxlora.intercept(config)
    def loss(params, x):
        return jnp.mean((model.apply({"params": params}, x) - target) ** 2)

    return loss


# ----------------------------------------------------------------------------------- inject


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_layouts_and_inject_put_the_layer_axis_where_nn_scan_slices(axis):
    """Used to build the adapter with the layer axis in front (taken from the wrong dimension):
    a (D, L, N, H) kernel got lora_b (D, r, N, H), and apply failed on shapes."""
    d, n, h, f, length = MAXTEXT
    x = _inputs(MAXTEXT)
    model = Scanned(MAXTEXT, axis, remat=True)
    base = model.init(jax.random.key(0), x)["params"]
    layouts = jaxlora.layouts(model, x)
    assert layouts["layers.query"].axis == axis and layouts["layers.query"].stack == 1
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=TARGETS)
    params = jaxlora.inject(base, config, jax.random.key(1), layouts=layouts)

    expect = {
        "query": ((d, 2), (2, n, h)),
        "out": ((n, h, 2), (2, d)),
        "fc": ((d, 2), (2, f)),
    }
    for name, (shape_a, shape_b) in expect.items():
        node = params["layers"][name]
        want_a = np.moveaxis(np.empty((length, *shape_a)), 0, axis).shape
        want_b = np.moveaxis(np.empty((length, *shape_b)), 0, axis).shape
        assert (node["lora_a"].shape, node["lora_b"].shape) == (want_a, want_b), name
        assert (STACK_NAME in node) == (axis != 0)
        slices = np.moveaxis(np.asarray(node["lora_a"]), axis, 0)
        for i in range(length):
            for j in range(i):
                assert not np.allclose(slices[i], slices[j])  # each layer its own draw
    with jaxlora.intercept(config):
        y = model.apply({"params": params}, x)
    np.testing.assert_array_equal(y, model.apply({"params": base}, x))  # starts as the base


@pytest.mark.parametrize(
    "dims, axis, remat",
    [(MAXTEXT, 1, True), (MAXTEXT, 0, False), (MAXTEXT, -1, False), (COINCIDING, 1, True)],
    ids=["maxtext-axis1-remat", "axis0", "axis-1", "coinciding-axis1-remat"],
)
def test_scanned_matches_unrolled_logits_grads_and_adamw(dims, axis, remat):
    unrolled_model, unrolled, model, scanned, config, x = _twins(dims, axis, remat)
    with jaxlora.intercept(config):
        y_u = unrolled_model.apply({"params": unrolled}, x)
        y_s = model.apply({"params": scanned}, x)
    assert _rel_err(y_s, y_u) < 2e-6
    base_y = unrolled_model.apply({"params": jaxlora.split(unrolled)[1]}, x)
    assert float(jnp.max(jnp.abs(y_u - base_y))) > 1e-2  # the adapter matters
    assert jaxlora.trainable_parameters(scanned) == jaxlora.trainable_parameters(unrolled)

    target = jnp.asarray(np.random.default_rng(5).normal(size=y_u.shape), jnp.float32)
    grad_u = jax.grad(_loss(unrolled_model, config, target))(unrolled, x)
    grad_s = jax.grad(_loss(model, config, target))(scanned, x)
    adapter_u = _stacked(jaxlora.split(grad_u)[0], dims, axis)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(adapter_u))
    assert scale > 1e-3
    assert _max_err(adapter_u, jaxlora.split(grad_s)[0]) < 1e-5 * scale  # fp32 rounding

    tx = jaxlora.freeze_base(optax.adamw(1e-2))

    def train(model, params):
        loss_fn = _loss(model, config, target)

        @jax.jit
        def step(params, state, x):
            updates, state = tx.update(jax.grad(loss_fn)(params, x), state, params)
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        for i in range(5):
            params, state = step(params, state, _inputs(dims, 10 + i))
        return params

    trained_u, trained_s = train(unrolled_model, unrolled), train(model, scanned)
    assert _max_err(_stacked(trained_u, dims, axis), trained_s) < 1e-4
    assert _max_err(jaxlora.split(trained_s)[0], jaxlora.split(scanned)[0]) > 1e-3  # trained
    jax.tree.map(  # the base is bit-identical
        np.testing.assert_array_equal, jaxlora.split(trained_s)[1], jaxlora.split(scanned)[1]
    )


# ------------------------------------------------------------------ merge, sharding, files


@pytest.mark.parametrize(
    "dims, axis", [(MAXTEXT, 1), (MAXTEXT, -1), (COINCIDING, 1)], ids=["1", "-1", "coinciding"]
)
def test_merge_is_the_unrolled_merge_and_unmerges(dims, axis):
    _, unrolled, model, scanned, config, x = _twins(dims, axis)
    merged, record = jaxlora.merge(scanned, alpha=config.alpha, record=True)
    assert STACK_NAME not in merged["layers"]["query"]
    merged_u = jaxlora.merge(unrolled, alpha=config.alpha)
    assert _max_err(_stacked(merged_u, dims, axis), merged) < 1e-6
    with jaxlora.intercept(config):
        want = model.apply({"params": scanned}, x)
    assert _rel_err(model.apply({"params": merged}, x), want) < 1e-5
    back = jaxlora.unmerge(merged, record)
    assert back["layers"]["query"][STACK_NAME] == scanned["layers"]["query"][STACK_NAME]
    assert _max_err(back, scanned) < 1e-6


@pytest.mark.parametrize("axis", [1, -1])
def test_partition_specs_put_the_layer_axis_name_at_the_scan_axis(axis):
    *_, scanned, _, _ = _twins(MAXTEXT, axis)

    def at(names):  # 'layers' inserted at the scan axis
        p = axis % (len(names) + 1)
        return (*names[:p], "layers", *names[p:])

    base = {"layers": {"query": {"kernel": P(*at(("embed", "heads", "kv")))}}}
    specs = jaxlora.partition_specs(scanned, base)["layers"]["query"]
    want = (at(("embed", None)), at((None, "heads", "kv")))
    assert (tuple(specs["lora_a"]), tuple(specs["lora_b"])) == want


def _read(directory):
    tensors = safetensors.numpy.load_file(str(directory / "adapter_model.safetensors"))
    return tensors, json.loads((directory / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    "dims, axis", [(MAXTEXT, 1), (MAXTEXT, -1), (COINCIDING, 1)], ids=["1", "-1", "coinciding"]
)
def test_files_are_the_unrolled_twins_and_load_back_exactly(tmp_path, dims, axis):
    _, unrolled, model, scanned, config, x = _twins(dims, axis)
    jaxlora.save_adapter(unrolled, tmp_path / "unrolled", config)
    jaxlora.save_adapter(scanned, tmp_path / "scanned", config, layer_names=NAMES)
    tensors_u, config_u = _read(tmp_path / "unrolled")
    tensors_s, config_s = _read(tmp_path / "scanned")
    assert sorted(tensors_s) == sorted(tensors_u)
    assert "base_model.model.layers_2.out.lora_A.weight" in tensors_s
    for key, value in tensors_u.items():
        np.testing.assert_array_equal(tensors_s[key], value, err_msg=key)
    assert config_s == config_u

    adapter = jaxlora.split(scanned)[0]
    # into the injected tree (another adapter): its records say the axis
    injected = jaxlora.inject(
        model.init(jax.random.key(0), x)["params"],
        config,
        jax.random.key(9),
        layouts=jaxlora.layouts(model, x),
    )
    into_injected = jaxlora.load_adapter(injected, tmp_path / "unrolled", layer_names=NAMES)
    assert _max_err(jaxlora.split(into_injected)[0], adapter) == 0.0
    assert into_injected["layers"]["query"].get(STACK_NAME) == adapter["layers"]["query"].get(
        STACK_NAME
    )
    # into the plain base: the layouts say the axis
    base = jaxlora.split(scanned)[1]
    layouts = jaxlora.layouts(model, x)
    into_base = jaxlora.load_adapter(
        base, tmp_path / "unrolled", layer_names=NAMES, layouts=layouts
    )
    assert _max_err(jaxlora.split(into_base)[0], adapter) == 0.0
    assert into_base["layers"]["query"][STACK_NAME] == adapter["layers"]["query"][STACK_NAME]
    jax.tree.map(np.testing.assert_array_equal, jaxlora.split(into_base)[1], base)


# ------------------------------------------------------------------------------- refusals


def test_a_plain_tree_on_another_axis_needs_the_layouts_to_load(tmp_path):
    _, unrolled, _, scanned, config, _ = _twins(MAXTEXT, 1)
    jaxlora.save_adapter(unrolled, tmp_path, config)
    base = jaxlora.split(scanned)[1]
    with pytest.raises(ValueError, match=r"under 'layers' share no layer axis at position 0.*"):
        jaxlora.load_adapter(base, tmp_path, layer_names=NAMES)


def test_per_layer_targets_count_the_layers_on_the_scan_axis():
    """A per-layer path names each of the L layers on the scan axis (not the D rows of axis
    0): targeting all of them adapts the stack."""
    x = _inputs(MAXTEXT)
    model = Scanned(MAXTEXT, 1)
    base = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoRAConfig(r=2, targets=r"layers_[0-2]\.query")
    params = jaxlora.inject(
        base, config, jax.random.key(1), layouts=jaxlora.layouts(model, x), layer_names=NAMES
    )
    assert params["layers"]["query"]["lora_a"].shape == (16, 3, 2)


def test_a_scan_axis_a_factor_does_not_have_is_refused():
    """nn.scan stacks every param of the layer on its axis: lora_b (r, D) of a (N, H, D)
    kernel has no axis 3 to be stacked on."""

    class Out(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            y = nn.DenseGeneral(4, axis=(-2, -1), use_bias=False, name="out")(x)
            return x + y[..., None, :2], None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Out, variable_axes={"params": 3}, split_rngs={"params": True}, length=3)
            return stack(name="layers")(x, None)[0]

    model, x = Model(), jnp.ones((2, 5, 2, 2))
    base = model.init(jax.random.key(0), x)["params"]
    assert base["layers"]["out"]["kernel"].shape == (2, 2, 4, 3)
    layouts = jaxlora.layouts(model, x)
    assert layouts["layers.out"].axis == 3
    config = jaxlora.LoRAConfig(r=2, targets=["out"])
    with pytest.raises(TypeError, match=r"'layers\.out' is stacked on axis 3 .* 'lora_b' \(2, 4\)"):
        jaxlora.inject(base, config, jax.random.key(1), layouts=layouts)


def test_many_adapter_stacks_hold_a_scanned_adapter_with_its_layer_axis():
    """Refused until tests/test_stacked_serving.py, which serves them: a stack holds each
    layer's factors, the layer axis read from the 'lora_stack' record moved after the slot."""
    *_, scanned, config, _ = _twins(MAXTEXT, 1)
    stack = jaxlora.stack_adapters([(scanned, config)])
    assert stack.scanned == tuple((f"layers.{t}", 1) for t in sorted(TARGETS))
    b = np.asarray(scanned["layers"]["query"]["lora_b"])  # (r, L, N, H)
    np.testing.assert_array_equal(stack.lora_b["layers.query"][0], np.moveaxis(b, 1, 0))


class _BoxedLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "heads", "kv"))
        q = nn.DenseGeneral((2, 4), kernel_init=init, use_bias=False, name="query")(x)
        return x + q.reshape(x.shape), None


class _BoxedScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _BoxedLayer,
            variable_axes={"params": 1},
            split_rngs={"params": True},
            length=3,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return stack(name="layers")(x, None)[0]


def test_boxed_names_put_the_layer_axis_name_at_the_scan_axis():
    model, x = _BoxedScan(), jnp.ones((2, 8))
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["query"])
    params = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    spec = nn.get_partition_spec(params)["params"]["layers"]["query"]
    assert spec["kernel"] == P("embed", "layers", "heads", "kv")
    assert spec["lora_a"] == P("embed", "layers", None)
    assert spec["lora_b"] == P(None, "layers", "heads", "kv")
    query = params["params"]["layers"]["query"]
    b = jax.random.normal(jax.random.key(2), (2, 3, 2, 4)) * 0.3
    params["params"]["layers"]["query"] = {**query, "lora_b": query["lora_b"].replace_boxed(b)}
    with jaxlora.intercept(config):
        y = model.apply(params, x)  # the scan strips the layer axis name from the adapter too
    merged = jaxlora.merge(nn.meta.unbox(params), alpha=4.0)
    assert float(jnp.max(jnp.abs(model.apply(merged, x) - y))) < 1e-5
    assert float(jnp.max(jnp.abs(model.apply(variables, x) - y))) > 1e-2


# ------------------------------------------------------------------------------------- NNX


def _nnx_stack(out_axes: int, width: int = 16, length: int = 3):
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(width, width // 2 if width > 4 else width, rngs=rngs)

    @nnx.split_rngs(splits=length)
    @nnx.vmap(in_axes=(0,), out_axes=out_axes)
    def create(rngs):
        return Block(rngs)

    return nnx.Dict(blocks=create(nnx.Rngs(0)))


@pytest.mark.parametrize(
    "out_axes, width, match",
    [
        (1, 16, r"not axis 0 but one of \[1\]"),
        (-1, 16, r"not axis 0 but one of \[-1\]"),
        (0, 4, r"ambiguous: sizes coincide, so axes \[-2, -1, 0, 1\] all fit"),
    ],
    ids=["out_axes=1", "out_axes=-1", "coinciding"],
)
def test_nnx_stacks_off_axis_0_are_refused_and_nothing_changes(out_axes, width, match):
    """jaxlora.nnx stacks adapters on axis 0: an nnx.vmap(out_axes=1) stack used to fail
    inside inject with a bare vmap size error (or, where sizes coincide, be misread)."""
    from flax import nnx

    import jaxlora.nnx

    model = _nnx_stack(out_axes, width, 4 if width == 4 else 3)
    kernel = np.asarray(model["blocks"].fc.kernel[...])
    with pytest.raises(TypeError, match=r"inject: layer 'blocks\.fc' is stacked .*" + match):
        jaxlora.nnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["fc"]), nnx.Rngs(1))
    assert type(model["blocks"].fc) is nnx.Linear and not hasattr(model, "lora_config")
    np.testing.assert_array_equal(np.asarray(model["blocks"].fc.kernel[...]), kernel)
