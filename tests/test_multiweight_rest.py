"""Several adapted weights in one Linen module inside ``nn.scan`` (issue #13): a gated MLP
holding ``w_gate``, ``w_up``, ``w_down``, each in its own einsum, scanned over L layers, against
its unrolled twin holding the same weights (``layers_{i}``): the adapters' shapes and records,
outputs, the adapters' gradients, merge layer by layer and unmerge, partition specs and the
PEFT files (the twin's, bit for bit), for the layer axis at 0 and at 1 (MaxText's
``param_scan_axis``). Each weight is stacked as a one-weight module's is (one mechanism). A
module with only some of its weights stacked is refused, naming the layer and the weights.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora.product import ProductsLayout
from tests.test_scan_axis import STACK_NAME, _fill, _max_err, _read, _rel_err, _stacked

jax.config.update("jax_default_matmul_precision", "highest")

L, D, F, R, ALPHA = 3, 4, 6, 2, 3.0
WEIGHTS = ("w_down", "w_gate", "w_up")
CONFIG = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["mlp"])
NAMES = {"layers": "layers_{i}"}  # the unrolled twin's layer modules
LENGTH = (L,)  # what tests.test_scan_axis._stacked reads the stack length from
TOL = 1e-6


class GatedMLP(nn.Module):
    """One module, three weights, each in its own einsum."""

    @nn.compact
    def __call__(self, x):
        w = {
            name: self.param(name, nn.initializers.normal(0.5), shape)
            for name, shape in (("w_gate", (D, F)), ("w_up", (D, F)), ("w_down", (F, D)))
        }
        g = jnp.einsum("btd,df->btf", x, w["w_gate"])
        u = jnp.einsum("btd,df->btf", x, w["w_up"])
        return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, w["w_down"])


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + GatedMLP(name="mlp")(x), None


class Scanned(nn.Module):
    axis: int = 0

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Layer, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L
        )
        return stack(name="layers")(x, None)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = Layer(name=f"layers_{i}")(x)
        return x


def _inputs(seed: int = 0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, 3, D)), jnp.float32)


def _injected(model, x, key: int = 1):
    base = model.init(jax.random.key(0), x)["params"]
    return jaxlora.inject(base, CONFIG, jax.random.key(key), layouts=jaxlora.layouts(model, x))


def _random_b(params, seed: int = 3):
    """Every ``<weight>_lora_b`` random (non-zero), so each adapter changes the output."""

    def perturb(path, v):
        name = getattr(path[-1], "key", "")
        if isinstance(name, str) and name.endswith("lora_b"):
            k = jax.random.key(zlib.crc32(f"{seed}{jax.tree_util.keystr(path)}".encode()))
            return jax.random.normal(k, v.shape, v.dtype) * 0.3
        return v

    return jax.tree_util.tree_map_with_path(perturb, params)


def _twins(axis: int):
    """(unrolled params, scanned model, scanned params, x): the scanned tree holds the
    twin's weights and adapters stacked on ``axis`` (``_fill`` checks that the shapes agree)."""
    x = _inputs()
    unrolled = _random_b(_injected(Unrolled(), x))
    model = Scanned(axis)
    return unrolled, model, _fill(_injected(model, x), _stacked(unrolled, LENGTH, axis)), x


def _loss(model, target):
    @jaxlora.intercept(CONFIG)
    def loss(params, x):
        return jnp.mean((model.apply({"params": params}, x) - target) ** 2)

    return loss


@pytest.mark.parametrize("axis", [0, 1])
def test_layouts_and_inject_stack_each_weight_on_the_scan_axis(axis):
    """Used to be refused ('several adapted weights inside a stacking transform')."""
    x = _inputs()
    model = Scanned(axis)
    layout = jaxlora.layouts(model, x)["layers.mlp"]
    assert isinstance(layout, ProductsLayout)
    assert (layout.weights, layout.stack, layout.scan, layout.axis) == (WEIGHTS, 1, "layers", axis)
    assert all((p.stack, p.scan, p.axis) == (1, "layers", axis) for p in layout.products)
    injected = _injected(model, x)
    node = injected["layers"]["mlp"]
    shapes = {"w_gate": ((D, R), (R, F)), "w_up": ((D, R), (R, F)), "w_down": ((F, R), (R, D))}

    def at(shape):  # one layer's shape with the layer axis where nn.scan puts it
        return np.moveaxis(np.empty((L, *shape)), 0, axis).shape

    for weight, (shape_a, shape_b) in shapes.items():
        a, b = node[f"{weight}_lora_a"], node[f"{weight}_lora_b"]
        assert (a.shape, b.shape) == (at(shape_a), at(shape_b)), weight
        slices = np.moveaxis(np.asarray(a), axis, 0)
        assert not np.allclose(slices[0], slices[1])  # each layer its own draw
        assert not np.any(np.asarray(b))
    assert [m.weight for m in node["lora_roles"]] == list(WEIGHTS)
    assert (STACK_NAME in node) == (axis != 0)
    with jaxlora.intercept(CONFIG):  # starts as the base
        y = model.apply({"params": injected}, x)
    np.testing.assert_array_equal(y, model.apply(model.init(jax.random.key(0), x), x))


def test_target_parameters_pick_weights_of_a_scanned_module():
    """Two of the three weights, named by target_parameters: each stacked, the third left."""
    x = _inputs()
    model = Scanned(axis=1)
    config = jaxlora.LoRAConfig(
        r=R, targets=[], target_parameters=["layers.mlp.w_up", "layers.mlp.w_gate"]
    )
    base = model.init(jax.random.key(0), x)["params"]
    node = jaxlora.inject(base, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    node = node["layers"]["mlp"]
    assert node["w_up_lora_a"].shape == (D, L, R) and node["w_gate_lora_b"].shape == (R, L, F)
    assert "w_down_lora_a" not in node and node[STACK_NAME].axis == 1
    assert [m.weight for m in node["lora_roles"]] == ["w_gate", "w_up"]


@pytest.mark.parametrize("axis", [0, 1])
def test_scanned_matches_unrolled_outputs_grads_and_merge_per_layer(axis):
    unrolled, model, scanned, x = _twins(axis)
    with jaxlora.intercept(CONFIG):
        want = Unrolled().apply({"params": unrolled}, x)
        got = model.apply({"params": scanned}, x)
    base_y = Unrolled().apply({"params": jaxlora.split(unrolled)[1]}, x)
    assert float(jnp.max(jnp.abs(want - base_y))) > 1e-2  # the adapters matter
    assert _rel_err(got, want) < TOL

    target = jnp.asarray(np.random.default_rng(5).normal(size=want.shape), jnp.float32)
    grad_u = jax.grad(_loss(Unrolled(), target))(unrolled, x)
    grad_s = jax.grad(_loss(model, target))(scanned, x)
    adapter_u = _stacked(jaxlora.split(grad_u)[0], LENGTH, axis)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(adapter_u))
    assert scale > 1e-3
    assert _max_err(adapter_u, jaxlora.split(grad_s)[0]) < TOL * scale

    merged = jaxlora.merge(scanned, alpha=ALPHA)
    merged_u = _stacked(jaxlora.merge(unrolled, alpha=ALPHA), LENGTH, axis)
    assert _max_err(merged_u, merged) < TOL
    assert _rel_err(model.apply({"params": merged}, x), want) < TOL
    merged, record = jaxlora.merge(scanned, alpha=ALPHA, record=True)
    assert _max_err(jaxlora.unmerge(merged, record), scanned) < TOL


def test_partition_specs_name_the_layer_axis_for_each_weight():
    *_, scanned, _ = _twins(axis=1)
    base = {"layers": {"mlp": {"w_gate": P("embed", "layers", "mlp"), "w_down": P("mlp")}}}
    specs = jaxlora.partition_specs(scanned, base)["layers"]["mlp"]
    assert tuple(specs["w_gate_lora_a"]) == ("embed", "layers", None)
    assert tuple(specs["w_gate_lora_b"]) == (None, "layers", "mlp")
    assert tuple(specs["w_down_lora_a"]) == ("mlp", None, None)  # the spec says axis 0 only
    assert tuple(specs["w_up_lora_a"]) == (None, None, None)


@pytest.mark.parametrize("axis", [0, 1])
def test_files_are_the_unrolled_twins_and_load_back_exactly(tmp_path, axis):
    unrolled, model, scanned, x = _twins(axis)
    path_map = {
        f"{layer}.mlp.{w}": f"{layer}.mlp.{w.removeprefix('w_')}_proj"
        for layer in [f"layers_{i}" for i in range(L)]
        for w in WEIGHTS
    }
    jaxlora.save_adapter(unrolled, tmp_path / "unrolled", CONFIG, path_map=path_map)
    jaxlora.save_adapter(
        scanned, tmp_path / "scanned", CONFIG, path_map=path_map, layer_names=NAMES
    )
    tensors_u, config_u = _read(tmp_path / "unrolled")
    tensors_s, config_s = _read(tmp_path / "scanned")
    assert "base_model.model.layers_2.mlp.up_proj.lora_B.weight" in tensors_s
    assert sorted(tensors_s) == sorted(tensors_u) and config_s == config_u
    for key, value in tensors_u.items():
        np.testing.assert_array_equal(tensors_s[key], value, err_msg=key)
    fresh = _injected(model, x, key=9)
    loaded = jaxlora.load_adapter(fresh, tmp_path / "scanned", path_map=path_map, layer_names=NAMES)
    assert _max_err(jaxlora.split(loaded)[0], jaxlora.split(scanned)[0]) == 0.0
    assert _max_err(jaxlora.split(loaded)[1], jaxlora.split(fresh)[1]) == 0.0  # its own base


def test_only_some_weights_stacked_is_refused_by_name():
    """A hand-made node with one weight (and its adapter) unstacked: never read as a stack
    in some other layout."""
    *_, scanned, _ = _twins(axis=0)
    node = dict(scanned["layers"]["mlp"])
    for leaf in ("w_up", "w_up_lora_a", "w_up_lora_b"):
        node[leaf] = node[leaf][0]
    params = {"layers": {"mlp": node}}
    with pytest.raises(ValueError, match=r"layer 'layers.mlp': .* only \['w_down', 'w_gate'\]"):
        jaxlora.merge(params, alpha=ALPHA)


# ------------------------------------------------------- multi-adapter batches (Linen)


class Block(nn.Module):
    """The gated MLP and a Dense head: a stack holds both kinds of layer."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(x + GatedMLP(name="mlp")(x))


def _adapters():
    """(model, base params, [(adapter params, config)] ×2, x of 3 examples): two adapters of
    the same base, of ranks 2 and 1, each with every factor random (non-zero)."""
    model = Block()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, D)), jnp.float32)
    base = model.init(jax.random.key(0), x)["params"]
    layouts = jaxlora.layouts(model, x)
    out = []
    for seed, (r, alpha) in enumerate([(2, 3.0), (1, 5.0)]):
        config = jaxlora.LoRAConfig(r=r, alpha=alpha, targets=["mlp", "head"])
        lora = _random_b(jaxlora.inject(base, config, jax.random.key(seed), layouts=layouts), seed)
        out.append((lora, config))
    return model, base, out, x


def test_stack_keys_each_weight_and_rows_equal_their_single_adapter_models():
    """Used to be refused ('has several adapted weights'): each weight is a layer of the stack
    keyed '<module>.<weight>', served at its own product by the same gathered branch."""
    model, base, adapters, x = _adapters()
    stack = jaxlora.stack_adapters(adapters, capacity=3)
    keys = ["mlp.w_down", "mlp.w_gate", "mlp.w_up"]
    assert sorted(stack.lora_a) == sorted([*keys, "head"])
    assert stack.modules == (("mlp", tuple(keys)),)
    assert stack.lora_a["mlp.w_down"].shape == (3, F, 2)
    assert stack.lora_b["mlp.w_up"].shape == (3, 2, F)
    index = jnp.array([1, -1, 0])

    @jax.jit
    def served(stack, index):
        with jaxlora.intercept_stack(stack, index):
            return model.apply({"params": base}, x)

    got = served(stack, index)
    want = [model.apply({"params": base}, x)]  # index -1: the base
    for lora, config in adapters:
        with jaxlora.intercept(config):
            want.append(model.apply({"params": lora}, x))
    assert float(jnp.max(jnp.abs(want[1] - want[0]))) > 1e-2  # the adapters matter
    assert float(jnp.max(jnp.abs(want[2] - want[1]))) > 1e-2
    for row, i in enumerate(np.asarray(index)):
        np.testing.assert_allclose(got[row], want[i + 1][row], rtol=0, atol=TOL)
    np.testing.assert_array_equal(got[1], want[0][1])  # the base row exactly


def test_stack_refuses_another_grouping_and_per_weight_patterns():
    model, base, adapters, x = _adapters()
    stack = jaxlora.stack_adapters(adapters[:1], capacity=2)
    # only w_up of the gated MLP: a one-weight module, keyed 'mlp' (lora_a/lora_b)
    config = jaxlora.LoRAConfig(r=1, targets=["head"], target_parameters=["mlp.w_up"])
    one_weight = jaxlora.inject(base, config, jax.random.key(3), layouts=jaxlora.layouts(model, x))
    with pytest.raises(
        ValueError,
        match=r"missing \['mlp.w_down', 'mlp.w_gate', 'mlp.w_up'\], unexpected \['mlp'\]",
    ):
        stack.set(1, one_weight, config)
    lora, config = adapters[0]
    patterned = jaxlora.LoRAConfig(
        r=2, alpha=3.0, targets=["mlp", "head"], alpha_pattern={"mlp.w_up": 7.0}
    )
    with pytest.raises(ValueError, match=r"layer 'mlp': the config's alpha_pattern gives"):
        jaxlora.stack_adapters([(lora, patterned)])


def test_stack_of_a_scanned_module_with_several_weights_needs_its_params_by_name():
    """Stacks of a scanned module are served since tests/test_multiweight_serving.py; applied
    on the plain base (not stack.params(base)), the scan body has no adapters: refused."""
    *_, model, scanned, x = _twins(axis=0)
    stack = jaxlora.stack_adapters([(scanned, CONFIG)])
    with pytest.raises(ValueError, match=r"layer 'layers.mlp', weight 'w_down' is stacked by nn"):
        with jaxlora.intercept_stack(stack, jnp.zeros(x.shape[0], jnp.int32)):
            model.apply({"params": jaxlora.split(scanned)[1]}, x)
