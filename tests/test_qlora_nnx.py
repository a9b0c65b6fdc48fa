"""QLoRA on NNX: ``jaxlora.nnx.quantize_base`` (a ``QuantizedKernel`` in ``LoRALinear``)
against closed forms and the Linen path; training never touches the packed base."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from jaxlora import nnx as jnnx
from jaxlora.quant import QuantizedWeight, dequantize
from tests._train import nnx_lora_step

IN, HIDDEN, OUT = 128, 64, 8
CONFIG = jaxlora.LoRAConfig(r=4, alpha=8, targets=["up", "down"])


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def _model(**options):
    model = MLP(nnx.Rngs(0))
    floats = {name: getattr(model, name).kernel[...] for name in ("up", "down")}
    jnnx.inject(model, CONFIG, nnx.Rngs(1))
    for i, name in enumerate(("up", "down")):  # nonzero B so that the branch is checked
        b = getattr(model, name).lora_b
        b[...] = 0.1 * jax.random.normal(jax.random.key(i), b.shape)
    jnnx.quantize_base(model, CONFIG, **options)
    return model, floats


def _reference(model, x):
    h = np.asarray(x, np.float64)
    for i, name in enumerate(("up", "down")):
        layer = getattr(model, name)
        kernel = np.asarray(dequantize(layer.kernel.get_value()), np.float64).T
        y = h @ kernel + np.asarray(layer.bias[...], np.float64)
        a, b = (np.asarray(v[...], np.float64) for v in (layer.lora_a, layer.lora_b))
        y += 2.0 * h @ a @ b
        h = np.maximum(y, 0) if i == 0 else y
    return h


@pytest.mark.parametrize("options", [{}, {"quant_type": "fp4"}, {"double_quant": True}])
def test_forward_equals_closed_form(options):
    model, floats = _model(**options)
    assert isinstance(model.up.kernel, jnnx.QuantizedKernel)
    assert not isinstance(model.up.kernel, nnx.Param)
    q = model.up.kernel.get_value()
    assert isinstance(q, QuantizedWeight) and q.shape == (HIDDEN, IN)
    np.testing.assert_array_equal(
        q.packed, jaxlora.quant.quantize(floats["up"].T, **options).packed
    )
    x = jax.random.normal(jax.random.key(3), (5, IN))
    expected = _reference(model, x)
    got = model(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), got, rtol=1e-6, atol=1e-6)


def test_train_optimizer_on_lora_params_never_touches_the_quantized_base():
    model, _ = _model()
    before = jax.tree.map(np.array, nnx.state(model, jnnx.QuantizedKernel))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    x = jax.random.normal(jax.random.key(4), (16, IN))
    target = jax.random.normal(jax.random.key(5), (16, OUT))

    losses = [float(nnx_lora_step(model, optimizer, x, target)[0]) for _ in range(5)]
    assert losses[-1] < losses[0]
    after = nnx.state(model, jnnx.QuantizedKernel)
    jax.tree.map(np.testing.assert_array_equal, after, before)
    lora_bytes = sum(v.nbytes for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    moments = [
        leaf
        for leaf in jax.tree.leaves(nnx.state(optimizer))
        if jnp.ndim(leaf) > 0 and leaf.dtype == jnp.float32
    ]
    assert sum(m.nbytes for m in moments) == 2 * lora_bytes
    assert all(leaf.dtype != jnp.uint8 for leaf in jax.tree.leaves(nnx.state(optimizer)))


def test_merge_returns_a_float_linear_with_the_dequantized_merge():
    model, _ = _model()
    expected = {}
    for name in ("up", "down"):
        layer = getattr(model, name)
        kernel = np.asarray(dequantize(layer.kernel.get_value()), np.float64).T
        a, b = (np.asarray(v[...], np.float64) for v in (layer.lora_a, layer.lora_b))
        expected[name] = kernel + 2.0 * a @ b
    jnnx.merge(model)
    for name in ("up", "down"):
        layer = getattr(model, name)
        assert type(layer) is nnx.Linear and type(layer.kernel) is nnx.Param
        np.testing.assert_allclose(
            layer.kernel[...], expected[name], rtol=0, atol=1e-6 * np.abs(expected[name]).max()
        )


def test_same_bytes_and_output_as_the_linen_path():
    from flax import linen as nn

    model, floats = _model()

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(OUT, name="down")(nn.relu(nn.Dense(HIDDEN, name="up")(x)))

    params = {
        name: {
            "kernel": floats[name],
            "bias": getattr(model, name).bias[...],
            "lora_a": getattr(model, name).lora_a[...],
            "lora_b": getattr(model, name).lora_b[...],
        }
        for name in ("up", "down")
    }
    variables = jaxlora.quant.quantize_base({"params": params}, CONFIG)
    for name in ("up", "down"):
        ours = getattr(model, name).kernel.get_value()
        np.testing.assert_array_equal(variables["quant"][name]["kernel"].packed, ours.packed)
    x = jax.random.normal(jax.random.key(6), (4, IN))
    with jaxlora.intercept(CONFIG):
        linen = Linen().apply(variables, x)
    np.testing.assert_allclose(model(x), linen, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["up", "nothing"], "quantize_base: .*'nothing'"),
        (["up", "plain"], "layer 'plain' is a Linear; only LoRALinear"),
    ],
)
def test_refusals_name_the_layer_and_change_nothing(targets, message):
    model, _ = _model()
    model.plain = nnx.Linear(4, 4, rngs=nnx.Rngs(2))
    model.down.kernel = nnx.Param(jnp.ones((HIDDEN, OUT)))  # float again: quantizable
    with pytest.raises(ValueError, match=message):
        jnnx.quantize_base(model, ["down", *targets])
    assert type(model.down.kernel) is nnx.Param


def test_a_quantized_kernel_is_not_quantized_again():
    model, _ = _model()
    with pytest.raises(ValueError, match="layer 'up': the kernel is already quantized"):
        jnnx.quantize_base(model, ["up"])


def test_adapter_files_round_trip_on_a_quantized_model(tmp_path):
    # The file code reads the kernel's shape: a QuantizedKernel reports the (in, out) shape of
    # the kernel it stands for.
    model, _ = _model()
    assert model.up.kernel.shape == (IN, HIDDEN) and model.up.kernel.ndim == 2
    jnnx.save_adapter(model, tmp_path)
    other, _ = _model()
    for name in ("up", "down"):
        getattr(other, name).lora_b[...] = jnp.zeros_like(getattr(other, name).lora_b[...])
    jnnx.load_adapter(other, tmp_path)
    for name in ("up", "down"):
        for leaf in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(
                getattr(getattr(other, name), leaf)[...], getattr(getattr(model, name), leaf)[...]
            )
    assert isinstance(other.up.kernel, jnnx.QuantizedKernel)
