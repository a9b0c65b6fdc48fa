"""QLoRA on Linen: ``jaxlora.quant.quantize_base`` + ``jaxlora.intercept`` against closed forms.

The forward of a quantized ``nn.Dense`` is compared with ``x @ dequantize(q).T + b`` (and the
LoRA branch) computed in float64 numpy; training checks that the packed base is never touched
and gets no optimizer state; merging is checked against its closed form and error bound.
PEFT/bitsandbytes parity is in ``parity_tests/test_qlora_peft.py``.
"""

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxlora
from jaxlora.quant import QuantizedWeight, dequantize, dequantize_base, quantize_base
from tests._train import linen_adam_steps

IN, HIDDEN, OUT = 128, 64, 8


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(HIDDEN, name="up")(x))
        return nn.Dense(OUT, name="down")(h)


CONFIG = jaxlora.LoRAConfig(r=4, alpha=8, targets=["up", "down"])


def _model(quant_type="nf4", double_quant=False, *, lora=True):
    model = MLP()
    variables = model.init(jax.random.key(0), jnp.ones((1, IN)))
    if lora:
        variables = jaxlora.inject(variables, CONFIG, jax.random.key(1))
        # lora_b starts at zero; give it values so the branch is checked too.
        for name in ("up", "down"):
            b = variables["params"][name]["lora_b"]
            variables["params"][name]["lora_b"] = 0.1 * jax.random.normal(
                jax.random.key(2), b.shape
            )
    quantized = quantize_base(variables, CONFIG, quant_type=quant_type, double_quant=double_quant)
    return model, variables, quantized


def _reference(quantized, x):
    h = np.asarray(x, np.float64)
    for i, name in enumerate(("up", "down")):
        p = quantized["params"][name]
        kernel = np.asarray(dequantize(quantized["quant"][name]["kernel"]), np.float64).T
        y = h @ kernel + np.asarray(p["bias"], np.float64)
        if "lora_a" in p:  # scale = alpha / r = 2
            y += 2.0 * h @ np.asarray(p["lora_a"], np.float64) @ np.asarray(p["lora_b"], np.float64)
        h = np.maximum(y, 0) if i == 0 else y
    return h


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("lora", [False, True])
def test_forward_equals_closed_form(quant_type, lora):
    model, _, quantized = _model(quant_type, lora=lora)
    assert "kernel" not in quantized["params"]["up"]
    assert isinstance(quantized["quant"]["up"]["kernel"], QuantizedWeight)
    x = jax.random.normal(jax.random.key(3), (5, IN))
    with jaxlora.intercept(CONFIG):
        got = model.apply(quantized, x)
    expected = _reference(quantized, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_forward_under_jit_equals_eager_and_double_quant():
    model, _, quantized = _model(double_quant=True)
    assert quantized["quant"]["up"]["kernel"].double_quant
    x = jax.random.normal(jax.random.key(3), (5, IN))

    @jax.jit
    def apply(variables, x):
        with jaxlora.intercept(CONFIG):
            return model.apply(variables, x)

    with jaxlora.intercept(CONFIG):
        eager = model.apply(quantized, x)
    np.testing.assert_allclose(apply(quantized, x), eager, rtol=1e-6, atol=1e-6)
    expected = _reference(quantized, x)
    np.testing.assert_allclose(eager, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_quantized_kernel_is_torch_layout_of_the_float_kernel():
    _, variables, quantized = _model()
    q = quantized["quant"]["up"]["kernel"]
    assert q.shape == (HIDDEN, IN)  # (out, in), as torch / bitsandbytes hold it
    ours = jaxlora.quant.quantize(variables["params"]["up"]["kernel"].T)
    np.testing.assert_array_equal(q.packed, ours.packed)
    np.testing.assert_array_equal(q.absmax, ours.absmax)


def test_compute_dtype_follows_the_dense_dtype():
    model = nn.Dense(16, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), jnp.ones((1, 64)))
    wrapped = {"params": {"d": variables["params"]}}

    class Wrap(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, dtype=jnp.bfloat16, name="d")(x)

    quantized = quantize_base(wrapped, ["d"])
    x = jax.random.normal(jax.random.key(1), (3, 64))
    with jaxlora.intercept(jaxlora.LoRAConfig(r=1, targets=["d"])):
        y = Wrap().apply(quantized, x)
    assert y.dtype == jnp.bfloat16
    kernel = dequantize(quantized["quant"]["d"]["kernel"]).T
    expected = jnp.dot(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)) + variables["params"][
        "bias"
    ].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))


def test_outside_intercept_the_missing_kernel_is_an_error():
    model, _, quantized = _model()
    with pytest.raises(flax.errors.ScopeParamNotFoundError, match='"kernel" in scope "/up"'):
        model.apply(quantized, jnp.ones((1, IN)))


class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.DenseGeneral((2, 4), name="gen")(x)
        x = nn.Dense(4, name="flat")(x.reshape(x.shape[0], -1))
        x = nn.Conv(3, (3,), name="conv")(x[..., None])
        return nn.Embed(5, 3, name="emb")(jnp.zeros(x.shape[:1], jnp.int32)) + x.sum()


def _mixed():
    return Mixed().init(jax.random.key(0), jnp.ones((2, 6)))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("gen", r"layer 'gen' has a kernel of shape \(6, 2, 4\)"),
        ("conv", r"layer 'conv' has a kernel of shape \(3, 1, 3\)"),
        ("emb", r"layer 'emb' has no 'kernel' \(found \['embedding'\]\)"),
        ("nothing", "quantize_base: .*'nothing'"),
    ],
)
def test_refuses_non_dense_targets_naming_the_path(target, message):
    variables = _mixed()
    before = jax.tree.map(np.asarray, variables)
    with pytest.raises(ValueError, match=message):
        quantize_base(variables, [target, "flat"])
    jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_refuses_a_second_quantization_and_bad_options():
    _, _, quantized = _model()
    with pytest.raises(ValueError, match="already hold a 'quant' collection"):
        quantize_base(quantized, CONFIG)
    with pytest.raises(ValueError, match="blocksize for nf4"):
        quantize_base(_model(lora=False)[1], CONFIG, blocksize=48)


def test_a_quantized_kernel_in_a_layer_that_cannot_hold_one_is_refused_at_the_call():
    # nn.DenseGeneral can hold one now (tests/test_qlora_oplevel.py); an nn.Conv cannot: its
    # kernel is no torch Linear. quantize_base refuses it; a hand-made 'quant' entry too.
    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3,), name="conv")(x)

    x = jnp.ones((1, 5, 4))
    variables = Conv().init(jax.random.key(0), x)
    kernel = variables["params"]["conv"]["kernel"]
    quantized = {
        "params": {"conv": {"bias": variables["params"]["conv"]["bias"]}},
        "quant": {"conv": {"kernel": jaxlora.quant.quantize(kernel.reshape(12, 4).T)}},
    }
    with (
        jaxlora.intercept(jaxlora.LoRAConfig(r=1, targets=["conv"])),
        pytest.raises(ValueError, match="'conv' is a Conv holding a quantized weight"),
    ):
        Conv().apply(quantized, x)


def test_a_quantized_kernel_of_the_wrong_shape_is_refused():
    model, _, quantized = _model()
    quantized["quant"]["up"] = quantized["quant"]["down"]
    with (
        jaxlora.intercept(CONFIG),
        pytest.raises(ValueError, match=r"'up'.*QuantizedWeight of shape \(features, in\)"),
    ):
        model.apply(quantized, jnp.ones((1, IN)))


def _nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def test_train_freeze_base_adam_never_touches_the_quantized_base():
    model, _, quantized = _model()
    frozen = quantized["quant"]
    before = jax.tree.map(np.array, frozen)
    x = jax.random.normal(jax.random.key(4), (16, IN))
    target = jax.random.normal(jax.random.key(5), (16, OUT))
    params, opt_state, losses, _ = linen_adam_steps(model, CONFIG, quantized, x, target, steps=5)
    assert losses[-1] < losses[0]
    # The packed base is bit-identical (and no uint8 leaf ever reached grad or the optimizer).
    jax.tree.map(np.testing.assert_array_equal, frozen, before)
    assert all(leaf.dtype != jnp.uint8 for leaf in jax.tree.leaves((params, opt_state)))
    np.testing.assert_array_equal(params["up"]["bias"], quantized["params"]["up"]["bias"])
    # Adam keeps two moments for the LoRA leaves only (plus its step counters).
    adapter, _ = jaxlora.split(params)
    moments = [
        leaf for leaf in jax.tree.leaves(opt_state) if jnp.ndim(leaf) > 0 and leaf.dtype == "f4"
    ]
    assert sum(m.nbytes for m in moments) == 2 * _nbytes(adapter)


@pytest.mark.parametrize(
    ("double_quant", "expected"),
    [
        # nf4: half a byte per element, one float32 absmax per block of 64.
        (False, 0.5 + 4 / 64),
        # double quantization: one uint8 code per block, a float32 scale per 256 blocks and
        # a float32 offset per weight.
        (True, None),
    ],
)
def test_bytes_per_base_parameter(double_quant, expected):
    _, variables, quantized = _model(double_quant=double_quant, lora=False)
    n = sum(np.size(variables["params"][k]["kernel"]) for k in ("up", "down"))
    got = _nbytes(quantized["quant"]) / n
    if expected is None:
        blocks = n // 64
        layers = 2  # each layer's blocks fit in one nested block of 256
        expected = (n / 2 + blocks + 4 * layers + 4 * layers) / n
        assert got < 0.5 + 4 / 64
    assert got == pytest.approx(expected, rel=1e-12)
    assert got < 0.6


def test_merge_dequantizes_then_merges_in_float32():
    _, variables, quantized = _model()
    merged = jaxlora.merge(quantized, alpha=CONFIG.alpha)
    assert "quant" not in merged
    assert sorted(merged["params"]["up"]) == ["bias", "kernel"]
    for name in ("up", "down"):
        p = quantized["params"][name]
        kernel = np.asarray(dequantize(quantized["quant"][name]["kernel"]), np.float64).T
        expected = kernel + 2.0 * np.asarray(p["lora_a"], np.float64) @ np.asarray(p["lora_b"])
        got = np.asarray(merged["params"][name]["kernel"])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
        # vs merging into the unquantized kernel: only the NF4 rounding error, at most half
        # the widest code gap (1 - 0.6962 = 0.3038) times the block's absmax.
        plain = jaxlora.merge(variables, alpha=CONFIG.alpha)["params"][name]["kernel"]
        w = np.asarray(variables["params"][name]["kernel"]).T  # (out, in), blocks of 64
        absmax = np.abs(w.reshape(-1, 64)).max(axis=1)
        error = np.abs(got - np.asarray(plain)).T.reshape(-1, 64)
        assert (error <= 0.152 * absmax[:, None] + 1e-6).all()
        assert error.max() > 0  # it is a quantized merge, not the plain one


def test_dequantize_base_round_trip_layout():
    _, _, quantized = _model(lora=False)
    plain = dequantize_base(quantized)
    assert "quant" not in plain
    np.testing.assert_array_equal(
        plain["params"]["up"]["kernel"], dequantize(quantized["quant"]["up"]["kernel"]).T
    )
    assert dequantize_base(plain) is plain


def test_adapter_files_round_trip_on_a_quantized_base(tmp_path):
    _, _, quantized = _model()
    jaxlora.save_adapter(quantized, tmp_path, CONFIG)
    base = {
        "params": {k: {"bias": v["bias"]} for k, v in quantized["params"].items()},
        "quant": quantized["quant"],
    }
    loaded = jaxlora.load_adapter(base, tmp_path)
    assert loaded["quant"] is quantized["quant"]
    assert "kernel" not in loaded["params"]["up"]  # no stand-in kernel is left behind
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], quantized["params"])


def test_a_pissa_file_is_refused_for_a_quantized_base(tmp_path):
    _, variables, quantized = _model(lora=False)
    pissa = jaxlora.LoRAConfig(r=4, alpha=8, targets=["up", "down"], init="pissa")
    injected = jaxlora.inject(variables, pissa, jax.random.key(1))
    jaxlora.save_adapter(injected, tmp_path, pissa)
    with pytest.raises(ValueError, match="init='pissa' adapter.*load it into the float base"):
        jaxlora.load_adapter(quantized, tmp_path)
