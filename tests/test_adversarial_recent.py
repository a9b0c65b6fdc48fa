"""Adversarial checks of last session's code (issue #13): adapter stacks (``to_multi``,
``AdapterStack``), tied products and ``keep_freed_memory``, attacked as a demanding user
would. Each input gives the right number (against the single-adapter model or a closed form
in numpy float64) or a clear refusal that changes nothing.
"""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxlora
from jaxlora import host
from jaxlora import nnx as jnnx
from tests.test_multiweight_rest import D as D_MLP
from tests.test_multiweight_rest import GatedMLP
from tests.test_multiweight_serving import _linen_adapters
from tests.test_oplevel_multiweight import Block
from tests.test_oplevel_multiweight import X as X_BLOCK
from tests.test_tied_head import LM, TOKENS, TiedEmbed, V, _randomize, _tied
from tests.test_tied_head import D as D_TIED

D, F = 8, 6
X = jnp.asarray(np.random.default_rng(1).normal(size=(3, D)), jnp.float32)


class _FakeLibc:
    """Records mallopt's (option, value) calls instead of changing this process's malloc."""

    def __init__(self, calls: list):
        self.calls = calls

    def mallopt(self, option, value):
        self.calls.append((option, value))
        return 1


@pytest.mark.parametrize("limit", [2**31, 2**32 + 5, 2**40], ids=["2^31", "2^32+5", "2^40"])
def test_keep_freed_memory_refuses_a_limit_above_a_c_int(monkeypatch, limit):
    """Used to pass ``limit`` to mallopt through ctypes masked to 32 bits and report success:
    2**40 set both thresholds to 0 (every allocation mapped afresh), 2**32 + 5 to 5 bytes."""
    calls: list = []
    monkeypatch.setattr(host.ctypes, "CDLL", lambda _: _FakeLibc(calls))
    monkeypatch.setattr(host.platform, "system", lambda: "Linux")
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("glibc", "2.36"))
    with pytest.raises(ValueError, match=rf"limit must be at most 2147483647 bytes.*got {limit}"):
        host.keep_freed_memory(limit)
    assert calls == []  # refused before any setting
    assert host.keep_freed_memory(2**31 - 1) and host.keep_freed_memory(2**31 - 1)  # twice
    assert calls == [(-1, 2**31 - 1), (-8, 1), (-3, 2**31 - 1)] * 2


class _TwoLinear(nnx.Module):
    def __init__(self, dtype=jnp.float32, param_dtype=jnp.float32):
        rngs = nnx.Rngs(0)
        self.l1 = nnx.Linear(D, F, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.l2 = nnx.Linear(F, D, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


# Per slot: another rank, alpha, rsLoRA, and rank/alpha patterns per layer.
SLOT_CONFIGS = [
    jaxlora.LoRAConfig(r=2, alpha=4.0, targets=["l1", "l2"]),
    jaxlora.LoRAConfig(r=1, alpha=3.0, targets=["l1", "l2"], use_rslora=True),
    jaxlora.LoRAConfig(
        r=3, alpha=4.0, targets=["l1", "l2"], rank_pattern={"l2": 1}, alpha_pattern={"l1": 7.0}
    ),
]


def _sources(base: _TwoLinear) -> list[_TwoLinear]:
    out = []
    for seed, config in enumerate(SLOT_CONFIGS):
        model = nnx.clone(base)
        jnnx.inject(model, config, nnx.Rngs(seed))
        for layer in (model.l1, model.l2):
            b = layer.lora_b
            b[...] = (0.3 * jax.random.normal(jax.random.key(10 + seed), b.shape)).astype(b.dtype)
        out.append(model)
    return out


def _serving(sources: list[_TwoLinear]) -> _TwoLinear:
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=len(sources), rank=3)
    for slot, source in enumerate(sources):
        jnnx.set_adapter(serving, slot, source)
    return serving


@pytest.mark.parametrize(
    "dtype, param_dtype",
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32)],
    ids=["fp32", "bf16-compute-fp32-params"],
)
def test_slots_of_other_ranks_alphas_rslora_and_patterns_equal_their_models(dtype, param_dtype):
    base = _TwoLinear(dtype, param_dtype)
    sources = _sources(base)
    serving = _serving(sources)
    for slot, config in enumerate(SLOT_CONFIGS):
        for name in ("l1", "l2"):  # each slot's own scale, rsLoRA and patterns included
            r, alpha = config.rank_for(name), config.alpha_for(name)
            scale = alpha / (np.sqrt(r) if config.use_rslora else r)
            assert np.isclose(float(getattr(serving, name).scale[...][slot]), scale, rtol=1e-6)
    index = jnp.array([2, 0, 1])
    with jnnx.adapter_index(index):
        got = np.asarray(serving(X), np.float32)
    # fp32: rounding only; bf16 compute: one bf16 rounding of an output of order 1
    tol = 1e-6 if dtype == jnp.float32 else 2**-8
    for row, slot in enumerate(np.asarray(index)):
        want = np.asarray(sources[int(slot)](X), np.float32)[row]
        assert np.abs(got[row] - want).max() <= tol * max(np.abs(want).max(), 1.0)


def test_merge_after_to_multi_is_refused_unchanged():
    """Used to return the model unchanged as if merged: its stacks are not nnx.Param, so
    ``nnx.state(model, nnx.Param)`` then held the base weights alone."""
    base = _TwoLinear()
    sources = _sources(base)
    serving = _serving(sources)
    index = jnp.array([0, 1, 2])
    with jnnx.adapter_index(index):
        before = np.asarray(serving(X))
    kernel = np.asarray(serving.l1.kernel[...])
    with pytest.raises(ValueError, match=r"merge: layers \['l1', 'l2'\] are adapter stacks"):
        jnnx.merge(serving)
    assert type(serving.l1) is jnnx.MultiLoRALinear and type(serving.l2) is jnnx.MultiLoRALinear
    np.testing.assert_array_equal(serving.l1.kernel[...], kernel)
    with jnnx.adapter_index(index):
        np.testing.assert_array_equal(serving(X), before)


def test_linen_merge_of_served_params_is_refused():
    """``jaxlora.merge`` of ``AdapterStack.params(base)`` used to return the base weights
    beside the stacks' leaves, which the plain model ignores: the base's output as if merged."""
    _, base, adapters = _linen_adapters(0)
    stack = jaxlora.stack_adapters(adapters, capacity=2)
    with pytest.raises(ValueError, match=r"merge: layer 'layers.mlp' holds adapter stacks"):
        jaxlora.merge(stack.params(base), alpha=adapters[0][1].alpha)
    with pytest.raises(ValueError, match=r"holds adapter stacks \['lora_served_a'"):
        jaxlora.merge({"params": {"dense": {"kernel": 0, "lora_served_a": 0}}}, alpha=1.0)


class _Untied(nnx.Module):
    """The tied model's embedding, with a separate ``lm_head`` Linear (untied)."""

    def __init__(self, tied: LM):
        self.embed, self.mix = nnx.clone(tied.embed), nnx.clone(tied.mix)
        self.lm_head = nnx.Linear(D_TIED, V, use_bias=False, rngs=nnx.Rngs(0))
        self.lm_head.kernel[...] = tied.embed.w[...].T

    def __call__(self, tokens):
        return self.lm_head(jnp.tanh(self.mix(self.embed.encode(tokens))))


def test_tied_adapter_loads_into_an_untied_lm_head():
    """A tied product's adapter saved as ``lm_head`` serves an untied model whose lm_head holds
    the same weight: the same logits, unmerged and merged."""
    tied = _tied()
    _randomize(tied)
    want = np.asarray(tied(TOKENS))
    untied = _Untied(LM(TiedEmbed, nnx.Rngs(0)))
    config = jaxlora.LoRAConfig(r=tied.embed.r, alpha=1.0, targets=["lm_head"])
    jnnx.inject(untied, config, nnx.Rngs(1))
    with tempfile.TemporaryDirectory() as directory:
        jnnx.save_adapter(tied, directory, path_map={"embed": "lm_head"})
        jnnx.load_adapter(untied, directory)
    assert untied.lm_head.scaling == tied.embed.scaling  # the file's alpha
    scale = np.abs(want).max()
    assert np.abs(np.asarray(untied(TOKENS)) - want).max() <= 2e-5 * scale
    jnnx.merge(untied)
    assert np.abs(np.asarray(untied(TOKENS)) - want).max() <= 2e-5 * scale


# A bf16 weight multiplied with fp32 activations: jnp.einsum/jnp.dot give dot_general the two
# dtypes as they are (an fp32 product). The branch used to round its fp32 factors to the
# weight's bf16 (relative error ~2e-3, where LoRALinear's is ~1e-7).
MIXED_TOL = 1e-5
KD, KE, KR = 16, 12, 4


class _Bf16Weight(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jax.random.normal(jax.random.key(0), (KD, KE)).astype(jnp.bfloat16))

    def __call__(self, x):
        return jnp.einsum("bd,de->be", x, self.w[...])


class _Holder(nnx.Module):
    def __init__(self):
        self.proj = _Bf16Weight()

    def __call__(self, x):
        return self.proj(x)


class _LinenBf16(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", lambda k: jax.random.normal(k, (KD, KE)).astype(jnp.bfloat16))
        return jnp.dot(x, w)


class _LinenHolder(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _LinenBf16(name="proj")(x)


def _f64(v) -> np.ndarray:
    return np.asarray(jnp.asarray(v, jnp.float32), np.float64)


def _closed(x, w, a, b, scale) -> np.ndarray:
    x = _f64(x)
    return x @ _f64(w) + scale * (x @ _f64(a)) @ _f64(b)


def _rel(got, want) -> float:
    return float(np.abs(_f64(got) - want).max() / np.abs(want).max())


X_MIXED = jnp.asarray(np.random.default_rng(2).normal(size=(3, KD)), jnp.float32)
MIXED_CONFIG = jaxlora.LoRAConfig(r=KR, alpha=8.0, targets=["proj"])


def _nnx_mixed(seed: int = 3) -> _Holder:
    model = _Holder()
    jnnx.inject(model, MIXED_CONFIG, nnx.Rngs(seed), inputs=(X_MIXED,))
    b = model.proj.lora_b
    b[...] = jax.random.normal(jax.random.key(seed), b.shape)
    return model


def test_bf16_weight_fp32_activation_branch_is_fp32_nnx():
    model = _nnx_mixed()
    p = model.proj
    assert p.lora_a.dtype == jnp.float32
    want = _closed(X_MIXED, p.w[...], p.lora_a[...], p.lora_b[...], p.scaling)
    assert _rel(model(X_MIXED), want) <= MIXED_TOL
    # the stacked layer's branch alike (to_multi): each row its slot's adapter
    other = _nnx_mixed(seed=4)
    serving = jnnx.to_multi(nnx.clone(model), capacity=2)
    jnnx.set_adapter(serving, 0, model)
    jnnx.set_adapter(serving, 1, other)
    with jnnx.adapter_index(jnp.array([1, -1, 0])):
        got = serving(X_MIXED)
    q = other.proj
    want_other = _closed(X_MIXED, q.w[...], q.lora_a[...], q.lora_b[...], q.scaling)
    assert _rel(got[0], want_other[0]) <= MIXED_TOL and _rel(got[2], want[2]) <= MIXED_TOL
    np.testing.assert_array_equal(got[1], _Holder()(X_MIXED)[1])


def test_bf16_weight_fp32_activation_branch_is_fp32_linen():
    model = _LinenHolder()
    base = model.init(jax.random.key(0), X_MIXED)["params"]
    layouts = jaxlora.layouts(model, X_MIXED)
    params = jaxlora.inject(base, MIXED_CONFIG, jax.random.key(1), layouts=layouts)
    proj = params["proj"]
    proj = {**proj, "lora_b": jax.random.normal(jax.random.key(2), proj["lora_b"].shape)}
    with jaxlora.intercept(MIXED_CONFIG):
        got = model.apply({"params": {**params, "proj": proj}}, X_MIXED)
    assert base["proj"]["w"].dtype == jnp.bfloat16 and proj["lora_a"].dtype == jnp.float32
    want = _closed(X_MIXED, base["proj"]["w"], proj["lora_a"], proj["lora_b"], 8.0 / KR)
    assert _rel(got, want) <= MIXED_TOL


def test_tied_product_of_a_bf16_weight_with_fp32_activations():
    model = LM(TiedEmbed, nnx.Rngs(0))
    model.embed.w = nnx.Param(model.embed.w[...].astype(jnp.bfloat16))
    config = jaxlora.LoRAConfig(r=3, alpha=6.0, targets=["embed"])
    jnnx.inject(model, config, nnx.Rngs(0), inputs=(TOKENS,), tied_products={"embed": "decode"})
    e = model.embed
    e.lora_b[...] = jax.random.normal(jax.random.key(3), e.lora_b.shape)
    h = jnp.tanh(model.mix(e.encode(TOKENS)))  # the base's lookups, fp32 after the Linear
    want = _closed(h, e.w[...].T, e.lora_a[...], e.lora_b[...], e.scaling)
    assert _rel(model(TOKENS), want) <= MIXED_TOL


def test_linen_stack_keeps_the_widest_adapter_dtype():
    """A float32 adapter given after a bfloat16 one used to be stored (and served) in bfloat16,
    the first adapter's dtype: ~2e-3 off its own model. Both rows now equal their models."""
    model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(8)])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12)), jnp.float32)
    base = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoRAConfig(r=4, alpha=8.0, targets=["layers_0", "layers_2"])

    def adapter(dtype, seed):
        params = jaxlora.inject(base, config, jax.random.key(seed), param_dtype=dtype)
        for name in ("layers_0", "layers_2"):
            b = params[name]["lora_b"]
            b = jax.random.normal(jax.random.key(seed + 10), b.shape).astype(dtype)
            params = {**params, name: {**params[name], "lora_b": b}}
        return params

    adapters = [(adapter(jnp.bfloat16, 1), config), (adapter(jnp.float32, 2), config)]
    stack = jaxlora.stack_adapters(adapters)
    assert stack.lora_a["layers_0"].dtype == stack.lora_b["layers_2"].dtype == jnp.float32
    with jaxlora.intercept_stack(stack, jnp.array([1, 0])):
        got = model.apply({"params": base}, x)
    for row, (params, _) in zip((1, 0), adapters, strict=True):
        with jaxlora.intercept(config):
            want = model.apply({"params": params}, x)
        assert float(jnp.abs(got[row] - want[row]).max() / jnp.abs(want).max()) <= 1e-6


# rank_pattern/alpha_pattern keys are checked against every adapted layer, the modules that
# target_parameters names included. They used to be checked against the targets' layers
# only: with target_parameters alone a key naming a weight ('w_up', a typo: keys name
# modules, as in PEFT) was silently ignored (r stayed the default), and beside targets a key
# naming the target_parameters module was refused as matching nothing.
PATTERN_CASES = [
    (dict(targets=[], target_parameters=["mlp.w_up"], rank_pattern={"w_up": 1}), None),
    (dict(targets=[], target_parameters=["mlp.w_up"], alpha_pattern={"mlpx": 9.0}), None),
    (dict(targets=["head"], target_parameters=["mlp.w_up"], rank_pattern={"mlp": 1}), 1),
]
PATTERN_IDS = ["weight-key-alone", "typo-alone", "module-key-beside-targets"]


@pytest.mark.parametrize("fields, rank", PATTERN_CASES, ids=PATTERN_IDS)
def test_patterns_of_target_parameters_modules_nnx(fields, rank):
    model = Block()
    config = jaxlora.LoRAConfig(r=2, alpha=4.0, **fields)
    if rank is None:
        with pytest.raises(ValueError, match="matches none of the adapted layers"):
            jnnx.inject(model, config, nnx.Rngs(0), inputs=(X_BLOCK,))
        assert not nnx.state(model, nnx.LoRAParam) and not hasattr(model, "lora_config")
        return
    jnnx.inject(model, config, nnx.Rngs(0), inputs=(X_BLOCK,))
    assert model.mlp.r == rank and model.mlp.lora_weights == ("w_up",)
    assert model.mlp.factors("w_up")[0].shape[-1] == rank and model.head.r == 2


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(GatedMLP(name="mlp")(x))


@pytest.mark.parametrize("fields, rank", PATTERN_CASES, ids=PATTERN_IDS)
def test_patterns_of_target_parameters_modules_linen(fields, rank):
    model, x = _LinenBlock(), jnp.ones((2, 3, D_MLP))
    base = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoRAConfig(r=2, alpha=4.0, **fields)
    layouts = jaxlora.layouts(model, x)
    if rank is None:
        with pytest.raises(ValueError, match="matches none of the adapted layers"):
            jaxlora.inject(base, config, jax.random.key(0), layouts=layouts)
        return
    params = jaxlora.inject(base, config, jax.random.key(0), layouts=layouts)
    assert params["mlp"]["lora_a"].shape[-1] == rank and params["head"]["lora_a"].shape[-1] == 2
