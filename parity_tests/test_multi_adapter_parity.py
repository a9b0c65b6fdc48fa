"""Many adapters in one batch against PEFT's mixed-batch forward (``adapter_names=``).

The same PEFT adapter files (different ranks, alphas and a rank pattern) are loaded into a
``PeftModel`` under several names and into a jaxlora stack (Linen and NNX) of the twin GPT; one
batch mixing them (and the base, PEFT's ``"__base__"``, our ``-1``) gives the same logits.
PEFT 0.21's ``LoraLayer._mixed_batch_forward`` runs the base layer on the whole batch and adds
each adapter's ``lora_B(lora_A(x[rows])) * scaling`` to its rows, skipping ``"__base__"``.
"""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel

import jaxlora
import jaxlora.nnx as jnnx
from jaxlora.models import gpt as jgpt
from parity_tests.twins import rel_err
from torchlora.models import gpt as tgpt

GPT_CFG = dict(vocab_size=96, block_size=32, n_layer=2, n_head=4, d_model=64)
TOL = 1e-5  # fp32 forward through the model, as in the GPT parity tests
CONFIGS = [
    jaxlora.LoRAConfig(r=8, alpha=16, targets=["query", "value"]),
    jaxlora.LoRAConfig(
        r=4, alpha=4, targets=["query", "value"], rank_pattern={"blocks_1.attn.value": 2}
    ),
    jaxlora.LoRAConfig(r=2, alpha=8, targets=["query", "value"], use_rslora=True),
]
NAMES = ["a1", "__base__", "a0", "a2", "a1", "a0"]
INDEX = jnp.array([-1 if n == "__base__" else int(n[1:]) for n in NAMES])
TOKENS = np.random.default_rng(1).integers(0, GPT_CFG["vocab_size"], (len(NAMES), 24))


def _random_adapter(params, seed):
    key = iter(jax.random.split(jax.random.key(seed), 64))

    def fill(path, value):
        if path[-1].key in ("lora_a", "lora_b"):
            return jax.random.normal(next(key), value.shape) * 0.2
        return value

    return jax.tree_util.tree_map_with_path(fill, params)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The torch base, its Linen params and three adapter files written by jaxlora."""
    root = tmp_path_factory.mktemp("multi")
    torch.manual_seed(0)
    base = tgpt.GPT(tgpt.GPTConfig(**GPT_CFG))
    params = jgpt.from_torch_state_dict(base.state_dict())
    dirs = []
    for i, config in enumerate(CONFIGS):
        adapter = _random_adapter(jaxlora.inject(params, config, jax.random.key(i)), 10 + i)
        jaxlora.save_adapter(adapter, root / f"a{i}", config)
        dirs.append(root / f"a{i}")
    return base, params, dirs


@pytest.fixture(scope="module")
def peft_mixed(files):
    base, _, dirs = files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a0")
        for i, directory in enumerate(dirs[1:], start=1):
            model.load_adapter(str(directory), adapter_name=f"a{i}")
    assert not caught, [str(w.message) for w in caught]
    model.eval()
    with torch.no_grad():
        mixed = model(torch.from_numpy(TOKENS), adapter_names=NAMES).numpy()
        alone = []  # each row with its own adapter alone, PEFT's ordinary forward
        for row, name in enumerate(NAMES):
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model(torch.from_numpy(TOKENS[row : row + 1]))[0].numpy())
            else:
                model.set_adapter(name)
                alone.append(model(torch.from_numpy(TOKENS[row : row + 1]))[0].numpy())
    return mixed, np.stack(alone)


def test_peft_mixed_batch_is_per_row_single_adapter(peft_mixed):
    mixed, alone = peft_mixed  # the reference itself: what adapter_names= promises
    assert rel_err(mixed, alone) <= TOL
    assert rel_err(mixed[1], mixed[2]) > 1e-2  # the adapters really change the logits


def test_linen_stack_matches_peft_mixed_batch(files, peft_mixed):
    _, params, dirs = files
    adapters = [
        (jaxlora.load_adapter(params, d), jaxlora.read_adapter_config(d, path_map=None))
        for d in dirs
    ]
    stack = jaxlora.stack_adapters(adapters, capacity=4)
    model = jgpt.GPT(jgpt.GPTConfig(**GPT_CFG))

    @jax.jit
    def forward(stack, params, tokens, index):
        with jaxlora.intercept_stack(stack, index):
            return model.apply({"params": params}, tokens)

    y = forward(stack, params, jnp.asarray(TOKENS), INDEX)
    assert rel_err(y, peft_mixed[0]) <= TOL


def test_nnx_stack_matches_peft_mixed_batch(files, peft_mixed):
    _, params, dirs = files
    base = jgpt.load_nnx(jgpt.NnxGPT(jgpt.GPTConfig(**GPT_CFG), rngs=nnx.Rngs(0)), params)
    sources = [jnnx.load_adapter(nnx.clone(base), d) for d in dirs]
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=4, rank=8)
    for slot, source in enumerate(sources):
        jnnx.set_adapter(serving, slot, source)

    @nnx.jit
    def forward(model, tokens, index):
        with jnnx.adapter_index(index):
            return model(tokens)

    y = forward(serving, jnp.asarray(TOKENS), INDEX)
    assert rel_err(y, peft_mixed[0]) <= TOL
