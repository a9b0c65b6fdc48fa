"""Adapter files: round trips, strict loading, atomic saves, size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxlora
import jaxlora.adapter
import jaxlora.nnx
import torchlora
from torchlora.models import gpt as tgpt


def _tree(rng, sizes, r, dtype):
    """A params tree of Dense layers with random non-zero adapters in ``dtype``."""
    params = {}
    for i, (n_in, n_out) in enumerate(sizes):
        params[f"layer_{i}"] = {
            "kernel": jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32),
            "lora_a": jnp.asarray(rng.standard_normal((n_in, r)), dtype),
            "lora_b": jnp.asarray(rng.standard_normal((r, n_out)), dtype),
        }
    return params


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.tuples(st.integers(2, 40), st.integers(2, 40)), min_size=1, max_size=3),
    r_frac=st.floats(0, 1),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    seed=st.integers(0, 1000),
)
def test_roundtrip_bit_for_bit_jax_torch_jax(tmp_path_factory, sizes, r_frac, dtype, seed):
    r = 1 + int(r_frac * (min(min(s) for s in sizes) - 1))
    params = _tree(np.random.default_rng(seed), sizes, r, dtype)
    config = jaxlora.LoRAConfig(r=r, alpha=2 * r, targets=r"layer_\d")
    first, second = tmp_path_factory.mktemp("jax"), tmp_path_factory.mktemp("torch")
    jaxlora.save_adapter(params, first, config)
    plain = jaxlora.split(params)[1]
    loaded = jaxlora.load_adapter(plain, first)
    jax.tree.map(lambda a, b: _same_bits(a, b) or pytest.fail("bits differ"), loaded, params)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, (n_in, n_out) in enumerate(sizes):
                self.add_module(f"layer_{i}", torch.nn.Linear(n_in, n_out, dtype=torch.float32))

    model = torchlora.load_adapter(Net(), first)
    torch_dtype = {
        jnp.float32: torch.float32,
        jnp.bfloat16: torch.float32,
        jnp.float16: torch.float32,
    }[dtype]
    assert model.layer_0.lora_a.dtype == torch_dtype  # cast into the model's own dtype
    for i in range(len(sizes)):  # the model holds fp32, the values are exactly the file's
        layer = getattr(model, f"layer_{i}")
        np.testing.assert_array_equal(
            layer.lora_a.detach().numpy().T, np.asarray(params[f"layer_{i}"]["lora_a"], np.float32)
        )
    torchlora.save_adapter(model.to(_torch_dtype(dtype)), second)
    back = jaxlora.load_adapter(plain, second)
    jax.tree.map(lambda a, b: _same_bits(a, b) or pytest.fail("bits differ"), back, params)


def _torch_dtype(dtype):
    return {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}[
        dtype
    ]


def _gpt_adapter(tmp_path, **config):
    model = tgpt.GPT(tgpt.GPTConfig(vocab_size=64, block_size=16))
    torchlora.inject(
        model, torchlora.LoRAConfig(r=4, alpha=8, targets=["query", "value"], **config)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_()
    torchlora.save_adapter(model, tmp_path)
    return model


def test_file_holds_only_the_adapter_and_config(tmp_path):
    model = _gpt_adapter(tmp_path)
    adapter_bytes = sum(
        v.numel() * v.element_size() for v in torchlora.lora_state_dict(model).values()
    )
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes <= size <= adapter_bytes + 4096  # + the safetensors header
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {
        "peft_type",
        "target_modules",
        "r",
        "lora_alpha",
        "use_rslora",
        "lora_dropout",
        "rank_pattern",
        "alpha_pattern",
    } <= set(config)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_torch_roundtrip_into_injected_and_plain(tmp_path):
    model = _gpt_adapter(tmp_path)
    fresh = tgpt.GPT(tgpt.GPTConfig(vocab_size=64, block_size=16))
    fresh.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "lora" not in k}, strict=False
    )
    torchlora.load_adapter(fresh, tmp_path)
    for key, value in torchlora.lora_state_dict(model).items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert fresh.lora_config.r == 4


def _break(directory, how):
    weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    peft = json.loads(config.read_text())
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif how == "no-peft-type":
        del peft["peft_type"]
        config.write_text(json.dumps(peft))
    elif how == "other-type":
        config.write_text(json.dumps({**peft, "peft_type": "IA3"}))
    elif how == "r-disagrees":  # as a file written by PEFT (no embedded config) would be
        from safetensors.torch import load_file, save_file

        save_file(load_file(weights), weights, metadata={"format": "pt"})
        config.write_text(json.dumps({**peft, "r": 8}))
    elif how == "alpha-disagrees":
        config.write_text(json.dumps({**peft, "lora_alpha": 99}))
    elif how in ("missing", "unexpected", "shape", "non-finite", "bad-key"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        key = "base_model.model.blocks_0.attn.query.lora_A.weight"
        if how == "missing":
            del tensors[key]
        elif how == "unexpected":
            tensors["base_model.model.blocks_0.attn.key.lora_A.weight"] = tensors[key].clone()
            tensors["base_model.model.blocks_0.attn.key.lora_B.weight"] = tensors[
                key.replace("lora_A", "lora_B")
            ].clone()
        elif how == "shape":
            tensors[key] = torch.zeros(4, 63)
        elif how == "non-finite":
            tensors[key] = tensors[key].clone()
            tensors[key][0, 0] = float("nan")
        else:
            tensors["base_model.model.blocks_0.attn.query.weight"] = tensors.pop(key)
        save_file(tensors, weights, metadata={"format": "pt"})


BROKEN = {
    "truncated": "cannot be read as safetensors, it may be truncated",
    "garbage": "cannot be read as safetensors",
    "no-peft-type": "has no 'peft_type'",
    "other-type": "peft_type 'IA3'",
    "r-disagrees": "has rank 4 in its tensors but 8 in adapter_config.json",
    "alpha-disagrees": "come from different saves",
    "missing": r"missing tensor 'base_model\.model\.blocks_0\.attn\.query\.lora_A\.weight'",
    "unexpected": r"unexpected tensors for layer\(s\) \['blocks_0\.attn\.key'\]",
    "shape": r"'base_model\.model\.blocks_0\.attn\.query\.lora_A\.weight' has shape \(4, 63\), "
    r"expected \(4, 64\)",
    "non-finite": r"non-finite values in 'base_model\.model\.blocks_0\.attn\.query\.lora_A",
    "bad-key": r"unexpected tensor 'base_model\.model\.blocks_0\.attn\.query\.weight'",
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_strict_loading_changes_nothing(tmp_path, how):
    _gpt_adapter(tmp_path)
    _break(tmp_path, how)
    # torch, plain model: not injected by a failed load
    model = tgpt.GPT(tgpt.GPTConfig(vocab_size=64, block_size=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=BROKEN[how]):
        torchlora.load_adapter(model, tmp_path)
    assert not any(isinstance(m, torchlora.Linear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # torch, injected model: adapters untouched
    torchlora.inject(model, torchlora.LoRAConfig(r=4, targets=["query", "value"]))
    lora_before = {k: v.clone() for k, v in torchlora.lora_state_dict(model).items()}
    with pytest.raises(ValueError, match=BROKEN[how]):
        torchlora.load_adapter(model, tmp_path)
    assert all(torch.equal(v, lora_before[k]) for k, v in torchlora.lora_state_dict(model).items())
    # JAX, plain tree
    from jaxlora.models import gpt as jgpt

    params = jgpt.from_torch_state_dict(before)
    with pytest.raises(ValueError, match=BROKEN[how]):
        jaxlora.load_adapter(params, tmp_path)
    # NNX, plain model
    nnx_model = jgpt.load_nnx(
        jgpt.NnxGPT(jgpt.GPTConfig(vocab_size=64, block_size=16), rngs=nnx.Rngs(0)), params
    )
    with pytest.raises(ValueError, match=BROKEN[how]):
        jaxlora.nnx.load_adapter(nnx_model, tmp_path)
    assert not any(isinstance(m, jaxlora.nnx.LoRALinear) for _, m in nnx.iter_modules(nnx_model))


def test_rank_mismatch_with_injected_model_is_refused(tmp_path):
    _gpt_adapter(tmp_path)
    model = tgpt.GPT(tgpt.GPTConfig(vocab_size=64, block_size=16))
    torchlora.inject(model, torchlora.LoRAConfig(r=2, targets=["query", "value"]))
    with pytest.raises(ValueError, match="has rank 4 in the file but 2 in the model"):
        torchlora.load_adapter(model, tmp_path)


def test_non_finite_adapter_is_not_saved(tmp_path):
    params = _tree(np.random.default_rng(0), [(4, 4)], 2, jnp.float32)
    params["layer_0"]["lora_b"] = params["layer_0"]["lora_b"].at[0, 0].set(jnp.inf)
    with pytest.raises(
        ValueError,
        match=r"non-finite values in 'base_model\.model\.layer_0\."
        r"lora_B\.weight'",
    ):
        jaxlora.save_adapter(params, tmp_path, jaxlora.LoRAConfig(r=2, targets=["layer_0"]))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fail_at", [0, 1], ids=["weights", "config"])
def test_failure_mid_write_keeps_the_previous_adapter(tmp_path, monkeypatch, fail_at):
    """A write that fails part-way, in either file, leaves both previous files as they were
    (both temporary files are written before either is renamed into place)."""
    from _loracore import safe_files

    config = jaxlora.LoRAConfig(r=2, targets=["layer_0"])
    old = _tree(np.random.default_rng(0), [(8, 8)], 2, jnp.float32)
    jaxlora.save_adapter(old, tmp_path, config)
    old_bytes = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real, calls = safe_files._temp, []

    def failing_temp(final, write):
        calls.append(final.name)
        if len(calls) - 1 != fail_at:
            return real(final, write)

        def partial(f):
            f.write(b"partial")
            raise OSError("disk full (injected)")

        return real(final, partial)

    monkeypatch.setattr(safe_files, "_temp", failing_temp)
    new = _tree(np.random.default_rng(1), [(8, 8)], 2, jnp.float32)
    with pytest.raises(OSError, match="injected"):
        jaxlora.save_adapter(new, tmp_path, config)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old_bytes  # no temp files
    loaded = jaxlora.load_adapter(jaxlora.split(old)[1], tmp_path)
    np.testing.assert_array_equal(loaded["layer_0"]["lora_a"], old["layer_0"]["lora_a"])


SAVER = textwrap.dedent("""
    import sys, numpy as np, jax.numpy as jnp, jaxlora
    d, seed = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(seed)
    params = {"big": {"kernel": jnp.zeros((2048, 2048)),
                      "lora_a": jnp.asarray(rng.standard_normal((2048, 512)), jnp.float32),
                      "lora_b": jnp.full((512, 2048), float(seed), jnp.float32)}}
    print("ready", flush=True)
    while True:
        jaxlora.save_adapter(params, d, jaxlora.LoRAConfig(r=512, targets=["big"]))
""")


def test_killed_save_leaves_a_complete_adapter(tmp_path):
    """SIGKILL a process that saves in a loop: what is on disk always loads, old or new."""
    config = jaxlora.LoRAConfig(r=512, targets=["big"])
    base = {"big": {"kernel": jnp.zeros((2048, 2048))}}
    jaxlora.save_adapter(
        {
            "big": {
                **base["big"],
                "lora_a": jnp.zeros((2048, 512)),
                "lora_b": jnp.zeros((512, 2048)),
            }
        },
        tmp_path,
        config,
    )
    for _ in range(5):
        seen = {p.name for p in tmp_path.iterdir()}
        with subprocess.Popen(
            [sys.executable, "-c", SAVER, str(tmp_path), "7"], stdout=subprocess.PIPE, text=True
        ) as proc:
            assert proc.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # kill as soon as a new temp file is being written
                if any(p.name.endswith(".tmp") and p.name not in seen for p in tmp_path.iterdir()):
                    break
                time.sleep(0.0005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        try:
            loaded = jaxlora.load_adapter(base, tmp_path)
        except ValueError as err:  # only the microsecond window between the two renames
            assert "come from different saves" in str(err)
            continue
        assert float(loaded["big"]["lora_b"][0, 0]) in (0.0, 7.0)
    # The kills landed mid-write (a SIGKILL leaves its temp file, which nothing ever reads).
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
