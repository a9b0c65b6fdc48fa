"""LoRA fine-tune of a small pretrained GPT, in JAX and (from the same start) in PyTorch.

The base (``examples/base/``, made by ``pretrain_base.py``) is a byte-level GPT trained on
CPython's documentation text; it is fine-tuned here on the standard library's source code,
which ships with Python, with LoRA on the attention query and value projections. The torch
reference runs the same steps on the same batches from the same weights, and the two loss
curves are compared. Nothing is downloaded.

    python examples/finetune.py            # ~1-2 minutes on a 2-core CPU
    python examples/finetune.py --help
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus

import jaxlora
from jaxlora.host import keep_freed_memory
from jaxlora.models import gpt as jgpt

BASE = Path(__file__).resolve().parent / "base" / "gpt_docs.safetensors"
PROMPT = "    def "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=400, help="training steps")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument(
        "--targets",
        default="query,value",
        help="comma-separated layer names to adapt (PEFT target_modules semantics)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for LoRA init and batch order")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out sequences to score")
    p.add_argument("--sample-length", type=int, default=120, help="bytes to generate")
    p.add_argument("--out", type=Path, default=Path("out/finetune"), help="output directory")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference run")
    p.add_argument(
        "--mesh",
        default=None,
        metavar="data=2,fsdp=2,tensor=2",
        help="train sharded on a device mesh (data/FSDP/tensor parallel); on a CPU "
        "simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=8",
    )
    return p.parse_args(argv)


def make_mesh(spec: str) -> Mesh:
    sizes = dict.fromkeys(("data", "fsdp", "tensor"), 1)
    for part in spec.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in sizes or not size.strip().isdigit():
            raise SystemExit(f"--mesh: expected e.g. data=2,fsdp=2,tensor=2, got {spec!r}")
        sizes[name.strip()] = int(size)
    needed, devices = int(np.prod(list(sizes.values()))), jax.devices()
    if needed > len(devices):
        raise SystemExit(
            f"--mesh {spec} needs {needed} devices, JAX sees {len(devices)}; on a "
            "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
    return Mesh(np.array(devices[:needed]).reshape(tuple(sizes.values())), tuple(sizes))


def load_base() -> tuple[jgpt.GPTConfig, dict, dict]:
    state = safetensors.numpy.load_file(BASE)
    card = json.loads(BASE.with_suffix(".json").read_text())
    return jgpt.GPTConfig(**card["config"]), state, jgpt.from_torch_state_dict(state)


def xent(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def train_jax(model, params, config, batches, lr, mesh=None):
    tx = jaxlora.freeze_base(optax.adamw(lr, weight_decay=0.01))
    put, out_shardings = (lambda tokens: tokens), None
    if mesh is not None:  # LoRA leaves follow their kernels (jaxlora.partition_specs)
        specs = jaxlora.partition_specs(params, jgpt.partition_rules(jaxlora.split(params)[1]))
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        params = jax.device_put(params, shardings)
        batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
        put, out_shardings = (lambda t: jax.device_put(t, batch_sharding)), (shardings, None, None)

    # The step's params and optimizer state are donated: XLA updates them in place instead of
    # writing new buffers (the caller's tree is copied first, so it stays usable).
    params = jax.tree.map(jnp.copy, params)

    @functools.partial(jax.jit, out_shardings=out_shardings, donate_argnums=(0, 1))
    @jaxlora.intercept(config)
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(
            lambda p: xent(model.apply({"params": p}, tokens[:, :-1]), tokens)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses, times = tx.init(params), [], []
    for tokens in tqdm(batches, desc="JAX   LoRA", unit="step", leave=True):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, put(tokens))
        losses.append(float(loss))  # float() waits for the step to finish
        times.append(time.perf_counter() - start)
    return params, opt_state, np.array(losses), statistics.median(times[1:] or times)


def train_torch(cfg, state, start_params, config, batches, lr):
    import torch
    import torch.nn.functional as F

    import torchlora
    from torchlora.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg.__dict__))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    torchlora.inject(
        model, torchlora.LoRAConfig(r=config.r, alpha=config.alpha, targets=config.targets)
    )
    start = jgpt.to_torch_state_dict(start_params)  # the JAX run's initial adapter
    torchlora.set_adapter(
        model,
        {k: torch.from_numpy(v) for k, v in start.items() if k.endswith(("lora_a", "lora_b"))},
    )
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01
    )
    losses, times = [], []
    for tokens in tqdm(batches, desc="torch LoRA", unit="step", leave=True):
        t0 = time.perf_counter()
        t = torch.from_numpy(tokens.astype(np.int64))
        logits = model(t[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    adapter = {k: v.numpy() for k, v in torchlora.lora_state_dict(model).items()}
    return np.array(losses), statistics.median(times[1:] or times), adapter


def generate(logits_fn, params, prompt: str, length: int, block: int, seed: int) -> str:
    """Sampling at temperature 0.7 with a fixed key (deterministic), one jitted call per byte."""
    tokens, key = list(corpus.encode(prompt)), jax.random.key(seed)
    for _ in range(length):
        window = tokens[-block:]
        padded = np.zeros((1, block), np.int32)
        padded[0, : len(window)] = window
        key, sub = jax.random.split(key)
        logits = logits_fn(params, padded)[0, len(window) - 1]
        tokens.append(int(jax.random.categorical(sub, logits / 0.7)))
    return corpus.decode(tokens)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Before JAX runs anything: XLA:CPU's per-step scratch buffer is reused instead of being
    # mapped and faulted in afresh on every step (glibc; both engines' steps gain).
    keep_freed_memory()
    args.out.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_default_matmul_precision", "highest")  # fp32 for the comparison
    device = jax.devices()[0]
    cfg, state, base = load_base()
    model = jgpt.GPT(cfg)
    seq = cfg.block_size
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    config = jaxlora.LoRAConfig(r=args.rank, alpha=args.alpha, targets=targets)
    train = corpus.encode(corpus.stdlib_text(corpus.TRAIN_MODULES))
    heldout = corpus.eval_windows(
        corpus.encode(corpus.stdlib_text(corpus.HELDOUT_MODULES)), seq, args.eval_windows
    )
    batches = corpus.sample_batches(train, args.steps, args.batch_size, seq, args.seed)
    print(
        f"JAX on {device.platform.upper()} ({device.device_kind}); base: {cfg.n_layer}-layer "
        f"GPT, d={cfg.d_model}, trained on CPython's docs; new domain: stdlib source "
        f"({len(train):,} bytes of {len(corpus.TRAIN_MODULES)} modules)"
    )

    params = jaxlora.inject(base, config, jax.random.key(args.seed))
    start = params
    report = jaxlora.trainable_parameters(params)

    @jax.jit
    @jaxlora.intercept(config)
    def logits_fn(params, tokens):
        return model.apply({"params": params}, tokens)

    def heldout_loss(p):
        return float(np.mean([xent(logits_fn(p, w[None, :-1]), w[None]) for w in heldout]))

    loss_before = heldout_loss(start)
    sample_before = generate(logits_fn, start, PROMPT, args.sample_length, seq, args.seed)

    mesh = make_mesh(args.mesh) if args.mesh else None
    params, opt_state, jax_losses, jax_step = train_jax(
        model, params, config, batches, args.lr, mesh
    )
    if mesh is not None:
        print(f"trained sharded on a {dict(mesh.shape)} mesh of {mesh.devices.size} devices")
        params = jax.device_get(params)
    loss_after = heldout_loss(params)
    sample_after = generate(logits_fn, params, PROMPT, args.sample_length, seq, args.seed)

    # Merge for inference and check it computes the same thing with the plain model.
    merged = jaxlora.merge(params, alpha=config.alpha)
    probe = heldout[:8, :-1]
    merge_diff = float(
        jnp.max(jnp.abs(model.apply({"params": merged}, probe) - logits_fn(params, probe)))
    )

    adapter_dir = jaxlora.save_adapter(params, args.out / "adapter", config)
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    full_state = jax.eval_shape(optax.adamw(args.lr).init, base)

    torch_losses = torch_step = torch_diff = adapter_diff = None
    if not args.no_torch:
        torch_losses, torch_step, torch_adapter = train_torch(
            cfg, state, start, config, batches, args.lr
        )
        torch_diff = float(np.max(np.abs(torch_losses - jax_losses)))
        jax_adapter = jgpt.to_torch_state_dict(params)
        adapter_diff = max(
            float(np.max(np.abs(jax_adapter[k] - v))) for k, v in torch_adapter.items()
        )

    plot = plot_losses(args.out / "loss_curves.png", jax_losses, torch_losses)
    summary = {
        "device": device.platform,
        "steps": args.steps,
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "trainable": report.trainable,
        "total": report.total,
        "percent": report.percent,
        "optimizer_state_bytes": nbytes(opt_state),
        "full_optimizer_state_bytes": nbytes(full_state),
        "adapter_file_bytes": adapter_bytes,
        "full_checkpoint_bytes": BASE.stat().st_size,
        "heldout_loss_before": loss_before,
        "heldout_loss_after": loss_after,
        "jax_step_s": jax_step,
        "torch_step_s": torch_step,
        "max_loss_diff_jax_torch": torch_diff,
        "max_adapter_diff_jax_torch": adapter_diff,
        "merge_max_logit_diff": merge_diff,
        "jax_losses": jax_losses.tolist(),
        "torch_losses": None if torch_losses is None else torch_losses.tolist(),
        "sample_before": sample_before,
        "sample_after": sample_after,
        "adapter_dir": str(adapter_dir),
        "plot": str(plot),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def plot_losses(path: Path, jax_losses, torch_losses) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, diff_ax) = plt.subplots(
        2, 1, figsize=(7, 5.2), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot(jax_losses, label="JAX (jaxlora, Linen + freeze_base)", lw=2.2)
    if torch_losses is not None:
        ax.plot(torch_losses, "--", label="PyTorch (torchlora reference)", lw=1.4)
        diff_ax.semilogy(
            np.abs(np.asarray(jax_losses) - np.asarray(torch_losses)) + 1e-12, color="gray", lw=0.8
        )
    diff_ax.set(xlabel="step", ylabel="|JAX - torch|")
    ax.set(
        ylabel="training loss (nats/byte)", title="LoRA fine-tune: CPython docs GPT → stdlib source"
    )
    for axis in (ax, diff_ax):
        axis.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def print_summary(s: dict) -> None:
    def mb(n):
        return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

    ppl = f"{np.exp(s['heldout_loss_before']):.2f} → {np.exp(s['heldout_loss_after']):.2f}"
    rows = [
        ("trainable parameters", f"{s['trainable']:,} of {s['total']:,} ({s['percent']:.2f}%)"),
        (
            "optimizer state (AdamW)",
            f"{mb(s['optimizer_state_bytes'])} vs "
            f"{mb(s['full_optimizer_state_bytes'])} for a full fine-tune",
        ),
        (
            "adapter file (PEFT)",
            f"{mb(s['adapter_file_bytes'])} vs {mb(s['full_checkpoint_bytes'])} full checkpoint",
        ),
        (
            "held-out loss (stdlib)",
            f"{s['heldout_loss_before']:.3f} → {s['heldout_loss_after']:.3f} nats/byte",
        ),
        ("held-out perplexity", ppl),
        ("step time, JAX", f"{1e3 * s['jax_step_s']:.1f} ms ({s['device']})"),
    ]
    if s["torch_step_s"] is not None:
        rows += [
            ("step time, PyTorch", f"{1e3 * s['torch_step_s']:.1f} ms (cpu)"),
            (
                "max |loss JAX - torch|",
                f"{s['max_loss_diff_jax_torch']:.2e} over {s['steps']} steps",
            ),
            ("max |adapter JAX - torch|", f"{s['max_adapter_diff_jax_torch']:.2e}"),
        ]
    rows.append(("merged vs unmerged logits", f"max diff {s['merge_max_logit_diff']:.2e}"))
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"\n  sample before: {s['sample_before']!r}")
    print(f"  sample after:  {s['sample_after']!r}")
    print(f"\n  adapter (PEFT format): {s['adapter_dir']}\n  loss plot: {s['plot']}")


if __name__ == "__main__":
    main()
