"""Every field of PEFT's ``LoraConfig`` (peft 0.21), and what this library does with it.

One table, read by ``LoRAConfig.from_peft``: a field is *implemented* (read into
``LoRAConfig``), *inert* (metadata or runtime settings that do not change what a loaded adapter
computes) or *refused* unless it holds one of its "off" values (a feature that changes the
math, which this library does not reproduce: loading it and ignoring it would give silently
wrong outputs). ``parity_tests/test_peft_options.py`` checks that the installed ``peft``'s
``LoraConfig`` has no field missing from this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IMPLEMENTED = (
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
    "use_dora",
    "target_parameters",  # config round-trip; files with it are refused (parse_config)
)

INERT = (
    "task_type",  # which PeftModel subclass wraps the model; the tensor keys are the same
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "runtime_config",  # runtime-only (GPU offload), never saved
    "megatron_core",  # the module name used only with megatron_config (refused below)
    "qalora_group_size",  # used only with use_qalora (refused below)
)

# field: the values that mean "feature off" (the field's default and its PEFT equivalents).
REFUSED: dict[str, tuple[Any, ...]] = {
    "exclude_modules": (None, [], ""),  # PEFT tests it for truthiness
    "fan_in_fan_out": (False,),
    "bias": ("none",),
    "modules_to_save": (None, []),
    "layers_to_transform": (None,),  # [] selects no layer in PEFT: not "off"
    "layers_pattern": (None, [], ""),
    "megatron_config": (None,),
    "trainable_token_indices": (None,),
    "loftq_config": ({}, None),
    "eva_config": (None,),
    "corda_config": (None,),
    "lora_ga_config": (None,),
    "velora_config": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False,),
    "monteclora_config": (None,),
    "layer_replication": (None,),
    "lora_bias": (False,),
    "use_bdlora": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "ensure_weight_tying": (False,),
}

KNOWN = frozenset(IMPLEMENTED) | frozenset(INERT) | frozenset(REFUSED)


def _same(value: Any, off: Any) -> bool:
    # Type-exact: JSON's 0 is not False and "false" is not False.
    return type(value) is type(off) and value == off


def _off_like(value: Any) -> bool:
    # A field this table does not know (a newer PEFT's) is accepted only when it holds a
    # null/false/empty value: PEFT adds features switched off by such defaults, and a feature
    # that is on may change the math, which loading and ignoring would get silently wrong.
    return value is None or value is False or (isinstance(value, str | list | dict) and not value)


def check_fields(peft_config: Mapping[str, Any]) -> None:
    """Raises a ``ValueError`` naming the first field that is refused, with its value."""
    for key, value in peft_config.items():
        if key in REFUSED and not any(_same(value, off) for off in REFUSED[key]):
            raise ValueError(
                f"adapter config sets {key}={value!r}, which is not supported: a PEFT feature "
                f"that changes what the adapter computes (supported: {key}={REFUSED[key][0]!r})"
            )
        if key not in KNOWN and not _off_like(value):
            raise ValueError(
                f"adapter config sets {key}={value!r}, a field this library does not know "
                "(from a newer PEFT?); it may change what the adapter computes, so the file is "
                "refused rather than loaded without it"
            )
