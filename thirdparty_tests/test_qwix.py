"""Adapters trained with the real qwix 0.1.8 on tunix 0.1.7's Llama3, read into jaxlora
(``jaxlora.nnx.from_qwix``), merged, and served by the real ``peft`` on transformers' torch
twin holding the same base weights.

Tolerances (fp32, relative to max |logit|): the qwix model and the converted jaxlora model
compute the same sums in a different association (qwix: one 3-operand einsum times
alpha/r; jaxlora: two products with the scaling folded in), so they agree to rounding:
``SAME`` = 1e-5 (about 100 fp32 ulps of the logit scale); merging adds one rounding of each
weight (also ``SAME``);
PEFT on torch is another framework: ``TOL`` = 1e-4 as in test_tunix.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import nnx

from jaxlora import nnx as jnnx
from parity_tests.twins import peft_load
from thirdparty_tests.twins import (
    TOKENS,
    TOL,
    base_state,
    pure,
    rel_err,
    torch_logits,
    trees_equal,
    tunix_inputs,
    tunix_twins,
)

SAME = 1e-5
R, ALPHA = 4, 8.0
TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
SPEC = next(t for t in tunix_twins() if t.name == "llama3")


def _logits(model: nnx.Module) -> np.ndarray:
    return np.asarray(model(*tunix_inputs())[0])


def _provider(**rule) -> qwix.LoraProvider:
    return qwix.LoraProvider(**{"module_path": TARGETS, "rank": R, "alpha": ALPHA, **rule})


def _train(model: nnx.Module, steps: int = 5) -> list[float]:
    def loss_fn(model):
        logits = model(*tunix_inputs())[0][:, :-1]
        labels = jnp.asarray(TOKENS)[:, 1:]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(HF checkpoint directory, the trained qwix model, its logits, the base logits)."""
    directory = str(tmp_path_factory.mktemp("llama3"))
    SPEC.hf_model().save_pretrained(directory)
    base = SPEC.tunix_load(directory)
    y_base = _logits(base)
    qwix_model = qwix.apply_lora_to_model(base, _provider(), *tunix_inputs(), rngs=nnx.Rngs(1))
    losses = _train(qwix_model)
    assert losses[-1] < losses[0], losses
    y_qwix = _logits(qwix_model)
    assert rel_err(y_qwix, y_base) > 1e-3  # B ≠ 0: the adapters count
    return directory, qwix_model, y_qwix, y_base


def _converted(directory: str, lora, rules=None) -> nnx.Module:
    model = SPEC.tunix_load(directory)
    return jnnx.from_qwix(model, lora, rules or _provider(), inputs=tunix_inputs())


def test_qwix_adapter_gives_same_logits_merges_and_is_served_by_peft(trained, tmp_path):
    directory, qwix_model, y_qwix, _ = trained
    model = _converted(directory, nnx.state(qwix_model, nnx.LoRAParam))
    y_jax = _logits(model)
    assert rel_err(y_jax, y_qwix) <= SAME
    # The whole qwix state as a plain dict (an orbax restore): the same adapters.
    from_dict = _converted(directory, pure(nnx.state(qwix_model)))
    np.testing.assert_array_equal(_logits(from_dict), y_jax)

    jnnx.save_adapter(model, tmp_path, path_map="tunix.llama3")
    hf = type(SPEC.hf_model()).from_pretrained(directory).eval()
    peft_model = peft_load(hf, tmp_path)
    assert rel_err(torch_logits(peft_model), y_qwix) <= TOL

    jnnx.merge(model)
    assert not nnx.state(model, nnx.LoRAParam)
    assert rel_err(_logits(model), y_qwix) <= SAME


def _lora(qwix_model) -> dict:
    return pure(nnx.state(qwix_model, nnx.LoRAParam))


def _edit(qwix_model, edit) -> dict:
    lora = _lora(qwix_model)
    edit(lora)
    return lora


REFUSALS = {
    "missing_b": (
        lambda lo: lo["layers"][0]["attn"]["q_proj"].pop("w_lora_b"),
        None,
        r"layer 'layers\.0\.attn\.q_proj', weight 'w': w_lora_b is missing",
    ),
    "extra_module": (
        lambda lo: lo["layers"][0]["attn"].update(
            {"xq_proj": {"w_lora_a": np.zeros((64, R)), "w_lora_b": np.zeros((R, 64))}}
        ),
        None,
        r"layer 'layers\.0\.attn\.xq_proj', weight 'w': the model has no module",
    ),
    "misshaped": (
        lambda lo: lo["layers"][1]["attn"]["k_proj"].update({"w_lora_b": np.zeros((R, 32))}),
        None,
        r"layer 'layers\.1\.attn\.k_proj', w_lora_b: shape \(4, 32\), expected \(4, 2, 16\)",
    ),
    "rank": (lambda lo: None, {"rank": 2}, r"its rank 4 is not the rule's 2"),
    "not_adaptable": (  # the embedding table is looked up, not multiplied
        lambda lo: lo.update(
            {
                "embedder": {
                    "input_embedding_lora_a": np.zeros((128, R)),
                    "input_embedding_lora_b": np.zeros((R, 64)),
                }
            }
        ),
        None,
        r"'embedder'",
    ),
    "qlora": (lambda lo: None, {"weight_qtype": "int8"}, r"QLoRA"),
    "no_rule": (lambda lo: None, {"module_path": r".*mlp.*"}, r"no rule's module_path"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_change_nothing(trained, case):
    directory, qwix_model, _, y_base = trained
    edit, rule, message = REFUSALS[case]
    lora = _edit(qwix_model, edit)
    model = SPEC.tunix_load(directory)
    before = base_state(model)
    with pytest.raises(ValueError, match=message):
        jnnx.from_qwix(model, lora, _provider(**(rule or {})), inputs=tunix_inputs())
    assert not nnx.state(model, nnx.LoRAParam)
    assert trees_equal(base_state(model), before)
    np.testing.assert_array_equal(_logits(model), _logits(SPEC.tunix_load(directory)))
    assert jax.tree.leaves(lora)  # the input was not consumed
    del y_base
