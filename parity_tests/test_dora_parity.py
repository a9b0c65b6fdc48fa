"""DoRA (PEFT's ``use_dora=True``) against the installed ``peft``: torchlora, Linen (inject +
intercept) and NNX, fp32.

The twin is a small MLP; PEFT's adapted copy and ours start from the same base weights and the
same A, B, m (copied, never re-drawn), with B and m moved off their init so every term counts.
Tolerances: forward outputs, merged weights and gradients agree to 1e-5 relative to their
scale (fp32 has ε ≈ 1.2e-7; the paths differ only in summation order, e.g. PEFT computes
``(m/n − 1)·xWᵀ + m/n·s·BAx`` where a merged weight computes ``m/n·(W + sBA)x``). After 20
AdamW steps 1e-4: Adam divides by √v, which amplifies rounding differences in tiny gradients.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import torchlora

TOL, TOL_TRAIN = 1e-5, 1e-4
TARGETS = ["0", "2"]


def make_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6, bias=False))


def peft_model(base: nn.Module, *, r=3, alpha=6, dropout=0.0, seed=1) -> nn.Module:
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, use_dora=True, lora_dropout=dropout
    )
    model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            if "lora_magnitude" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    return model


def peft_tensors(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    layer = model.base_model.model.get_submodule(path)
    return {
        "lora_a": layer.lora_A["default"].weight,
        "lora_b": layer.lora_B["default"].weight,
        "lora_magnitude": layer.lora_magnitude_vector["default"].weight,
    }


def torch_twin(base: nn.Module, peft: nn.Module, *, r=3, alpha=6, dropout=0.0) -> nn.Module:
    config = torchlora.LoRAConfig(r=r, alpha=alpha, targets=TARGETS, use_dora=True, dropout=dropout)
    model = torchlora.inject(copy.deepcopy(base), config)
    with torch.no_grad():
        for path in TARGETS:
            layer = model.get_submodule(path)
            for name, value in peft_tensors(peft, path).items():
                getattr(layer, name).copy_(value)
    return model


def _np(t) -> np.ndarray:
    return np.asarray(t.detach() if isinstance(t, torch.Tensor) else t, np.float64)


def rel(actual, expected) -> float:
    """Max abs difference relative to the expected value's scale (torch, numpy or jax)."""
    actual, expected = _np(actual), _np(expected)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def x_input(seed: int = 2) -> torch.Tensor:
    return torch.randn(7, 12, generator=torch.Generator().manual_seed(seed))


def test_peft_initialises_magnitude_to_the_weight_norm():
    base = make_base()
    ours = torchlora.inject(
        copy.deepcopy(base), torchlora.LoRAConfig(r=3, targets=TARGETS, use_dora=True)
    )
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=3, target_modules=TARGETS, use_dora=True)
    )
    for path in TARGETS:
        m = peft_tensors(theirs, path)["lora_magnitude"]
        assert rel(ours.get_submodule(path).lora_magnitude, m) < TOL
        assert rel(m, torch.linalg.norm(base.get_submodule(path).weight, dim=1)) < TOL


def test_torch_forward_grads_and_merge_match_peft():
    base = make_base()
    peft = peft_model(base)
    ours = torch_twin(base, peft)
    x = x_input()
    y_peft, y_ours = peft(x), ours(x)
    assert rel(y_ours, y_peft) < TOL
    (y_peft**2).sum().backward()
    (y_ours**2).sum().backward()
    for path in TARGETS:
        layer = ours.get_submodule(path)
        for name, theirs in peft_tensors(peft, path).items():
            assert rel(getattr(layer, name).grad, theirs.grad) < TOL, (path, name)
        assert layer.weight.grad is None  # frozen
    merged = copy.deepcopy(peft).merge_and_unload()
    for path in TARGETS:
        layer = ours.get_submodule(path)
        assert rel(layer.merged_weight(), merged.get_submodule(path).weight) < TOL


def test_torch_dropout_base_term_matches_peft():
    # With dropout active PEFT computes the correction on base(dropout(x)): same masks here
    # because both draw from torch's global generator in the same order (one dropout per layer).
    base = make_base()
    peft = peft_model(base, dropout=0.3)
    ours = torch_twin(base, peft, dropout=0.3)
    peft.train()
    ours.train()
    x = x_input()
    torch.manual_seed(5)
    y_peft = peft(x)
    torch.manual_seed(5)
    y_ours = ours(x)
    assert rel(y_ours, y_peft) < TOL
    peft.eval()
    ours.eval()
    assert rel(ours(x), peft(x)) < TOL


def _adamw_run(model, params, x, steps=20):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()
    return model


def test_torch_twenty_adamw_steps_match_peft():
    base = make_base()
    peft = peft_model(base)
    ours = torch_twin(base, peft)
    x = x_input()
    _adamw_run(peft, [p for p in peft.parameters() if p.requires_grad], x)
    _adamw_run(ours, [p for p in ours.parameters() if p.requires_grad], x)
    for path in TARGETS:
        layer = ours.get_submodule(path)
        for name, theirs in peft_tensors(peft, path).items():
            assert rel(getattr(layer, name), theirs) < TOL_TRAIN, (path, name)
    assert rel(ours(x), peft(x)) < TOL_TRAIN


def test_torch_files_both_ways(tmp_path):
    base = make_base()
    peft = peft_model(base)
    x = x_input()
    peft.save_pretrained(str(tmp_path / "peft"))
    ours = torchlora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert rel(ours(x), peft(x)) < TOL
    torchlora.save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    assert rel(back(x), peft(x)) < TOL
    for path in TARGETS:
        for name, theirs in peft_tensors(back, path).items():
            assert torch.equal(getattr(ours.get_submodule(path), name), theirs), (path, name)


# --- jaxlora Linen: inject + intercept on the unmodified twin ---------------------------------

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as fnn  # noqa: E402

import jaxlora  # noqa: E402

LINEN_PATHS = {"0": "layers_0", "2": "layers_2"}


class FlaxNet(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        x = jnp.tanh(fnn.Dense(10, name="layers_0")(x))
        return fnn.Dense(6, use_bias=False, name="layers_2")(x)


def linen_twin(base: nn.Module, peft: nn.Module, *, r=3, alpha=6, dropout=0.0):
    """The Linen twin: the base's kernels, then PEFT's adapter tensors, in Flax layout."""
    params = {}
    for path, name in LINEN_PATHS.items():
        layer = base.get_submodule(path)
        params[name] = {"kernel": jnp.asarray(layer.weight.detach().numpy().T)}
        if layer.bias is not None:
            params[name]["bias"] = jnp.asarray(layer.bias.detach().numpy())
    config = jaxlora.LoRAConfig(
        r=r, alpha=alpha, targets=list(LINEN_PATHS.values()), use_dora=True, dropout=dropout
    )
    params = jaxlora.inject(params, config, jax.random.key(0))
    for path, name in LINEN_PATHS.items():
        t = {k: v.detach().numpy() for k, v in peft_tensors(peft, path).items()}
        params[name] = {
            **params[name],
            "lora_a": jnp.asarray(t["lora_a"].T),
            "lora_b": jnp.asarray(t["lora_b"].T),
            "lora_magnitude": jnp.asarray(t["lora_magnitude"]),
        }
    return config, {"params": params}


def _linen_apply(config, variables, x):
    with jaxlora.intercept(config):
        return FlaxNet().apply(variables, x)


def test_linen_inject_magnitude_is_peft_init():
    base = make_base()
    config, variables = linen_twin(base, peft_model(base))
    fresh = jaxlora.inject(
        {
            n: {k: v for k, v in d.items() if not k.startswith("lora")}
            for n, d in variables["params"].items()
        },
        config,
        jax.random.key(3),
    )
    theirs = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, use_dora=True),
    )
    for path, name in LINEN_PATHS.items():
        m = peft_tensors(theirs, path)["lora_magnitude"]
        assert rel(np.asarray(fresh[name]["lora_magnitude"]), m) < TOL


def test_linen_forward_grads_merge_match_peft():
    base = make_base()
    peft = peft_model(base)
    config, variables = linen_twin(base, peft)
    x = x_input()
    xj = jnp.asarray(x.numpy())
    y_peft = peft(x)
    assert rel(np.asarray(_linen_apply(config, variables, xj)), y_peft) < TOL
    (y_peft**2).sum().backward()
    adapter, frozen = jaxlora.split(variables["params"])

    def loss(adapter):
        y = _linen_apply(config, {"params": jaxlora.combine(adapter, frozen)}, xj)
        return (y**2).sum()

    grads = jax.grad(loss)(adapter)
    for path, name in LINEN_PATHS.items():
        theirs = peft_tensors(peft, path)
        g = {k: np.asarray(v) for k, v in grads[name].items()}
        assert rel(g["lora_a"].T, theirs["lora_a"].grad) < TOL
        assert rel(g["lora_b"].T, theirs["lora_b"].grad) < TOL
        assert rel(g["lora_magnitude"], theirs["lora_magnitude"].grad) < TOL
    merged_peft = copy.deepcopy(peft).merge_and_unload()
    merged = jaxlora.merge(variables["params"], alpha=6)
    for path, name in LINEN_PATHS.items():
        kernel = np.asarray(merged[name]["kernel"]).T.copy()
        assert rel(kernel, merged_peft.get_submodule(path).weight) < TOL
        assert set(merged[name]) <= {"kernel", "bias"}


def test_linen_twenty_adamw_steps_match_peft():
    base = make_base()
    peft = peft_model(base)
    config, variables = linen_twin(base, peft)
    x = x_input()
    xj = jnp.asarray(x.numpy())
    _adamw_run(peft, [p for p in peft.parameters() if p.requires_grad], x)
    tx = jaxlora.freeze_base(optax.adamw(1e-2, weight_decay=0.01))
    params = variables["params"]
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            return (_linen_apply(config, {"params": p}, xj) ** 2).mean()

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(20):
        params, state = step(params, state)
    for path, name in LINEN_PATHS.items():
        theirs = peft_tensors(peft, path)
        ours = {k: np.asarray(v) for k, v in params[name].items()}
        assert rel(ours["lora_a"].T.copy(), theirs["lora_a"]) < TOL_TRAIN
        assert rel(ours["lora_b"].T.copy(), theirs["lora_b"]) < TOL_TRAIN
        assert rel(ours["lora_magnitude"], theirs["lora_magnitude"]) < TOL_TRAIN
        np.testing.assert_array_equal(
            ours["kernel"], np.asarray(variables["params"][name]["kernel"])
        )


def test_linen_files_both_ways(tmp_path):
    base = make_base()
    peft = peft_model(base)
    _, variables = linen_twin(base, peft)
    x = x_input()
    xj = jnp.asarray(x.numpy())
    peft.save_pretrained(str(tmp_path / "peft"))
    plain = {
        n: {k: v for k, v in d.items() if not k.startswith("lora")}
        for n, d in variables["params"].items()
    }
    path_map = {v: k for k, v in LINEN_PATHS.items()}
    loaded = jaxlora.load_adapter(plain, tmp_path / "peft", path_map=path_map)
    file_config = jaxlora.read_adapter_config(tmp_path / "peft")
    assert file_config.use_dora
    loaded_config = jaxlora.LoRAConfig(
        r=3, alpha=6, targets=list(LINEN_PATHS.values()), use_dora=True
    )
    y = _linen_apply(loaded_config, {"params": loaded}, xj)
    assert rel(np.asarray(y), peft(x)) < TOL
    jaxlora.save_adapter(loaded, tmp_path / "ours", loaded_config, path_map=path_map)
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    for path in TARGETS:
        for name, theirs in peft_tensors(back, path).items():
            assert torch.equal(theirs, peft_tensors(peft, path)[name]), (path, name)
    assert rel(back(x), peft(x)) < TOL


# --- jaxlora.nnx: inject on a plain NNX twin --------------------------------------------------

from flax import nnx  # noqa: E402

import jaxlora.nnx as jnnx  # noqa: E402


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers_0 = nnx.Linear(12, 10, rngs=rngs)
        self.layers_2 = nnx.Linear(10, 6, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.layers_2(jnp.tanh(self.layers_0(x)))


def nnx_base(base: nn.Module) -> NnxNet:
    model = NnxNet(nnx.Rngs(0))
    for path, name in LINEN_PATHS.items():
        layer, ours = base.get_submodule(path), getattr(model, name)
        ours.kernel[...] = jnp.asarray(layer.weight.detach().numpy().T)
        if layer.bias is not None:
            ours.bias[...] = jnp.asarray(layer.bias.detach().numpy())
    return model


def nnx_twin(base: nn.Module, peft: nn.Module, *, dropout=0.0) -> NnxNet:
    model = nnx_base(base)
    config = jaxlora.LoRAConfig(
        r=3, alpha=6, targets=list(LINEN_PATHS.values()), use_dora=True, dropout=dropout
    )
    jnnx.inject(model, config, nnx.Rngs(1))
    for path, name in LINEN_PATHS.items():
        t = {k: v.detach().numpy() for k, v in peft_tensors(peft, path).items()}
        layer = getattr(model, name)
        layer.lora_a[...] = jnp.asarray(t["lora_a"].T)
        layer.lora_b[...] = jnp.asarray(t["lora_b"].T)
        layer.lora_magnitude[...] = jnp.asarray(t["lora_magnitude"])
    return model


def test_nnx_inject_magnitude_is_peft_init():
    base = make_base()
    model = nnx_base(base)
    config = jaxlora.LoRAConfig(r=3, targets=list(LINEN_PATHS.values()), use_dora=True)
    jnnx.inject(model, config, nnx.Rngs(1))
    for path, name in LINEN_PATHS.items():
        expected = torch.linalg.norm(base.get_submodule(path).weight, dim=1)
        assert rel(getattr(model, name).lora_magnitude[...], expected) < TOL
    assert sorted(nnx.state(model, nnx.LoRAParam)["layers_0"]) == [
        "lora_a",
        "lora_b",
        "lora_magnitude",
    ]


def test_nnx_forward_grads_merge_match_peft():
    base = make_base()
    peft = peft_model(base)
    model = nnx_twin(base, peft)
    x = x_input()
    xj = jnp.asarray(x.numpy())
    y_peft = peft(x)
    assert rel(model(xj), y_peft) < TOL
    (y_peft**2).sum().backward()
    grads = nnx.grad(lambda m: (m(xj) ** 2).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    for path, name in LINEN_PATHS.items():
        theirs = peft_tensors(peft, path)
        g = grads[name]
        assert rel(np.asarray(g["lora_a"][...]).T, theirs["lora_a"].grad) < TOL
        assert rel(np.asarray(g["lora_b"][...]).T, theirs["lora_b"].grad) < TOL
        assert rel(g["lora_magnitude"][...], theirs["lora_magnitude"].grad) < TOL
    merged_peft = copy.deepcopy(peft).merge_and_unload()
    jnnx.merge(model)
    for path, name in LINEN_PATHS.items():
        layer = getattr(model, name)
        assert type(layer) is nnx.Linear
        assert rel(np.asarray(layer.kernel[...]).T, merged_peft.get_submodule(path).weight) < TOL
    assert rel(model(xj), y_peft) < TOL


def test_nnx_twenty_adamw_steps_match_peft():
    base = make_base()
    peft = peft_model(base)
    model = nnx_twin(base, peft)
    x = x_input()
    xj = jnp.asarray(x.numpy())
    _adamw_run(peft, [p for p in peft.parameters() if p.requires_grad], x)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.01), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: (m(xj) ** 2).mean()  # noqa: E731
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)

    for _ in range(20):
        step(model, optimizer)
    for path, name in LINEN_PATHS.items():
        theirs = peft_tensors(peft, path)
        layer = getattr(model, name)
        assert rel(np.asarray(layer.lora_a[...]).T, theirs["lora_a"]) < TOL_TRAIN
        assert rel(np.asarray(layer.lora_b[...]).T, theirs["lora_b"]) < TOL_TRAIN
        assert rel(layer.lora_magnitude[...], theirs["lora_magnitude"]) < TOL_TRAIN


def test_nnx_files_both_ways(tmp_path):
    base = make_base()
    peft = peft_model(base)
    x = x_input()
    xj = jnp.asarray(x.numpy())
    peft.save_pretrained(str(tmp_path / "peft"))
    path_map = {v: k for k, v in LINEN_PATHS.items()}
    model = jnnx.load_adapter(nnx_base(base), tmp_path / "peft", path_map=path_map)
    assert model.layers_0.use_dora
    assert rel(model(xj), peft(x)) < TOL
    jnnx.save_adapter(model, tmp_path / "ours", path_map=path_map)
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    for path in TARGETS:
        for name, theirs in peft_tensors(back, path).items():
            assert torch.equal(theirs, peft_tensors(peft, path)[name]), (path, name)
    assert rel(back(x), peft(x)) < TOL


# --- the layer classes: jaxlora.LoRADense (Linen) on PEFT's single Linear ---------------------


def test_linen_lora_dense_matches_peft_forward_and_grads():
    base = make_base()
    peft = peft_model(base)
    layer = base.get_submodule("0")
    t = peft_tensors(peft, "0")
    params = {
        "kernel": jnp.asarray(layer.weight.detach().numpy().T),
        "bias": jnp.asarray(layer.bias.detach().numpy()),
        "lora_a": jnp.asarray(t["lora_a"].detach().numpy().T),
        "lora_b": jnp.asarray(t["lora_b"].detach().numpy().T),
        "lora_magnitude": jnp.asarray(t["lora_magnitude"].detach().numpy()),
    }
    dense = jaxlora.LoRADense(10, 3, 6, use_dora=True)
    x = x_input()
    y_peft = peft.base_model.model.get_submodule("0")(x)
    xj = jnp.asarray(x.numpy())
    assert rel(dense.apply({"params": params}, xj), y_peft) < TOL
    (y_peft**2).sum().backward()
    grads = jax.grad(lambda p: (dense.apply({"params": p}, xj) ** 2).sum())(params)
    assert rel(grads["lora_a"].T, t["lora_a"].grad) < TOL
    assert rel(grads["lora_b"].T, t["lora_b"].grad) < TOL
    assert rel(grads["lora_magnitude"], t["lora_magnitude"].grad) < TOL
    init = dense.init(jax.random.key(0), xj)["params"]
    assert rel(init["lora_magnitude"], np.linalg.norm(np.asarray(init["kernel"]), axis=0)) < TOL


# --- torch Embedding and Conv (PEFT supports DoRA on both) ------------------------------------


class KindsNet(nn.Module):
    """An embedding feeding a Conv2d and a Conv1d: every DoRA layer kind PEFT has besides
    Linear (a conv's magnitude is stored (1, out, 1, ...) by PEFT)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 7)
        self.conv = nn.Conv2d(7, 5, 3, padding=1)
        self.conv1 = nn.Conv1d(5, 4, 2)

    def forward(self, ids):
        e = self.emb(ids).permute(0, 2, 1)  # (N, 7, L)
        h = self.conv(e[..., None].expand(-1, -1, -1, 3))  # (N, 5, L, 3)
        return self.conv1(torch.tanh(h.mean(-1)))


KIND_TARGETS = ["emb", "conv", "conv1"]


def kinds_peft(base: nn.Module, dropout: float = 0.0) -> nn.Module:
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=KIND_TARGETS, use_dora=True, lora_dropout=dropout
    )
    model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name or "lora_B" in name:
                p.normal_(0.0, 0.3)
            if "lora_magnitude" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    return model


def kind_tensors(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    layer = model.base_model.model.get_submodule(path)
    if path == "emb":
        a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return {
        "lora_a": a,
        "lora_b": b,
        "lora_magnitude": layer.lora_magnitude_vector["default"].weight,
    }


def kinds_twin(base: nn.Module, peft: nn.Module, dropout: float = 0.0) -> nn.Module:
    config = torchlora.LoRAConfig(
        r=2, alpha=4, targets=KIND_TARGETS, use_dora=True, dropout=dropout
    )
    model = torchlora.inject(copy.deepcopy(base), config)
    with torch.no_grad():
        for path in KIND_TARGETS:
            layer = model.get_submodule(path)
            for name, value in kind_tensors(peft, path).items():
                getattr(layer, name).copy_(value.reshape(getattr(layer, name).shape))
    return model


def _kinds_setup(dropout: float = 0.0):
    torch.manual_seed(0)
    base = KindsNet()
    peft = kinds_peft(base, dropout)
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(4))
    return base, peft, kinds_twin(base, peft, dropout), ids


def test_torch_embedding_and_conv_forward_grads_merge_match_peft():
    base, peft, ours, ids = _kinds_setup()
    fresh = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=KIND_TARGETS, use_dora=True),
    )
    initial = torchlora.inject(
        copy.deepcopy(base),
        torchlora.LoRAConfig(r=2, alpha=4, targets=KIND_TARGETS, use_dora=True),
    )
    for path in KIND_TARGETS:  # the magnitude starts where PEFT's does
        m = kind_tensors(fresh, path)["lora_magnitude"]
        assert rel(initial.get_submodule(path).lora_magnitude, m.reshape(-1)) < TOL
    y_peft, y_ours = peft(ids), ours(ids)
    assert rel(y_ours, y_peft) < TOL
    (y_peft**2).sum().backward()
    (y_ours**2).sum().backward()
    for path in KIND_TARGETS:
        layer = ours.get_submodule(path)
        for name, theirs in kind_tensors(peft, path).items():
            got = getattr(layer, name).grad
            assert rel(got, theirs.grad.reshape(got.shape)) < TOL, (path, name)
    merged = copy.deepcopy(peft).merge_and_unload()
    for path in KIND_TARGETS:
        layer = ours.get_submodule(path)
        assert rel(layer.merged_weight(), merged.get_submodule(path).weight) < TOL, path


def test_torch_conv_dropout_matches_peft():
    _, peft, ours, ids = _kinds_setup(dropout=0.3)
    peft.train()
    ours.train()
    torch.manual_seed(5)
    y_peft = peft(ids)
    torch.manual_seed(5)
    assert rel(ours(ids), y_peft) < TOL


def test_torch_embedding_and_conv_twenty_adamw_steps_and_files(tmp_path):
    base, peft, ours, ids = _kinds_setup()
    _adamw_run(peft, [p for p in peft.parameters() if p.requires_grad], ids)
    _adamw_run(ours, [p for p in ours.parameters() if p.requires_grad], ids)
    for path in KIND_TARGETS:
        layer = ours.get_submodule(path)
        for name, theirs in kind_tensors(peft, path).items():
            got = getattr(layer, name)
            assert rel(got, theirs.reshape(got.shape)) < TOL_TRAIN, (path, name)
    peft.save_pretrained(str(tmp_path / "peft"))
    loaded = torchlora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert rel(loaded(ids), peft(ids)) < TOL
    torchlora.save_adapter(loaded, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    for path in KIND_TARGETS:
        for name, theirs in kind_tensors(back, path).items():
            assert torch.equal(theirs, kind_tensors(peft, path)[name]), (path, name)
    assert rel(back(ids), peft(ids)) < TOL


# --- jaxlora Linen Embed and Conv through inject/intercept, from PEFT's file -------------------

from jaxlora import kinds  # noqa: E402


class FlaxKindsNet(fnn.Module):
    @fnn.compact
    def __call__(self, ids):
        e = fnn.Embed(11, 7, name="emb")(ids)  # (N, L, 7)
        e = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], 3, 7))
        h = fnn.Conv(5, (3, 3), padding=1, name="conv")(e).mean(2)  # (N, L, 5)
        return fnn.Conv(4, (2,), padding="VALID", name="conv1")(jnp.tanh(h)).transpose(0, 2, 1)


def flax_kinds_base(base: nn.Module) -> dict:
    weight = {n: base.get_submodule(n).weight.detach().numpy() for n in KIND_TARGETS}
    bias = {n: base.get_submodule(n).bias.detach().numpy() for n in ("conv", "conv1")}
    return {
        "emb": {"embedding": jnp.asarray(weight["emb"])},
        "conv": {"kernel": jnp.asarray(weight["conv"].transpose(2, 3, 1, 0)), "bias": bias["conv"]},
        "conv1": {"kernel": jnp.asarray(weight["conv1"].transpose(2, 1, 0)), "bias": bias["conv1"]},
    }


def _flax_kinds(tmp_path):
    base, peft, _, ids = _kinds_setup()
    peft.save_pretrained(str(tmp_path / "peft"))
    params = jaxlora.load_adapter(flax_kinds_base(base), tmp_path / "peft")
    config = jaxlora.read_adapter_config(tmp_path / "peft")
    return base, peft, ids, config, params


def _kinds_apply(config, params, ids):
    with jaxlora.intercept(config):
        return FlaxKindsNet().apply({"params": params}, ids)


def test_linen_embed_and_conv_from_peft_file_forward_grads_merge(tmp_path):
    _, peft, ids, config, params = _flax_kinds(tmp_path)
    idsj = jnp.asarray(ids.numpy())
    y_peft = peft(ids)
    assert rel(_kinds_apply(config, params, idsj), y_peft) < TOL
    (y_peft**2).sum().backward()
    adapter, frozen = jaxlora.split(params)
    grads = jax.grad(
        lambda ad: (_kinds_apply(config, jaxlora.combine(ad, frozen), idsj) ** 2).sum()
    )(adapter)
    for path in KIND_TARGETS:
        kind = "embed" if path == "emb" else "conv"
        g = {k: np.asarray(v) for k, v in grads[path].items()}
        ga, gb = kinds.to_torch(kind, g["lora_a"], g["lora_b"])
        theirs = kind_tensors(peft, path)
        assert rel(ga, theirs["lora_a"].grad) < TOL, path
        assert rel(gb, theirs["lora_b"].grad) < TOL, path
        assert rel(g["lora_magnitude"], theirs["lora_magnitude"].grad.reshape(-1)) < TOL, path
    merged_peft = copy.deepcopy(peft).merge_and_unload()
    merged = jaxlora.merge(params, alpha=config.alpha_for)
    assert rel(FlaxKindsNet().apply({"params": merged}, idsj), y_peft) < TOL
    expected = flax_kinds_base(merged_peft)
    for path in KIND_TARGETS:
        name = "embedding" if path == "emb" else "kernel"
        assert rel(merged[path][name], expected[path][name]) < TOL, path


def test_linen_embed_attend_uses_the_dora_table():
    class Tied(fnn.Module):
        @fnn.compact
        def __call__(self, q):
            return fnn.Embed(11, 7, name="emb").attend(q)

    torch.manual_seed(0)
    base = KindsNet()
    peft = kinds_peft(base)
    t = {k: v.detach().numpy() for k, v in kind_tensors(peft, "emb").items()}
    a, b = kinds.from_torch("embed", t["lora_a"], t["lora_b"], (11, 7))
    params = {
        "emb": {
            "embedding": jnp.asarray(base.emb.weight.detach().numpy()),
            "lora_a": jnp.asarray(a),
            "lora_b": jnp.asarray(b),
            "lora_magnitude": jnp.asarray(t["lora_magnitude"]),
        }
    }
    table = copy.deepcopy(peft).merge_and_unload().emb.weight.detach().numpy()
    q = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["emb"], use_dora=True)
    with jaxlora.intercept(config):
        got = Tied().apply({"params": params}, jnp.asarray(q))
    assert rel(got, q @ table.T) < TOL


def test_linen_embed_and_conv_twenty_adamw_steps_and_file_back(tmp_path):
    base, peft, ids, config, params = _flax_kinds(tmp_path)
    idsj = jnp.asarray(ids.numpy())
    _adamw_run(peft, [p for p in peft.parameters() if p.requires_grad], ids)
    tx = jaxlora.freeze_base(optax.adamw(1e-2, weight_decay=0.01))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: (_kinds_apply(config, p, idsj) ** 2).mean())(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(20):
        params, state = step(params, state)
    for path in KIND_TARGETS:
        kind = "embed" if path == "emb" else "conv"
        a, b = kinds.to_torch(
            kind, np.asarray(params[path]["lora_a"]), np.asarray(params[path]["lora_b"])
        )
        theirs = kind_tensors(peft, path)
        assert rel(a, theirs["lora_a"]) < TOL_TRAIN, path
        assert rel(b, theirs["lora_b"]) < TOL_TRAIN, path
        m = theirs["lora_magnitude"].reshape(-1)
        assert rel(params[path]["lora_magnitude"], m) < TOL_TRAIN, path
    jaxlora.save_adapter(params, tmp_path / "ours", config)
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    for path in KIND_TARGETS:
        for name, theirs in kind_tensors(back, path).items():
            ours = kind_tensors(peft, path)[name]
            assert theirs.shape == ours.shape and rel(theirs, ours) < TOL_TRAIN, (path, name)
    assert rel(back(ids), peft(ids)) < TOL_TRAIN


# --- jaxlora.nnx Embed and Conv, from PEFT's file -------------------------------------------------


class NnxKindsNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.emb = nnx.Embed(11, 7, rngs=rngs)
        self.conv = nnx.Conv(7, 5, (3, 3), padding=1, rngs=rngs)
        self.conv1 = nnx.Conv(5, 4, (2,), padding="VALID", rngs=rngs)

    def __call__(self, ids):
        e = self.emb(ids)
        e = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], 3, 7))
        h = self.conv(e).mean(2)
        return self.conv1(jnp.tanh(h)).transpose(0, 2, 1)


def nnx_kinds_base(base: nn.Module) -> NnxKindsNet:
    model = NnxKindsNet(nnx.Rngs(0))
    for path, leaves in flax_kinds_base(base).items():
        for name, value in leaves.items():
            getattr(getattr(model, path), name)[...] = jnp.asarray(value)
    return model


def test_nnx_embed_and_conv_from_peft_file_forward_grads_steps_files(tmp_path):
    base, peft, _, ids = _kinds_setup()
    idsj = jnp.asarray(ids.numpy())
    peft.save_pretrained(str(tmp_path / "peft"))
    model = jnnx.load_adapter(nnx_kinds_base(base), tmp_path / "peft")
    y_peft = peft(ids)
    assert rel(model(idsj), y_peft) < TOL
    (y_peft**2).sum().backward()
    grads = nnx.grad(lambda m: (m(idsj) ** 2).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    for path in KIND_TARGETS:
        kind = "embed" if path == "emb" else "conv"
        g = grads[path]
        ga, gb = kinds.to_torch(kind, np.asarray(g["lora_a"][...]), np.asarray(g["lora_b"][...]))
        theirs = kind_tensors(peft, path)
        assert rel(ga, theirs["lora_a"].grad) < TOL, path
        assert rel(gb, theirs["lora_b"].grad) < TOL, path
        got = g["lora_magnitude"][...]
        assert rel(got, theirs["lora_magnitude"].grad.reshape(-1)) < TOL, path
    _adamw_run(peft, [p for p in peft.parameters() if p.requires_grad], ids)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.01), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: (m(idsj) ** 2).mean()  # noqa: E731
        optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))

    for _ in range(20):
        step(model, optimizer)
    assert rel(model(idsj), peft(ids)) < TOL_TRAIN
    jnnx.save_adapter(model, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    for path in KIND_TARGETS:
        for name, theirs in kind_tensors(back, path).items():
            ours = kind_tensors(peft, path)[name]
            assert theirs.shape == ours.shape and rel(theirs, ours) < TOL_TRAIN, (path, name)
    merged_peft = copy.deepcopy(peft).merge_and_unload()
    jnnx.merge(model)
    assert type(model.conv) is nnx.Conv and type(model.emb) is nnx.Embed
    expected = flax_kinds_base(merged_peft)
    for path in KIND_TARGETS:
        name = "embedding" if path == "emb" else "kernel"
        assert rel(getattr(model, path).__dict__[name][...], expected[path][name]) < TOL_TRAIN


def test_nnx_embed_attend_uses_the_merged_table():
    torch.manual_seed(0)
    base = KindsNet()
    model = nnx_kinds_base(base)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["emb"], use_dora=True)
    jnnx.inject(model, config, nnx.Rngs(1))
    emb = model.emb
    emb.lora_a[...] = jax.random.normal(jax.random.key(0), emb.lora_a.shape)
    emb.lora_magnitude[...] = emb.lora_magnitude[...] * 1.3
    table = jnnx.merge(model).emb.embedding[...]
    model = nnx_kinds_base(base)
    jnnx.inject(model, config, nnx.Rngs(1))
    model.emb.lora_a[...] = emb.lora_a[...]
    model.emb.lora_magnitude[...] = emb.lora_magnitude[...]
    q = jax.random.normal(jax.random.key(1), (4, 7))
    assert rel(model.emb.attend(q), q @ table.T) < TOL


class FlaxKindsLayers(fnn.Module):
    """``FlaxKindsNet`` built from jaxlora's Linen layer classes with ``use_dora=True``."""

    @fnn.compact
    def __call__(self, ids):
        lora = dict(r=2, alpha=4, use_dora=True)
        e = jaxlora.LoRAEmbed(11, 7, name="emb", **lora)(ids)
        e = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], 3, 7))
        h = jaxlora.LoRAConv(5, (3, 3), padding=1, name="conv", **lora)(e).mean(2)
        conv1 = jaxlora.LoRAConv(4, (2,), padding="VALID", name="conv1", **lora)
        return conv1(jnp.tanh(h)).transpose(0, 2, 1)


def test_linen_layer_classes_embed_and_conv_match_peft(tmp_path):
    _, peft, ids, _, params = _flax_kinds(tmp_path)
    idsj = jnp.asarray(ids.numpy())
    y_peft = peft(ids)
    assert rel(FlaxKindsLayers().apply({"params": params}, idsj), y_peft) < TOL
    (y_peft**2).sum().backward()
    grads = jax.grad(lambda p: (FlaxKindsLayers().apply({"params": p}, idsj) ** 2).sum())(params)
    for path in KIND_TARGETS:
        theirs = kind_tensors(peft, path)["lora_magnitude"].grad.reshape(-1)
        assert rel(grads[path]["lora_magnitude"], theirs) < TOL, path
    init = FlaxKindsLayers().init(jax.random.key(0), idsj)["params"]
    conv = np.asarray(init["conv"]["kernel"]).reshape(-1, 5)
    assert rel(init["conv"]["lora_magnitude"], np.linalg.norm(conv, axis=0)) < TOL
