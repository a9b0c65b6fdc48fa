"""QLoRA on a Linen module with several adapted weights (issue #16): the gated MLP of
``tests/test_linen_multiweight.py`` (``w_gate`` (D, F), ``w_up`` (D, F), ``w_down`` (F, D), each
in its own einsum, each with its own ``<weight>_lora_a``/``<weight>_lora_b``).

``quantize_base`` quantizes each weight alone as the torch Linear it is (an einsum weight
(D, F) used as ``x @ w`` is ``nn.Linear(D, F)``, weight ``w.T``), so its bytes are
``jaxlora.quant.quantize`` of that Linear's weight (bit-equal to bitsandbytes, see
``tests/test_quant.py``); the ``'quant'`` entry holds the three weights and the node's
``lora_roles`` tuple. Checked: bytes per weight, the forward against the numpy closed form on
the dequantized weights (float64, fp32 tolerance 1e-5 of the output's scale), optax steps
that leave the packed bytes bit-identical, a re-quantizing merge (each merged weight
``quantize``d alone), the adapter file round trip, and the refusals of a malformed entry.

And a stack of layers of MoE experts (a weight (L, E, D, D): ``nn.scan`` or ``nnx.vmap`` of the
MoE module of ``tests/test_oplevel_moe_scan.py``), which used to be refused: each (layer,
expert) is quantized as its own Linear, the stored arrays leading with (L, E).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxlora
import jaxlora.quant
from jaxlora.oplevel import Roles
from jaxlora.product import ProductRoles
from jaxlora.quant import _layout, quantize
from tests import test_multiweight_rest as multi
from tests import test_oplevel_moe_scan as moe
from tests._train import intercepted_loss
from tests.test_linen_multiweight import CONFIG, WEIGHTS, S, X, _injected, _randomize

OPTIONS = {"nf4": {}, "nf4-dq": {"double_quant": True}, "int8": {"quant_type": "int8"}}


def _quantized(options=OPTIONS["nf4"]):
    model, _, lora = _injected()
    lora, factors = _randomize(lora)
    return model, jaxlora.quant.quantize_base(lora, CONFIG, **options), factors


def _torch_linear_weight(w: np.ndarray) -> np.ndarray:
    """The (out, in) weight of the torch Linear an einsum weight used as ``x @ w`` is."""
    return np.ascontiguousarray(np.asarray(w).T)


def _same_bits(got, want):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _one_adam_step(model, config, q, x):
    """One ``freeze_base(adam)`` step on the params of the quantized variables ``q``: no
    optimizer state holds a packed byte and the packed bytes stay bit identical; returns
    (the gradients, the new params)."""
    before = jax.tree.map(np.array, q["quant"])
    params, quant = q["params"], q["quant"]
    tx = jaxlora.freeze_base(optax.adam(1e-2))
    state = tx.init(params)
    assert not any(leaf.dtype == jnp.uint8 for leaf in jax.tree.leaves(state))
    grads = jax.grad(intercepted_loss(model, config))(params, quant, x)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    _same_bits(quant, jax.tree.map(jnp.asarray, before))
    return grads, new


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _mlp_reference(weights: dict, factors: dict, x=X) -> np.ndarray:
    """The gated MLP on ``weights`` with ``S · (x a) b`` at the product of each weight in
    ``factors`` ({weight: (a, b)}), in float64."""
    x = np.asarray(x, np.float64)

    def product(inp, name):
        out = inp @ np.asarray(weights[name], np.float64)
        if name in factors:
            a, b = (np.asarray(f, np.float64) for f in factors[name])
            out = out + S * (inp @ a) @ b
        return out

    return product(_silu(product(x, "w_gate")) * product(x, "w_up"), "w_down")


def _head(variables, h):
    head = variables["params"]["head"]
    return h @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)


def _close(got, want, tol=1e-5):
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_weight_is_quantized_as_its_own_torch_linear(name):
    _, lora = _injected()[1:]
    q = jaxlora.quant.quantize_base(lora, CONFIG, **OPTIONS[name])
    entry = q["quant"]["mlp"]
    assert sorted(entry) == sorted([*WEIGHTS, "roles"])
    assert entry["roles"] == lora["params"]["mlp"]["lora_roles"]
    assert all(isinstance(m, ProductRoles) for m in entry["roles"])
    assert not set(WEIGHTS) & set(q["params"]["mlp"])  # the float weights left params
    for w in WEIGHTS:
        linear = _torch_linear_weight(lora["params"]["mlp"][w])
        _same_bits(entry[w], quantize(jnp.asarray(linear), **OPTIONS[name]))
    # the rest of the tree untouched: the Dense head keeps its float kernel
    _same_bits(q["params"]["head"], lora["params"]["head"])


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_forward_is_the_closed_form_on_the_dequantized_weights(name):
    model, q, factors = _quantized(OPTIONS[name])
    deq = jaxlora.quant.dequantize_base(q)
    weights = {w: deq["params"]["mlp"][w] for w in WEIGHTS}
    for w in WEIGHTS:  # dequantize_base is each Linear's dequantize, transposed back
        np.testing.assert_array_equal(
            np.asarray(weights[w]), np.asarray(jaxlora.quant.dequantize(q["quant"]["mlp"][w])).T
        )
    with jaxlora.intercept(CONFIG):
        got = model.apply(q, jnp.asarray(X))
    _close(got, _head(q, _mlp_reference(weights, factors)))


def test_optax_steps_keep_the_packed_bytes_bit_identical():
    model, q, _ = _quantized(OPTIONS["nf4-dq"])
    grads, new = _one_adam_step(model, CONFIG, q, jnp.asarray(X))
    assert not any(leaf.dtype == jnp.uint8 for leaf in jax.tree.leaves(grads))
    # every weight's adapter gets a gradient (its branch runs at its own product)
    for w in WEIGHTS:
        assert np.abs(np.asarray(grads["mlp"][f"{w}_lora_a"])).max() > 0
    for w in WEIGHTS:
        assert not np.array_equal(new["mlp"][f"{w}_lora_b"], q["params"]["mlp"][f"{w}_lora_b"])


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_merge_requantizes_each_weight_alone(name):
    model, q, factors = _quantized(OPTIONS[name])
    floats = jaxlora.merge(q, alpha=CONFIG.alpha)
    deq = jaxlora.quant.dequantize_base(q)
    for w in WEIGHTS:
        a, b = (np.asarray(f, np.float64) for f in factors[w])
        want = np.asarray(deq["params"]["mlp"][w], np.float64) + S * a @ b
        _close(floats["params"]["mlp"][w], want)
    merged = jaxlora.merge(q, alpha=CONFIG.alpha, requantize=True)
    assert not any("lora" in k for k in merged["params"]["mlp"])
    for w in WEIGHTS:
        linear = _torch_linear_weight(floats["params"]["mlp"][w])
        _same_bits(merged["quant"]["mlp"][w], quantize(jnp.asarray(linear), **OPTIONS[name]))
    # the re-quantized module (no adapter left) runs its own products on its weights
    requant = jaxlora.quant.dequantize_base(merged)
    with jaxlora.intercept(CONFIG):
        got = model.apply(merged, jnp.asarray(X))
    weights = {w: requant["params"]["mlp"][w] for w in WEIGHTS}
    _close(got, _head(merged, _mlp_reference(weights, {})))


def test_adapter_files_round_trip_on_the_quantized_model(tmp_path):
    model, q, _ = _quantized()
    jaxlora.save_adapter(q, tmp_path, CONFIG)
    zero = lambda p, v: jnp.zeros_like(v) if "lora_" in jax.tree_util.keystr(p) else v  # noqa: E731
    fresh = {**q, "params": jax.tree_util.tree_map_with_path(zero, q["params"])}
    loaded = jaxlora.load_adapter(fresh, tmp_path)
    assert loaded["quant"] is q["quant"]
    _same_bits(jaxlora.split(loaded["params"])[0], jaxlora.split(q["params"])[0])
    # the file is the float model's file: the same adapters, the base weight not in it
    float_model = jaxlora.quant.dequantize_base(q)
    jaxlora.save_adapter(float_model, tmp_path / "float", CONFIG)
    import safetensors.numpy

    ours = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    twin = safetensors.numpy.load_file(tmp_path / "float" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(twin)
    for key in twin:
        np.testing.assert_array_equal(ours[key], twin[key])
    with jaxlora.intercept(CONFIG):
        _close(model.apply(loaded, jnp.asarray(X)), model.apply(q, jnp.asarray(X)), tol=0)


def test_a_malformed_entry_of_several_weights_is_refused_by_name():
    model, q, _ = _quantized()
    entry = dict(q["quant"]["mlp"])
    missing = {k: v for k, v in entry.items() if k != "w_up"}
    bad = {**q, "quant": {"mlp": missing}}
    with pytest.raises(ValueError, match=r"layer 'mlp' holds .*QuantizedWeights named \['w_down'"):
        jaxlora.quant.dequantize_base(bad)
    with (
        jaxlora.intercept(CONFIG),
        pytest.raises(ValueError, match=r"layer 'mlp' holds .*expected QuantizedWeights named"),
    ):
        model.apply(bad, jnp.asarray(X))
    unsorted = {**entry, "roles": tuple(reversed(entry["roles"]))}
    with pytest.raises(ValueError, match=r"'mlp.roles' must be a ProductRoles, or a tuple"):
        jaxlora.quant.dequantize_base({**q, "quant": {"mlp": unsorted}})


# -------------------------------------------- a stack of layers of MoE experts (L, E, D, D)
# tests/test_oplevel_moe_scan.py's models: L residual layers of E experts, ``x[:, i] @ w[i]``
# (static i) per expert; each (layer, expert) is the torch Linear ``w[l, e].T`` (its own
# blocks), the stored arrays lead with (L, E) and a scan slicing them on axis 0 hands each
# layer its experts' (E, …) arrays.


def _stack_bytes_are_each_layer_and_experts_linear(q, ws, options):
    assert all(jnp.shape(x)[:2] == (moe.L, moe.E) for x in jax.tree.leaves(q))
    for i in range(moe.L):
        for e in range(moe.E):
            one = jax.tree.map(lambda x, i=i, e=e: x[i, e], q)
            _same_bits(one, quantize(jnp.asarray(_torch_linear_weight(ws[i, e])), **options))


class QLinenScanned(nn.Module):
    """``moe.LinenScanned`` with the ``'quant'`` collection sliced on axis 0 too."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            moe.LinenBlock,
            variable_axes={"params": 0, "quant": 0},
            split_rngs={"params": True},
            length=moe.L,
        )
        return stack(name="layers")(x, None)[0]


def _linen_moe(options):
    _, params, _, _, a, b = moe._linen_twins()
    q = jaxlora.quant.quantize_base({"params": params}, moe.CONFIG, **options)
    return q, a, b


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_linen_scanned_moe_is_quantized_per_layer_and_expert_forward_and_merge(name):
    """Used to be refused ("a stack of layers ... of a weight with batch axes")."""
    q, a, b = _linen_moe(OPTIONS[name])
    entry = q["quant"]["layers"]["moe"]
    assert entry["stack"].axis == 0 and entry["stack_index"].shape == (moe.L, 1, 1, 1)
    _stack_bytes_are_each_layer_and_experts_linear(entry["w"], moe.WS, OPTIONS[name])
    deq = np.asarray(jaxlora.quant.dequantize_base(q)["params"]["layers"]["moe"]["w"])
    assert deq.shape == moe.WS.shape
    x = jnp.asarray(moe.X)
    with jaxlora.intercept(moe.CONFIG):
        got = QLinenScanned().apply(q, x)
    _close(got, moe._stack_forward(moe.X, deq, a, b))
    # merge: float, then re-quantized per layer and expert
    floats = jaxlora.merge(q, alpha=moe.ALPHA)
    merged_w = np.asarray(floats["params"]["layers"]["moe"]["w"])
    _close(merged_w, moe._merged(deq, a, b))
    merged = jaxlora.merge(q, alpha=moe.ALPHA, requantize=True)
    _stack_bytes_are_each_layer_and_experts_linear(
        merged["quant"]["layers"]["moe"]["w"], merged_w, OPTIONS[name]
    )
    requant = np.asarray(jaxlora.quant.dequantize_base(merged)["params"]["layers"]["moe"]["w"])
    with jaxlora.intercept(moe.CONFIG):
        got = QLinenScanned().apply(merged, x)
    zeros = np.zeros_like(a), np.zeros_like(b)
    _close(got, moe._stack_forward(moe.X, requant, *zeros))


def test_linen_scanned_moe_trains_without_touching_the_packed_bytes_and_files_round_trip(
    tmp_path,
):
    q, a, b = _linen_moe(OPTIONS["nf4"])
    _, new = _one_adam_step(QLinenScanned(), moe.CONFIG, q, jnp.asarray(moe.X))
    lora_b = q["params"]["layers"]["moe"]["lora_b"]
    assert not np.array_equal(new["layers"]["moe"]["lora_b"], lora_b)
    # files: each layer's and expert's adapter, read back exactly into the quantized model
    path_map = moe._paths("layers_{i}.moe")
    jaxlora.save_adapter(q, tmp_path, moe.CONFIG, path_map=path_map, layer_names=moe.NAMES)
    moe._assert_files_per_layer_per_expert(moe._files(tmp_path), a, b)
    zero = lambda p, v: jnp.zeros_like(v) if "lora_" in jax.tree_util.keystr(p) else v  # noqa: E731
    fresh = {**q, "params": jax.tree_util.tree_map_with_path(zero, q["params"])}
    loaded = jaxlora.load_adapter(fresh, tmp_path, path_map=path_map, layer_names=moe.NAMES)
    assert loaded["quant"] is q["quant"]
    np.testing.assert_array_equal(loaded["params"]["layers"]["moe"]["lora_a"], a)
    np.testing.assert_array_equal(loaded["params"]["layers"]["moe"]["lora_b"], b)


def test_nnx_vmapped_moe_is_quantized_per_layer_and_expert_trains_merges_and_saves(tmp_path):
    """Used to be refused (the NNX side of the test above)."""
    options = OPTIONS["nf4-dq"]
    scanned, _, a, b = moe._nnx_twins()
    jaxlora.nnx.quantize_base(scanned, moe.CONFIG, **options)
    kernel = scanned.layers.moe.w
    assert isinstance(kernel, jaxlora.nnx.QuantizedKernel)
    assert kernel.shape == moe.WS.shape and kernel.layer_axis == 0
    _stack_bytes_are_each_layer_and_experts_linear(kernel.get_value(), moe.WS, options)
    deq = np.asarray(_layout.dequantize_stack(kernel.get_value(), scanned.layers.moe.lora_roles, 0))
    _close(scanned(jnp.asarray(moe.X)), moe._stack_forward(moe.X, deq, a, b))
    # one optax step: the adapters move, the packed bytes do not
    before = jax.tree.map(np.array, kernel.get_value())
    optimizer = nnx.Optimizer(scanned, optax.adam(1e-2), wrt=nnx.LoRAParam)
    assert not [v for v in jax.tree.leaves(nnx.state(optimizer)) if v.dtype == jnp.uint8]
    loss = lambda m, x: jnp.mean(m(x) ** 2)  # noqa: E731
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(scanned, jnp.asarray(moe.X))
    optimizer.update(scanned, grads)
    _same_bits(scanned.layers.moe.w.get_value(), jax.tree.map(jnp.asarray, before))
    assert not np.array_equal(scanned.layers.moe.lora_b[...], b)
    # files: each layer's and expert's adapter
    a, b = np.asarray(scanned.layers.moe.lora_a[...]), np.asarray(scanned.layers.moe.lora_b[...])
    path_map = moe._paths("layers.{i}.moe")
    jaxlora.nnx.save_adapter(scanned, tmp_path, path_map=path_map)
    moe._assert_files_per_layer_per_expert(moe._files(tmp_path), a, b)
    # merge, re-quantized per layer and expert
    floats = jaxlora.nnx.merge(nnx.clone(scanned))  # dequantized, merged in fp32
    merged_w = np.asarray(floats.layers.moe.w[...])
    _close(merged_w, moe._merged(deq, a, b))
    jaxlora.nnx.merge(scanned, requantize=True)
    _stack_bytes_are_each_layer_and_experts_linear(
        scanned.layers.moe.w.get_value(), merged_w, options
    )


def test_a_stack_of_experts_with_the_wrong_counts_is_refused_by_name():
    roles = Roles((moe.E, moe.D, moe.D), (0,), (1,), (2,))
    q = _layout.quantize_stack(jnp.ones((moe.L, moe.E, moe.D, moe.D)), roles, 0)
    other = Roles((moe.E + 1, moe.D, moe.D), (0,), (1,), (2,))
    with pytest.raises(ValueError, match=r"batch axes \(0,\).*4 stacked in front.*\(2, 3\)"):
        _layout.dequantize_stack(q, other, 0)
    with pytest.raises(ValueError, match=r"dequantize: .*stack of 2 layers"):
        _layout.dequantize_weight(q, roles)


class _QuantScanned(nn.Module):
    """``tests/test_multiweight_rest.py``'s scanned gated MLP, 'quant' sliced on axis 0."""

    axis: int = 0

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            multi.Layer,
            variable_axes={"params": self.axis, "quant": 0},
            split_rngs={"params": True},
            length=multi.L,
        )
        return stack(name="layers")(x, None)[0]


@pytest.mark.parametrize("axis", [0, 1])
def test_a_scanned_module_with_several_weights_is_quantized_layer_by_layer_as_its_twin(axis):
    """Several weights of one module inside nn.scan (adapted since the scanned multi-weight
    change): each (layer, weight) quantized as the unrolled twin's, the forward and the
    re-quantizing merge equal the twin's bit for bit."""
    unrolled, _, scanned, x = multi._twins(axis)
    q = jaxlora.quant.quantize_base({"params": scanned}, multi.CONFIG)
    twin = jaxlora.quant.quantize_base({"params": unrolled}, multi.CONFIG)
    node = q["quant"]["layers"]["mlp"]
    for i in range(multi.L):
        for weight in multi.WEIGHTS:
            layer = jax.tree.map(lambda t, i=i: t[i], node[weight])
            _same_bits(layer, twin["quant"][f"layers_{i}"]["mlp"][weight])
    with jaxlora.intercept(multi.CONFIG):
        got = _QuantScanned(axis).apply(q, x)
        want = multi.Unrolled().apply(twin, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    merged = jaxlora.merge(q, alpha=multi.CONFIG.alpha, requantize=True)["quant"]["layers"]["mlp"]
    merged_twin = jaxlora.merge(twin, alpha=multi.CONFIG.alpha, requantize=True)["quant"]
    for i in range(multi.L):
        for weight in multi.WEIGHTS:
            layer = jax.tree.map(lambda t, i=i: t[i], merged[weight])
            _same_bits(layer, merged_twin[f"layers_{i}"]["mlp"][weight])
