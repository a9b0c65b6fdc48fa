"""Many adapters in one batch for an NNX module with several adapted weights (issue #13).

``jaxlora.nnx.to_multi`` of a model holding an op-level module whose several weights each
enter their own product (the gated MLP of ``tests.test_oplevel_multiweight``: ``w_gate``,
``w_up``, ``w_down``) gives it one adapter stack per weight (``<weight>_lora_a``/``_b``, as
its ``OpAdapter`` names its factors) and one ``scale``/``occupied`` for the module, each weight
served at its own product by the single-weight gathered branch (one mechanism, as Linen's
``stack_adapters`` serves such a module unrolled: ``tests.test_multiweight_rest``). Row i of a
batch equals the single-adapter model of its adapter (fp32, 1e-6), a base row (-1) the base
model bit for bit; slots are set, replaced and cleared without a retrace; refusals name the
layer (and the weight) and change nothing.
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
from tests.test_multi_oplevel import _nnx_forward, _same, _state
from tests.test_multiweight_rest import CONFIG, L, Scanned, _injected, _random_b
from tests.test_multiweight_rest import D as D_LINEN
from tests.test_multiweight_rest import F as F_LINEN
from tests.test_multiweight_rest import R as R_LINEN
from tests.test_oplevel_multiweight import (
    ALPHA,
    WEIGHTS,
    Block,
    D,
    F,
    _randomize,
    _reference,
)
from tests.test_scan_axis import _rel_err

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-6
RANKS_ALPHAS = [(2, ALPHA), (1, 5.0)]  # two ranks and scales in one stack
X = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, D)), jnp.float32)  # 3 examples
X_LINEN = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, D_LINEN)), jnp.float32)


def _sources() -> tuple[Block, list[Block]]:
    """(the base, [single-adapter models]): the gated MLP and a Linear head adapted, every
    factor random (non-zero), each adapter its own rank and alpha."""
    base = Block()
    out = []
    for seed, (r, alpha) in enumerate(RANKS_ALPHAS):
        model = nnx.clone(base)
        config = LoRAConfig(r=r, alpha=alpha, targets=["mlp", "head"])
        jnnx.inject(model, config, nnx.Rngs(seed), inputs=(X,))
        _randomize(model.mlp, seed=10 + seed)
        for w in WEIGHTS:  # outputs of order 1, where fp32 rounds to ~1e-7
            b = model.mlp.factors(w)[1]
            b[...] = b[...] * 0.2
        b = model.head.lora_b
        b[...] = 0.2 * jax.random.normal(jax.random.key(seed), b.shape)
        out.append(model)
    return base, out


def _serving(sources: list[Block], capacity: int = 3) -> Block:
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=capacity)
    for slot, source in enumerate(sources):
        jnnx.set_adapter(serving, slot, source)
    return serving


def _close(got, want) -> None:
    """Equal to ``TOL`` of the output's scale (fp32)."""
    err = float(jnp.max(jnp.abs(got - want)))
    assert err <= TOL * max(float(jnp.max(jnp.abs(want))), 1.0), err


def _assert_same(before: dict, after: dict) -> None:
    assert _same(before, after)


@pytest.fixture(scope="module")
def setup():
    return _sources()


def test_each_weight_has_its_own_stack(setup):
    """Used to be refused ('to_multi: layers ['mlp'] have several adapted weights')."""
    _, sources = setup
    serving = _serving(sources)
    mlp = serving.mlp
    assert isinstance(mlp, jnnx.MultiOpAdapter) and mlp.lora_weights == WEIGHTS
    shapes = {w: tuple(f.shape for f in mlp.factors(w)) for w in WEIGHTS}
    assert shapes == {
        "w_down": ((3, F, 2), (3, 2, D)),
        "w_gate": ((3, D, 2), (3, 2, F)),
        "w_up": ((3, D, 2), (3, 2, F)),
    }
    assert mlp.scale.shape == mlp.occupied.shape == (3,)
    assert not hasattr(mlp, "lora_a")  # the one-weight names belong to one-weight modules
    # the slots hold each source's factors (zero-padded to the stack's rank) and scale
    for slot, source in enumerate(sources):
        r = source.mlp.r
        for w in WEIGHTS:
            (a, b), (sa, sb) = mlp.factors(w), source.mlp.factors(w)
            np.testing.assert_array_equal(np.asarray(a[...])[slot, :, :r], np.asarray(sa[...]))
            np.testing.assert_array_equal(np.asarray(b[...])[slot, :r], np.asarray(sb[...]))
            assert not np.asarray(a[...])[slot, :, r:].any()
        assert float(mlp.scale[...][slot]) == source.mlp.scaling
    assert not nnx.state(serving, nnx.LoRAParam)  # served, never trained


def test_rows_equal_their_single_adapter_models(setup):
    base, sources = setup
    forward, _ = _nnx_forward()
    index = jnp.array([1, -1, 0])
    got = forward(_serving(sources), X, index)
    want = {-1: base(X), 0: sources[0](X), 1: sources[1](X)}
    assert float(jnp.max(jnp.abs(want[0] - want[-1]))) > 1e-2  # the adapters matter
    assert float(jnp.max(jnp.abs(want[1] - want[0]))) > 1e-2
    for row, i in enumerate(np.asarray(index)):
        _close(got[row], want[int(i)][row])
    np.testing.assert_array_equal(got[1], base(X)[1])  # the base row bit for bit
    # the gated MLP's rows against the closed form (numpy float64) of each weight's adapter
    served = _mlp_rows(sources, index)
    for row, i in enumerate(np.asarray(index)):
        factors = {} if i < 0 else _factors(sources[int(i)])
        scale = 0.0 if i < 0 else sources[int(i)].mlp.scaling
        ref = _reference(factors, x=np.asarray(X)[row : row + 1], scale=scale)[0]
        np.testing.assert_allclose(served[row], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _factors(model: Block) -> dict:
    return {w: tuple(np.asarray(f[...]) for f in model.mlp.factors(w)) for w in WEIGHTS}


def _mlp_rows(sources: list[Block], index: jax.Array) -> np.ndarray:
    """The stacked gated MLP alone on ``X`` with ``index``."""
    mlp = _serving(sources).mlp
    with jnnx.adapter_index(index):
        return np.asarray(mlp(X))


def test_set_replace_and_clear_slots_without_a_retrace(setup):
    base, sources = setup
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=3)
    forward, traces = _nnx_forward()
    jnnx.set_adapter(serving, 0, sources[0])
    y0 = forward(serving, X, jnp.array([0, -1, 0]))
    jnnx.set_adapter(serving, 2, sources[1])  # an empty slot (another rank)
    jnnx.set_adapter(serving, 0, sources[1])  # a replaced one
    y = forward(serving, X, jnp.array([2, 0, -1]))
    jnnx.clear_adapter(serving, 0)
    y_cleared = forward(serving, X, jnp.array([2, -1, -1]))
    assert len(traces) == 1
    want0, want1, want_base = sources[0](X), sources[1](X), base(X)
    _close(y0[0], want0[0])
    _close(y0[2], want0[2])
    _close(y[0], want1[0])
    _close(y[1], want1[1])  # slot 0 now adapter 1
    np.testing.assert_array_equal(y[2], want_base[2])
    _close(y_cleared[0], want1[0])
    np.testing.assert_array_equal(y_cleared[1], want_base[1])
    for w in WEIGHTS:  # a cleared slot holds zeros in each weight's stack
        assert not any(np.asarray(f[...])[0].any() for f in serving.mlp.factors(w))
    assert not bool(serving.mlp.occupied[...][0]) and float(serving.mlp.scale[...][0]) == 0.0
    with pytest.raises(ValueError, match=r"layer '\w+'.*values \[0\] name no adapter"):
        with jnnx.adapter_index(jnp.array([0, -1, 2])):
            serving(X)


def test_set_adapter_refusals_name_the_weight_and_change_nothing(setup):
    base, sources = setup
    serving = _serving(sources[:1], capacity=2)
    before = _state(serving)
    # only w_up of the gated MLP adapted: a one-weight module, not the stack's three weights
    one = nnx.clone(base)
    config = LoRAConfig(r=1, targets=["head"], target_parameters=["mlp.w_up"])
    jnnx.inject(one, config, nnx.Rngs(3), inputs=(X,))
    with pytest.raises(
        ValueError,
        match=r"layer 'mlp': the adapter was made for the weights 'w_up' as .*, the stack's "
        r"for 'w_down' as .*'w_gate' as .*'w_up' as",
    ):
        jnnx.set_adapter(serving, 1, one)
    # a non-finite factor in the last weight: the head and the earlier weights not written
    bad = nnx.clone(sources[1])
    bad.mlp.w_up_lora_b[...] = bad.mlp.w_up_lora_b[...].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"layer 'mlp', weight 'w_up': .*non-finite"):
        jnnx.set_adapter(serving, 1, bad)
    # another base in one weight
    other = nnx.clone(sources[1])
    other.mlp.w_down[...] = other.mlp.w_down[...] + 1.0
    with pytest.raises(ValueError, match=r"layer 'mlp', weight 'w_down'.*base kernel differs"):
        jnnx.set_adapter(serving, 1, other)
    with pytest.raises(ValueError, match=r"layer '\w+' has r=2, above the stack's rank 1"):
        jnnx.set_adapter(_serving(sources[1:], capacity=2), 0, sources[0])
    _assert_same(before, _state(serving))


def test_still_unsupported_is_refused_by_name_and_changes_nothing():
    """Examples moved off axis 0 before one weight's product. (A multi-weight module of an
    nnx.vmap stack, refused here before, is served since tests/test_stacked_serving.py.)"""
    served = Swapped()
    jnnx.inject(served, LoRAConfig(r=2, targets=["mlp"]), nnx.Rngs(1), inputs=(X,))
    source = nnx.clone(served)
    jnnx.to_multi(served, capacity=2)
    jnnx.set_adapter(served, 0, source)
    before = _state(served)
    with pytest.raises(
        ValueError, match=r"layer 'mlp', weight 'w_down': the product's activation \(2, 3, 12\)"
    ):
        with jnnx.adapter_index(jnp.zeros(3, jnp.int32)):
            served(X)
    _assert_same(before, _state(served))


class SwappedMLP(nnx.Module):
    """The gated MLP whose down projection sees the examples on axis 1 (transposed)."""

    def __init__(self):
        rng = np.random.default_rng(2)
        for name, shape in (("w_gate", (D, F)), ("w_up", (D, F)), ("w_down", (F, D))):
            setattr(self, name, nnx.Param(jnp.asarray(rng.normal(size=shape), jnp.float32)))

    def __call__(self, x):
        h = jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_up[...])
        return jnp.einsum("tbf,fd->btd", jnp.swapaxes(h, 0, 1), self.w_down[...])


class Swapped(nnx.Module):
    def __init__(self):
        self.mlp = SwappedMLP()

    def __call__(self, x):
        return self.mlp(x)


# ------------------------------------------- Linen: a module with several weights in nn.scan


@functools.cache
def _linen_adapters(axis: int):
    """(scanned model, plain base, [(adapter, config)] ×2): the scanned gated MLP of
    ``tests.test_multiweight_rest`` (layer axis ``axis``), two adapters of the same base,
    every B random, with their own alpha."""
    model = Scanned(axis)
    scanned = _random_b(_injected(model, X_LINEN))
    other = LoRAConfig(r=R_LINEN, alpha=5.0, targets=["mlp"])
    adapters = [(scanned, CONFIG), (_other_b(scanned), other)]
    return model, jaxlora.split(scanned)[1], adapters


def _other_b(params):
    """Every ``<weight>_lora_b`` another non-zero value (numpy: no compile per shape)."""

    def other(path, v):
        name = getattr(path[-1], "key", "")
        if isinstance(name, str) and name.endswith("lora_b"):
            return jnp.asarray(-0.7 * np.flip(np.asarray(v)) + 0.05)
        return v

    return jax.tree_util.tree_map_with_path(other, params)


def _linen_served(model):
    traces = []

    @jax.jit
    def served(stack, base, x, index):
        traces.append(1)  # runs once per trace
        with jaxlora.intercept_stack(stack, index):
            return model.apply({"params": stack.params(base)}, x)

    return served, traces


@functools.cache
def _linen_alone(axis: int) -> dict:
    """{adapter index: the model's output with that adapter alone (-1: the base)}."""
    model, base, adapters = _linen_adapters(axis)
    out = {-1: model.apply({"params": base}, X_LINEN)}
    for i, (params, config) in enumerate(adapters):
        with jaxlora.intercept(config):
            out[i] = model.apply({"params": params}, X_LINEN)
    return out


def _row_close(got, want) -> None:
    assert _rel_err(got, want) < TOL, _rel_err(got, want)


@pytest.mark.parametrize("axis", [0, 1])
def test_linen_scanned_rows_equal_their_single_adapter_models(axis):
    """Used to be refused ('stacked (nn.scan ...), which this operation does not handle'):
    each weight's stack holds every layer (N, L, ...), and reaches the scan body through the
    params (stack.params), sliced per layer as the weights are."""
    model, base, adapters = _linen_adapters(axis)
    stack = jaxlora.stack_adapters(adapters, capacity=3)
    keys = tuple(f"layers.mlp.{w}" for w in WEIGHTS)
    assert stack.scanned == tuple((k, axis) for k in keys)
    assert stack.modules == (("layers.mlp", keys),)
    assert stack.lora_a["layers.mlp.w_down"].shape == (3, L, F_LINEN, R_LINEN)
    assert stack.lora_b["layers.mlp.w_up"].shape == (3, L, R_LINEN, F_LINEN)
    node = stack.params(base)["layers"]["mlp"]  # the layer axis where the scan slices it
    at_axis = np.moveaxis(np.empty((L, 3, D_LINEN, R_LINEN)), 0, axis).shape
    assert node["w_up_lora_served_a"].shape == at_axis
    assert "w_up_lora_a" not in node and "lora_roles" not in node
    served, _ = _linen_served(model)
    index = jnp.array([1, -1, 0])
    got = served(stack, base, X_LINEN, index)
    alone = _linen_alone(axis)
    assert _rel_err(alone[0], alone[-1]) > 1e-2 and _rel_err(alone[1], alone[0]) > 1e-2
    for row, i in enumerate(np.asarray(index)):
        _row_close(got[row], alone[int(i)][row])
    np.testing.assert_array_equal(got[1], alone[-1][1])  # the base row bit for bit


def test_linen_scanned_slots_set_replace_clear_without_a_retrace():
    model, base, adapters = _linen_adapters(1)
    stack = jaxlora.stack_adapters(adapters[:1], capacity=3)
    served, traces = _linen_served(model)
    alone = _linen_alone(1)
    y = served(stack, base, X_LINEN, jnp.array([0, -1, 0]))
    _row_close(y[2], alone[0][2])
    stack = stack.set(2, *adapters[1]).set(0, *adapters[1])  # added, replaced
    y = served(stack, base, X_LINEN, jnp.array([2, 0, -1]))
    _row_close(y[0], alone[1][0])
    _row_close(y[1], alone[1][1])
    np.testing.assert_array_equal(y[2], alone[-1][2])
    stack = stack.clear(0)
    y = served(stack, base, X_LINEN, jnp.array([-1, 2, 2]))
    np.testing.assert_array_equal(y[0], alone[-1][0])
    _row_close(y[1], alone[1][1])
    assert len(traces) == 1
    y = served(stack, base, X_LINEN, jnp.array([0, -1, 2]))  # traced: the emptied slot is NaN
    assert np.isnan(np.asarray(y[0])).all() and not np.isnan(np.asarray(y[1:])).any()
    with pytest.raises(ValueError, match=r"adapter index values \[0\] name no adapter"):
        with jaxlora.intercept_stack(stack, jnp.array([0, -1, 2])):  # concrete: refused
            model.apply({"params": stack.params(base)}, X_LINEN)


def test_linen_scanned_refusals_name_the_layer_and_change_nothing():
    model, base, adapters = _linen_adapters(0)
    stack = jaxlora.stack_adapters(adapters[:1], capacity=2)
    before = jax.tree.map(np.asarray, stack)
    index = jnp.zeros(X_LINEN.shape[0], jnp.int32)
    # made for the layer axis 1: another layout of the same base
    _, _, on_axis_1 = _linen_adapters(1)
    with pytest.raises(ValueError, match=r"layer 'layers.mlp.w_down'.*another base model"):
        stack.set(1, *on_axis_1[1])
    # params made by a stack of another capacity: not this stack's slices
    wider = jaxlora.stack_adapters(adapters[:1], capacity=3)
    with pytest.raises(ValueError, match=r"layer 'layers.mlp', weight 'w_down': 'w_down_lora_s"):
        with jaxlora.intercept_stack(stack, index):
            model.apply({"params": wider.params(base)}, X_LINEN)
    with pytest.raises(ValueError, match=r"layer 'layers.mlp' already holds 'w_down_lora_served"):
        stack.params(stack.params(base))
    with pytest.raises(ValueError, match=r"the base has no module 'layers.mlp' \(at 'layers'\)"):
        stack.params({"other": base["layers"]})
    after = jax.tree.map(np.asarray, stack)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))


def test_linen_scanned_one_weight_module_is_served_by_the_same_mechanism():
    """One weight of the scanned module adapted (lora_a/lora_b, a one-weight module): its
    stack is keyed by the module and passed as 'lora_served_a'/'_b'."""
    model, base, _ = _linen_adapters(1)
    config = LoRAConfig(r=1, alpha=2.0, targets=[], target_parameters=["layers.mlp.w_up"])
    layouts = jaxlora.layouts(model, X_LINEN)
    lora = _other_b(jaxlora.inject(base, config, jax.random.key(4), layouts=layouts))
    stack = jaxlora.stack_adapters([(lora, config)], capacity=2)
    assert stack.scanned == (("layers.mlp", 1),) and stack.modules == ()
    assert stack.params(base)["layers"]["mlp"]["lora_served_b"].shape == (2, L, 1, F_LINEN)
    served, _ = _linen_served(model)
    got = served(stack, base, X_LINEN, jnp.array([0, -1, 0]))
    with jaxlora.intercept(config):
        want = model.apply({"params": lora}, X_LINEN)
    assert _rel_err(want, _linen_alone(1)[-1]) > 1e-2  # the adapter matters
    for row in (0, 2):
        _row_close(got[row], want[row])
    np.testing.assert_array_equal(got[1], _linen_alone(1)[-1][1])
