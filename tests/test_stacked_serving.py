"""Many adapters in one batch for layers stacked on a layer axis (issue #13).

Linen: a plain ``nn.Dense``/``nn.DenseGeneral`` inside ``nn.scan`` (the MaxText-like layer of
``tests.test_scan_axis``: DenseGeneral q/k/v/out with heads, a Dense MLP, ``nn.remat``, the
params scanned on axis k, MaxText's ``param_scan_axis=1`` among them) is stacked as a scanned
op-level layer is (one mechanism, ``tests.test_multiweight_serving``): ``lora_a`` (N, L, *in,
R), ``lora_b`` (N, L, R, *out), carried into the scan body by ``AdapterStack.params(base)``
and sliced per layer as the kernels are; each layer's call adds the gathered branch of its
own slice.

NNX: a ``LoRALinear`` of an ``nnx.vmap`` stack (``tests._nnx_stacks``, run by ``nnx.scan``)
becomes a ``MultiLoRALinear`` whose stacks carry the layer axis in front, (L, N, …), so the
scan slices them with the kernel and each layer's call is the one-layer stacked layer; an
op-level layer of such a stack (the gated MLP of ``tests.test_oplevel_multiweight``, three
weights) becomes a stacked op-level layer the same way.

Both: row i of a batch equals the single-adapter model of its adapter (fp32, 1e-6 of the
row's scale), a base row (-1) the base model bit for bit; slots are set, replaced and cleared
without a retrace; what is still unsupported is refused by name and changes nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora import LoRAConfig
from jaxlora import nnx as jnnx
from tests._nnx_stacks import ScannedLayers
from tests.test_multi_oplevel import _nnx_forward, _same, _state
from tests.test_multiweight_serving import _linen_served
from tests.test_oplevel_multiweight import WEIGHTS, _Stacked
from tests.test_oplevel_multiweight import D as OP_D
from tests.test_oplevel_multiweight import F as OP_F
from tests.test_scan_axis import TARGETS, Scanned, _rel_err

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-6
CONFIG = jaxlora.LoRAConfig(r=2, alpha=4.0, targets=TARGETS)
OTHER = jaxlora.LoRAConfig(r=1, alpha=3.0, targets=TARGETS)  # another rank and scale
INDEX = jnp.array([1, -1, 0, 0, 1, -1])


# --------------------------------------------------- Linen: nn.Dense/DenseGeneral in nn.scan


# (D, N, H, F, L): MaxText-like (smaller than tests.test_scan_axis's, to be fast), and sizes
# that all coincide (no shape tells where the layer axis is)
SMALL = (8, 2, 4, 16, 2)
COINCIDING = (2, 2, 2, 2, 2)


@functools.cache
def _linen(dims: tuple, axis: int):
    """(scanned model, plain base, [(adapter, config)] ×2, x of 6 examples): the MaxText-like
    scanned layer of ``tests.test_scan_axis`` (layer axis ``axis``) adapted on every
    projection, every B random, and a second adapter of the same base with rank 1 and
    another alpha (numpy values: no compile per shape)."""
    model = Scanned(dims, axis)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3, dims[0])), jnp.float32)
    base = model.init(jax.random.key(0), x)["params"]
    lora = jaxlora.inject(base, CONFIG, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    first = _with_factors(lora, axis, lambda a, b: (a, 0.2 * _normal(b.shape, 3)))
    second = _with_factors(  # factors of the first's order: outputs of order 1
        lora,
        axis,
        lambda a, b: (0.2 * _normal(a[..., :1].shape, 4), 0.2 * _normal(b[:, :1].shape, 5)),
    )
    return model, base, [(first, CONFIG), (second, OTHER)], x


def _normal(shape: tuple, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _with_factors(params, axis: int, new):
    """``params`` with each layer's (lora_a, lora_b) replaced by ``new(a, b)``, both with the
    layer axis in front ((L, *in, r) and (L, r, *out)) and put back at ``axis``."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and "lora_a" in value:
            a, b = (np.moveaxis(np.asarray(value[n]), axis, 0) for n in ("lora_a", "lora_b"))
            a, b = new(a, b)
            a, b = (jnp.asarray(np.moveaxis(f, 0, axis)) for f in (a, b))
            out[key] = {**value, "lora_a": a, "lora_b": b}
        else:
            out[key] = _with_factors(value, axis, new) if isinstance(value, dict) else value
    return out


@functools.cache
def _alone(dims: tuple, axis: int) -> dict:
    """{adapter index: the model's output with that adapter alone (-1: the base)}."""
    model, base, adapters, x = _linen(dims, axis)
    out = {-1: model.apply({"params": base}, x)}
    for i, (params, config) in enumerate(adapters):
        with jaxlora.intercept(config):
            out[i] = model.apply({"params": params}, x)
    return out


def _rows_close(got, alone: dict, index, tol: float = TOL) -> None:
    """Each row of ``got`` equals its adapter's model alone (to ``tol`` of the row's scale),
    a base row (-1) the base model bit for bit."""
    for row, i in enumerate(np.asarray(index)):
        if i == -1:
            np.testing.assert_array_equal(got[row], alone[-1][row])
        else:
            assert _rel_err(got[row], alone[int(i)][row]) < tol, (row, i)


# MaxText's param_scan_axis=1, and a negative axis where sizes coincide (the default axis 0
# is tests.test_multi_adapter's ScanGPT; two cases only, to stay fast)
CASES = [(SMALL, 1), (COINCIDING, -1)]


@pytest.mark.parametrize("dims, axis", CASES, ids=["axis1", "coinciding-axis-1"])
def test_linen_scanned_dense_rows_equal_their_single_adapter_models(dims, axis):
    """Used to be refused ("'layers.query' ... stacked over 1 leading layer axis(es) ...
    which this operation does not handle")."""
    model, base, adapters, x = _linen(dims, axis)
    d, n, h, _, length = dims
    stack = jaxlora.stack_adapters(adapters, capacity=3)
    assert stack.scanned == tuple((f"layers.{t}", axis) for t in sorted(TARGETS))
    assert stack.roles == () and stack.modules == ()  # linear layers, not op-level ones
    assert stack.lora_a["layers.query"].shape == (3, length, d, 2)  # rank 2: the largest
    assert stack.lora_b["layers.query"].shape == (3, length, 2, n, h)
    assert stack.lora_a["layers.out"].shape == (3, length, n, h, 2)
    assert not np.asarray(stack.lora_a["layers.fc"])[1, :, :, 1:].any()  # r=1 zero-padded
    node = stack.params(base)["layers"]["query"]  # the layer axis where the scan slices it
    assert node["lora_served_a"].shape == np.moveaxis(np.empty((length, 3, d, 2)), 0, axis).shape
    assert node["kernel"] is base["layers"]["query"]["kernel"]  # the base itself, no copy
    served, _ = _linen_served(model)
    got = served(stack, base, x, INDEX)
    alone = _alone(dims, axis)
    assert _rel_err(alone[0], alone[-1]) > 1e-2 and _rel_err(alone[1], alone[0]) > 1e-2
    _rows_close(got, alone, INDEX)


def test_linen_scanned_dense_slots_set_replace_clear_without_a_retrace():
    model, base, adapters, x = _linen(SMALL, 1)
    alone = _alone(SMALL, 1)
    stack = jaxlora.stack_adapters(adapters[:1], capacity=3, rank=2)
    served, traces = _linen_served(model)
    index = jnp.array([0, -1, 0, -1, 0, 0])
    _rows_close(served(stack, base, x, index), alone, index)
    stack = stack.set(2, *adapters[1]).set(0, *adapters[1])  # an empty slot, a replaced one
    index = jnp.array([2, 0, -1, 2, 0, -1])
    got = served(stack, base, x, index)
    _rows_close(got, {**alone, 0: alone[1], 2: alone[1]}, index)
    stack = stack.clear(0)
    index = jnp.array([-1, 2, 2, -1, -1, 2])
    _rows_close(served(stack, base, x, index), {**alone, 2: alone[1]}, index)
    assert len(traces) == 1
    assert not np.asarray(stack.lora_b["layers.mlp"])[0].any()
    y = served(stack, base, x, jnp.array([0, -1, 2, 2, 2, 2]))  # traced: the empty slot is NaN
    assert np.isnan(np.asarray(y[0])).all() and not np.isnan(np.asarray(y[1:])).any()
    with pytest.raises(ValueError, match=r"adapter index values \[0\] name no adapter"):
        with jaxlora.intercept_stack(stack, jnp.array([0, -1, 2, 2, 2, 2])):  # concrete
            model.apply({"params": stack.params(base)}, x)


def test_linen_scanned_dense_refusals_name_the_layer_and_change_nothing():
    model, base, adapters, x = _linen(SMALL, 1)
    stack = jaxlora.stack_adapters(adapters[:1], capacity=2)
    before = jax.tree.map(np.asarray, stack)
    index = jnp.zeros(x.shape[0], jnp.int32)
    # applied on the plain base: the scan body would have no adapters
    with pytest.raises(ValueError, match=r"layer 'layers\.\w+' is stacked by nn.scan \(layer axis"):
        with jaxlora.intercept_stack(stack, index):
            model.apply({"params": base}, x)
    # params made by a stack of another capacity: not this stack's slices
    wider = jaxlora.stack_adapters(adapters[:1], capacity=3)
    with pytest.raises(ValueError, match=r"layer 'layers\.\w+': 'lora_served_a' is \(3, "):
        with jaxlora.intercept_stack(stack, index):
            model.apply({"params": wider.params(base)}, x)
    # the same adapter laid out as a stack over the layer axis 0 (kernel and factors moved)
    moved = {
        name: {k: jnp.moveaxis(node[k], 1, 0) for k in ("kernel", "lora_a", "lora_b")}
        for name, node in adapters[0][0]["layers"].items()
    }
    with pytest.raises(ValueError, match=r"layer 'layers.fc'.*\(2, 8, 16\).*another base model"):
        stack.set(1, {"layers": moved}, adapters[0][1])
    with pytest.raises(ValueError, match=r"layer 'layers.\w+' already holds 'lora_served_a'"):
        stack.params(stack.params(base))
    after = jax.tree.map(np.asarray, stack)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))


def test_linen_nested_scans_are_refused_by_name():
    """A Dense stacked over two layer axes (an nn.scan inside an nn.scan): its scan body
    would not see one layer's slice of a stack laid out for one layer axis."""
    params = {
        "outer": {
            "dense": {
                "kernel": jnp.ones((2, 3, 4, 5)),
                "lora_a": jnp.ones((2, 3, 4, 1)),
                "lora_b": jnp.ones((2, 3, 1, 5)),
            }
        }
    }
    config = jaxlora.LoRAConfig(r=1, targets=["dense"])
    with pytest.raises(ValueError, match=r"layer 'outer.dense'.*stacked over 2 layer axes"):
        jaxlora.stack_adapters([(params, config)])


# ------------------------------------------------------------ NNX: LoRALinear of nnx.vmap


class _Block(nnx.Module):
    """Two ``nnx.Linear`` layers (D → F → D) with a residual."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc0 = nnx.Linear(NNX_D, NNX_F, rngs=rngs)
        self.fc1 = nnx.Linear(NNX_F, NNX_D, rngs=rngs)

    def __call__(self, x):
        return x + self.fc1(jax.nn.gelu(self.fc0(x)))


class _Layers(ScannedLayers):
    block = _Block
    length = 3


NNX_D, NNX_F = 4, 8
NNX_RANKS = [(2, 4.0), (1, 3.0)]  # two ranks and scales in one stack
X_NNX = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3, NNX_D)), jnp.float32)


@functools.cache
def _nnx_sources() -> tuple[nnx.Module, list[nnx.Module]]:
    """(the base, [single-adapter models]): fc0 and fc1 of every layer adapted, every B
    random (numpy), each adapter its own rank and alpha."""
    base = _Layers(nnx.Rngs(0))
    out = []
    for seed, (r, alpha) in enumerate(NNX_RANKS):
        model = nnx.clone(base)
        jnnx.inject(model, LoRAConfig(r=r, alpha=alpha, targets=["fc0", "fc1"]), nnx.Rngs(seed))
        for layer in (model.layers.fc0, model.layers.fc1):
            layer.lora_b[...] = jnp.asarray(0.3 * _normal(layer.lora_b.shape, 10 + seed))
        out.append(model)
    return base, out


def _nnx_serving(sources, capacity: int = 3):
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=capacity)
    for slot, source in enumerate(sources):
        jnnx.set_adapter(serving, slot, source)
    return serving


def _nnx_alone() -> dict:
    base, sources = _nnx_sources()
    return {-1: base(X_NNX), **{i: source(X_NNX) for i, source in enumerate(sources)}}


def test_nnx_vmap_stacked_linear_rows_equal_their_single_adapter_models():
    """Used to be refused ("to_multi: layers ['layers.fc0', 'layers.fc1'] are stacked")."""
    _, sources = _nnx_sources()
    serving = _nnx_serving(sources)
    fc0 = serving.layers.fc0
    assert isinstance(fc0, jnnx.MultiLoRALinear) and fc0.capacity == 3 and fc0.rank == 2
    assert fc0.lora_a.shape == (3, 3, NNX_D, 2) and fc0.lora_b.shape == (3, 3, 2, NNX_F)
    assert fc0.scale.shape == fc0.occupied.shape == (3, 3)  # (layers, slots)
    a = np.asarray(fc0.lora_a[...])
    np.testing.assert_array_equal(a[:, 1, :, :1], np.asarray(sources[1].layers.fc0.lora_a[...]))
    assert not a[:, 1, :, 1:].any() and not a[:, 2].any()  # r=1 zero-padded, slot 2 empty
    np.testing.assert_array_equal(np.asarray(fc0.scale[...])[:, 1], 3.0)
    forward, _ = _nnx_forward()
    index = jnp.array([1, -1, 0, 1])
    got = forward(serving, X_NNX, index)
    alone = _nnx_alone()
    assert _rel_err(alone[0], alone[-1]) > 1e-2 and _rel_err(alone[1], alone[0]) > 1e-2
    _rows_close(got, alone, index)


def test_nnx_vmap_stacked_slots_set_replace_clear_without_a_retrace():
    _, sources = _nnx_sources()
    alone = _nnx_alone()
    serving = _nnx_serving(sources[:1])
    forward, traces = _nnx_forward()
    _rows_close(forward(serving, X_NNX, jnp.array([0, -1, 0, 0])), alone, [0, -1, 0, 0])
    jnnx.set_adapter(serving, 2, sources[1])  # an empty slot
    jnnx.set_adapter(serving, 0, sources[1])  # a replaced one
    index = jnp.array([2, 0, -1, 0])
    _rows_close(forward(serving, X_NNX, index), {**alone, 0: alone[1], 2: alone[1]}, index)
    jnnx.clear_adapter(serving, 0)
    index = jnp.array([-1, 2, 2, -1])
    _rows_close(forward(serving, X_NNX, index), {**alone, 2: alone[1]}, index)
    assert len(traces) == 1
    assert not np.asarray(serving.layers.fc1.lora_b[...])[:, 0].any()
    assert not np.asarray(serving.layers.fc1.occupied[...])[:, 0].any()
    y = forward(serving, X_NNX, jnp.array([0, -1, 2, 2]))  # the emptied slot: NaN rows
    assert np.isnan(np.asarray(y[0])).all() and not np.isnan(np.asarray(y[1:])).any()


def test_nnx_vmap_stacked_refusals_name_the_layer_and_change_nothing():
    _, sources = _nnx_sources()
    serving = _nnx_serving(sources[:1], capacity=2)
    before = _state(serving)
    with pytest.raises(ValueError, match=r"layer 'layers.fc0' has r=2, above the stack's rank"):
        jnnx.set_adapter(_nnx_serving(sources[1:], capacity=2), 0, sources[0])
    other = nnx.clone(sources[1])
    other.layers.fc1.kernel[...] = other.layers.fc1.kernel[...] + 1.0  # another base
    with pytest.raises(ValueError, match=r"layer 'layers.fc1'.*kernel differs"):
        jnnx.set_adapter(serving, 1, other)
    bad = nnx.clone(sources[1])
    bad.layers.fc1.lora_b[...] = bad.layers.fc1.lora_b[...].at[2, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"layer 'layers.fc1'.*non-finite"):
        jnnx.set_adapter(serving, 1, bad)
    with pytest.raises(ValueError, match=r"holds the stacks of 3 stacked layers .*per layer"):
        with jnnx.adapter_index(jnp.zeros(4, jnp.int32)):
            serving.layers.fc0(X_NNX)  # the stack called unsliced
    assert _same(before, _state(serving))


def test_nnx_nested_vmap_stacks_are_refused_and_change_nothing():
    """A LoRALinear stacked over two layer axes (nested nnx.vmap): a per-layer call would
    not see one layer's slice of stacks laid out for one layer axis."""

    layer = jnnx.LoRALinear(4, 5, r=1, rngs=nnx.Rngs(0))
    # what nested nnx.vmap makes: every weight (2, 3, …), two leading layer axes
    layer.kernel = nnx.Param(jnp.ones((2, 3, 4, 5)))
    layer.bias = nnx.Param(jnp.zeros((2, 3, 5)))
    layer.lora_a = nnx.LoRAParam(jnp.ones((2, 3, 4, 1)))
    layer.lora_b = nnx.LoRAParam(jnp.ones((2, 3, 1, 5)))
    model = nnx.Dict(fc=layer)
    before = _state(model)
    with pytest.raises(ValueError, match=r"to_multi: layers \['fc'\] are stacked over several"):
        jnnx.to_multi(model, capacity=2)
    assert type(model["fc"]) is jnnx.LoRALinear and _same(before, _state(model))


# ------------------------------------------- NNX: op-level layers of an nnx.vmap stack


@functools.cache
def _op_sources() -> tuple[nnx.Module, list[nnx.Module]]:
    """(the base, [single-adapter models]): the gated MLP of ``tests.test_oplevel_multiweight``
    stacked by nnx.vmap (two layers), its three weights adapted at their products, every
    factor random (numpy), each adapter its own rank and alpha."""
    base = _Stacked()
    out = []
    for seed, (r, alpha) in enumerate(NNX_RANKS):
        model = nnx.clone(base)
        config = LoRAConfig(r=r, alpha=alpha, targets=["layers"])
        jnnx.inject(model, config, nnx.Rngs(seed), inputs=(X_OP,))
        for w in WEIGHTS:  # outputs of order 1, where fp32 rounds to ~1e-7
            for i, f in enumerate(model.layers.factors(w)):
                f[...] = jnp.asarray(0.2 * _normal(f.shape, 20 + 2 * seed + i))
        out.append(model)
    return base, out


X_OP = jnp.asarray(np.random.default_rng(5).normal(size=(3, 2, OP_D)), jnp.float32)


def test_nnx_vmap_stacked_op_level_rows_equal_their_single_adapter_models():
    """Used to be refused ("to_multi: layers ['layers'] are stacked"): each weight's stack
    (L, N, ...) is sliced per layer by the model's nnx.scan with the weight."""
    base, sources = _op_sources()
    serving = _nnx_serving(sources)
    mlp = serving.layers
    assert isinstance(mlp, jnnx.MultiOpAdapter) and mlp.capacity == 3 and mlp.rank == 2
    shapes = {w: tuple(f.shape for f in mlp.factors(w)) for w in WEIGHTS}
    assert shapes["w_up"] == ((2, 3, OP_D, 2), (2, 3, 2, OP_F))
    assert shapes["w_down"] == ((2, 3, OP_F, 2), (2, 3, 2, OP_D))
    assert mlp.scale.shape == (2, 3)
    forward, traces = _nnx_forward()
    index = jnp.array([1, -1, 0])
    alone = {-1: base(X_OP), **{i: s(X_OP) for i, s in enumerate(sources)}}
    assert _rel_err(alone[0], alone[-1]) > 1e-2 and _rel_err(alone[1], alone[0]) > 1e-2
    _rows_close(forward(serving, X_OP, index), alone, index)
    jnnx.set_adapter(serving, 0, sources[1])  # a replaced slot: no retrace
    _rows_close(forward(serving, X_OP, index), {**alone, 0: alone[1]}, index)
    assert len(traces) == 1
