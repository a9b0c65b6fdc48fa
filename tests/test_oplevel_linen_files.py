"""PEFT files for Linen adapters made at a weight's product (``layouts`` → ``inject``), both
ways: ``load_adapter`` reads them by the ``jaxlora.hf_maps`` rule that writes them (shared with
``jaxlora.nnx``), and transformers' ``Conv1D`` modules (``HFLinear(conv1d=True)``) carry PEFT's
``fan_in_fan_out``.

The model: a ``FlaxConv1D`` (kernel (out, in), ``x @ kernel.T``) and tunix's q ``Einsum``
('BTD,DNH->BTNH'). Its torch twins: ``c_attn`` an ``nn.Linear`` (weight = kernel) or
transformers' ``Conv1D`` (weight (in, out) = kernel.T), ``q_proj`` an ``nn.Linear`` with weight
w.reshape(D, N·H).T. References are the real ``peft`` on the twin; outputs agree to 1e-5 of
their scale (fp32, sums of 16 products).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

import jaxlora
from jaxlora import nnx as jnnx
from parity_tests.test_oplevel_linen_parity import ALPHA, CONFIG, B, Block, D, H, N, R, T

CONV1D = {"c_attn": jaxlora.HFLinear("c_attn", conv1d=True)}
X = np.array(jax.random.normal(jax.random.key(1), (B, T, D)))


class TorchBlock(torch.nn.Module):
    def __init__(self, conv1d: bool):
        super().__init__()
        self.c_attn = Conv1D(D, D) if conv1d else torch.nn.Linear(D, D)
        self.q_proj = torch.nn.Linear(D, N * H, bias=False)

    def forward(self, x):
        return self.c_attn(x), self.q_proj(x)


MODEL = Block()
BASE = MODEL.init(jax.random.key(0), X)
LAYOUTS = jaxlora.layouts(MODEL, X)


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float32, copy=True, order="C"))


def _twin(conv1d: bool) -> TorchBlock:
    """The torch twin holding BASE's weights."""
    torch_model, p = TorchBlock(conv1d), BASE["params"]
    kernel = np.asarray(p["c_attn"]["kernel"])  # (out, in)
    with torch.no_grad():
        torch_model.c_attn.weight.copy_(_t(kernel.T if conv1d else kernel))
        torch_model.c_attn.bias.copy_(_t(p["c_attn"]["bias"]))
        torch_model.q_proj.weight.copy_(_t(np.asarray(p["q_proj"]["w"]).reshape(D, N * H).T))
    return torch_model


def _injected(config=CONFIG, key: int = 2, scale: float = 0.3):
    """BASE injected at the products, with B ≠ 0 so that the branch counts."""
    params = jaxlora.inject(BASE, config, jax.random.key(key), layouts=LAYOUTS)["params"]
    for k, name in enumerate(
        n for n in ("c_attn", "q_proj") if n in params and "lora_b" in params[n]
    ):
        b = params[name]["lora_b"]
        params[name]["lora_b"] = scale * jax.random.normal(jax.random.key(key + 10 + k), b.shape)
    return params


def _outputs(params, config) -> np.ndarray:
    with jaxlora.intercept(config):
        c, q = MODEL.apply({"params": params}, jnp.asarray(X))
    return np.concatenate([np.asarray(c).ravel(), np.asarray(q).ravel()])


def _torch_outputs(torch_model) -> np.ndarray:
    with torch.no_grad():
        c, q = torch_model.eval()(_t(X))
    return np.concatenate([c.numpy().ravel(), q.numpy().ravel()])


def _close(got, want, tol=1e-5):
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def _lora(params) -> dict:
    return {
        (name, leaf): np.asarray(params[name][leaf])
        for name in params
        for leaf in ("lora_a", "lora_b")
        if leaf in params[name]
    }


def _peft_trained(directory, conv1d: bool, steps: int = 3, **options) -> np.ndarray:
    """A PEFT adapter trained (Adam, a few steps) on the torch twin, saved to ``directory``;
    returns the trained PEFT model's outputs."""
    torch.manual_seed(0)
    peft_model = get_peft_model(_twin(conv1d), LoraConfig(r=R, lora_alpha=ALPHA, **options))
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    target = torch.randn(B, T, D), torch.randn(B, T, N * H)
    for _ in range(steps):
        c, q = peft_model(_t(X))
        loss = ((c - target[0]) ** 2).mean() + ((q - target[1]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.save_pretrained(str(directory))
    return _torch_outputs(peft_model)


@pytest.mark.parametrize(
    "path_map",
    [None, {**CONV1D, "q_proj": jaxlora.HFLinear("q_proj", out_axes=(2, 1))}],
    ids=["same-paths", "conv1d-and-permuted-heads"],
)
def test_save_then_load_is_exact(tmp_path, path_map):
    params = _injected()
    jaxlora.save_adapter(params, tmp_path, CONFIG, path_map=path_map)
    other = _injected(key=5)
    loaded = jaxlora.load_adapter(other, tmp_path, path_map=path_map)
    got, want = _lora(loaded), _lora(params)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
        assert got[key].dtype == want[key].dtype
    assert loaded["c_attn"]["lora_roles"] == params["c_attn"]["lora_roles"]
    np.testing.assert_array_equal(_outputs(loaded, CONFIG), _outputs(params, CONFIG))


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_peft_trained_adapter_gives_peft_outputs(tmp_path, use_rslora):
    """Trained with the real PEFT on the Linear twin (rsLoRA, an alpha pattern), loaded into
    the Linen tree injected with layouts: PEFT's outputs, with the config the file gives."""
    want = _peft_trained(
        tmp_path,
        conv1d=False,
        target_modules=["c_attn", "q_proj"],
        use_rslora=use_rslora,
        alpha_pattern={"q_proj": 3.0},
    )
    params = jaxlora.load_adapter(_injected(), tmp_path)
    config = jaxlora.read_adapter_config(tmp_path, path_map=None)
    assert config.alpha_for("q_proj") == 3.0 and config.use_rslora == use_rslora
    assert np.abs(_outputs(params, config) - _torch_outputs(_twin(False))).max() > 1e-2
    _close(_outputs(params, config), want)


def test_peft_trained_conv1d_adapter_loads_with_fan_in_fan_out(tmp_path):
    """PEFT's adapter for a transformers Conv1D (``fan_in_fan_out=True``, as for GPT-2) loads
    where path_map says the module is a Conv1D: PEFT's outputs; the dict map's HFLinear also
    names the Flax path in ``read_adapter_config``."""
    want = _peft_trained(tmp_path, conv1d=True, target_modules=["c_attn"], fan_in_fan_out=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    config_c = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn"])
    params = jaxlora.load_adapter(_injected(config_c), tmp_path, path_map=CONV1D)
    config = jaxlora.read_adapter_config(tmp_path, path_map=CONV1D)
    assert config.rank_for("c_attn") == R and config.alpha_for("c_attn") == ALPHA
    _close(_outputs(params, config), want)


def test_conv1d_file_says_fan_in_fan_out_and_peft_loads_it_without_warning(tmp_path):
    """Written with a Conv1D map, the file says ``fan_in_fan_out: true``: the real PEFT loads it
    onto the Conv1D twin with no warning (pytest runs warnings-as-errors) and the same outputs."""
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn"])
    params = _injected(config)
    jaxlora.save_adapter(params, tmp_path, config, path_map=CONV1D)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True
    served = PeftModel.from_pretrained(_twin(True), str(tmp_path))
    _close(_torch_outputs(served), _outputs(params, config))
    loaded = jaxlora.load_adapter(_injected(config, key=7), tmp_path, path_map=CONV1D)
    np.testing.assert_array_equal(loaded["c_attn"]["lora_b"], params["c_attn"]["lora_b"])


def test_mixed_conv1d_and_linear_file_says_false(tmp_path):
    """A file with a Conv1D and a Linear module cannot say one fan_in_fan_out for both: it says
    false (PEFT sets the flag per module; the tensors are the same) and reads back."""
    params = _injected()
    jaxlora.save_adapter(params, tmp_path, CONFIG, path_map=CONV1D)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    loaded = jaxlora.load_adapter(_injected(key=5), tmp_path, path_map=CONV1D)
    np.testing.assert_array_equal(loaded["q_proj"]["lora_a"], params["q_proj"]["lora_a"])


def test_fan_in_fan_out_file_for_a_linear_is_refused(tmp_path):
    """A fan_in_fan_out file whose module path_map gives as an nn.Linear is refused by name,
    never transposed to fit (c_attn is square: the shapes alone would not tell)."""
    _peft_trained(tmp_path, conv1d=True, target_modules=["c_attn"], fan_in_fan_out=True)
    config_c = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn"])
    params = _injected(config_c)
    before = _lora(params)
    match = r"fan_in_fan_out=True, which is not supported for layer 'c_attn'.*nn\.Linear"
    with pytest.raises(ValueError, match=match):
        jaxlora.load_adapter(params, tmp_path)
    assert all(np.array_equal(v, before[k]) for k, v in _lora(params).items())


def _write(directory, tensors: dict, **config) -> None:
    """A PEFT adapter directory written by hand (as PEFT writes it: no embedded config)."""
    directory.mkdir(exist_ok=True)
    peft = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, **config}
    (directory / "adapter_config.json").write_text(json.dumps(peft))
    full = {f"base_model.model.{k}": np.asarray(v, np.float32) for k, v in tensors.items()}
    safetensors.numpy.save_file(full, str(directory / "adapter_model.safetensors"))


def _good() -> dict:
    rng = np.random.default_rng(0)
    return {
        "c_attn.lora_A.weight": rng.normal(size=(R, D)),
        "c_attn.lora_B.weight": rng.normal(size=(D, R)),
        "q_proj.lora_A.weight": rng.normal(size=(R, D)),
        "q_proj.lora_B.weight": rng.normal(size=(N * H, R)),
    }


@pytest.mark.parametrize(
    ("change", "config", "match"),
    [
        (
            {"q_proj.lora_B.weight": np.ones((N * H - 1, R))},
            {},
            r"'base_model\.model\.q_proj"
            r"\.lora_B\.weight' has shape \(31, 4\), expected \(32, 4\)",
        ),
        (
            {"c_attn.lora_A.weight": np.ones((R, D + 1))},
            {},
            r"c_attn\.lora_A\.weight' has "
            r"shape \(4, 17\), expected \(4, 16\)",
        ),
        (
            {"q_proj.lora_A.weight": np.ones((2, D)), "q_proj.lora_B.weight": np.ones((N * H, 2))},
            {"rank_pattern": {"q_proj": 2}},
            r"q_proj\.lora_A\.weight' has shape \(2, 16\), "
            r"expected \(4, 16\) \(rank 4",
        ),
        (
            {"q_proj.lora_A.weight": None, "q_proj.lora_B.weight": None},
            {},
            r"missing tensors for layer\(s\) \['q_proj'\]",
        ),
        (
            {"out.lora_A.weight": np.ones((R, D)), "out.lora_B.weight": np.ones((D, R))},
            {},
            r"\['out'\] are not in the model",
        ),
        (
            {
                "c_attn.lora_magnitude_vector": np.ones(D),
                "q_proj.lora_magnitude_vector": np.ones(N * H),
            },
            {"use_dora": True},
            r"DoRA adapter \(use_dora=true\) cannot be "
            r"loaded into adapters made at a weight's product \(c_attn, q_proj\)",
        ),
        ({}, {"init_lora_weights": "pissa"}, r"layer 'c_attn'.*init='pissa' adapter cannot"),
    ],
    ids=["B-out", "A-in", "rank", "missing", "unknown", "dora", "pissa"],
)
def test_file_that_does_not_match_the_tree_is_refused(tmp_path, change, config, match):
    tensors = {k: v for k, v in {**_good(), **change}.items() if v is not None}
    _write(tmp_path, tensors, target_modules=["c_attn", "q_proj"], **config)
    params = _injected()
    before = _lora(params)
    with pytest.raises(ValueError, match=match):
        jaxlora.load_adapter(params, tmp_path)
    assert all(np.array_equal(v, before[k]) for k, v in _lora(params).items())
    _accepts_the_matching_file(tmp_path / "good", params)


def _accepts_the_matching_file(directory, params) -> None:
    """The control: the same tree takes the matching file, whose tensors it then holds."""
    names = sorted(n for n in params if "lora_roles" in params[n])
    good = {k: v for k, v in _good().items() if k.split(".")[0] in names}
    _write(directory, good, target_modules=names)
    loaded = jaxlora.load_adapter(params, directory)
    for name in names:
        np.testing.assert_array_equal(
            np.asarray(loaded[name]["lora_a"]).T, good[f"{name}.lora_A.weight"].astype(np.float32)
        )


def test_layer_the_tree_does_not_adapt_is_refused(tmp_path):
    _write(tmp_path, _good(), target_modules=["c_attn", "q_proj"])
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn"])
    params = _injected(config)
    with pytest.raises(ValueError, match=r"unexpected tensors for layer\(s\) \['q_proj'\]"):
        jaxlora.load_adapter(params, tmp_path)
    _accepts_the_matching_file(tmp_path / "good", params)


def test_plain_tree_with_an_hflinear_map_is_refused(tmp_path):
    """Without layouts the product (hence the layout) is unknown: refused, saying to inject."""
    _write(
        tmp_path,
        {k: v for k, v in _good().items() if k.startswith("c_attn")},
        target_modules=["c_attn"],
        fan_in_fan_out=True,
    )
    with pytest.raises(ValueError, match=r"layer 'c_attn', which holds no adapter made at"):
        jaxlora.load_adapter(BASE["params"], tmp_path, path_map=CONV1D)


class NNXConv1D(nnx.Module):
    """transformers' ``FlaxConv1D`` in NNX: kernel (out, in), ``x @ kernel.T + bias``."""

    def __init__(self, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (D, D)) / 4.0)
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (D,)))

    def __call__(self, x):
        return x @ self.kernel[...].T + self.bias[...]


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.c_attn = NNXConv1D(rngs)

    def __call__(self, x):
        return self.c_attn(x)


def test_nnx_op_level_layers_share_the_conv1d_rule(tmp_path):
    """The NNX writer and reader use the same rule: a Conv1D map writes fan_in_fan_out and
    reads it back exactly; without it the file is refused by name."""
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn"])
    model = NNXBlock(nnx.Rngs(0))
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(jnp.asarray(X),))
    model.c_attn.lora_b[...] = jax.random.normal(jax.random.key(3), model.c_attn.lora_b.shape)
    jnnx.save_adapter(model, tmp_path, path_map=CONV1D)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    other = NNXBlock(nnx.Rngs(0))
    jnnx.inject(other, config, nnx.Rngs(5), inputs=(jnp.asarray(X),))
    with pytest.raises(ValueError, match=r"fan_in_fan_out=True, which is not supported for"):
        jnnx.load_adapter(other, tmp_path)
    plain = NNXBlock(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layer 'c_attn' \(a NNXConv1D\), which is not adapted"):
        jnnx.load_adapter(plain, tmp_path, path_map=CONV1D)
    jnnx.load_adapter(other, tmp_path, path_map=CONV1D)
    np.testing.assert_array_equal(other.c_attn.lora_a[...], model.c_attn.lora_a[...])
    np.testing.assert_array_equal(other.c_attn.lora_b[...], model.c_attn.lora_b[...])


def test_hflinear_for_a_dense_adapter_is_refused_on_save(tmp_path):
    """A Dense adapter (not made at a product) is one torch module named by a path: an
    HFLinear for it (say a Conv1D map on a tree injected without layouts) is refused by name
    instead of being written under a key made of its repr."""
    kernel = np.asarray(jax.random.normal(jax.random.key(0), (D, D)))
    params = {"params": {"out": {"kernel": kernel, "bias": np.zeros(D, np.float32)}}}
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["out"])
    params = jaxlora.inject(params, config, jax.random.key(1))
    with pytest.raises(ValueError, match=r"path_map gives HFLinear\(path='out'.* for layer 'out'"):
        jaxlora.save_adapter(params, tmp_path, config, path_map={"out": jaxlora.HFLinear("out")})
    assert not tmp_path.joinpath("adapter_config.json").exists()
    jaxlora.save_adapter(params, tmp_path, config, path_map={"out": "out"})
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is False and saved["target_modules"] == ["out"]


def test_embedded_config_must_agree_on_fan_in_fan_out(tmp_path):
    """The weights file embeds its config: a fan_in_fan_out edited in adapter_config.json only
    is a mismatch (two saves), refused."""
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["c_attn"])
    jaxlora.save_adapter(_injected(config), tmp_path, config, path_map=CONV1D)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": False}))
    with pytest.raises(ValueError, match=r"different saves.*fan_in_fan_out: True in"):
        jaxlora.load_adapter(_injected(config), tmp_path, path_map=CONV1D)
