"""Op-level (product) adapters inside scanned and rematerialized stacks (MaxText's scanned
decoder with einsum projections and ``nn.remat`` per layer; tunix-like NNX ``Einsum`` layers
built by ``nnx.vmap`` and run by ``nnx.scan``), each against its unrolled twin holding the
same weights: outputs, the adapters' gradients, merged weights (1e-5 of their scale), the
base bit-identical after optax steps with the base frozen, and the PEFT files (the twin's,
bit for bit). What stays unsupported is refused, naming the layer, before anything changes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxlora
import jaxlora.nnx
from tests._nnx_stacks import ScannedLayers, UnrolledLayers
from tests.test_oplevel_linen import FlaxConv1D
from tests.test_scan_axis import (
    STACK_NAME,
    _fill,
    _max_err,
    _random_b,
    _read,
    _rel_err,
    _stacked,
)

jax.config.update("jax_default_matmul_precision", "highest")

L, D, N, H = 3, 4, 2, 3
TARGETS = ["q", "o", "c", "mlp"]
NAMES = {"layers": "layers_{i}"}  # the unrolled Linen twin's layer modules
LENGTH = (L,)  # what tests.test_scan_axis._stacked reads the stack length from


class Einsum(nn.Module):
    """tunix's ``Einsum`` (Linen twin): ``jnp.einsum(eqn, x, w)``."""

    eqn: str
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.5), self.shape)
        return jnp.einsum(self.eqn, x, w)


class Block(nn.Module):
    """Einsum q (D → N, H) and o (N, H → D), a FlaxConv1D ``x @ kernel.T`` and a Dense: the
    product adapters and a Dense one in one scanned layer."""

    @nn.compact
    def __call__(self, x, _=None):
        q = Einsum("BTD,DNH->BTNH", (D, N, H), name="q")(x)
        x = x + Einsum("BTNH,NHD->BTD", (N, H, D), name="o")(jnp.tanh(q))
        x = x + nn.Dense(D, name="mlp")(jax.nn.gelu(FlaxConv1D(2 * D, name="c")(x)))
        return x, None


class Scanned(nn.Module):
    axis: int = 0
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        body = nn.remat(Block, prevent_cse=False) if self.remat else Block
        stack = nn.scan(
            body, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L
        )
        return stack(name="layers")(x, None)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = Block(name=f"layers_{i}")(x)
        return x


class Remat(nn.Module):
    """Each layer under ``nn.remat`` (``nn.checkpoint``), unscanned: MaxText's remat without
    the scan."""

    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = nn.checkpoint(Block, prevent_cse=True)(name=f"layers_{i}")(x)
        return x


def _inputs(seed: int = 0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, 5, D)), jnp.float32)


CONFIG = jaxlora.LoRAConfig(r=2, alpha=6, targets=TARGETS)


def _injected(model, x, key: int = 1, config=CONFIG):
    base = model.init(jax.random.key(0), x)["params"]
    layouts = jaxlora.layouts(model, x)
    return jaxlora.inject(base, config, jax.random.key(key), layouts=layouts)


def _linen_twins(axis: int = 0, remat: bool = False):
    """(unrolled model, its adapted params, scanned model, its adapted params, x): the scanned
    tree holds the twin's weights stacked on ``axis`` (the shapes must agree: ``_fill``)."""
    x = _inputs()
    unrolled = _random_b(_injected(Unrolled(), x))
    model = Scanned(axis, remat)
    scanned = _fill(_injected(model, x), _stacked(unrolled, LENGTH, axis))
    return Unrolled(), unrolled, model, scanned, x


def _loss(model, target):
    @jaxlora.intercept(CONFIG)
    def loss(params, x):
        return jnp.mean((model.apply({"params": params}, x) - target) ** 2)

    return loss


def _train(model, params, target, steps: int = 4):
    tx = jaxlora.freeze_base(optax.adamw(1e-2))
    loss_fn = _loss(model, target)

    @jax.jit
    def step(params, state, x):
        updates, state = tx.update(jax.grad(loss_fn)(params, x), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for i in range(steps):
        params, state = step(params, state, _inputs(10 + i))
    return params


# --------------------------------------------------------------------------------- Linen


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_layouts_and_inject_stack_product_adapters_on_the_scan_axis(axis):
    """Used to be refused ('called 2 times in one forward': nn.scan traces its body twice)."""
    x = _inputs()
    model = Scanned(axis, remat=True)
    layouts = jaxlora.layouts(model, x)
    q = layouts["layers.q"]
    assert (q.kind, q.weight, q.stack, q.scan, q.axis) == ("product", "w", 1, "layers", axis)
    assert q.roles.shape == (D, N, H)
    params = _injected(model, x)["layers"]

    def at(shape):  # one layer's shape with the layer axis where nn.scan puts it
        return np.moveaxis(np.empty((L, *shape)), 0, axis).shape

    expect = {"q": ((D, 2), (2, N, H)), "o": ((N, H, 2), (2, D)), "c": ((D, 2), (2, 2 * D))}
    for name, (shape_a, shape_b) in expect.items():
        node = params[name]
        assert (node["lora_a"].shape, node["lora_b"].shape) == (at(shape_a), at(shape_b)), name
        assert node["lora_roles"].roles.shape == model_shapes()[name]
        assert (STACK_NAME in node) == (axis != 0)
        slices = np.moveaxis(np.asarray(node["lora_a"]), axis, 0)
        assert not np.allclose(slices[0], slices[1])  # each layer its own draw
    base = model.init(jax.random.key(0), x)
    with jaxlora.intercept(CONFIG):
        y = model.apply({"params": _injected(model, x)}, x)
    np.testing.assert_array_equal(y, model.apply(base, x))  # starts as the base


def model_shapes():
    return {"q": (D, N, H), "o": (N, H, D), "c": (2 * D, D)}


@pytest.mark.parametrize("axis, remat", [(0, False), (1, True), (-1, False)], ids=str)
def test_scanned_matches_unrolled_outputs_grads_merge_and_adamw(axis, remat):
    unrolled_model, unrolled, model, scanned, x = _linen_twins(axis, remat)
    with jaxlora.intercept(CONFIG):
        want = unrolled_model.apply({"params": unrolled}, x)
        got = model.apply({"params": scanned}, x)
    base_y = unrolled_model.apply({"params": jaxlora.split(unrolled)[1]}, x)
    assert float(jnp.max(jnp.abs(want - base_y))) > 1e-2  # the adapters matter
    assert _rel_err(got, want) < 1e-5

    target = jnp.asarray(np.random.default_rng(5).normal(size=want.shape), jnp.float32)
    grad_u = jax.grad(_loss(unrolled_model, target))(unrolled, x)
    grad_s = jax.grad(_loss(model, target))(scanned, x)
    adapter_u = _stacked(jaxlora.split(grad_u)[0], LENGTH, axis)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(adapter_u))
    assert scale > 1e-3
    assert _max_err(adapter_u, jaxlora.split(grad_s)[0]) < 1e-5 * scale

    merged = jaxlora.merge(scanned, alpha=CONFIG.alpha)
    merged_u = _stacked(jaxlora.merge(unrolled, alpha=CONFIG.alpha), LENGTH, axis)
    assert _max_err(merged_u, merged) < 1e-5
    assert _rel_err(model.apply({"params": merged}, x), want) < 1e-5

    trained_u, trained_s = _train(unrolled_model, unrolled, target), _train(model, scanned, target)
    assert _max_err(_stacked(trained_u, LENGTH, axis), trained_s) < 1e-4
    assert _max_err(jaxlora.split(trained_s)[0], jaxlora.split(scanned)[0]) > 1e-3  # trained
    jax.tree.map(
        np.testing.assert_array_equal, jaxlora.split(trained_s)[1], jaxlora.split(scanned)[1]
    )


def test_merge_record_unmerges_a_scanned_product_stack():
    *_, scanned, _ = _linen_twins(axis=1)
    merged, record = jaxlora.merge(scanned, alpha=CONFIG.alpha, record=True)
    back = jaxlora.unmerge(merged, record)
    assert back["layers"]["q"][STACK_NAME] == scanned["layers"]["q"][STACK_NAME]
    assert _max_err(back, scanned) < 1e-6


def test_remat_layers_match_the_plain_twin():
    """nn.checkpoint around each layer (unscanned): the same numbers as without it."""
    x = _inputs()
    plain = _random_b(_injected(Unrolled(), x))
    target = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
    remat = _fill(_injected(Remat(), x), plain)  # the same tree: nn.remat adds no axis
    with jaxlora.intercept(CONFIG):
        want = Unrolled().apply({"params": plain}, x)
        got = Remat().apply({"params": remat}, x)
    assert _rel_err(got, want) < 1e-6
    grad_p = jaxlora.split(jax.grad(_loss(Unrolled(), target))(plain, x))[0]
    grad_r = jaxlora.split(jax.grad(_loss(Remat(), target))(remat, x))[0]
    assert _max_err(grad_p, grad_r) < 1e-6
    trained = _train(Remat(), remat, target)
    jax.tree.map(np.testing.assert_array_equal, jaxlora.split(trained)[1], jaxlora.split(remat)[1])
    assert _max_err(trained, _train(Unrolled(), plain, target)) < 1e-5


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_partition_specs_name_the_layer_axis_at_the_scan_axis(axis):
    *_, scanned, _ = _linen_twins(axis)

    def at(names):  # 'layers' inserted at the scan axis
        p = axis % (len(names) + 1)
        return (*names[:p], "layers", *names[p:])

    base = {"layers": {"q": {"w": P(*at(("embed", "heads", "kv")))}}}
    specs = jaxlora.partition_specs(scanned, base)["layers"]["q"]
    want = (at(("embed", None)), at((None, "heads", "kv")))
    assert (tuple(specs["lora_a"]), tuple(specs["lora_b"])) == want


def _assert_twin_files(directory, expected_key: str):
    """The scanned model's files (``directory/'scanned'``) are its unrolled twin's
    (``'unrolled'``): the same config, the same keys (``expected_key`` among them) and arrays."""
    tensors_u, config_u = _read(directory / "unrolled")
    tensors_s, config_s = _read(directory / "scanned")
    assert expected_key in tensors_s
    assert sorted(tensors_s) == sorted(tensors_u) and config_s == config_u
    for key, value in tensors_u.items():
        np.testing.assert_array_equal(tensors_s[key], value, err_msg=key)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_files_are_the_unrolled_twins_and_load_back_exactly(tmp_path, axis):
    _, unrolled, model, scanned, x = _linen_twins(axis)
    jaxlora.save_adapter(unrolled, tmp_path / "unrolled", CONFIG)
    jaxlora.save_adapter(scanned, tmp_path / "scanned", CONFIG, layer_names=NAMES)
    _assert_twin_files(tmp_path, "base_model.model.layers_2.q.lora_B.weight")

    injected = _injected(model, x, key=9)
    loaded = jaxlora.load_adapter(injected, tmp_path / "unrolled", layer_names=NAMES)
    assert _max_err(jaxlora.split(loaded)[0], jaxlora.split(scanned)[0]) == 0.0
    assert loaded["layers"]["q"].get(STACK_NAME) == scanned["layers"]["q"].get(STACK_NAME)
    assert loaded["layers"]["q"]["lora_roles"] == scanned["layers"]["q"]["lora_roles"]


def test_a_stacked_product_adapter_without_layer_names_is_refused(tmp_path):
    *_, scanned, _ = _linen_twins()
    with pytest.raises(ValueError, match=r"layer 'layers\.(q|o|c)'.*stacked.*layer_names"):
        jaxlora.save_adapter(scanned, tmp_path, CONFIG)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_a_stacked_product_adapter_in_an_unscanned_call_is_refused():
    """The stacked adapter on the unrolled layers' call: its shapes are a stack's."""
    *_, scanned, x = _linen_twins()
    one_layer = {"layers_0": scanned["layers"]}
    with pytest.raises(ValueError, match=r"layer 'layers_0\.q'.*stacked.*layer axis 0"):
        with jaxlora.intercept(CONFIG):
            _OneLayer().apply({"params": one_layer}, x)


class _OneLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Block(name="layers_0")(x)[0]


def test_per_layer_ranks_that_break_a_product_stack_are_refused():
    x = _inputs()
    model = Scanned()
    base = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoRAConfig(r=2, targets=TARGETS, rank_pattern={"layers.1.q": 1})
    with pytest.raises(ValueError, match=r"layer 'layers\.q'.*one r and one alpha"):
        jaxlora.inject(base, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))


class _Twice(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        q = Einsum("BTD,DE->BTE", (D, D), name="q")
        return q(q(x)), None


def test_a_module_called_twice_per_scanned_layer_is_still_refused():
    x = _inputs()
    model = nn.scan(_Twice, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)()
    layouts = jaxlora.layouts(model, x, None)
    assert "q" not in layouts and "called 2 times" in layouts.reasons["q"]


# ----------------------------------------------------------------------------------- NNX


class NnxEinsum(nnx.Module):
    """tunix's ``Einsum``: ``jnp.einsum(eqn, x, w)``."""

    def __init__(self, eqn: str, shape: tuple[int, ...], *, rngs: nnx.Rngs):
        self.eqn = eqn
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.5)

    def __call__(self, x):
        return jnp.einsum(self.eqn, x, self.w[...])


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q = NnxEinsum("BTD,DNH->BTNH", (D, N, H), rngs=rngs)
        self.o = NnxEinsum("BTNH,NHD->BTD", (N, H, D), rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.o(jnp.tanh(self.q(x)))
        return x + self.mlp(jax.nn.gelu(x))


class NnxScanned(ScannedLayers):
    block, length = NnxBlock, L


class NnxUnrolled(UnrolledLayers):
    block, length = NnxBlock, L


NNX_CONFIG = jaxlora.LoRAConfig(r=2, alpha=6, targets=["q", "o", "mlp"])


def _pure(model, kind: Any = nnx.Param):
    return nnx.to_pure_dict(nnx.state(model, kind))


def _stack_layers(pure: dict) -> dict:
    layers = [pure["layers"][i] for i in range(L)]
    return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def _nnx_twins():
    """(unrolled, scanned): injected alike, the scanned one holding the unrolled one's base
    and adapter weights stacked (non-zero lora_b)."""
    x = _inputs()
    unrolled, scanned = NnxUnrolled(nnx.Rngs(0)), NnxScanned(nnx.Rngs(0))
    jaxlora.nnx.inject(unrolled, NNX_CONFIG, nnx.Rngs(1), inputs=(x,))
    jaxlora.nnx.inject(scanned, NNX_CONFIG, nnx.Rngs(2), inputs=(x,))
    for i in range(L):
        for name in ("q", "o", "mlp"):
            layer = getattr(unrolled.layers[i], name)
            key = jax.random.key(10 * i + len(name))
            layer.lora_b[...] = jax.random.normal(key, layer.lora_b.shape) * 0.3
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, _stack_layers(_pure(unrolled)))
    nnx.update(scanned, state)
    return unrolled, scanned


def _nnx_loss(model, x, target):
    return jnp.mean((model(x) - target) ** 2)


def test_nnx_inject_finds_the_product_of_each_layer_through_nnx_scan():
    """Used to be refused ('weight 'w' (3, 4, 2, 3): used only by scan')."""
    x = _inputs()
    model = NnxScanned(nnx.Rngs(0))
    before = model(x)
    jaxlora.nnx.inject(model, NNX_CONFIG, nnx.Rngs(1), inputs=(x,))
    q, o = model.layers.q, model.layers.o
    assert isinstance(q, jaxlora.nnx.OpAdapter) and q.lora_roles.shape == (D, N, H)
    assert (q.lora_a.shape, q.lora_b.shape) == ((L, D, 2), (L, 2, N, H))
    assert (o.lora_a.shape, o.lora_b.shape) == ((L, N, H, 2), (L, 2, D))
    a = np.asarray(q.lora_a[...])
    assert not np.allclose(a[0], a[1])  # each layer its own draw
    np.testing.assert_array_equal(model(x), before)


def test_nnx_scanned_matches_unrolled_outputs_grads_adamw_and_merge():
    unrolled, scanned = _nnx_twins()
    x = _inputs(1)
    want = unrolled(x)
    assert _rel_err(scanned(x), want) < 1e-5
    target = jnp.asarray(np.random.default_rng(5).normal(size=want.shape), jnp.float32)

    diff = nnx.DiffState(0, nnx.LoRAParam)
    grad_u = nnx.to_pure_dict(nnx.grad(_nnx_loss, argnums=diff)(unrolled, x, target))
    grad_s = nnx.to_pure_dict(nnx.grad(_nnx_loss, argnums=diff)(scanned, x, target))
    stacked = _stack_layers(grad_u)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(stacked))
    assert scale > 1e-3 and _max_err(stacked, grad_s) < 1e-5 * scale

    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    base_before = _pure(scanned, base)

    def train(model):
        optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

        @nnx.jit
        def step(model, optimizer, x):
            optimizer.update(model, nnx.grad(_nnx_loss, argnums=diff)(model, x, target))

        for i in range(4):
            step(model, optimizer, _inputs(10 + i))

    train(unrolled)
    train(scanned)
    trained_u = _stack_layers(_pure(unrolled, nnx.LoRAParam))
    assert _max_err(trained_u, _pure(scanned, nnx.LoRAParam)) < 1e-4
    jax.tree.map(np.testing.assert_array_equal, _pure(scanned, base), base_before)

    want = unrolled(x)
    jaxlora.nnx.merge(unrolled)
    jaxlora.nnx.merge(scanned)
    assert type(scanned.layers.q) is NnxEinsum and scanned.layers.q.w.shape == (L, D, N, H)
    assert _max_err(_stack_layers(_pure(unrolled)), _pure(scanned)) < 1e-5
    assert _rel_err(scanned(x), want) < 1e-5


class NnxRematScanned(NnxScanned):
    """Each layer under ``nnx.remat`` inside the ``nnx.scan`` (the remat returns the layer's
    state, the weight with it, as scanned outputs)."""

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, block):
            return block(x)

        return body(x, self.layers)


def test_nnx_remat_inside_the_scan_matches_the_unrolled_twin():
    """Used to be refused ('used only by scan'; with remat, 'an output of the traced call')."""
    unrolled, scanned = _nnx_twins()
    x = _inputs(1)
    remat = NnxRematScanned(nnx.Rngs(0))
    jaxlora.nnx.inject(remat, NNX_CONFIG, nnx.Rngs(3), inputs=(x,))
    assert remat.layers.o.lora_roles == scanned.layers.o.lora_roles
    nnx.update(remat, nnx.state(scanned))
    target = jnp.zeros_like(x)
    assert _rel_err(remat(x), unrolled(x)) < 1e-5
    diff = nnx.DiffState(0, nnx.LoRAParam)
    grad_u = _stack_layers(nnx.to_pure_dict(nnx.grad(_nnx_loss, argnums=diff)(unrolled, x, target)))
    grad_r = nnx.to_pure_dict(nnx.grad(_nnx_loss, argnums=diff)(remat, x, target))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad_u))
    assert _max_err(grad_u, grad_r) < 1e-5 * scale


def test_nnx_files_are_the_unrolled_twins_and_load_back_exactly(tmp_path):
    unrolled, scanned = _nnx_twins()
    jaxlora.nnx.save_adapter(unrolled, tmp_path / "unrolled")
    jaxlora.nnx.save_adapter(scanned, tmp_path / "scanned")
    _assert_twin_files(tmp_path, "base_model.model.layers.2.q.lora_B.weight")

    fresh = NnxScanned(nnx.Rngs(0))
    jaxlora.nnx.inject(fresh, NNX_CONFIG, nnx.Rngs(7), inputs=(_inputs(),))
    jaxlora.nnx.load_adapter(fresh, tmp_path / "unrolled")
    assert _max_err(_pure(fresh, nnx.LoRAParam), _pure(scanned, nnx.LoRAParam)) == 0.0


def test_nnx_a_file_missing_a_layer_of_a_product_stack_is_refused(tmp_path):
    _, scanned = _nnx_twins()
    config = jaxlora.LoRAConfig(r=2, alpha=6, targets=["layers.0.q", "layers.1.q"])
    partial = NnxUnrolled(nnx.Rngs(0))
    jaxlora.nnx.inject(partial, config, nnx.Rngs(1), inputs=(_inputs(),))
    jaxlora.nnx.save_adapter(partial, tmp_path)
    before = _pure(scanned, nnx.LoRAParam)
    with pytest.raises(ValueError, match=r"layers\.2\.q"):
        jaxlora.nnx.load_adapter(scanned, tmp_path)
    jax.tree.map(np.testing.assert_array_equal, _pure(scanned, nnx.LoRAParam), before)


def test_nnx_a_product_stack_off_axis_0_is_refused_and_nothing_changes():
    x = _inputs()
    model = NnxScannedOff(nnx.Rngs(0))
    before = _pure(model)
    config = jaxlora.LoRAConfig(r=2, targets=["q", "o"])
    with pytest.raises(TypeError, match=r"layer 'layers\.(q|o)'.*axes \(1,\).*restack"):
        jaxlora.nnx.inject(model, config, nnx.Rngs(1), inputs=(x,))
    assert type(model.layers.q) is NnxEinsum
    jax.tree.map(np.testing.assert_array_equal, _pure(model), before)


class NnxScannedOff(NnxScanned):
    """The stack made with ``out_axes=1`` and scanned on that axis."""

    def __init__(self, rngs: nnx.Rngs):
        super().__init__(rngs, out_axes=1)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 1), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.layers)


def test_nnx_per_layer_ranks_for_a_product_stack_are_refused():
    """A per-layer rank_pattern key names one layer of a product stack (its per-layer paths
    are known once traced); giving it another r is refused as for stacked nnx.Linear layers
    (tests/test_oplevel_moe_scan.py has the accepted per-layer targets and patterns)."""
    x = _inputs()
    model = NnxScanned(nnx.Rngs(0))
    config = jaxlora.LoRAConfig(r=2, targets=["q"], rank_pattern={"layers.1.q": 1})
    with pytest.raises(ValueError, match=r"layer 'layers\.q'.*'layers\.1\.q': \(1, 1\.0\).*one r"):
        jaxlora.nnx.inject(model, config, nnx.Rngs(1), inputs=(x,))
    assert type(model.layers.q) is NnxEinsum


class _EinsumSetup(nn.Module):
    shape: tuple

    def setup(self):
        self.w = self.param("w", nn.initializers.normal(1.0), self.shape)

    def __call__(self, x):
        return jnp.einsum("btd,de->bte", x, self.w)


class _RematProduct(nn.Module):
    """The product module itself wrapped by nn.remat (compact) or nn.checkpoint (setup)."""

    setup_style: bool

    @nn.compact
    def __call__(self, x):
        if self.setup_style:
            q = nn.checkpoint(_EinsumSetup, prevent_cse=False)((D, D), name="q")
        else:
            q = nn.remat(Einsum)("btd,de->bte", (D, D), name="q")
        return q(x)


@pytest.mark.parametrize("setup_style", [False, True])
def test_a_product_module_wrapped_in_remat_gets_its_branch(setup_style):
    """The remat-lifted module's call is the one intercepted: the branch is added (under jit
    and grad), merged = unmerged, and lora_a/lora_b get gradients."""
    model, x = _RematProduct(setup_style), _inputs()
    params = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["q"])
    adapted = jaxlora.inject(params, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    a = np.asarray(nn.unbox(adapted["q"]["lora_a"]), np.float64)
    b = np.random.default_rng(3).normal(size=(2, D))
    adapted["q"]["lora_b"] = jnp.asarray(b, jnp.float32)
    w = np.asarray(nn.unbox(params["q"]["w"]), np.float64)
    xs = np.asarray(x, np.float64)
    want = xs @ w + 2.0 * (xs @ a) @ b
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    with jaxlora.intercept(config):
        got = apply(adapted, x)
        grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(adapted)
    assert _rel_err(got, want) < 1e-5
    assert float(jnp.abs(grads["q"]["lora_a"]).max()) > 0
    merged = jaxlora.merge({"params": adapted}, alpha=4)
    assert _rel_err(model.apply(merged, x), want) < 1e-5
