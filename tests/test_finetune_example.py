"""The main example, in a reduced mode: it runs, writes its outputs, and JAX matches torch."""

from __future__ import annotations

import json

from safetensors.numpy import load_file

from tests.example_runner import run_example


def test_finetune_example_reduced(tmp_path):
    out = run_example(
        "finetune.py",
        "--steps",
        "12",
        "--eval-windows",
        "8",
        "--sample-length",
        "12",
        "--out",
        str(tmp_path),
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in (
        "loss_curves.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    # The same steps on the same batches from the same weights: the curves agree to fp32
    # rounding (measured ~1e-6 on the full run), and the adapters too.
    jax_losses, torch_losses = summary["jax_losses"], summary["torch_losses"]
    assert len(jax_losses) == len(torch_losses) == 12
    assert summary["max_loss_diff_jax_torch"] <= 1e-4 * max(torch_losses)
    assert summary["max_adapter_diff_jax_torch"] <= 1e-4
    assert summary["merge_max_logit_diff"] <= 1e-4
    assert jax_losses[-1] < jax_losses[0]  # even 12 steps move it
    # LoRA's accounting, from the files themselves.
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(v.size for v in adapter.values()) == summary["trainable"]
    assert summary["optimizer_state_bytes"] <= 2 * 4 * summary["trainable"] + 64
    assert summary["adapter_file_bytes"] < summary["full_checkpoint_bytes"] / 10
    for label in (
        "trainable parameters",
        "optimizer state",
        "adapter file",
        "held-out loss",
        "step time, JAX",
        "max |loss JAX - torch|",
        "sample before",
        "loss plot",
    ):
        assert label in out.stdout, label


def test_finetune_help_lists_the_options():
    out = run_example("finetune.py", "--help")
    for option in (
        "--steps",
        "--rank",
        "--alpha",
        "--targets",
        "--batch-size",
        "--seed",
        "--out",
        "--no-torch",
    ):
        assert option in out.stdout, option


def test_finetune_example_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        run_example(
            "finetune.py",
            "--steps",
            "5",
            "--eval-windows",
            "4",
            "--sample-length",
            "8",
            "--no-torch",
            "--seed",
            "3",
            "--out",
            str(tmp_path / name),
        )
        runs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    for key in ("jax_losses", "heldout_loss_after", "sample_after"):
        assert runs[0][key] == runs[1][key], key
    assert runs[0]["torch_losses"] is None  # --no-torch really skipped it


def test_finetune_example_sharded_on_a_mesh(tmp_path):
    """``--mesh data=2,fsdp=2,tensor=2`` on 8 simulated CPU devices: same curve as torch."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = run_example(
        "finetune.py",
        "--steps",
        "8",
        "--eval-windows",
        "4",
        "--sample-length",
        "8",
        "--mesh",
        "data=2,fsdp=2,tensor=2",
        "--out",
        str(tmp_path),
        env=env,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert "trained sharded on a" in out.stdout
    assert summary["max_loss_diff_jax_torch"] <= 1e-4 * max(summary["torch_losses"])
    assert summary["max_adapter_diff_jax_torch"] <= 1e-4
