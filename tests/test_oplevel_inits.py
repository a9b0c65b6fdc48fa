"""LoRAConfig.init for adapters at a weight's product (NNX op-level layers, Linen product
adapters): gaussian N(0, 1/r), PiSSA and OLoRA from the weight as the torch Linear it is,
(out, in) = (prod free, prod contracted) in role order. References in numpy float64: the
Linear matrix of each layout written out per case, its SVD/QR (sign-free products), and the
base output; PiSSA/OLoRA leave the output unchanged at init to fp32 rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxlora
import jaxlora.nnx
import jaxlora.tree

R, ALPHA = 2, 6.0
S = ALPHA / R

# name: (einsum, weight shape, input shape, the weight as its (out, in) Linear in numpy)
CASES = {
    "q_proj": ("btd,dnh->btnh", (6, 2, 3), (2, 5, 6), lambda w: w.reshape(6, 6).T),
    "gemma_q": (
        "btd,ndh->btnh",
        (2, 6, 3),
        (2, 5, 6),
        lambda w: w.transpose(0, 2, 1).reshape(6, 6),
    ),
    "o_proj": ("btnh,nhd->btd", (2, 3, 5), (2, 4, 2, 3), lambda w: w.reshape(6, 5).T),
    "conv1d": ("bti,oi->bto", (4, 7), (2, 5, 7), lambda w: w),
}


class NnxEinsum(nnx.Module):
    def __init__(self, eqn: str, shape: tuple[int, ...], seed: int = 0):
        self.eqn = eqn
        self.w = nnx.Param(jax.random.normal(jax.random.key(seed), shape))

    def __call__(self, x):
        return jnp.einsum(self.eqn, x, self.w)


class NnxModel(nnx.Module):
    def __init__(self, eqn: str, shape: tuple[int, ...]):
        self.proj = NnxEinsum(eqn, shape)

    def __call__(self, x):
        return self.proj(x)


class LinenEinsum(nn.Module):
    eqn: str
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.eqn, x, self.param("w", nn.initializers.normal(1.0), self.shape))


class LinenModel(nn.Module):
    eqn: str
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        return LinenEinsum(self.eqn, self.shape, name="proj")(x)


def _config(init: str) -> jaxlora.LoRAConfig:
    return jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"], init=init)


def _nnx(case: str, init: str):
    eqn, shape, x_shape, _ = CASES[case]
    model = NnxModel(eqn, shape)
    x = jax.random.normal(jax.random.key(1), x_shape)
    w, y = np.asarray(model.proj.w[...], np.float64), np.asarray(model(x))
    jaxlora.nnx.inject(model, _config(init), nnx.Rngs(2), inputs=(x,))
    return model, x, w, y


def _linen(case: str, init: str):
    eqn, shape, x_shape, _ = CASES[case]
    model = LinenModel(eqn, shape)
    x = jax.random.normal(jax.random.key(1), x_shape)
    params = model.init(jax.random.key(0), x)["params"]
    w = np.asarray(params["proj"]["w"], np.float64)
    y = np.asarray(model.apply({"params": params}, x))
    layouts = jaxlora.layouts(model, x)
    adapted = jaxlora.inject(params, _config(init), jax.random.key(2), layouts=layouts)
    with jaxlora.intercept(_config(init)):
        y_adapted = np.asarray(model.apply({"params": adapted}, x))
    return adapted, x, w, y, y_adapted


def _factors_reference(init: str, linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale·B·A, residual) of PEFT's PiSSA/OLoRA on the (out, in) matrix, in float64: both
    free of the factors' signs. PiSSA: scale·B·A is the top-r SVD part; OLoRA: B·A is the
    first r columns of Q times R's first r rows (PEFT's, scale not divided out)."""
    if init == "pissa":
        u, s, vh = np.linalg.svd(linear, full_matrices=False)
        part = (u[:, :R] * s[:R]) @ vh[:R]
    else:
        q, rr = np.linalg.qr(linear)
        part = S * q[:, :R] @ rr[:R]
    return part, linear - part


def _check_factors(case: str, init: str, a, b, residual, w: np.ndarray) -> None:
    to_linear = CASES[case][3]
    linear = to_linear(w)
    out, n_in = linear.shape
    # lora_a (C…, r) → A (r, in); lora_b (r, F…) → B (out, r): the same flattening as W's.
    big_a = np.asarray(a, np.float64).reshape(n_in, R).T
    big_b = np.asarray(b, np.float64).reshape(R, out).T
    part, res = _factors_reference(init, linear)
    scale = np.abs(linear).max()
    assert np.abs(S * big_b @ big_a - part).max() <= 2e-5 * scale
    assert np.abs(to_linear(np.asarray(residual, np.float64)) - res).max() <= 2e-5 * scale
    if init == "olora":  # OLoRA's B itself: Q[:, :r], orthonormal columns
        assert np.abs(big_b.T @ big_b - np.eye(R)).max() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_nnx_weight_inits_factor_the_linear_and_keep_the_output(case, init):
    model, x, w, y = _nnx(case, init)
    layer = model.proj
    assert layer.lora_init == init
    _check_factors(case, init, layer.lora_a[...], layer.lora_b[...], layer.w[...], w)
    assert layer.w[...].dtype == jnp.float32
    y_adapted = np.asarray(model(x))
    assert np.abs(y_adapted - y).max() <= 1e-5 * np.abs(y).max()
    jaxlora.nnx.merge(model)  # residual + delta = W again
    np.testing.assert_allclose(np.asarray(model.proj.w[...]), w, atol=2e-5 * np.abs(w).max())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_linen_weight_inits_factor_the_linear_and_keep_the_output(case, init):
    adapted, _, w, y, y_adapted = _linen(case, init)
    node = adapted["proj"]
    assert node["lora_init"] == jaxlora.tree.InitRecord(init)
    _check_factors(case, init, node["lora_a"], node["lora_b"], node["w"], w)
    assert np.abs(y_adapted - y).max() <= 1e-5 * np.abs(y).max()
    merged = jaxlora.merge(adapted, alpha=ALPHA)
    np.testing.assert_allclose(np.asarray(merged["proj"]["w"]), w, atol=2e-5 * np.abs(w).max())


def test_gaussian_is_pefts_distribution_in_nnx_and_linen():
    eqn, shape = "btd,dnh->btnh", (512, 4, 128)
    x = jnp.ones((1, 1, 512))
    config = jaxlora.LoRAConfig(r=16, targets=["proj"], init="gaussian")
    model = NnxModel(eqn, shape)
    jaxlora.nnx.inject(model, config, nnx.Rngs(0), inputs=(x,))
    linen = LinenModel(eqn, shape)
    params = linen.init(jax.random.key(0), x)["params"]
    params = jaxlora.inject(params, config, jax.random.key(1), layouts=jaxlora.layouts(linen, x))
    pairs = (
        (model.proj.lora_a[...], model.proj.lora_b[...]),
        (params["proj"]["lora_a"], params["proj"]["lora_b"]),
    )
    for a, b in pairs:
        a = np.asarray(a)
        assert a.shape == (512, 16)
        # 8192 draws: the std and mean within ~5 standard errors of N(0, σ=1/16); kaiming's
        # U(±1/√512) would give σ ≈ 0.0255.
        assert abs(a.std() - 1 / 16) < 0.04 / 16 and abs(a.mean()) < 0.05 / 16
        assert not np.asarray(b).any()


MOE = ("ebd,edf->ebf", (3, 6, 5), (3, 4, 6))


def test_nnx_weight_init_with_batch_axes_is_refused_and_changes_nothing():
    eqn, shape, x_shape = MOE
    model = NnxModel(eqn, shape)
    x = jnp.ones(x_shape)
    w = model.proj.w[...]
    with pytest.raises(ValueError, match=r"init='pissa'.*batch axes \(0,\).*MoE"):
        jaxlora.nnx.inject(model, _config("pissa"), nnx.Rngs(0), inputs=(x,))
    assert type(model.proj) is NnxEinsum and bool((model.proj.w[...] == w).all())


def test_linen_weight_init_with_batch_axes_is_refused():
    eqn, shape, x_shape = MOE
    model = LinenModel(eqn, shape)
    x = jnp.ones(x_shape)
    params = model.init(jax.random.key(0), x)["params"]
    layouts = jaxlora.layouts(model, x)
    with pytest.raises(ValueError, match=r"inject: layer 'proj'.*init='olora'.*batch axes"):
        jaxlora.inject(params, _config("olora"), jax.random.key(0), layouts=layouts)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_op_level_weight_init_files_are_refused_by_name(tmp_path, init):
    model, *_ = _nnx("q_proj", init)
    with pytest.raises(ValueError, match=rf"save_adapter: layer 'proj'.*init='{init}'.*merge"):
        jaxlora.nnx.save_adapter(model, tmp_path / "nnx")
    adapted = _linen("q_proj", init)[0]
    with pytest.raises(ValueError, match=rf"save_adapter: layer 'proj'.*init='{init}'.*merge"):
        jaxlora.save_adapter(adapted, tmp_path / "linen", _config(init))
    assert not (tmp_path / "nnx").exists() and not (tmp_path / "linen").exists()


def test_plain_file_into_an_op_level_pissa_adapter_is_refused(tmp_path):
    plain, *_ = _nnx("q_proj", "kaiming")
    jaxlora.nnx.save_adapter(plain, tmp_path / "nnx")
    model, *_ = _nnx("q_proj", "pissa")
    before = np.asarray(model.proj.lora_a[...])
    with pytest.raises(ValueError, match=r"layer 'proj'.*init='pissa'.*loaded"):
        jaxlora.nnx.load_adapter(model, tmp_path / "nnx")
    assert (np.asarray(model.proj.lora_a[...]) == before).all()
    linen_plain = _linen("q_proj", "kaiming")[0]
    jaxlora.save_adapter(linen_plain, tmp_path / "linen", _config("kaiming"))
    adapted = _linen("q_proj", "pissa")[0]
    with pytest.raises(ValueError, match=r"layer 'proj'.*init='pissa'.*loaded"):
        jaxlora.load_adapter(adapted, tmp_path / "linen")


def test_kaiming_product_adapter_saved_with_a_pissa_config_is_refused(tmp_path):
    """The file would say init 'pissa', and PEFT would rebuild a residual under a kaiming
    adapter made for W itself."""
    adapted = _linen("q_proj", "kaiming")[0]
    with pytest.raises(ValueError, match=r"save_adapter: layer 'proj'.*saved with init='pissa'"):
        jaxlora.save_adapter(adapted, tmp_path / "f", _config("pissa"))
