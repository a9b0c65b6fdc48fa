"""Embed, Conv and DenseGeneral (Flax attention's query/value) adapters: Linen against a torch
twin (torchlora.Embedding, Conv2d, Linear over the flattened heads) and against real PEFT.

The twin: tokens on a (H, W) grid → embedding → 3×3 conv → self-attention (Flax's own
``nn.MultiHeadDotProductAttention``; in torch, Linear projections over heads·head_dim) → head.
Forward outputs, gradients, merged weights and 20 Adam steps agree in fp32; adapter files
saved on one side load on the other, and in PEFT, with the same outputs.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from torch.nn import functional as F

import jaxlora
import jaxlora.nnx
import torchlora
from jaxlora import kinds
from parity_tests.twins import rel_err

VOCAB, DIM, HEADS, GRID = 13, 8, 2, (3, 4)
HEAD_DIM = DIM // HEADS
TARGETS = ["embed", "conv", "attn.query", "attn.value"]
KINDS = {"embed": "embed", "conv": "conv", "attn.query": "linear", "attn.value": "linear"}
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, *GRID))
CONFIG = jaxlora.LoRAConfig(r=2, alpha=3, targets=TARGETS)
TOL = 1e-5  # fp32 through a few layers (the core forward parity bound)


class LinenTwin(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, DIM, name="embed")(tokens)
        x = nn.relu(nn.Conv(DIM, (3, 3), padding=1, name="conv")(x))
        x = x.reshape(x.shape[0], -1, DIM)
        x = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x)
        return nn.Dense(VOCAB, name="head")(x)


class Attention(torch.nn.Module):
    """Flax's MultiHeadDotProductAttention with Linear layers over heads·head_dim."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (torch.nn.Linear(DIM, DIM) for _ in range(3))
        self.out = torch.nn.Linear(DIM, DIM)

    def forward(self, x):
        n, length, _ = x.shape
        q, k, v = (
            p(x).view(n, length, HEADS, HEAD_DIM) for p in (self.query, self.key, self.value)
        )
        weights = torch.einsum("nqhd,nkhd->nhqk", q / math.sqrt(HEAD_DIM), k).softmax(-1)
        return self.out(torch.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, length, DIM))


class TorchTwin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.conv = torch.nn.Conv2d(DIM, DIM, 3, padding=1)
        self.attn = Attention()
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens).permute(0, 3, 1, 2)
        x = F.relu(self.conv(x)).permute(0, 2, 3, 1)
        return self.head(self.attn(x.reshape(x.shape[0], -1, DIM)))


def _torch_state(params) -> dict[str, torch.Tensor]:
    """The Linen base weights in the torch twin's layout (independent of jaxlora's code)."""
    p = jax.tree.map(np.asarray, params)
    state = {
        "embed.weight": p["embed"]["embedding"],
        "conv.weight": p["conv"]["kernel"].transpose(3, 2, 0, 1),
        "conv.bias": p["conv"]["bias"],
        "head.weight": p["head"]["kernel"].T,
        "head.bias": p["head"]["bias"],
        "attn.out.weight": p["attn"]["out"]["kernel"].reshape(DIM, DIM).T,
        "attn.out.bias": p["attn"]["out"]["bias"],
    }
    for name in ("query", "key", "value"):
        state[f"attn.{name}.weight"] = p["attn"][name]["kernel"].reshape(DIM, DIM).T
        state[f"attn.{name}.bias"] = p["attn"][name]["bias"].reshape(DIM)
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def _twins():
    """(Linen model, injected params with a random adapter, torch twin with the same adapter)."""
    model = LinenTwin()
    variables = model.init(jax.random.key(0), TOKENS)
    lora = jaxlora.inject(
        variables, CONFIG, jax.random.key(1), layouts=jaxlora.layouts(model, TOKENS)
    )
    torch_model = TorchTwin()
    torch_model.load_state_dict(_torch_state(variables["params"]))
    torchlora.inject(torch_model, CONFIG)
    gen = torch.Generator().manual_seed(2)
    params = jax.tree.map(lambda v: v, lora["params"])
    for path in TARGETS:
        layer = torch_model.get_submodule(path)
        with torch.no_grad():
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=gen) * 0.4)
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen) * 0.4)
        node = _node(params, path)
        a, b = (t.detach().numpy() for t in (layer.lora_a, layer.lora_b))
        base = node["embedding" if KINDS[path] == "embed" else "kernel"]
        in_axes = node["lora_a"].ndim - 1 if KINDS[path] == "linear" else 1
        node["lora_a"], node["lora_b"] = map(
            jnp.asarray, kinds.from_torch(KINDS[path], a, b, base.shape, in_axes)
        )
    return model, {"params": params}, torch_model


def _node(params, path):
    for key in path.split("."):
        params = params[key]
    return params


def _apply(model, variables):
    with jaxlora.intercept(CONFIG):
        return model.apply(variables, TOKENS)


def test_leaf_shapes_follow_the_layouts():
    _, variables, _ = _twins()
    p = variables["params"]
    assert p["attn"]["query"]["lora_a"].shape == (DIM, 2)
    assert p["attn"]["query"]["lora_b"].shape == (2, HEADS, HEAD_DIM)
    assert p["conv"]["lora_a"].shape == (3, 3, DIM, 2)
    assert p["conv"]["lora_b"].shape == (1, 1, 2, DIM)
    assert p["embed"]["lora_a"].shape == (VOCAB, 2)


def test_forward_matches_torch():
    model, variables, torch_model = _twins()
    expected = torch_model(torch.from_numpy(TOKENS)).detach()
    assert rel_err(_apply(model, variables), expected) <= TOL


def test_gradients_match_torch():
    model, variables, torch_model = _twins()
    adapter, base = jaxlora.split(variables)

    def loss(adapter):
        return jnp.mean(_apply(model, jaxlora.combine(adapter, base)) ** 2)

    grads = jax.grad(loss)(adapter)["params"]
    torch_model(torch.from_numpy(TOKENS)).pow(2).mean().backward()
    for path in TARGETS:
        layer = torch_model.get_submodule(path)
        ga, gb = kinds.to_torch(
            KINDS[path], *(np.asarray(_node(grads, path)[n]) for n in ("lora_a", "lora_b"))
        )
        assert rel_err(ga, layer.lora_a.grad) <= TOL, path
        assert rel_err(gb, layer.lora_b.grad) <= TOL, path


def test_merged_weights_match_torch():
    model, variables, torch_model = _twins()
    merged = jaxlora.merge(variables, alpha=CONFIG.alpha)
    y = model.apply(merged, TOKENS)  # the plain model, no intercept
    torchlora.merge(torch_model)
    expected = _torch_state(merged["params"])
    for key, value in torch_model.state_dict().items():
        assert rel_err(expected[key], value) <= 1e-6, key
    assert rel_err(y, torch_model(torch.from_numpy(TOKENS)).detach()) <= TOL


def test_twenty_adam_steps_match_torch():
    model, variables, torch_model = _twins()
    target = np.random.default_rng(1).normal(size=(2, math.prod(GRID), VOCAB)).astype(np.float32)
    tx = jaxlora.freeze_base(optax.adam(1e-2))
    state = tx.init(variables)

    @jax.jit
    def step(variables, state):
        loss, grads = jax.value_and_grad(lambda v: jnp.mean((_apply(model, v) - target) ** 2))(
            variables
        )
        updates, state = tx.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state, loss

    opt = torch.optim.Adam([p for p in torch_model.parameters() if p.requires_grad], lr=1e-2)
    jax_losses, torch_losses = [], []
    for _ in range(20):
        variables, state, loss = step(variables, state)
        jax_losses.append(float(loss))
        opt.zero_grad()
        torch_loss = F.mse_loss(torch_model(torch.from_numpy(TOKENS)), torch.from_numpy(target))
        torch_loss.backward()
        opt.step()
        torch_losses.append(float(torch_loss.detach()))
    # Adam divides by √v: a 1e-7 difference in a tiny gradient can move a step by up to lr·1e-3;
    # over 20 steps the adapters stay within 1e-4 of each other (measured ~1e-6).
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    assert jax_losses[-1] < 0.9 * jax_losses[0]
    for path in TARGETS:
        layer = torch_model.get_submodule(path)
        a, b = kinds.to_torch(
            KINDS[path],
            *(np.asarray(_node(variables["params"], path)[n]) for n in ("lora_a", "lora_b")),
        )
        assert rel_err(a, layer.lora_a) <= 1e-4 and rel_err(b, layer.lora_b) <= 1e-4, path


def _peft_model() -> torch.nn.Module:
    model = TorchTwin()
    model.load_state_dict(_torch_state(LinenTwin().init(jax.random.key(0), TOKENS)["params"]))
    return model


def test_linen_adapter_loads_in_peft_and_torchlora(tmp_path):
    model, variables, _ = _twins()
    jaxlora.save_adapter(variables, tmp_path, CONFIG)
    expected = _apply(model, variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT must find every tensor it expects, and no other
        peft_model = PeftModel.from_pretrained(_peft_model(), tmp_path)
    assert sorted(type(m).__name__ for m in peft_model.modules() if hasattr(m, "lora_A")) == [
        "Conv2d",
        "Embedding",
        "Linear",
        "Linear",
    ]
    assert rel_err(peft_model(torch.from_numpy(TOKENS)).detach(), expected) <= TOL
    ours = torchlora.load_adapter(_peft_model(), tmp_path)
    assert rel_err(ours(torch.from_numpy(TOKENS)).detach(), expected) <= TOL


def test_peft_adapter_loads_in_linen(tmp_path):
    torch.manual_seed(3)
    peft_model = get_peft_model(
        _peft_model(), LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS)
    )
    with torch.no_grad():  # PEFT starts with B = 0 (A = 0 for the embedding): move both
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path)
    expected = peft_model(torch.from_numpy(TOKENS)).detach()
    model = LinenTwin()
    variables = model.init(jax.random.key(0), TOKENS)
    loaded = jaxlora.load_adapter(variables, tmp_path)
    config = jaxlora.read_adapter_config(tmp_path)
    with jaxlora.intercept(config):
        assert rel_err(model.apply(loaded, TOKENS), expected) <= TOL
    assert (
        rel_err(
            torchlora.load_adapter(_peft_model(), tmp_path)(torch.from_numpy(TOKENS)).detach(),
            expected,
        )
        <= TOL
    )
    round_trip = tmp_path / "again"
    jaxlora.save_adapter(loaded, round_trip, config)
    again = jaxlora.load_adapter(variables, round_trip)
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(got, want)  # bit-exact


@pytest.mark.parametrize("path", ["conv", "embed"])
def test_a_file_for_another_kind_is_refused(tmp_path, path):
    _, variables, _ = _twins()
    jaxlora.save_adapter(variables, tmp_path, CONFIG)
    swapped = TorchTwin()
    if path == "conv":
        swapped.conv = torch.nn.Conv2d(DIM, DIM, 1)  # a 1×1 conv: the file's A is 3×3
        match = (
            r"'base_model.model.conv.lora_A.weight' has shape \(2, 8, 3, 3\), "
            r"expected \(2, 8, 1, 1\)"
        )
    else:
        swapped.embed = torch.nn.Linear(VOCAB, DIM)
        match = r"layer 'embed' is a Linear 13 -> 8 \(linear\) but the file holds a embed adapter"
    with pytest.raises(ValueError, match=match):
        torchlora.load_adapter(swapped, tmp_path)


class NnxTwin(nnx.Module):
    """The same network in NNX (its attention's projections are nnx.LinearGeneral)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.conv = nnx.Conv(DIM, DIM, (3, 3), padding=1, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
        self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = nnx.relu(self.conv(self.embed(tokens)))
        x = x.reshape(x.shape[0], -1, DIM)
        return self.head(self.attn(x))


def _nnx_base(variables) -> NnxTwin:
    """A plain NNX twin holding the Linen twin's base weights (the same Flax layouts)."""
    model = NnxTwin(nnx.Rngs(5))
    for path, node in _layers(variables["params"]):
        module = model
        for key in path.split("."):
            module = getattr(module, key)
        for leaf, value in node.items():
            if not leaf.startswith("lora_"):
                getattr(module, leaf)[...] = value
    return model


def _nnx_twin(variables) -> NnxTwin:
    """The NNX twin, injected, holding the Linen twin's adapter."""
    model = _nnx_base(variables)
    params = variables["params"]
    jaxlora.nnx.inject(model, CONFIG, nnx.Rngs(6))
    for path in TARGETS:
        module = model
        for key in path.split("."):
            module = getattr(module, key)
        module.lora_a[...], module.lora_b[...] = (
            _node(params, path)[n] for n in ("lora_a", "lora_b")
        )
    return model


def _layers(params, prefix=""):
    for key, value in params.items():
        leaves = {k: v for k, v in value.items() if not isinstance(v, dict)}
        if leaves:
            yield prefix + key, leaves
        yield from _layers(
            {k: v for k, v in value.items() if isinstance(v, dict)}, f"{prefix}{key}."
        )


def test_nnx_layers_match_linen_and_torch():
    _, variables, torch_model = _twins()
    nnx_model = _nnx_twin(variables)
    assert [type(getattr(nnx_model, n)).__name__ for n in ("embed", "conv")] == [
        "LoRAEmbed",
        "LoRAConv",
    ]
    assert type(nnx_model.attn.query).__name__ == "LoRALinearGeneral"
    expected = torch_model(torch.from_numpy(TOKENS)).detach()
    assert rel_err(nnx_model(TOKENS), expected) <= TOL

    def loss(model):
        return jnp.mean(model(TOKENS) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(nnx_model)
    torch_model(torch.from_numpy(TOKENS)).pow(2).mean().backward()
    for path in TARGETS:
        node = grads
        for key in path.split("."):
            node = node[key]
        ga, gb = kinds.to_torch(
            KINDS[path], *(np.asarray(node[n][...]) for n in ("lora_a", "lora_b"))
        )
        layer = torch_model.get_submodule(path)
        assert rel_err(ga, layer.lora_a.grad) <= TOL and rel_err(gb, layer.lora_b.grad) <= TOL, path
    jaxlora.nnx.merge(nnx_model)
    assert type(nnx_model.conv) is nnx.Conv and type(nnx_model.attn.value) is nnx.LinearGeneral
    assert rel_err(nnx_model(TOKENS), expected) <= TOL


def test_nnx_adapter_files_round_trip_with_peft(tmp_path):
    _, variables, _ = _twins()
    nnx_model = _nnx_twin(variables)
    expected = nnx_model(TOKENS)
    jaxlora.nnx.save_adapter(nnx_model, tmp_path / "nnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model = PeftModel.from_pretrained(_peft_model(), tmp_path / "nnx")
    assert rel_err(peft_model(torch.from_numpy(TOKENS)).detach(), expected) <= TOL
    peft_model.save_pretrained(tmp_path / "peft")
    base = _nnx_base(variables)
    jaxlora.nnx.load_adapter(base, tmp_path / "peft")  # into a plain model: injects, then loads
    assert rel_err(base(TOKENS), expected) <= TOL


def test_nnx_twenty_adam_steps_match_torch():
    _, variables, torch_model = _twins()
    model = _nnx_twin(variables)
    target = np.random.default_rng(1).normal(size=(2, math.prod(GRID), VOCAB)).astype(np.float32)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(TOKENS) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    opt = torch.optim.Adam([p for p in torch_model.parameters() if p.requires_grad], lr=1e-2)
    nnx_losses, torch_losses = [], []
    for _ in range(20):
        nnx_losses.append(float(step(model, optimizer)))
        opt.zero_grad()
        loss = F.mse_loss(torch_model(torch.from_numpy(TOKENS)), torch.from_numpy(target))
        loss.backward()
        opt.step()
        torch_losses.append(float(loss.detach()))
    np.testing.assert_allclose(nnx_losses, torch_losses, rtol=1e-5)  # as the Linen test
    for path in TARGETS:
        module = model
        for key in path.split("."):
            module = getattr(module, key)
        a, b = kinds.to_torch(
            KINDS[path], np.asarray(module.lora_a[...]), np.asarray(module.lora_b[...])
        )
        layer = torch_model.get_submodule(path)
        assert rel_err(a, layer.lora_a) <= 1e-4 and rel_err(b, layer.lora_b) <= 1e-4, path
    # The frozen weights did not move.
    np.testing.assert_array_equal(model.conv.kernel[...], variables["params"]["conv"]["kernel"])


class Linen1d(nn.Module):
    @nn.compact
    def __call__(self, x):  # (N, L, C)
        return nn.Conv(6, (3,), strides=2, padding=1, name="conv")(x)


class Torch1d(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 6, 3, stride=2, padding=1)

    def forward(self, x):  # (N, L, C) like Flax
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def test_conv1d_adapters_move_between_linen_torchlora_and_peft(tmp_path):
    x = np.random.default_rng(2).normal(size=(2, 9, 4)).astype(np.float32)
    model = Linen1d()
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["conv"])
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    keys = iter(jax.random.split(jax.random.key(2), 2))
    lora = jax.tree_util.tree_map_with_path(
        lambda p, v: jax.random.normal(next(keys), v.shape) * 0.3 if "lora" in str(p) else v, lora
    )
    with jaxlora.intercept(config):
        expected = model.apply(lora, x)
    jaxlora.save_adapter(lora, tmp_path, config)

    def base() -> Torch1d:
        twin = Torch1d()
        p = variables["params"]["conv"]
        state = {"conv.weight": np.asarray(p["kernel"]).transpose(2, 1, 0), "conv.bias": p["bias"]}
        twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        return twin

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model = PeftModel.from_pretrained(base(), tmp_path)
    assert type(peft_model.base_model.model.conv).__name__ == "Conv1d"  # PEFT's LoRA Conv1d
    assert rel_err(peft_model(torch.from_numpy(x)).detach(), expected) <= TOL
    ours = torchlora.load_adapter(base(), tmp_path)
    assert type(ours.conv) is torchlora.Conv1d
    assert rel_err(ours(torch.from_numpy(x)).detach(), expected) <= TOL
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = jaxlora.load_adapter(variables, tmp_path / "peft")
    with jaxlora.intercept(jaxlora.read_adapter_config(tmp_path / "peft")):
        assert rel_err(model.apply(loaded, x), expected) <= TOL
