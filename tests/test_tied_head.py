"""LoRA on a tied lm_head in NNX: one weight W (V, D) read by row lookups (``W[tokens]``, the
embedding) and multiplied for the logits (``x @ W.T``), as tunix Gemma3's ``Embedder``.

``inject(..., tied_products={path: method})`` adapts the product only, PEFT's tied-lm_head
semantics: logits = h·Wᵀ + s·(h·A)·B with A (D, r), B (r, V), the lookups reading the
unadapted W. Without it such a weight is refused with a message naming the option. The
references are closed forms in numpy float64; fp32 tolerance 2e-5 of the output's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jaxlora
from jaxlora import nnx as jnnx

V, D, R, ALPHA = 11, 6, 3, 6.0
S = ALPHA / R
TOL = 2e-5
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 5)))


class TiedEmbed(nnx.Module):
    """tunix's ``Embedder``: ``encode`` looks rows up, ``decode`` gives the logits."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (V, D)))

    def encode(self, tokens):
        return self.w[(tokens,)] * np.sqrt(D).astype(np.float32)

    def decode(self, x):
        return jnp.dot(x, self.w[...].T)


class OneCall(TiedEmbed):
    """Both uses in ``__call__``, chosen by a flag (``nnx.Embed``'s ``attend`` in one)."""

    def __call__(self, x, decode: bool = False):
        return self.decode(x) if decode else self.encode(x)


class LM(nnx.Module):
    def __init__(self, embed_type: type, rngs: nnx.Rngs):
        self.embed = embed_type(rngs)
        self.mix = nnx.Linear(D, D, rngs=rngs)
        self.one_call = embed_type is OneCall

    def __call__(self, tokens):
        e = self.embed(tokens) if self.one_call else self.embed.encode(tokens)
        h = jnp.tanh(self.mix(e))
        return self.embed(h, decode=True) if self.one_call else self.embed.decode(h)


class Extra(LM):
    """The tied weight also used otherwise: a bias-like add, or a second product."""

    def __init__(self, how: str, rngs: nnx.Rngs):
        super().__init__(TiedEmbed, rngs)
        self.how = how

    def __call__(self, tokens):
        logits = super().__call__(tokens)
        w = self.embed.w[...]
        return logits + (w.sum() if self.how == "add" else (logits @ w).sum())


def _params(model: nnx.Module) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _same(a, b) -> bool:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in leaves
    )


def _config(targets=("embed",)) -> jaxlora.LoRAConfig:
    return jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=list(targets))


def _tied(embed_type=TiedEmbed, method="decode", seed=0) -> LM:
    model = LM(embed_type, nnx.Rngs(0))
    jnnx.inject(model, _config(), nnx.Rngs(seed), inputs=(TOKENS,), tied_products={"embed": method})
    return model


def _reference(model: LM, tokens) -> np.ndarray:
    """PEFT's tied lm_head in numpy: lookups of the base W, logits h·Wᵀ + s·(h·A)·B."""
    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    w, k, b = f64(model.embed.w), f64(model.mix.kernel), f64(model.mix.bias)
    a, bb = f64(model.embed.lora_a), f64(model.embed.lora_b)
    h = np.tanh(w[np.asarray(tokens)] * np.sqrt(D) @ k + b)
    return h @ w.T + S * (h @ a) @ bb


def _randomize(model: LM, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for f in (model.embed.lora_a, model.embed.lora_b):
        f[...] = jnp.asarray(rng.normal(size=f.shape), jnp.float32)


@pytest.mark.parametrize("embed_type, method", [(TiedEmbed, "decode"), (OneCall, "__call__")])
def test_tied_product_matches_closed_form(embed_type, method):
    model = _tied(embed_type, method)
    plain = LM(embed_type, nnx.Rngs(0))
    assert model.embed.lora_a.shape == (D, R) and model.embed.lora_b.shape == (R, V)
    np.testing.assert_array_equal(model(TOKENS), plain(TOKENS))  # lora_b = 0: the base
    _randomize(model)
    want = _reference(model, TOKENS)
    got = np.asarray(model(TOKENS))
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()
    got_jit = np.asarray(nnx.jit(lambda m, t: m(t))(model, TOKENS))
    assert np.abs(got_jit - want).max() <= TOL * np.abs(want).max()
    # The lookups are the base's: encode is unchanged by the adapter.
    if embed_type is TiedEmbed:
        np.testing.assert_array_equal(model.embed.encode(TOKENS), plain.embed.encode(TOKENS))


def test_training_moves_only_the_adapter():
    model = _tied()
    frozen = jax.tree.map(
        np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    )
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    def loss(m):
        logits = m(TOKENS)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()

    @nnx.jit
    def step(m, opt):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, grads)
        return value

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0], losses
    after = jax.tree.map(
        np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    )
    assert _same(after, frozen)
    assert np.abs(np.asarray(model.embed.lora_b[...])).max() > 0
    want = _reference(model, TOKENS)
    assert np.abs(np.asarray(model(TOKENS)) - want).max() <= TOL * np.abs(want).max()


def test_refused_without_tied_products_naming_it():
    model = LM(TiedEmbed, nnx.Rngs(0))
    before, embed = _params(model), model.embed
    with pytest.raises(ValueError) as err:
        jnnx.inject(model, _config(("embed", "mix")), nnx.Rngs(0), inputs=(TOKENS,))
    message = str(err.value)
    assert f"layer 'embed', weight 'w' ({V}, {D}): read by row lookups" in message
    assert "tied_products={'embed': '<the method of TiedEmbed computing the product" in message
    assert model.embed is embed and type(model.mix) is nnx.Linear
    assert not hasattr(model, "lora_config") and _same(_params(model), before)


@pytest.mark.parametrize(
    "tied, why",
    [
        ({"embed": "encode"}, "computes no product of its weight in that method"),
        ({"embed": "attend"}, "the method 'attend', which its class TiedEmbed does not have"),
        ({"mix": "decode"}, "tied_products names layer 'mix', which the targets do not choose"),
        ({"embed": 3}, "tied_products must map layer paths to the name of the method"),
    ],
    ids=["wrong-method", "no-such-method", "not-a-product-layer", "not-a-name"],
)
def test_bad_tied_products_are_refused_unchanged(tied, why):
    model = LM(TiedEmbed, nnx.Rngs(0))
    before, embed, mix = _params(model), model.embed, model.mix
    with pytest.raises((ValueError, TypeError), match=why):
        jnnx.inject(
            model, _config(("embed", "mix")), nnx.Rngs(0), inputs=(TOKENS,), tied_products=tied
        )
    assert model.embed is embed and model.mix is mix and type(model.embed) is TiedEmbed
    assert not hasattr(model, "lora_config") and _same(_params(model), before)


def test_tied_products_needs_inputs():
    model = LM(TiedEmbed, nnx.Rngs(0))
    with pytest.raises(ValueError, match="tied_products needs inputs="):
        jnnx.inject(model, _config(("mix",)), nnx.Rngs(0), tied_products={"embed": "decode"})
    assert type(model.mix) is nnx.Linear


@pytest.mark.parametrize(
    "how, why", [("add", "reduce_sum besides its product"), ("second", "used by 2 products")]
)
def test_other_uses_stay_refused_with_tied_products(how, why):
    model = Extra(how, nnx.Rngs(0))
    before = _params(model)
    with pytest.raises(ValueError, match=why):
        jnnx.inject(
            model, _config(), nnx.Rngs(0), inputs=(TOKENS,), tied_products={"embed": "decode"}
        )
    assert type(model.embed) is TiedEmbed and _same(_params(model), before)


def test_merge_and_stacks_are_refused_unchanged():
    model = _tied()
    _randomize(model)
    before, y = _params(model), np.asarray(model(TOKENS))
    with pytest.raises(ValueError, match=r"merge: layer 'embed': weights \['w'\] are tied"):
        jnnx.merge(model)
    with pytest.raises(ValueError, match="to_multi: layer 'embed' is a tied op-level adapter"):
        jnnx.to_multi(model, capacity=2)
    assert _same(_params(model), before) and hasattr(model, "lora_config")
    np.testing.assert_array_equal(model(TOKENS), y)


def test_peft_file_round_trip_as_lm_head(tmp_path):
    model = _tied()
    _randomize(model)
    jnnx.save_adapter(model, tmp_path, path_map={"embed": "lm_head"})
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    a = tensors["base_model.model.lm_head.lora_A.weight"]
    b = tensors["base_model.model.lm_head.lora_B.weight"]
    assert a.shape == (R, D) and b.shape == (V, R)
    np.testing.assert_array_equal(a, np.asarray(model.embed.lora_a[...]).T)
    np.testing.assert_array_equal(b, np.asarray(model.embed.lora_b[...]).T)
    other = _tied(seed=5)
    jnnx.load_adapter(other, tmp_path, path_map={"embed": "lm_head"})
    np.testing.assert_array_equal(other.embed.lora_a[...], model.embed.lora_a[...])
    np.testing.assert_array_equal(other.embed.lora_b[...], model.embed.lora_b[...])
    np.testing.assert_array_equal(other(TOKENS), model(TOKENS))


class Routed(nnx.Module):
    """Experts chosen by a traced index (``W[idx]`` into the product), the chosen rows also
    used otherwise: no lookup can be left unadapted beside a gathered product."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, D, D)))

    def __call__(self, x, idx):
        chosen = self.w[idx]
        return jnp.einsum("bd,bdf->bf", x, chosen) + jnp.tanh(chosen).sum()


class MoE(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.moe = Routed(rngs)

    def __call__(self, x, idx):
        return self.moe(x, idx)


@pytest.mark.parametrize(
    "tied, why",
    [
        (None, r"read by row lookups \(a traced index into it, then tanh\)"),
        ({"moe": "__call__"}, "entering its product through a traced index too"),
    ],
    ids=["plain", "tied"],
)
def test_lookups_beside_a_gathered_product_are_refused(tied, why):
    wrapper = MoE(nnx.Rngs(0))
    inputs = (jnp.ones((3, D)), jnp.asarray([0, 2, 3]))
    with pytest.raises(ValueError, match=why):
        jnnx.inject(wrapper, _config(("moe",)), nnx.Rngs(0), inputs=inputs, tied_products=tied)
    assert type(wrapper.moe) is Routed
