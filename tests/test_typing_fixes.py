"""Cases the type checker found where a value the annotations allow gave an unclear crash (an
AttributeError or a TypeError from deep inside) instead of a refusal naming the bad value."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxlora
from _loracore.peft_format import check_layer_set
from jaxlora.inject import init_leaves
from jaxlora.quant import dequantize, quantize


def test_dequantize_refuses_a_double_quantized_weight_without_offset():
    # The field is typed jax.Array | None; None used to reach `absmax + None` (a TypeError).
    weight = np.linspace(-1.0, 1.0, 128, dtype=np.float32).reshape(8, 16)
    q = quantize(jnp.asarray(weight), double_quant=True)
    assert q.double_quant and q.offset is not None
    # intact, it dequantizes as the single-quantized weight does, up to absmax's 8-bit codes
    single = dequantize(quantize(jnp.asarray(weight)))
    np.testing.assert_allclose(dequantize(q), single, atol=0.01)
    broken = dataclasses.replace(q, offset=None)
    with pytest.raises(ValueError, match="double-quantized weight .* needs its offset"):
        dequantize(broken)


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="q")(x)


def test_linen_save_adapter_refuses_an_hflinear_for_a_plain_layer(tmp_path):
    # A plain Dense is written as one torch module: its path_map value must be a str. An
    # HFLinear used to fail as "'HFLinear' object has no attribute 'endswith'".
    params = _Model().init(jax.random.key(0), jnp.ones((1, 8)))
    config = jaxlora.LoRAConfig(r=2, targets=["q"])
    adapted = jaxlora.inject(params, config, jax.random.key(1))
    path_map = {"q": jaxlora.HFLinear("model.q_proj")}
    with pytest.raises(
        ValueError, match=r"path_map gives HFLinear\(.*for layer 'q'.*give a torch path"
    ):
        jaxlora.save_adapter(adapted, tmp_path / "a", config, path_map=path_map)
    assert not (tmp_path / "a").exists()  # nothing was written
    jaxlora.save_adapter(adapted, tmp_path / "b", config, path_map={"q": "model.q_proj"})
    assert jaxlora.read_adapter_config(tmp_path / "b", path_map=None).targets == ("model.q_proj",)


def test_check_layer_set_names_a_non_path_layer_instead_of_failing_to_sort():
    # An expected layer may be an HFLinear (a path_map's value); sorting it among str paths
    # used to raise "'<' not supported between instances of 'HFLinear' and 'str'".
    spec = jaxlora.HFLinear("model.q_proj")
    with pytest.raises(ValueError, match=r"missing tensors for layer\(s\) \[HFLinear"):
        check_layer_set({spec, "b", "a"}, {"a"}, "dir")
    with pytest.raises(ValueError, match=r"missing tensors for layer\(s\) \['b', 'c'\]"):
        check_layer_set({"c", "b", "a"}, {"a"}, "dir")  # paths still sorted as before


def test_init_leaves_without_a_key_refuses_a_random_init():
    # key is typed jax.Array | None: None is fine for deterministic PiSSA, refused otherwise.
    base = jnp.asarray(np.random.default_rng(0).standard_normal((8, 6)), jnp.float32)
    leaves = init_leaves(base, 2, 1.0, "pissa", None, jnp.float32)
    np.testing.assert_allclose(
        leaves["kernel"] + leaves["lora_a"] @ leaves["lora_b"], base, atol=1e-5
    )
    with pytest.raises(ValueError, match="init='kaiming' draws the adapter and needs a random"):
        init_leaves(base, 2, 1.0, "kaiming", None, jnp.float32)


def test_nnx_save_adapter_refuses_an_hflinear_for_one_layer_of_a_stack(tmp_path):
    # _views checked the stack's own path's value but not each per-layer path's: an HFLinear
    # there became a dict key where a torch path (str) is expected.
    from flax import nnx

    import jaxlora.nnx
    from jaxlora.models import gpt as jgpt

    cfg = jgpt.GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=8)
    model = jgpt.NnxScanGPT(cfg, rngs=nnx.Rngs(0))
    config = jaxlora.LoRAConfig(r=2, targets=["query"])
    jaxlora.nnx.inject(model, config, nnx.Rngs(1))

    def path_map(path):
        return jaxlora.HFLinear("h.1.q") if path == "blocks.1.attn.query" else path

    with pytest.raises(ValueError, match=r"HFLinear\(.*'blocks\.1\.attn\.query'.*a str"):
        jaxlora.nnx.save_adapter(model, tmp_path / "a", config, path_map=path_map)
    assert not (tmp_path / "a").exists()
    jaxlora.nnx.save_adapter(model, tmp_path / "b", config)  # str paths: written per layer
    keys = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert sorted(k for k in keys if k.endswith("lora_A.weight")) == [
        f"base_model.model.blocks.{i}.attn.query.lora_A.weight" for i in range(2)
    ]
