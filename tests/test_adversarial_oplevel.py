"""Adversarial cases for op-level adapters, their files, ``from_qwix`` and the adapter file
writer: inputs a demanding user tries, each checked against a closed form (numpy) or the
real ``peft``, or required to be refused with nothing changed. Each case here failed (gave a
wrong number or a different file) before its fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import nnx
from peft import PeftModel

import jaxlora
from jaxlora import nnx as jnnx
from tests.test_from_qwix import ALPHA, Rule, Tiny, X, _lora, _reference

# ------------------------------------------------------------------------------- from_qwix


def test_from_qwix_takes_the_rule_qwix_takes_for_the_op():
    """qwix applies the first rule whose op_names hold the op the module calls. A rule for
    einsum only does not apply to nnx.Linear (dot_general): qwix trained 'out' with the second
    rule's alpha. from_qwix took the first rule for both (a silently wrong alpha for 'out');
    it cannot tell from the trace which op a module called, so it refuses."""
    rules = [Rule(module_path=".*", op_names=("einsum",)), Rule(module_path=".*", alpha=1.0)]
    model, lora = Tiny(), _lora()
    before = nnx.to_pure_dict(nnx.state(model))
    with pytest.raises(ValueError, match=r"layer 'out'.*cannot tell which"):
        jnnx.from_qwix(model, lora, rules, inputs=(jnp.asarray(X),))
    assert not nnx.state(model, nnx.LoRAParam)
    after = nnx.to_pure_dict(nnx.state(model))
    assert all(map(np.array_equal, jax.tree.leaves(before), jax.tree.leaves(after)))


def test_from_qwix_rules_per_op_that_agree_are_accepted():
    """An op-restricted rule that is the only one matching (the other op has none, or the
    same rule): the adapter is qwix's, with that rule's alpha (numpy reference)."""
    rules = [Rule(module_path="proj", op_names=("einsum",)), Rule(module_path="out")]
    model, lora = Tiny(), _lora()
    want = _reference(model, lora)
    jnnx.from_qwix(model, lora, rules, inputs=(jnp.asarray(X),))
    assert model.lora_config.alpha == ALPHA
    got = np.asarray(model(jnp.asarray(X)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ------------------------------------------- PEFT files: a fused weight split off axis 0
#
# A fused k/v weight (H, C=2, D, K) used as 'BSD,HCDK->CBSKH' (its split axis C is not the
# leading one, and torch flattens the heads (K, H), not W's (H, K)), beside a q weight
# (K, D, H) with its own rank and alpha (rank_pattern, alpha_pattern) under rsLoRA. Torch
# twin: k_proj, v_proj, q_proj = nn.Linear(D, K·H).

B, S, D, H, K = 2, 3, 4, 3, 2
FUSED_CONFIG = jaxlora.LoRAConfig(
    r=2,
    alpha=6.0,
    targets=["kv", "q"],
    rank_pattern={"q": 1},
    alpha_pattern={"q": 5.0},
    use_rslora=True,
)
FUSED_MAP = {
    "kv": jaxlora.HFLinear(("k_proj", "v_proj"), split=1, out_axes=(3, 0)),
    "q": jaxlora.HFLinear("q_proj", out_axes=(0, 2)),
}


class _Weight(nn.Module):
    eqn: str
    shape: tuple

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.eqn, x, self.param("w", nn.initializers.normal(1.0), self.shape))


class _Fused(nn.Module):
    @nn.compact
    def __call__(self, x):
        kv = _Weight("BSD,HCDK->CBSKH", (H, 2, D, K), name="kv")(x)
        return kv, _Weight("BSD,KDH->BSKH", (K, D, H), name="q")(x)


class _FusedTwin(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.k_proj, self.v_proj, self.q_proj = (
            torch.nn.Linear(D, K * H, bias=False) for _ in range(3)
        )
        w, wq = np.asarray(params["kv"]["w"]), np.asarray(params["q"]["w"])
        weights = [np.transpose(w[:, c], (2, 0, 1)) for c in range(2)]  # (K, H, D)
        weights.append(np.transpose(wq, (0, 2, 1)))
        with torch.no_grad():
            for module, weight in zip(
                (self.k_proj, self.v_proj, self.q_proj), weights, strict=True
            ):
                module.weight.copy_(torch.from_numpy(weight.reshape(K * H, D).copy()))

    def forward(self, x):
        return self.k_proj(x), self.v_proj(x), self.q_proj(x)


def _fused():
    x = np.random.default_rng(0).standard_normal((B, S, D)).astype(np.float32)
    model = _Fused()
    base = model.init(jax.random.key(0), x)
    layouts = jaxlora.layouts(model, x)
    params = jaxlora.inject(base, FUSED_CONFIG, jax.random.key(1), layouts=layouts)["params"]
    for i, name in enumerate(("kv", "q")):
        shape = params[name]["lora_b"].shape
        params[name]["lora_b"] = jax.random.normal(jax.random.key(10 + i), shape)
    return model, base, layouts, params, x


def test_fused_weight_split_off_axis_0_is_what_peft_computes(tmp_path):
    model, base, _, params, x = _fused()
    assert params["q"]["lora_a"].shape == (D, 1)  # its rank_pattern
    with jaxlora.intercept(FUSED_CONFIG):
        kv, q = model.apply({"params": params}, x)
    jaxlora.save_adapter(params, tmp_path, FUSED_CONFIG, path_map=FUSED_MAP)
    twin = PeftModel.from_pretrained(_FusedTwin(base["params"]), str(tmp_path)).eval()
    with torch.no_grad():
        k, v, q_t = (t.numpy().reshape(B, S, K, H) for t in twin(torch.from_numpy(x)))
    want = np.stack([k, v])
    np.testing.assert_allclose(kv, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(q, q_t, rtol=0, atol=1e-5 * np.abs(q_t).max())
    config = jaxlora.read_adapter_config(tmp_path, path_map=FUSED_MAP)
    assert (config.rank_for("q"), config.alpha_for("q"), config.alpha_for("kv")) == (1, 5.0, 6.0)


def test_save_load_save_is_byte_identical(tmp_path):
    """safetensors writes its metadata in hash-map order, which changed from save to save;
    and the config read back (JAX-keyed patterns) wrote JAX paths into the torch-keyed
    rank_pattern/alpha_pattern. Saved again with the config read from the file: the same
    bytes."""
    _, base, layouts, params, _ = _fused()
    first = tmp_path / "first"
    jaxlora.save_adapter(params, first, FUSED_CONFIG, path_map=FUSED_MAP)
    config = jaxlora.read_adapter_config(first, path_map=FUSED_MAP)
    other = jaxlora.inject(base, config, jax.random.key(5), layouts=layouts)["params"]
    loaded = jaxlora.load_adapter(other, first, path_map=FUSED_MAP)
    for name in ("kv", "q"):
        for leaf in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(loaded[name][leaf], params[name][leaf])
    blobs = set()
    for i in range(6):  # one pair could agree by chance (3 metadata keys: 1 in 6)
        again = tmp_path / f"again{i}"
        jaxlora.save_adapter(loaded, again, config, path_map=FUSED_MAP)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (again / name).read_bytes() == (first / name).read_bytes(), name
        blobs.add((again / "adapter_model.safetensors").read_bytes())
    assert len(blobs) == 1


# ------------------------------------- DenseGeneral / LinearGeneral with axis out of order
#
# Flax's DenseGeneral and NNX's LinearGeneral sort ``axis`` (``_normalize_axes``): with
# axis=(-1, -2) the kernel is (N, H, F) for an input (…, N, H) and N pairs with the kernel's
# axis 0. The branch paired x's axes in the order given (H with axis 0): with N == H the
# shapes agree and the output was silently wrong (0.59 off at scale 1 below); the merged
# kernel was right, so merged and unmerged models disagreed.

N_H = 3  # N == H: the shapes cannot tell the two pairings apart


class _General(nn.Module):
    axis: tuple

    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral(5, axis=self.axis, name="proj")(x)


def _general_reference(node, x, scale):
    """The layer with kernel + s·a⋅b, in numpy float64: Flax's sorted pairing written out
    (x's axes N, H contract with the kernel's axes 0, 1)."""
    a, b, k = (np.asarray(node[n], np.float64) for n in ("lora_a", "lora_b", "kernel"))
    w = k + scale * np.einsum("nhr,rf->nhf", a, b)
    return np.einsum("bnh,nhf->bf", np.asarray(x, np.float64), w) + np.asarray(node["bias"])


@pytest.mark.parametrize("axis", [(-1, -2), (2, 1), (-2, -1)], ids=str)
def test_dense_general_axis_out_of_order_linen(axis):
    model = _General(axis)
    x = jax.random.normal(jax.random.key(0), (4, N_H, N_H))
    base = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=2, alpha=4.0, targets=["proj"])
    lora = jaxlora.inject(base, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    node = dict(lora["params"]["proj"])
    node["lora_b"] = jax.random.normal(jax.random.key(2), node["lora_b"].shape)
    want = _general_reference(node, x, 2.0)
    with jaxlora.intercept(config):
        y = model.apply({"params": {"proj": node}}, x)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * np.abs(want).max())
    merged = jaxlora.merge({"params": {"proj": node}}, alpha=4.0)
    np.testing.assert_allclose(model.apply(merged, x), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_dense_general_axis_out_of_order_in_an_adapter_stack():
    """The Linen adapter stack (intercept_stack) pairs the axes as the single adapter does."""
    model = _General((-1, -2))
    x = jax.random.normal(jax.random.key(0), (4, N_H, N_H))
    base = model.init(jax.random.key(0), x)
    layouts = jaxlora.layouts(model, x)
    adapters, wants = [], []
    for i in range(2):
        config = jaxlora.LoRAConfig(r=2, alpha=4.0, targets=["proj"])
        params = jaxlora.inject(base, config, jax.random.key(1 + i), layouts=layouts)
        node = dict(params["params"]["proj"])
        node["lora_b"] = jax.random.normal(jax.random.key(5 + i), node["lora_b"].shape)
        adapters.append(({"proj": node}, config))
        wants.append(_general_reference(node, x, 2.0))
    stack = jaxlora.stack_adapters(adapters, capacity=2)
    index = jnp.array([0, 1, -1, 1])
    with jaxlora.intercept_stack(stack, index):
        y = model.apply(base, x)
    plain = np.asarray(model.apply(base, x))
    want = np.stack([wants[0][0], wants[1][1], plain[2], wants[1][3]])
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_linear_general_axis_out_of_order_nnx():
    layer = nnx.LinearGeneral((N_H, N_H), 5, axis=(-1, -2), rngs=nnx.Rngs(0))
    model = nnx.Sequential(layer)
    x = jax.random.normal(jax.random.key(0), (4, N_H, N_H))
    jnnx.inject(model, jaxlora.LoRAConfig(r=2, alpha=4.0, targets=["layers.0"]), nnx.Rngs(1))
    adapted = model.layers[0]
    adapted.lora_b[...] = jax.random.normal(jax.random.key(2), adapted.lora_b.shape)
    node = {
        "kernel": adapted.kernel[...],
        "bias": adapted.bias[...],
        "lora_a": adapted.lora_a[...],
        "lora_b": adapted.lora_b[...],
    }
    want = _general_reference(node, x, 2.0)
    np.testing.assert_allclose(model(x), want, rtol=0, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------- an integer weight
#
# A weight stored as int8 and cast to float before its product was adapted; the branch was
# right, but merge rounded W + delta back to int8 (NNX and Linen: the merged model's output
# moved by 1.7 here) and a PiSSA/OLoRA residual would be rounded alike. Refused at inject.


def _int8(key, shape):
    return jax.random.randint(key, shape, -5, 5).astype(jnp.int8)


class _IntLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", _int8, (4, 3)).astype(jnp.float32)


class _IntNNX(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(_int8(jax.random.key(0), (4, 3)))

    def __call__(self, x):
        return x @ self.w[...].astype(jnp.float32)


class _IntLinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _IntLinen(name="p")(x)


class _IntNNXModel(nnx.Module):
    def __init__(self):
        self.p = _IntNNX()

    def __call__(self, x):
        return self.p(x)


INT_CONFIG = jaxlora.LoRAConfig(r=2, alpha=2.0, targets=["p"])


def test_integer_weight_is_refused_linen():
    model = _IntLinenModel()
    x = jnp.ones((2, 4))
    base = model.init(jax.random.key(0), x)
    with pytest.raises((TypeError, ValueError), match=r"'p'.*dtype int8 is not floating"):
        jaxlora.inject(base, INT_CONFIG, jax.random.key(1), layouts=jaxlora.layouts(model, x))


def test_integer_weight_is_refused_nnx():
    model = _IntNNXModel()
    before = np.asarray(model.p.w[...])
    with pytest.raises(ValueError, match=r"'p', weight 'w'.*dtype int8 is not floating"):
        jnnx.inject(model, INT_CONFIG, nnx.Rngs(0), inputs=(jnp.ones((2, 4)),))
    assert type(model.p) is _IntNNX
    np.testing.assert_array_equal(model.p.w[...], before)
