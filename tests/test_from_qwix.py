"""``jaxlora.nnx.from_qwix`` without qwix: a hand-built qwix-style dict of
``<weight>_lora_a`` / ``<weight>_lora_b`` arrays on a tiny model with an einsum weight and an
``nnx.Linear``, against the closed-form numpy output ``x W + (alpha/r)(x a) b`` (qwix's
formula), and the refusals (each leaving the model unchanged)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora import nnx as jnnx
from tests._qwix_rule import QwixRule

D, N, H, F, R, ALPHA = 6, 2, 3, 5, 2, 3.0
RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, D)).astype(np.float32)


class Proj(nnx.Module):  # tunix's Einsum: 'BD,DNH->BNH'
    def __init__(self):
        self.w = nnx.Param(jnp.asarray(RNG.normal(size=(D, N, H)), jnp.float32))

    def __call__(self, x):
        return jnp.einsum("BD,DNH->BNH", x, self.w[...])


class Tiny(nnx.Module):
    def __init__(self):
        self.proj = Proj()
        self.out = nnx.Linear(N * H, F, rngs=nnx.Rngs(1))
        self.scale = nnx.Param(jnp.ones((F,)))

    def __call__(self, x):
        return self.out(self.proj(x).reshape(x.shape[0], -1)) * self.scale[...]


Rule = functools.partial(QwixRule, module_path="proj|out", rank=R, alpha=ALPHA)


def _lora() -> dict:
    arrays = {
        "proj": {"w_lora_a": (D, R), "w_lora_b": (R, N, H)},
        "out": {"kernel_lora_a": (N * H, R), "kernel_lora_b": (R, F)},
    }
    return {
        m: {k: RNG.normal(size=s).astype(np.float32) for k, s in v.items()}
        for m, v in arrays.items()
    }


def _reference(model: Tiny, lora: dict) -> np.ndarray:
    s = ALPHA / R
    w = np.asarray(model.proj.w[...]).reshape(D, N * H)
    a, b = lora["proj"]["w_lora_a"], lora["proj"]["w_lora_b"].reshape(R, N * H)
    h = X @ w + s * (X @ a) @ b
    k, a2, b2 = (np.asarray(model.out.kernel[...]), *lora["out"].values())
    return h @ k + np.asarray(model.out.bias[...]) + s * (h @ a2) @ b2


def test_converted_model_computes_qwix_formula_and_merges():
    model, lora = Tiny(), _lora()
    want = _reference(model, lora)
    jnnx.from_qwix(model, lora, [Rule()], inputs=(jnp.asarray(X),))
    got = np.asarray(model(jnp.asarray(X)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(model.proj.lora_b[...]), lora["proj"]["w_lora_b"])
    assert model.lora_config.r == R and model.lora_config.alpha == ALPHA
    jnnx.merge(model)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(X))), got, atol=1e-5)


def _drop(lora):
    del lora["proj"]["w_lora_b"]


REFUSALS = {
    "missing_b": (_drop, Rule(), r"layer 'proj', weight 'w': w_lora_b is missing"),
    "misshaped": (
        lambda lo: lo["proj"].update(w_lora_b=np.zeros((R, N * H), np.float32)),
        Rule(),
        r"layer 'proj', w_lora_b: shape \(2, 6\), expected \(2, 2, 3\)",
    ),
    "no_module": (
        lambda lo: lo.update(other={"w_lora_a": 0.0, "w_lora_b": 0.0}),
        Rule(module_path=".*"),
        r"layer 'other', weight 'w': the model has no module",
    ),
    "no_weight": (
        lambda lo: lo["proj"].update(v_lora_a=0.0, v_lora_b=0.0),
        Rule(),
        r"layer 'proj', weight 'v': the module has no nnx.Param 'v'",
    ),
    "rank": (lambda lo: None, Rule(rank=3), r"layer 'out', kernel_lora_a \(6, 2\): its rank 2"),
    "qlora": (lambda lo: None, Rule(weight_qtype="int8"), r"layer 'out'.*QLoRA"),
    "no_rule": (lambda lo: None, Rule(module_path="proj"), r"layer 'out': no rule"),
    "float64": (
        lambda lo: lo["out"].update(kernel_lora_b=np.zeros((R, F))),
        Rule(),
        r"kernel_lora_b: dtype float64 does not convert exactly",
    ),
    "mixed_rules": (
        lambda lo: None,
        [Rule(module_path="proj"), Rule(module_path="out", alpha=1.0)],
        r"different \(rank, alpha, dropout\)",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_change_nothing(case):
    edit, rules, message = REFUSALS[case]
    model, lora = Tiny(), _lora()
    edit(lora)
    before = nnx.to_pure_dict(nnx.state(model))
    with pytest.raises(ValueError, match=message):
        jnnx.from_qwix(
            model, lora, rules if isinstance(rules, list) else [rules], inputs=(jnp.asarray(X),)
        )
    assert not nnx.state(model, nnx.LoRAParam)
    after = nnx.to_pure_dict(nnx.state(model))
    assert jax.tree.structure(after) == jax.tree.structure(before)
    assert all(map(np.array_equal, jax.tree.leaves(before), jax.tree.leaves(after)))


def test_weight_not_in_a_product_is_refused():
    model, lora = Tiny(), {"": {"scale_lora_a": np.zeros((F, R)), "scale_lora_b": 0.0}}
    with pytest.raises(ValueError, match="from_qwix: layer ''"):
        jnnx.from_qwix(model, lora, [Rule(module_path=".*")], inputs=(jnp.asarray(X),))
    assert not nnx.state(model, nnx.LoRAParam)


class SwappedProj(nnx.Module):  # w (D, H, H) used as 'BD,DNH->BNH' after swapping its free axes
    def __init__(self):
        self.w = nnx.Param(jnp.asarray(RNG.normal(size=(D, H, H)), jnp.float32))

    def __call__(self, x):
        return jnp.einsum("BD,DNH->BNH", x, jnp.swapaxes(self.w[...], 1, 2))


class Holder(nnx.Module):
    def __init__(self):
        self.proj = SwappedProj()

    def __call__(self, x):
        return self.proj(x)


def test_transpose_reordering_equal_sized_axes_is_refused():
    """qwix's lora_b follows the transposed operand (N, H); jaxlora's follows w's own (H, N)
    order: with N = H the shapes agree and a copy would be silently wrong, so it is refused."""
    model = Holder()
    a, b = np.zeros((D, R), np.float32), np.ones((R, H, H), np.float32)
    lora = {"proj": {"w_lora_a": a, "w_lora_b": b}}
    with pytest.raises(ValueError, match=r"transpose that reorders its free axes"):
        jnnx.from_qwix(model, lora, [Rule(module_path="proj")], inputs=(jnp.asarray(X),))
    assert not nnx.state(model, nnx.LoRAParam)
