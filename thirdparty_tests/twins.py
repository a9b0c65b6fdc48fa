"""Tiny twins of third-party models: a transformers torch model with random weights, saved
with ``save_pretrained``, and the same base loaded into the JAX model by that JAX library's
own loader (tunix's safetensors loaders; transformers' ``from_pt``).

Everything is fp32 on the CPU. Tolerances are relative to the logits' scale (max |logit|):
``TOL`` = 1e-4 for two frameworks computing the same model (measured: ~1e-6), exact equality
where one framework computes one thing twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

TOL = 1e-4
B, T, VOCAB = 2, 7, 128
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (B, T))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def tunix_inputs(tokens: np.ndarray = TOKENS) -> tuple:
    """tunix's ``model(tokens, positions, cache, attention_mask)`` arguments, causal."""
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t), (b, t))
    mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
    return (jnp.asarray(tokens), jnp.asarray(positions), None, jnp.asarray(mask))


def tunix_loss(model: nnx.Module) -> jax.Array:
    """Next-token cross-entropy of a tunix model on ``TOKENS``."""
    logits = model(*tunix_inputs())[0][:, :-1]
    labels = jnp.asarray(TOKENS)[:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def lora_train(model: nnx.Module, steps: int = 5) -> list[float]:
    """``steps`` Adam steps of the model's ``nnx.LoRAParam`` on ``tunix_loss``; the losses."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        grad_fn = nnx.value_and_grad(tunix_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
        loss, grads = grad_fn(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


def peft_train(peft_model: torch.nn.Module, steps: int = 3) -> None:
    """``steps`` Adam steps of a PEFT model's trainable parameters on next-token cross-entropy
    over ``TOKENS`` (the torch side of "a PEFT-trained adapter loads in JAX")."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    tokens = torch.from_numpy(TOKENS)
    for _ in range(steps):
        logits = peft_model(tokens).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@dataclasses.dataclass(frozen=True)
class TunixTwin:
    """One tunix family: its HF torch class and config, its tunix config and loader, the LoRA
    targets (JAX names) with their torch names, and the ready map's name."""

    name: str
    hf_model: Callable[[], torch.nn.Module]
    tunix_load: Callable[[str], nnx.Module]
    jax_targets: tuple[str, ...]
    torch_targets: tuple[str, ...]
    path_map: str
    # torch modules that are one fused JAX weight: a PEFT adapter must share their lora_A.
    fused: tuple[str, ...] = ()


def _llama_like(hf_config_cls, hf_cls, tunix_pkg: str, **extra) -> tuple[Callable, Callable]:
    def hf_model():
        torch.manual_seed(0)
        config = hf_config_cls(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=1e6,  # tunix 0.1.7's Llama3/Qwen3 always use 1e6
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            max_position_embeddings=64,
            initializer_range=0.1,
            **extra,
        )
        return hf_cls(config).eval()

    def tunix_load(directory: str):
        import importlib

        model_lib = importlib.import_module(f"tunix.models.{tunix_pkg}.model")
        params_lib = importlib.import_module(f"tunix.models.{tunix_pkg}.params")
        config = model_lib.ModelConfig(
            num_layers=2,
            vocab_size=VOCAB,
            embed_dim=64,
            hidden_dim=96,
            num_heads=4,
            head_dim=16,
            num_kv_heads=2,
            rope_theta=1_000_000,
            norm_eps=1e-5,
            **({"use_tied_embedding": False} if tunix_pkg == "qwen3" else {}),
        )
        return params_lib.create_model_from_safe_tensors(directory, config, dtype=jnp.float32)

    return hf_model, tunix_load


def _gemma3(num_kv_heads: int) -> tuple[Callable, Callable]:
    def hf_model():
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        config = Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=num_kv_heads,
            head_dim=16,
            query_pre_attn_scalar=16,  # tunix: 1/sqrt(head_dim)
            sliding_window=32,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            max_position_embeddings=64,
            initializer_range=0.1,
        )
        return Gemma3ForCausalLM(config).eval()

    def tunix_load(directory: str):
        from tunix.models.gemma3 import model as model_lib
        from tunix.models.gemma3 import params_safetensors

        config = model_lib.ModelConfig(
            num_layers=2,
            num_embed=VOCAB,
            embed_dim=64,
            hidden_dim=96,
            num_heads=4,
            head_dim=16,
            num_kv_heads=num_kv_heads,
            sliding_window_size=32,
            local_base_frequency=10_000,
            global_base_frequency=1_000_000,
            param_dtype=jnp.float32,
        )
        return params_safetensors.create_model_from_safe_tensors(
            directory, config, dtype=jnp.float32
        )

    return hf_model, tunix_load


def qwen3_moe_config(num_layers: int, experts: int = 4, top_k: int = 2, moe_dim: int = 32):
    """tunix's Qwen3-MoE config of the tiny twin (``_qwen3_moe``)."""
    from tunix.models.qwen3 import model as model_lib

    return model_lib.ModelConfig(
        num_layers=num_layers,
        vocab_size=VOCAB,
        embed_dim=64,
        hidden_dim=moe_dim,
        num_heads=4,
        head_dim=16,
        num_kv_heads=2,
        rope_theta=1_000_000,
        norm_eps=1e-5,
        use_tied_embedding=False,
        num_experts=experts,
        num_experts_per_tok=top_k,
    )


def _qwen3_moe() -> tuple[Callable, Callable]:
    """tunix's Qwen3 with ``num_experts`` (every layer a ``MoELayer``; on the CPU its dense
    routing runs a per-expert loop over ``w[i]``) and transformers' ``Qwen3MoeForCausalLM``
    (every layer sparse, top-k weights renormalized as tunix does)."""
    experts, top_k, moe_dim = 4, 2, 32

    def hf_model():
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        torch.manual_seed(0)
        config = Qwen3MoeConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=moe_dim,
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            max_position_embeddings=64,
            initializer_range=0.1,
        )
        return Qwen3MoeForCausalLM(config).eval()

    def tunix_load(directory: str):
        from tunix.models.qwen3 import params as params_lib

        config = qwen3_moe_config(num_layers=2)
        return params_lib.create_model_from_safe_tensors(directory, config, dtype=jnp.float32)

    return hf_model, tunix_load


def _hf(name: str):
    import transformers

    return getattr(transformers, name)


MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def tunix_twins() -> list[TunixTwin]:
    llama = _llama_like(_hf("LlamaConfig"), _hf("LlamaForCausalLM"), "llama3")
    qwen = _llama_like(_hf("Qwen3Config"), _hf("Qwen3ForCausalLM"), "qwen3")
    gemma_kv, gemma_qkv = _gemma3(2), _gemma3(4)
    return [
        TunixTwin("llama3", *llama, ATTN + MLP, ATTN + MLP, "tunix.llama3"),
        TunixTwin("qwen3", *qwen, ATTN + MLP, ATTN + MLP, "tunix.qwen3"),
        # The MoELayer 'mlp' holds gate/up/down_proj (E, …): one adapter per expert each.
        TunixTwin("qwen3_moe", *_qwen3_moe(), (*ATTN, "mlp"), ATTN + MLP, "tunix.qwen3"),
        TunixTwin(
            "gemma3_kv",  # grouped heads: q_einsum and a fused kv_einsum
            *gemma_kv,
            ("q_einsum", "kv_einsum", "attn_vec_einsum", *MLP),
            ATTN + MLP,
            "tunix.gemma3",
            fused=("k_proj", "v_proj"),
        ),
        TunixTwin(
            "gemma3_qkv",  # as many kv heads as heads: one fused qkv_einsum
            *gemma_qkv,
            ("qkv_einsum", "attn_vec_einsum", *MLP),
            ATTN + MLP,
            "tunix.gemma3",
            fused=("q_proj", "k_proj", "v_proj"),
        ),
    ]


def torch_logits(model: torch.nn.Module, tokens: np.ndarray = TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def pure(state: Any) -> Any:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def base_state(model: nnx.Module) -> Any:
    return pure(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))


def lora_state(model: nnx.Module) -> Any:
    return pure(nnx.state(model, nnx.LoRAParam))


def trees_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
