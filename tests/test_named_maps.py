"""Ready path maps (``jaxlora.hf_maps.NAMED_MAPS``): a name resolves to the map, a misspelled
name is refused naming the known ones before anything is written, and a ready map that names
a fused weight the user did not adapt does not stop the other layers' file.

The maps themselves are checked against the real tunix and transformers models, with real
``peft``, in ``thirdparty_tests/`` (CI's ``.ci/thirdparty``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jaxlora
from jaxlora import hf_maps
from jaxlora import nnx as jnnx
from jaxlora.hf_maps import HFLinear

D, K, H, F = 8, 2, 4, 8


class Einsum(nnx.Module):
    def __init__(self, eqn, shape, rngs):
        self.einsum_str = eqn
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


class Attn(nnx.Module):
    def __init__(self, rngs):
        self.kv_einsum = Einsum("BSD,CKDH->CBSKH", (2, K, D, H), rngs)

    def __call__(self, x):
        k, v = self.kv_einsum(x)
        return (k * v).reshape(*x.shape[:-1], K * H)


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.gate_proj = nnx.Linear(K * H, F, rngs=rngs)

    def __call__(self, x):
        return self.gate_proj(x)


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.attn, self.mlp = Attn(rngs), Mlp(rngs)

    def __call__(self, x):
        return self.mlp(self.attn(x))


class GemmaLike(nnx.Module):
    """tunix Gemma3's paths: ``layers.{i}.attn.kv_einsum``, ``layers.{i}.mlp.gate_proj``."""

    def __init__(self):
        self.layers = nnx.List([Layer(nnx.Rngs(i)) for i in range(2)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)[..., :D]
        return x


X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, D)), jnp.float32)


@pytest.mark.parametrize(
    ("name", "path", "want"),
    [
        ("tunix.llama3", "layers.11.attn.o_proj", "model.layers.11.self_attn.o_proj"),
        ("tunix.qwen3", "layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj"),
        ("tunix.qwen3", "layers.3.mlp.router", "model.layers.3.mlp.gate"),
        ("tunix.llama3", "lm_head", "lm_head"),
        ("tunix.llama3", "embedder", "embedder"),  # unknown: its own path, as with a dict
        ("tunix.gemma3", "layers.2.attn.attn_vec_einsum", "model.layers.2.self_attn.o_proj"),
        (
            "tunix.gemma3",
            "layers.1.attn.qkv_einsum",
            HFLinear(tuple(f"model.layers.1.self_attn.{m}_proj" for m in "qkv"), split=0),
        ),
    ],
)
def test_names_resolve(name, path, want):
    assert hf_maps.resolve(name)(path) == want


def test_qwen3_moe_weights_adapted_at_their_product_are_experts():
    """One JAX path, two models: tunix Qwen3's dense ``mlp.up_proj`` Linear (its torch path)
    and its MoELayer's ``up_proj`` (E, D, F) weight adapted at its products (per expert)."""
    want = HFLinear("model.layers.0.mlp.up_proj", experts="model.layers.0.mlp.experts.{}.up_proj")
    named = hf_maps.resolve("tunix.qwen3")
    assert hf_maps.product_spec(named, "layers.0.mlp.up_proj") == want
    assert hf_maps.product_spec(named, "layers.0.attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert hf_maps.product_spec({"a": "b"}, "a") == "b"


def test_flax_llama_map_is_the_identity():
    assert hf_maps.resolve("transformers.flax_llama") is None


def test_misspelled_name_is_refused_naming_the_known_ones(tmp_path):
    model = GemmaLike()
    jnnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["gate_proj"]), nnx.Rngs(1))
    match = r"path_map='tunix.lama3' is not a known map name; known names: \['transformers"
    with pytest.raises(ValueError, match=match):
        jnnx.save_adapter(model, tmp_path / "a", path_map="tunix.lama3")
    assert not (tmp_path / "a").exists()
    jnnx.save_adapter(model, tmp_path / "b", path_map="tunix.gemma3")
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    with pytest.raises(ValueError, match=r"'tunix.gemma' is not a known map name"):
        jnnx.load_adapter(model, tmp_path / "b", path_map="tunix.gemma")
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    params = {"params": {"dense": {"kernel": jnp.ones((2, 2))}}}
    with pytest.raises(ValueError, match=r"'flax_llama' is not a known map name"):
        jaxlora.load_adapter(params, tmp_path / "b", path_map="flax_llama")


def test_ready_map_naming_an_unadapted_fused_weight_saves_the_others(tmp_path):
    """Only the MLP adapted: the map's HFLinear for the plain kv_einsum is no file layer
    (before, save_adapter refused the whole model for it)."""
    model = GemmaLike()
    jnnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["gate_proj"]), nnx.Rngs(1))
    for layer in model.layers:
        layer.mlp.gate_proj.lora_b[...] = jnp.full((2, F), 0.5)
    jnnx.save_adapter(model, tmp_path, path_map="tunix.gemma3")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.mlp.gate_proj.lora_{f}.weight"
        for i in range(2)
        for f in "AB"
    )
    other = GemmaLike()
    jnnx.inject(other, jaxlora.LoRAConfig(r=2, targets=["gate_proj"]), nnx.Rngs(7))
    jnnx.load_adapter(other, tmp_path, path_map="tunix.gemma3")
    np.testing.assert_array_equal(other(X), model(X))


def test_file_naming_an_unadapted_fused_weight_is_refused(tmp_path):
    """The file holds the fused weight's modules but the model's kv_einsum is not adapted at
    its product: say to inject it first, and change nothing."""
    model = GemmaLike()
    config = jaxlora.LoRAConfig(r=2, targets=["kv_einsum", "gate_proj"])
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(X,))
    jnnx.save_adapter(model, tmp_path, path_map="tunix.gemma3")
    plain = GemmaLike()
    with pytest.raises(ValueError, match=r"layer 'layers.0.attn.kv_einsum' \(a Einsum\).*inject"):
        jnnx.load_adapter(plain, tmp_path, path_map="tunix.gemma3")
    assert not nnx.state(plain, nnx.LoRAParam)


def test_hflinear_for_a_dense_family_lora_layer_is_refused(tmp_path):
    """An adapted nnx.Linear is written as one torch module: an HFLinear for it is refused by
    name, never skipped."""
    model = GemmaLike()
    jnnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["gate_proj"]), nnx.Rngs(1))
    path_map = {"layers.0.mlp.gate_proj": HFLinear("model.layers.0.mlp.gate_proj")}
    match = r"layer 'layers.0.mlp.gate_proj' \(a LoRALinear\), whose adapter is written as one"
    with pytest.raises(ValueError, match=match):
        jnnx.save_adapter(model, tmp_path / "a", path_map=path_map)
    assert not (tmp_path / "a").exists()
