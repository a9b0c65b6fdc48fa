"""Tests against third-party models (tunix 0.1.7, transformers 4.57) in their own venv, built
and run by ``.ci/thirdparty``; not collected by the main ``python -m pytest`` (pyproject's
testpaths). Skips fail here too (the root conftest).

Warnings stay errors, except these, which the third-party code raises on its own (by message):
"""

from __future__ import annotations

THIRD_PARTY_WARNINGS = [
    # tunix 0.1.7 builds its nnx.Params with Flax's older `sharding=` metadata name.
    "ignore:'sharding' is deprecated, use 'out_sharding' instead.:DeprecationWarning",
    # ... reads its weights with `.value` and its mesh through jax's pxla.thread_resources,
    "ignore:'.value' access is now deprecated:DeprecationWarning",
    "ignore:jax.interpreters.pxla.thread_resources is deprecated:DeprecationWarning",
    "ignore:jax.experimental.shard_map is deprecated:DeprecationWarning",
    # ... and its safetensors loader calls State.to_pure_dict.
    "ignore:`flax.nnx.State` will be deprecated:DeprecationWarning",
    # tunix's PeftTrainer logs the gradient norm with optax.global_norm.
    "ignore:optax.global_norm is deprecated:DeprecationWarning",
    # qwix 0.1.8 walks NNX models with the deprecated Module.iter_modules method.
    "ignore:The 'm.iter_modules\\(\\)' method is deprecated:DeprecationWarning",
    # ... and unboxes its variables through flax's removed alias nnx.VariableState.
    "ignore:'VariableState' was removed:DeprecationWarning",
    # transformers 4.57 decorates with torch.jit.script_method at import.
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
]


def pytest_configure(config):
    for line in THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", line)
