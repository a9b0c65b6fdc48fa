"""The twin GPT-style decoder in Flax Linen (``GPT``) and NNX (``NnxGPT``), and their scanned
variants (``ScanGPT``: ``nn.scan`` over the blocks; ``NnxScanGPT``: ``nnx.vmap``-made blocks
run with ``nnx.scan``), whose block weights are stacked under ``blocks`` (a leading layer
axis; ``stack_blocks``/``unstack_blocks`` convert the params trees).

Mirrors ``torchlora.models.gpt`` layer for layer, with the same paths (``blocks_0.attn.query``),
exact GELU, LayerNorm eps 1e-5 with the two-pass variance (as torch computes it). Weights move
between the three with ``from_torch_state_dict`` / ``to_torch_state_dict`` (Linen params tree)
and ``load_nnx`` (that tree into an NNX model).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from _loracore.gpt_config import GPTConfig
from jaxlora.convert import as_numpy, from_torch, to_torch


def _heads(z: jax.Array, n_head: int) -> jax.Array:
    b, t, d = z.shape
    return z.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3)


def _causal_softmax(q: jax.Array, k: jax.Array) -> jax.Array:
    """softmax over keys of ``q @ kᵀ`` (q already scaled), future keys masked out."""
    s = q @ jnp.swapaxes(k, -1, -2)
    t = s.shape[-1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    e = jnp.exp(s - s.max(-1, keepdims=True))  # the diagonal is never masked: max is finite
    return e * (1 / e.sum(-1, keepdims=True))


def _wide(z: jax.Array) -> jax.Array:
    """(…, t, hd) as (…, hd, t), materialised: a dot that contracts the (short) t axis of a
    small operand then reads it row-major. Left to itself XLA folds the transpose into the dot
    and runs a batched dot over the non-minor axis, which XLA:CPU does through a slow path
    (benchmarks/README.md, the train-step breakdown)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(z, -1, -2))


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention of (b, h, t, hd) heads, q pre-scaled. The backward pass is written out
    (dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO Vᵀ ∘ P)), dQ = dS K, dK = dSᵀ Q) so that only P
    is kept from the forward pass and every product runs as a row-major dot; autodiff of the
    softmax kept broadcast intermediates of P's size and ran two of the products through a
    slow XLA:CPU path (benchmarks/README.md, the train step op by op). Reverse mode only
    (``jax.jvp`` through the twin's attention is not supported)."""
    return _causal_softmax(q, k) @ v


def _attention_fwd(q, k, v):
    p = _causal_softmax(q, k)
    return p @ v, (p, q, k, v)


def _attention_bwd(res, g):
    p, q, k, v = res
    dv = jnp.swapaxes(_wide(g) @ p, -1, -2)
    dp = g @ jnp.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dk = jnp.swapaxes(_wide(q) @ ds, -1, -2)
    return ds @ k, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def _attend(q, k, v, n_head: int) -> jax.Array:
    b, t, d = q.shape
    scale = jnp.asarray(1 / math.sqrt(d // n_head), q.dtype)
    out = _attention(_heads(q * scale, n_head), _heads(k, n_head), _heads(v, n_head))
    return out.transpose(0, 2, 1, 3).reshape(b, t, d)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as torch's ``F.gelu`` computes it, ``x·½(1 + erf(x/√2))``, with its
    derivative ``Φ(x) + x·φ(x)`` written out (``_gelu``) and recomputed from ``x`` in the
    backward pass (``jax.checkpoint``), as torch's ``gelu_backward`` does.

    ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, whose XLA:CPU expansion and
    derivative cost several passes over the MLP's widest activation in the train step; and
    keeping the derivative from the forward pass had XLA:CPU write ``erf`` out and read it
    back twice, where recomputing it leaves one fused pass each way (benchmarks/README.md).
    """
    return _gelu_remat(x)


@jax.custom_jvp
def _gelu(x: jax.Array) -> jax.Array:
    return x * _normal_cdf(x)


def _normal_cdf(x: jax.Array) -> jax.Array:
    half = jnp.asarray(0.5, x.dtype)
    return half + half * jax.lax.erf(x * jnp.asarray(1 / math.sqrt(2), x.dtype))


@_gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = _normal_cdf(x)
    pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(1 / math.sqrt(2 * math.pi), x.dtype)
    return x * cdf, (cdf + x * pdf) * t


_gelu_remat = jax.checkpoint(_gelu)


def _check_length(t: int, cfg: GPTConfig) -> None:
    if t > cfg.block_size:
        raise ValueError(f"sequence length {t} exceeds block_size={cfg.block_size}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """torch's LayerNorm over the last axis: two-pass variance (mean of squared deviations),
    statistics in float32 or wider, output in the promoted dtype of ``x`` and the params (as
    ``nn.LayerNorm``'s). The backward pass is written out (dx = rstd·(dx̂ − mean(dx̂) −
    x̂·mean(dx̂·x̂)), dx̂ = dy·scale), keeping only x̂ and rstd: autodiff of the same formula
    cost about a fifth of the twin GPT's LoRA train step on XLA:CPU (benchmarks/README.md)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    wide = jnp.promote_types(x.dtype, jnp.float32)
    xw = x.astype(wide)
    centered = xw - xw.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt((centered * centered).mean(-1, keepdims=True) + jnp.asarray(eps, wide))
    normed = centered * rstd
    out = normed * scale.astype(wide) + bias.astype(wide)
    # residuals are arrays: x's dtype travels as a 0-d array of it
    kept = (normed, rstd, scale, bias, jnp.zeros((), x.dtype))
    return out.astype(jnp.result_type(x, scale, bias)), kept


def _layer_norm_bwd(eps, res, g):
    normed, rstd, scale, bias, x_like = res
    g = g.astype(normed.dtype)
    dnormed = g * scale.astype(normed.dtype)
    dx = rstd * (
        dnormed
        - dnormed.mean(-1, keepdims=True)
        - normed * (dnormed * normed).mean(-1, keepdims=True)
    )
    over = tuple(range(g.ndim - 1))
    dscale = (g * normed).sum(over).astype(scale.dtype)
    return dx.astype(x_like.dtype), dscale, g.sum(over).astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """Linen LayerNorm computing ``layer_norm``, with ``nn.LayerNorm``'s params (``scale``
    ones, ``bias`` zeros, float32)."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        return layer_norm(x, scale, bias, self.epsilon)


def _layer_norm(cfg: GPTConfig, name: str) -> LayerNorm:
    return LayerNorm(cfg.layer_norm_eps, name=name)


class _Attn(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        d = self.cfg.d_model
        q, k, v = (nn.Dense(d, name=n)(h) for n in ("query", "key", "value"))
        return nn.Dense(d, name="out")(_attend(q, k, v, self.cfg.n_head))


class _Mlp(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = nn.Dense(self.cfg.mlp_ratio * self.cfg.d_model, name="fc")(h)
        return nn.Dense(self.cfg.d_model, name="proj")(gelu(h))


class _Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + _Attn(self.cfg, name="attn")(_layer_norm(self.cfg, "ln_1")(x))
        return x + _Mlp(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln_2")(x))


class GPT(nn.Module):
    """Linen twin of ``torchlora.models.gpt.GPT``: tokens (B, T) int → logits (B, T, vocab)."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        _check_length(tokens.shape[-1], cfg)
        x = nn.Embed(cfg.vocab_size, cfg.d_model, name="tok_emb")(tokens)
        x = x + nn.Embed(cfg.block_size, cfg.d_model, name="pos_emb")(jnp.arange(tokens.shape[-1]))
        for i in range(cfg.n_layer):
            x = _Block(cfg, name=f"blocks_{i}")(x)
        x = _layer_norm(cfg, "ln_f")(x)
        return nn.Dense(cfg.vocab_size, use_bias=False, name="head")(x)


class _ScanBlock(nn.Module):
    """``_Block`` as an ``nn.scan`` body: (carry, unused) -> (carry, None), same param paths."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        x = x + _Attn(self.cfg, name="attn")(_layer_norm(self.cfg, "ln_1")(x))
        return x + _Mlp(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln_2")(x)), None


class ScanGPT(nn.Module):
    """``GPT`` with its blocks ``nn.scan``ned (``variable_axes={"params": 0}``): one compiled
    block, params ``blocks.attn.query.kernel`` (n_layer, d, d); ``remat`` wraps the block in
    ``nn.remat``. The same function as ``GPT`` on ``stack_blocks`` of its params."""

    cfg: GPTConfig
    remat: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        _check_length(tokens.shape[-1], cfg)
        x = nn.Embed(cfg.vocab_size, cfg.d_model, name="tok_emb")(tokens)
        x = x + nn.Embed(cfg.block_size, cfg.d_model, name="pos_emb")(jnp.arange(tokens.shape[-1]))
        block = nn.remat(_ScanBlock) if self.remat else _ScanBlock
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=cfg.n_layer,
        )
        x, _ = blocks(cfg, name="blocks")(x, None)
        x = _layer_norm(cfg, "ln_f")(x)
        return nn.Dense(cfg.vocab_size, use_bias=False, name="head")(x)


def stack_blocks(params: Mapping[str, Any], n_layer: int) -> dict:
    """``GPT``'s params (``blocks_0`` … ``blocks_{n-1}``) as ``ScanGPT``'s (``blocks``, every
    leaf stacked on a new leading axis); other entries are kept."""
    names = [f"blocks_{i}" for i in range(n_layer)]
    out = {k: v for k, v in params.items() if k not in names}
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[n] for n in names))
    return out


def unstack_blocks(params: Mapping[str, Any]) -> dict:
    """``ScanGPT``'s params as ``GPT``'s: the inverse of ``stack_blocks``."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    n_layer = jax.tree.leaves(params["blocks"])[0].shape[0]
    for i in range(n_layer):
        out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    return out


class NnxLayerNorm(nnx.Module):
    """NNX LayerNorm computing ``layer_norm``, with ``nnx.LayerNorm``'s params."""

    def __init__(self, features: int, epsilon: float = 1e-5) -> None:
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.epsilon)


def _nnx_layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> NnxLayerNorm:
    del rngs  # deterministic init, as nnx.LayerNorm's
    return NnxLayerNorm(cfg.d_model, cfg.layer_norm_eps)


class _NnxAttn(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs) -> None:
        d, self.n_head = cfg.d_model, cfg.n_head
        self.query, self.key, self.value, self.out = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.out(_attend(self.query(h), self.key(h), self.value(h), self.n_head))


class _NnxMlp(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs) -> None:
        self.fc = nnx.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, rngs=rngs)
        self.proj = nnx.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.proj(gelu(self.fc(h)))


class _NnxBlock(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs) -> None:
        self.ln_1 = _nnx_layer_norm(cfg, rngs)
        self.attn = _NnxAttn(cfg, rngs)
        self.ln_2 = _nnx_layer_norm(cfg, rngs)
        self.mlp = _NnxMlp(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NnxGPT(nnx.Module):
    """NNX twin of ``torchlora.models.gpt.GPT``, with the same attribute paths."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.pos_emb = nnx.Embed(cfg.block_size, cfg.d_model, rngs=rngs)
        for i in range(cfg.n_layer):
            setattr(self, f"blocks_{i}", _NnxBlock(cfg, rngs))
        self.ln_f = _nnx_layer_norm(cfg, rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        _check_length(tokens.shape[-1], self.cfg)
        x = self.tok_emb(tokens) + self.pos_emb(jnp.arange(tokens.shape[-1]))
        for i in range(self.cfg.n_layer):
            x = getattr(self, f"blocks_{i}")(x)
        return self.head(self.ln_f(x))


class NnxScanGPT(nnx.Module):
    """``NnxGPT`` with its blocks made by ``nnx.vmap`` (one ``_NnxBlock`` whose weights carry a
    leading n_layer axis, Flax's "scan over layers" pattern) and run with ``nnx.scan``."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.pos_emb = nnx.Embed(cfg.block_size, cfg.d_model, rngs=rngs)

        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> _NnxBlock:
            return _NnxBlock(cfg, rngs)

        self.blocks = create(rngs)
        self.ln_f = _nnx_layer_norm(cfg, rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        _check_length(tokens.shape[-1], self.cfg)
        x = self.tok_emb(tokens) + self.pos_emb(jnp.arange(tokens.shape[-1]))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x: jax.Array, block: _NnxBlock) -> jax.Array:
            return block(x)

        return self.head(self.ln_f(body(x, self.blocks)))


def partition_rules(params: Mapping[str, Any]) -> dict:
    """PartitionSpecs for the GPT's base params on a ('data', 'fsdp', 'tensor') mesh.

    Megatron-style tensor parallelism: query/key/value and the MLP's ``fc`` split their output
    axis over 'tensor' (column parallel), ``out`` and ``proj`` their input axis (row parallel);
    the other kernel axis is split over 'fsdp'. Embeddings, LayerNorms and the head are
    replicated. Complete it for LoRA leaves with ``jaxlora.partition_specs``.
    """
    from jax.sharding import PartitionSpec as P

    def spec(path, leaf):
        names = [str(getattr(p, "key", p)) for p in path]
        layer, name = (names[-2], names[-1]) if len(names) > 1 else ("", names[-1])
        if layer in ("query", "key", "value", "fc"):
            return P("fsdp", "tensor") if name == "kernel" else P("tensor")
        if layer in ("out", "proj"):
            return P("tensor", "fsdp") if name == "kernel" else P()
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


def _kind(module_path: str) -> str:
    name = module_path.rsplit(".", 1)[-1]
    if name in ("tok_emb", "pos_emb"):
        return "embed"
    return "norm" if name.startswith("ln_") else "linear"


def from_torch_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """The torch GPT's state dict (plain or LoRA-injected) as the Linen/NNX params tree."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        grouped.setdefault(module, {})[leaf] = value
    params: dict = {}
    for module, leaves in grouped.items():
        kind = _kind(module)
        if kind == "linear":
            flax_leaves = from_torch(leaves)
        else:
            arrays = {k: jnp.asarray(as_numpy(v)) for k, v in leaves.items()}
            names = {"weight": "embedding" if kind == "embed" else "scale", "bias": "bias"}
            flax_leaves = {names[k]: v for k, v in arrays.items()}
        node = params
        for part in module.split("."):
            node = node.setdefault(part, {})
        node.update(flax_leaves)
    return params


def to_torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The Linen/NNX params tree as the torch GPT's state dict (numpy arrays, torch layout)."""
    out: dict[str, np.ndarray] = {}

    def walk(node: Mapping, path: tuple[str, ...]) -> None:
        leaves = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        if leaves:
            module = ".".join(path)
            if _kind(module) == "linear":
                converted = to_torch(leaves)
            else:
                names = {"embedding": "weight", "scale": "weight", "bias": "bias"}
                converted = {names[k]: np.array(v) for k, v in leaves.items()}
            out.update({f"{module}.{k}": v for k, v in converted.items()})
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, (*path, key))

    walk(params, ())
    return out


def load_nnx(model: nnx.Module, params: Mapping[str, Any]) -> nnx.Module:
    """Writes a Linen-style params tree into an NNX model with the same paths, in place."""

    def walk(obj: Any, node: Mapping, path: str) -> None:
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if not hasattr(obj, key):
                raise ValueError(f"load_nnx: the model has no '{where}'")
            if isinstance(value, Mapping):
                walk(getattr(obj, key), value, where)
            else:
                variable = getattr(obj, key)
                if tuple(variable.shape) != tuple(jnp.shape(value)):
                    raise ValueError(
                        f"load_nnx: '{where}' has shape {tuple(variable.shape)}, "
                        f"got {tuple(jnp.shape(value))}"
                    )
                variable[...] = jnp.asarray(value, variable.dtype)

    walk(model, params, "")
    return model
