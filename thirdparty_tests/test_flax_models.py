"""jaxlora on transformers 4.57's Linen Flax models (unmodified): ``FlaxLlamaForCausalLM``
trained with ``jaxlora.inject`` + ``intercept`` and served by the real ``peft`` on
``LlamaForCausalLM`` holding the same base (loaded with ``from_pt=True``), and back; and
``FlaxGPT2LMHeadModel``'s ``FlaxConv1D`` (kernel (out, in), used as ``x @ kernel.T``), adapted
at its product (with ``layouts``) and checked against PEFT on ``GPT2LMHeadModel``, with PEFT
files both ways through the ready map ``"transformers.flax_gpt2"`` (Conv1D modules:
``fan_in_fan_out``); without layouts, or PEFT's GPT-2 files without the map, refused by name.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    FlaxGPT2LMHeadModel,
    FlaxLlamaForCausalLM,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
)

import jaxlora
from parity_tests.twins import peft_load
from thirdparty_tests.twins import (
    TOKENS,
    TOL,
    VOCAB,
    peft_train,
    rel_err,
    torch_logits,
)

R, ALPHA = 4, 8.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS)
MAP = "transformers.flax_llama"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF checkpoint directory, the Flax model, its base params, the torch logits)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    directory = str(tmp_path_factory.mktemp("llama"))
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(directory)
    flax_model = FlaxLlamaForCausalLM.from_pretrained(directory, from_pt=True)
    return directory, flax_model, flax_model.params, torch_logits(hf)


def _logits(model, params) -> np.ndarray:
    return np.asarray(model(jnp.asarray(TOKENS), params=params).logits)


def _base(params):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
        if not any(getattr(k, "key", None) in ("lora_a", "lora_b") for k in p)
    }


def _lora(params):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
        if any(getattr(k, "key", None) in ("lora_a", "lora_b") for k in p)
    }


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _train(model, params, steps: int = 5):
    tx = jaxlora.freeze_base(optax.adam(1e-2))
    opt_state = tx.init(params)

    @jax.jit
    @jaxlora.intercept(CONFIG)
    def step(params, opt_state):
        def loss_fn(p):
            logits = model(jnp.asarray(TOKENS), params=p).logits[:, :-1]
            labels = jnp.asarray(TOKENS)[:, 1:]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return params, losses


def test_base_logits_agree(llama):
    _, model, params, want = llama
    assert rel_err(_logits(model, params), want) <= TOL


def test_jax_trained_adapter_is_served_by_peft(llama, tmp_path):
    directory, model, base, y_base = llama
    params = jaxlora.inject(base, CONFIG, jax.random.key(1))
    params, losses = _train(model, params)
    assert losses[-1] < losses[0], losses
    assert _equal(_base(params), _base(base))  # only the adapters trained
    with jaxlora.intercept(CONFIG):
        y_jax = _logits(model, params)
    assert rel_err(y_jax, y_base) > 1e-3  # the adapters count

    jaxlora.save_adapter(params, tmp_path, CONFIG, path_map=MAP)
    peft_model = peft_load(LlamaForCausalLM.from_pretrained(directory).eval(), tmp_path)
    assert rel_err(torch_logits(peft_model), y_jax) <= TOL

    other = jaxlora.inject(base, CONFIG, jax.random.key(9))
    loaded = jaxlora.load_adapter(other, tmp_path, path_map=MAP)
    assert _equal(_lora(loaded), _lora(params))
    with jaxlora.intercept(jaxlora.read_adapter_config(tmp_path, path_map=MAP)):
        np.testing.assert_array_equal(_logits(model, loaded), y_jax)

    merged = jaxlora.merge(params, alpha=CONFIG.alpha)
    assert not _lora(merged)
    assert rel_err(_logits(model, merged), y_jax) <= TOL  # the unmodified model runs it
    assert rel_err(torch_logits(peft_model.merge_and_unload()), y_jax) <= TOL


def test_peft_trained_adapter_loads_in_jax(llama, tmp_path):
    directory, model, base, y_base = llama
    torch.manual_seed(3)
    hf = LlamaForCausalLM.from_pretrained(directory)
    peft_model = get_peft_model(
        copy.deepcopy(hf), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)
    )
    peft_train(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    want = torch_logits(peft_model.eval())
    assert rel_err(want, y_base) > 1e-3
    params = jaxlora.load_adapter(base, tmp_path, path_map=MAP)  # into the plain params
    with jaxlora.intercept(jaxlora.read_adapter_config(tmp_path, path_map=MAP)):
        assert rel_err(_logits(model, params), want) <= TOL


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(the Flax model, token ids, the torch GPT2LMHeadModel with the same weights)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0)
    config.embd_pdrop = config.attn_pdrop = 0.0
    directory = str(tmp_path_factory.mktemp("gpt2"))
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(directory)
    model = FlaxGPT2LMHeadModel.from_pretrained(directory, from_pt=True)
    return model, jnp.asarray(TOKENS), hf


GPT2_TARGETS = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn", "c_proj"])


def _gpt2_layouts(model, ids):
    return jaxlora.layouts(model.module, ids, jnp.ones_like(ids), jnp.zeros_like(ids))


def _gpt2_adapted(model, ids):
    """The GPT-2 params adapted at the FlaxConv1D products, with B ≠ 0 (so the branch counts)."""
    params = jaxlora.inject(
        model.params, GPT2_TARGETS, jax.random.key(0), layouts=_gpt2_layouts(model, ids)
    )
    key = iter(jax.random.split(jax.random.key(1), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, v: (
            0.1 * jax.random.normal(next(key), v.shape)
            if getattr(p[-1], "key", None) == "lora_b"
            else v
        ),
        params,
    )


def test_gpt2_conv1d_adapted_at_its_product_equals_peft(gpt2):
    """FlaxConv1D (kernel (out, in), used as ``x @ kernel.T``) is adapted at its product when
    inject gets the model's layouts: ``lora_a`` (in, r), ``lora_b`` (r, out). With the same
    factors, PEFT's LoRA on the torch GPT-2's Conv1D (``fan_in_fan_out=True``) gives the same
    logits, and jaxlora's merge (in the (out, in) layout) gives them with no adapter."""
    model, ids, hf = gpt2
    params = _gpt2_adapted(model, ids)
    attn = params["transformer"]["h"]["0"]["attn"]["c_attn"]
    assert attn["kernel"].shape == (96, 32)  # (out, in): FlaxConv1D's own layout
    assert (attn["lora_a"].shape, attn["lora_b"].shape) == ((32, R), (R, 96))
    with jaxlora.intercept(GPT2_TARGETS):
        y_jax = np.asarray(model(ids, params=params).logits)

    peft_model = get_peft_model(
        copy.deepcopy(hf),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    )
    adapted = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                node = params
                for part in name.split(".")[name.split(".").index("transformer") :]:
                    node = node[part]
                module.lora_A["default"].weight.copy_(
                    torch.from_numpy(np.array(node["lora_a"]).T.copy())
                )
                module.lora_B["default"].weight.copy_(
                    torch.from_numpy(np.array(node["lora_b"]).T.copy())
                )
                adapted += 1
    assert adapted == 3 * 2  # c_attn, attn.c_proj and mlp.c_proj in each of 2 blocks
    want = torch_logits(peft_model.eval())
    assert rel_err(y_jax, torch_logits(hf)) > 1e-3
    assert rel_err(y_jax, want) <= TOL
    merged = jaxlora.merge(params, alpha=ALPHA)
    assert rel_err(np.asarray(model(ids, params=merged).logits), want) <= TOL


def test_gpt2_adapter_file_is_served_by_peft(gpt2, tmp_path):
    """A FlaxGPT2 adapter made at the FlaxConv1D products is saved as PEFT's GPT-2 adapter
    (``lora_A`` (r, in), ``lora_B`` (out, r) per Conv1D; the Flax and torch module paths are
    the same): the real PEFT loads it onto GPT2LMHeadModel with the same logits. The file says
    ``fan_in_fan_out=False`` (jaxlora cannot know the torch module is a Conv1D); PEFT warns and
    sets it, which changes only how it would merge, not the adapter's tensors."""
    model, ids, hf = gpt2
    params = _gpt2_adapted(model, ids)
    with jaxlora.intercept(GPT2_TARGETS):
        y_jax = np.asarray(model(ids, params=params).logits)
    jaxlora.save_adapter(params, tmp_path, GPT2_TARGETS)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False"):
        served = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path))
    assert rel_err(y_jax, torch_logits(hf)) > 1e-3
    assert rel_err(y_jax, torch_logits(served.eval())) <= TOL


def test_gpt2_conv1d_holding_lora_leaves_is_refused_when_called(gpt2):
    """Without layouts a 2-D kernel is taken as nn.Dense's; the first call under intercept
    finds a FlaxConv1D holding the leaves and refuses it, never computing a wrong branch."""
    model, ids, _ = gpt2
    params = jaxlora.inject(model.params, GPT2_TARGETS, jax.random.key(0))
    match = r"layer 'transformer.h.0.attn.c_attn' is a FlaxConv1D holding LoRA leaves"
    with pytest.raises(ValueError, match=match), jaxlora.intercept(GPT2_TARGETS):
        model(ids, params=params)


def test_gpt2_tied_embedding_is_refused_with_layouts(gpt2):
    """FlaxGPT2LMHeadModel's head is ``lm_head.apply({"params": {"kernel": wte.T}})``: it reads
    the embedding table's params, so LoRA on ``wte`` would adapt the lookups only and merging
    would change the head too. ``layouts`` sees the read and ``inject`` refuses the table by
    name (the attention and MLP stay adaptable), changing nothing."""
    model, ids, _ = gpt2
    layouts = _gpt2_layouts(model, ids)
    assert "transformer.wte" not in layouts and "transformer.h.0.attn.c_attn" in layouts
    assert set(layouts.shared) == {"transformer.wte"}
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["wte", "c_attn"])
    match = (
        rf"layer 'transformer.wte' holds \{{'embedding': \({VOCAB}, 32\)\}} in a Embed, "
        r"which cannot be adapted: the model also reads its weight outside it "
        r"\(its embedding by \w+ at 'lm_head'"
    )
    before = jax.tree.map(np.asarray, model.params)
    with pytest.raises(TypeError, match=match):
        jaxlora.inject(model.params, config, jax.random.key(0), layouts=layouts)
    jax.tree.map(np.testing.assert_array_equal, model.params, before)


def test_gpt2_peft_adapter_is_refused_by_load(gpt2, tmp_path):
    """PEFT's GPT-2 adapters (Conv1D, fan_in_fan_out=True) are refused where the map does not
    say the modules are Conv1D (the identity map: nn.Linear), and into a plain tree (the
    layout needs layouts=), so no (out, in) FlaxConv1D kernel gets a Dense-layout delta."""
    from transformers import GPT2LMHeadModel

    model, _, _ = gpt2
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))
    config = LoraConfig(r=R, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    get_peft_model(hf, config).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"fan_in_fan_out=True, which is not supported"):
        jaxlora.load_adapter(model.params, tmp_path)
    with pytest.raises(ValueError, match=r"holds no adapter made at its weight's product"):
        jaxlora.load_adapter(model.params, tmp_path, path_map=GPT2_MAP)


GPT2_MAP = "transformers.flax_gpt2"
GPT2_ALL = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn", "c_proj", "c_fc"])


def test_gpt2_file_with_the_ready_map_is_served_by_peft_without_warning(gpt2, tmp_path):
    """Saved with ``path_map="transformers.flax_gpt2"`` (attention and MLP Conv1D modules) the
    file says ``fan_in_fan_out: true``: PEFT loads it with no warning, the same logits, merged
    equals PEFT's merge_and_unload, and it loads back exactly."""
    model, ids, hf = gpt2
    params = jaxlora.inject(
        model.params, GPT2_ALL, jax.random.key(0), layouts=_gpt2_layouts(model, ids)
    )
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.05 if getattr(p[-1], "key", None) == "lora_b" else v, params
    )
    with jaxlora.intercept(GPT2_ALL):
        y_jax = np.asarray(model(ids, params=params).logits)
    assert rel_err(y_jax, torch_logits(hf)) > 1e-3
    jaxlora.save_adapter(params, tmp_path, GPT2_ALL, path_map=GPT2_MAP)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True
    served = peft_load(copy.deepcopy(hf), tmp_path)  # asserts PEFT did not warn
    assert rel_err(torch_logits(served), y_jax) <= TOL
    merged = jaxlora.merge(params, alpha=ALPHA)
    want = torch_logits(served.merge_and_unload())
    assert rel_err(np.asarray(model(ids, params=merged).logits), want) <= TOL
    other = jaxlora.inject(
        model.params, GPT2_ALL, jax.random.key(5), layouts=_gpt2_layouts(model, ids)
    )
    loaded = jaxlora.load_adapter(other, tmp_path, path_map=GPT2_MAP)
    assert _equal(_lora(loaded), _lora(params))


def test_gpt2_peft_trained_adapter_loads_in_flax(gpt2, tmp_path):
    """An adapter trained with the real PEFT on GPT2LMHeadModel (attention and MLP Conv1D,
    fan_in_fan_out=True, rsLoRA) loads into FlaxGPT2LMHeadModel adapted at its products with
    the ready map: PEFT's logits, with the config read back from the file."""
    model, ids, hf = gpt2
    torch.manual_seed(3)
    peft_model = get_peft_model(
        copy.deepcopy(hf),
        LoraConfig(
            r=R,
            lora_alpha=ALPHA,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            use_rslora=True,
        ),
    )
    peft_train(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    want = torch_logits(peft_model.eval())
    assert rel_err(want, torch_logits(hf)) > 1e-3
    params = jaxlora.inject(
        model.params, GPT2_ALL, jax.random.key(1), layouts=_gpt2_layouts(model, ids)
    )
    params = jaxlora.load_adapter(params, tmp_path, path_map=GPT2_MAP)
    config = jaxlora.read_adapter_config(tmp_path, path_map=GPT2_MAP, params=params)
    assert config.use_rslora
    with jaxlora.intercept(config):
        assert rel_err(np.asarray(model(ids, params=params).logits), want) <= TOL
