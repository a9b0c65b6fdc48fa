"""DoRA (``use_dora=True``): closed-form numpy references, the naming rule, merge/unmerge,
dropout as PEFT applies it, and every refusal. Parity with the real ``peft`` is in
``parity_tests/test_dora_parity.py``."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
import jaxlora.nnx as jnnx
import torchlora

# in < out: the dropout tests solve the output for the dropped-out input exactly.
N_IN, N_OUT, R, ALPHA = 6, 8, 2, 4.0
SCALE = ALPHA / R


def _arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(N_IN, N_OUT)).astype(np.float32)  # Flax layout (in, out)
    bias = rng.normal(size=(N_OUT,)).astype(np.float32)
    a = rng.normal(size=(N_IN, R)).astype(np.float32)
    b = rng.normal(size=(R, N_OUT)).astype(np.float32)
    m = rng.uniform(0.5, 2.0, size=(N_OUT,)).astype(np.float32)
    x = rng.normal(size=(5, N_IN)).astype(np.float32)
    return kernel, bias, a, b, m, x


def reference(kernel, bias, a, b, m, x, scale=SCALE):
    """DoRA in float64, closed form: x (m/‖K + s a b‖ ⊙ (K + s a b)) + bias (column norms)."""
    full = kernel.astype(np.float64) + scale * a.astype(np.float64) @ b
    merged = full * (m / np.linalg.norm(full, axis=0))
    return x @ merged + bias, merged


def rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(N_OUT, name="fc")(x)


def _linen(seed=0, dropout=0.0):
    kernel, bias, a, b, m, x = _arrays(seed)
    params = {"fc": {"kernel": kernel, "bias": bias}}
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["fc"], use_dora=True, dropout=dropout)
    params = jaxlora.inject(params, config, jax.random.key(0))
    params["fc"] = {**params["fc"], "lora_a": a, "lora_b": b, "lora_magnitude": m}
    return config, params, x


def _torch(seed=0, dropout=0.0):
    kernel, bias, a, b, m, x = _arrays(seed)
    layer = torchlora.Linear(N_IN, N_OUT, True, R, ALPHA, use_dora=True, dropout=dropout)
    with torch.no_grad():
        for name, value in zip(
            ("weight", "bias", "lora_a", "lora_b", "lora_magnitude"),
            (kernel.T, bias, a.T, b.T, m),
            strict=True,
        ):
            getattr(layer, name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return layer, torch.from_numpy(x)


def _nnx(seed=0, dropout=0.0):
    kernel, bias, a, b, m, x = _arrays(seed)
    layer = jnnx.LoRALinear(
        N_IN, N_OUT, r=R, alpha=ALPHA, use_dora=True, dropout=dropout, rngs=nnx.Rngs(0)
    )
    for name, value in zip(
        ("kernel", "bias", "lora_a", "lora_b", "lora_magnitude"),
        (kernel, bias, a, b, m),
        strict=True,
    ):
        getattr(layer, name)[...] = jnp.asarray(value)
    return layer, jnp.asarray(x)


# --- forward and merge against the closed form ------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_all_sides_match_the_closed_form(seed):
    kernel, bias, a, b, m, x = _arrays(seed)
    expected, merged = reference(kernel, bias, a, b, m, x)
    config, params, _ = _linen(seed)
    with jaxlora.intercept(config):
        assert rel(Net().apply({"params": params}, x), expected) < 1e-5
    dense = jaxlora.LoRADense(N_OUT, R, ALPHA, use_dora=True)
    assert rel(dense.apply({"params": params["fc"]}, x), expected) < 1e-5
    layer, xt = _torch(seed)
    assert rel(layer(xt).detach(), expected) < 1e-5
    assert rel(layer.merged_weight().T, merged) < 1e-5
    nl, xj = _nnx(seed)
    assert rel(nl(xj), expected) < 1e-5
    assert rel(nl.to_base().kernel[...], merged) < 1e-5
    assert rel(jaxlora.merge(params, alpha=ALPHA)["fc"]["kernel"], merged) < 1e-5


def test_magnitude_starts_at_the_weight_norm_so_the_layer_starts_as_its_base():
    kernel, bias, *_, x = _arrays()
    params = {"fc": {"kernel": kernel, "bias": bias}}
    config = jaxlora.LoRAConfig(r=R, targets=["fc"], use_dora=True)
    params = jaxlora.inject(params, config, jax.random.key(0))
    np.testing.assert_allclose(
        params["fc"]["lora_magnitude"], np.linalg.norm(kernel, axis=0), rtol=1e-6
    )
    with jaxlora.intercept(config):
        y = Net().apply({"params": params}, x)
    np.testing.assert_allclose(y, x @ kernel + bias, rtol=1e-5, atol=1e-5)
    layer = torchlora.Linear(N_IN, N_OUT, True, R, use_dora=True)
    expected = torch.linalg.norm(layer.weight, dim=1)
    torch.testing.assert_close(layer.lora_magnitude.detach(), expected)


def test_norm_is_constant_in_backward():
    # d/dB of the output only through the lora term: the norm's own derivative is dropped.
    kernel, _, a, b, m, x = _arrays()
    layer, xt = _torch()
    layer(xt).sum().backward()
    full = kernel + SCALE * a @ b
    factor = m / np.linalg.norm(full, axis=0)  # (out,)
    # y = x K + b + (f-1) x K + f s x a b  ->  dB = s (x a)^T (1 * f), norm held constant
    expected_b = SCALE * (x @ a).T @ np.ones((5, N_OUT)) * factor
    assert rel(layer.lora_b.grad.T, expected_b) < 1e-5
    expected_m = (x @ full).sum(0) / np.linalg.norm(full, axis=0)
    assert rel(layer.lora_magnitude.grad, expected_m) < 1e-5


# --- dropout: PEFT computes the correction on base(dropout(x)) --------------------------------


def _dropped_input(z, x, kernel, bias, a, b, m):
    """Solves z = x K + bias + h ((f−1) K + f·s a b) (f per column) for the branch input h:
    PEFT's DoRA with dropout, whose correction term uses base(h), not base(x)."""
    full = kernel.astype(np.float64) + SCALE * a @ b
    f = m / np.linalg.norm(full, axis=0)
    matrix = kernel * (f - 1) + SCALE * (a @ b) * f  # (in, out), full row rank as in < out
    return (np.asarray(z, np.float64) - x @ kernel - bias) @ np.linalg.pinv(matrix)


class Conv1x1(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(N_OUT, (1,), name="fc")(x[:, None, :])[:, 0, :]


def _conv_kernel(params):
    """The Dense twin's params as a (1, in, out) conv's (a 1×1 conv is the same product)."""
    fc = dict(params["fc"])
    fc["kernel"], fc["lora_a"] = fc["kernel"][None], fc["lora_a"][None]
    fc["lora_b"] = fc["lora_b"][None]
    return {"fc": fc}


@pytest.mark.parametrize(
    "side", ["torch", "linen-intercept", "linen-layer", "nnx", "linen-conv", "nnx-conv"]
)
def test_dropout_applies_to_the_dora_correction_as_in_peft(side):
    rate = 0.5
    kernel, bias, a, b, m, x = _arrays()
    if side == "torch":
        layer, xt = _torch(dropout=rate)
        layer.train()
        torch.manual_seed(0)
        z = layer(xt).detach().numpy()
    elif side == "linen-intercept":
        config, params, _ = _linen(dropout=rate)
        with jaxlora.intercept(config, deterministic=False):
            z = Net().apply({"params": params}, x, rngs={"dropout": jax.random.key(3)})
    elif side == "linen-layer":
        dense = jaxlora.LoRADense(N_OUT, R, ALPHA, use_dora=True, dropout=rate)
        params = _linen()[1]["fc"]
        z = dense.apply({"params": params}, x, False, rngs={"dropout": jax.random.key(3)})
    elif side == "linen-conv":
        config, params, _ = _linen(dropout=rate)
        with jaxlora.intercept(config, deterministic=False):
            z = Conv1x1().apply(
                {"params": _conv_kernel(params)}, x, rngs={"dropout": jax.random.key(3)}
            )
    elif side == "nnx-conv":
        conv = jnnx.LoRAConv(
            N_IN, N_OUT, (1,), r=R, alpha=ALPHA, use_dora=True, dropout=rate, rngs=nnx.Rngs(0)
        )
        fc = _conv_kernel(_linen()[1])["fc"]
        for name, value in fc.items():
            getattr(conv, name)[...] = jnp.asarray(value)
        z = conv(jnp.asarray(x)[:, None, :], deterministic=False)[:, 0, :]
    else:
        layer, xj = _nnx(dropout=rate)
        z = layer(xj, deterministic=False)
    h = _dropped_input(z, x, kernel, bias, a, b, m)
    kept = np.isclose(h, x / (1 - rate), rtol=1e-3, atol=1e-4)
    dropped = np.isclose(h, 0.0, atol=1e-4)
    assert (kept | dropped).all()  # every entry of h is x/(1-rate) or 0: dropout(x)
    assert dropped.any() and kept.any()


# --- the naming rule: the magnitude is trained, split off, frozen by nothing ------------------


def test_magnitude_is_an_adapter_leaf_everywhere():
    _, params, _ = _linen()
    assert jaxlora.lora_mask(params)["fc"]["lora_magnitude"]
    adapter, base = jaxlora.split(params)
    assert sorted(adapter["fc"]) == ["lora_a", "lora_b", "lora_magnitude"]
    assert sorted(base["fc"]) == ["bias", "kernel"]
    tx = jaxlora.freeze_base(optax.sgd(0.1))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["fc"]["lora_magnitude"]).min()) > 0
    assert float(jnp.abs(updates["fc"]["kernel"]).max()) == 0
    model = torch.nn.Sequential(torch.nn.Linear(N_IN, N_OUT))
    torchlora.inject(model, torchlora.LoRAConfig(r=R, targets=["0"], use_dora=True))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["0.lora_a", "0.lora_b", "0.lora_magnitude"]
    assert "0.lora_magnitude" in torchlora.lora_state_dict(model)
    nl, _ = _nnx()
    assert "lora_magnitude" in nnx.state(nl, nnx.LoRAParam)


# --- merge / unmerge ----------------------------------------------------------------------------


def test_torch_unmerge_restores_the_weight_exactly():
    layer, xt = _torch()
    before, y = layer.weight.detach().clone(), layer(xt).detach()
    layer.merge()
    assert rel(layer(xt).detach(), y) < 1e-5
    with torch.no_grad():  # edits while merged do not change what unmerge restores
        layer.lora_magnitude.mul_(3.0)
    layer.unmerge()
    assert torch.equal(layer.weight, before)


def test_linen_merge_with_record_is_refused_for_dora():
    _, params, _ = _linen()
    with pytest.raises(ValueError, match="layer 'fc' is DoRA.*cannot be unmerged exactly"):
        jaxlora.merge(params, alpha=ALPHA, record=True)


def test_torch_use_dora_is_fixed_after_build():
    layer, _ = _torch()
    with pytest.raises(ValueError, match="use_dora is fixed"):
        layer.use_dora = False


# --- refusals: what is not implemented, by name -------------------------------------------------


def test_config_refuses_bad_use_dora():
    with pytest.raises(TypeError, match="use_dora must be True or False, got 'yes'"):
        jaxlora.LoRAConfig(targets=["q"], use_dora="yes")
    with pytest.raises(ValueError, match="use_dora=True with init='olora' is not implemented"):
        jaxlora.LoRAConfig(targets=["q"], use_dora=True, init="olora")
    assert jaxlora.LoRAConfig(targets=["q"], use_dora=True).to_peft()["use_dora"] is True


def test_torch_embedding_and_conv_closed_form_and_exact_unmerge():
    torch.manual_seed(0)
    emb = torchlora.Embedding(11, 5, 2, alpha=4, use_dora=True)
    conv = torchlora.Conv2d(3, 4, 3, 2, alpha=4, use_dora=True, padding=1)
    with torch.no_grad():
        emb.lora_a.normal_()
        conv.lora_b.normal_()
        for layer in (emb, conv):
            layer.lora_magnitude.uniform_(0.5, 2.0)
    table = (emb.weight + 2.0 * (emb.lora_b @ emb.lora_a).T).detach().double().numpy()
    m = emb.lora_magnitude.detach().double().numpy()
    expected = table * (m / np.linalg.norm(table, axis=0))  # per embedding feature (column)
    assert rel(emb.merged_weight(), expected) < 1e-6
    ids = torch.tensor([[1, 4, 10]])
    assert rel(emb(ids).detach(), expected[ids.numpy()]) < 1e-5
    delta = (conv.lora_b.flatten(1) @ conv.lora_a.flatten(1)).reshape(conv.weight.shape)
    full = (conv.weight + 2.0 * delta).detach().double().numpy()
    norm = np.linalg.norm(full.reshape(4, -1), axis=1)
    factor = conv.lora_magnitude.detach().double().numpy() / norm
    assert rel(conv.merged_weight(), full * factor[:, None, None, None]) < 1e-6
    x = torch.randn(2, 3, 5, 5)
    expected_y = torch.nn.functional.conv2d(
        x.double(), torch.from_numpy(full * factor[:, None, None, None]), conv.bias.double(), 1, 1
    )
    assert rel(conv(x).detach(), expected_y) < 1e-5
    for layer in (emb, conv):
        before = layer.weight.detach().clone()
        layer.merge()
        layer.unmerge()
        assert torch.equal(layer.weight, before)


def test_linen_refuses_dora_on_multi_axis_and_stacked_kernels():
    general = {"g": {"kernel": jnp.ones((4, 2, 3))}}
    layouts = {"g": jaxlora.Layout("linear", 1, 3)}
    config = jaxlora.LoRAConfig(r=1, targets=["g"], use_dora=True)
    with pytest.raises(ValueError, match=r"implemented for nn.Dense \(2-D kernel\), nn.Conv"):
        jaxlora.inject(general, config, jax.random.key(0), layouts=layouts)
    stacked = {"s": {"kernel": jnp.ones((3, 4, 2))}}
    layouts = {"s": jaxlora.Layout("linear", 1, 2, stack=1, scan="s")}
    with pytest.raises(ValueError, match="stacked over 1 layer axis"):
        jaxlora.inject(
            stacked,
            config.__class__(r=1, targets=["s"], use_dora=True),
            jax.random.key(0),
            layouts=layouts,
        )


def test_intercept_refuses_magnitude_on_dense_general():
    class G(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(N_OUT, name="fc")(x)

    config, params, x = _linen()
    with pytest.raises(ValueError, match="DenseGeneral holds 'lora_magnitude'"):
        with jaxlora.intercept(config):
            G().apply({"params": params}, x)


def test_lora_dense_refuses_a_magnitude_it_would_ignore():
    params = _linen()[1]["fc"]
    with pytest.raises(ValueError, match="use_dora=False, which would ignore it"):
        jaxlora.LoRADense(N_OUT, R, ALPHA).apply({"params": params}, _arrays()[-1])


def test_nnx_refuses_dora_on_linear_general():
    class M(nnx.Module):
        def __init__(self):
            self.g = nnx.LinearGeneral(4, (2, 3), rngs=nnx.Rngs(0))

    config = jaxlora.LoRAConfig(r=1, targets=["g"], use_dora=True)
    model = M()
    with pytest.raises(ValueError, match="not a LinearGeneral"):
        jnnx.inject(model, config, nnx.Rngs(0))
    assert type(model.g) is nnx.LinearGeneral


# --- adapter files --------------------------------------------------------------------------------


def _torch_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(N_IN, N_OUT))
    return torchlora.inject(model, torchlora.LoRAConfig(r=R, targets=["0"], use_dora=True))


def test_file_keys_and_round_trip(tmp_path):
    from safetensors.numpy import load_file

    model = _torch_model()
    with torch.no_grad():
        model[0].lora_magnitude.mul_(1.5)
    torchlora.save_adapter(model, tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == [
        "base_model.model.0.lora_A.weight",
        "base_model.model.0.lora_B.weight",
        "base_model.model.0.lora_magnitude_vector",
    ]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(N_IN, N_OUT))
    loaded = torchlora.load_adapter(fresh, tmp_path)
    assert torch.equal(loaded[0].lora_magnitude, model[0].lora_magnitude)


def _rewrite(tmp_path, change_tensors=None, change_config=None):
    from safetensors.numpy import load_file, save_file

    weights = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    if change_tensors:
        weights = change_tensors(weights)
    if change_config:
        config = change_config(config)
    save_file(weights, tmp_path / "adapter_model.safetensors", {"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))


MAG = "base_model.model.0.lora_magnitude_vector"


@pytest.mark.parametrize(
    "tensors,config,match",
    [
        (lambda w: {k: v for k, v in w.items() if k != MAG}, None, "has no '.*lora_magnitude"),
        (lambda w: {**w, MAG: w[MAG][:3]}, None, r"has shape \(3,\), expected \(8,\)"),
        (lambda w: {**w, MAG: w[MAG] * np.nan}, None, "non-finite values in '.*magnitude"),
        (None, lambda c: {**c, "use_dora": False}, "does not set use_dora=true"),
        (
            lambda w: {**w, "base_model.model.9.lora_magnitude_vector": w[MAG]},
            None,
            "'base_model.model.9.lora_magnitude_vector' belongs to no layer",
        ),
    ],
    ids=["missing", "shape", "nan", "not-dora", "stray"],
)
def test_bad_dora_files_are_refused(tmp_path, tensors, config, match):
    torchlora.save_adapter(_torch_model(), tmp_path)
    _rewrite(tmp_path, tensors, config)
    fresh = torch.nn.Sequential(torch.nn.Linear(N_IN, N_OUT))
    with pytest.raises(ValueError, match=match):
        torchlora.load_adapter(fresh, tmp_path)
    assert isinstance(fresh[0], torch.nn.Linear)  # untouched
    with pytest.raises(ValueError, match=match):
        jaxlora.load_adapter({"0": {"kernel": jnp.ones((N_IN, N_OUT))}}, tmp_path)


def test_dora_file_into_a_plain_lora_layer_is_refused(tmp_path):
    torchlora.save_adapter(_torch_model(), tmp_path)
    plain = torchlora.inject(
        torch.nn.Sequential(torch.nn.Linear(N_IN, N_OUT)), torchlora.LoRAConfig(r=R, targets=["0"])
    )
    with pytest.raises(ValueError, match="has use_dora=False but the file has use_dora=True"):
        torchlora.load_adapter(plain, tmp_path)
    params = {"0": {"kernel": jnp.ones((N_IN, N_OUT))}}
    params = jaxlora.inject(params, jaxlora.LoRAConfig(r=R, targets=["0"]), jax.random.key(0))
    with pytest.raises(ValueError, match="has no 'lora_magnitude'"):
        jaxlora.load_adapter(params, tmp_path)


def test_save_refuses_a_config_that_disagrees(tmp_path):
    _, params, _ = _linen()
    with pytest.raises(ValueError, match="use_dora=False but the layer holds 'lora_magnitude'"):
        jaxlora.save_adapter(params, tmp_path, jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["fc"]))
    assert not tmp_path.joinpath("adapter_config.json").exists()


def test_linen_lora_embed_class_attend_matches_intercept():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, q):
            return nn.Embed(11, 5, name="emb").attend(q)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, q):
            return jaxlora.LoRAEmbed(11, 5, r=2, alpha=4, use_dora=True, name="emb").attend(q)

    rng = np.random.default_rng(0)
    params = {
        "emb": {
            "embedding": rng.normal(size=(11, 5)).astype(np.float32),
            "lora_a": rng.normal(size=(11, 2)).astype(np.float32),
            "lora_b": rng.normal(size=(2, 5)).astype(np.float32),
            "lora_magnitude": rng.uniform(0.5, 2, size=(5,)).astype(np.float32),
        }
    }
    q = rng.normal(size=(3, 5)).astype(np.float32)
    full = params["emb"]["embedding"] + 2.0 * params["emb"]["lora_a"] @ params["emb"]["lora_b"]
    table = full * params["emb"]["lora_magnitude"] / np.linalg.norm(full, axis=0)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["emb"], use_dora=True)
    with jaxlora.intercept(config):
        assert rel(Plain().apply({"params": params}, q), q @ table.T) < 1e-5
    assert rel(Layer().apply({"params": params}, q), q @ table.T) < 1e-5


def test_partition_specs_shard_the_magnitude_like_the_output_features():
    from jax.sharding import PartitionSpec

    _, params, _ = _linen()
    specs = jaxlora.partition_specs(params, {"fc": {"kernel": PartitionSpec("fsdp", "tensor")}})
    assert specs["fc"]["lora_magnitude"] == PartitionSpec("tensor")
    assert jax.tree.structure(specs) == jax.tree.structure(params)


def test_intercept_refuses_dora_on_a_quantized_kernel():
    from jaxlora.quant import quantize_base

    rng = np.random.default_rng(0)
    variables = {"params": {"fc": {"kernel": rng.normal(size=(64, 64)).astype(np.float32)}}}
    config = jaxlora.LoRAConfig(r=2, targets=["fc"], use_dora=True)
    variables = jaxlora.inject(variables, config, jax.random.key(0))
    quantized = quantize_base(variables, ["fc"])

    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(64, use_bias=False, name="fc")(x)

    with pytest.raises(ValueError, match="with a quantized kernel holds 'lora_magnitude'"):
        with jaxlora.intercept(config):
            Bare().apply(quantized, jnp.ones((1, 64)))


def test_convert_carries_the_magnitude_both_ways():
    layer, _ = _torch()
    params = jaxlora.from_torch(dict(layer.state_dict()))
    np.testing.assert_array_equal(params["lora_magnitude"], layer.lora_magnitude.detach().numpy())
    back = jaxlora.to_torch(params)
    np.testing.assert_array_equal(back["lora_magnitude"], layer.lora_magnitude.detach().numpy())
    with pytest.raises(ValueError, match="'lora_magnitude' has shape"):
        jaxlora.from_torch({**dict(layer.state_dict()), "lora_magnitude": np.ones(3)})


def test_nnx_linear_general_layer_refuses_use_dora():
    with pytest.raises(ValueError, match="use_dora=True is not implemented for LoRALinearGeneral"):
        jnnx.LoRALinearGeneral(4, (2, 3), r=1, use_dora=True, rngs=nnx.Rngs(0))
