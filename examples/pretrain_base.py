"""Produces the small pretrained base that ``finetune.py`` adapts: the twin GPT trained on
CPython's documentation text (``pydoc_data.topics``), byte level.

The result ships in ``examples/base/`` (weights in the torch GPT's state-dict layout, as
safetensors, plus a JSON card), so the main example needs no download and no long pretraining.
Re-create it with:

    python examples/pretrain_base.py            # about 5 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import safetensors.numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus

from jaxlora.models.gpt import GPT, GPTConfig, to_torch_state_dict

BASE_DIR = Path(__file__).resolve().parent / "base"
CONFIG = GPTConfig(vocab_size=256, block_size=128, n_layer=3, n_head=4, d_model=96)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=BASE_DIR)
    args = parser.parse_args()
    text = corpus.docs_text()
    data = corpus.encode(text)
    model = GPT(CONFIG)
    seq = CONFIG.block_size
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, seq), jnp.int32))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, args.steps, 3e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

    @jax.jit
    def step(params, opt_state, tokens):
        def loss_fn(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, start = tx.init(params), time.time()
    batches = corpus.sample_batches(data, args.steps, args.batch, seq, args.seed)
    for i, tokens in enumerate(batches):
        params, opt_state, loss = step(params, opt_state, tokens)
        if i % 100 == 0 or i == args.steps - 1:
            print(f"step {i:5d}  loss {float(loss):.3f}  ({time.time() - start:.0f}s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    state = to_torch_state_dict(params)
    safetensors.numpy.save_file(state, args.out / "gpt_docs.safetensors", metadata={"format": "pt"})
    card = {
        "model": "twin GPT (torchlora.models.gpt / jaxlora.models.gpt), byte-level",
        "config": CONFIG.__dict__,
        "data": "pydoc_data.topics (CPython documentation), sorted topics joined by blank lines",
        "data_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "python": platform.python_version(),
        "steps": args.steps,
        "batch": args.batch,
        "seq": seq,
        "seed": args.seed,
        "optimizer": "clip 1.0 + AdamW(warmup-cosine 3e-3 -> 3e-4, weight_decay 0.01)",
        "final_train_loss": float(loss),
        "parameters": int(sum(v.size for v in state.values())),
    }
    (args.out / "gpt_docs.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"saved {args.out / 'gpt_docs.safetensors'}")


if __name__ == "__main__":
    main()
