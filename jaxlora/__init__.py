"""jaxlora: LoRA for Flax (Linen and NNX) with optax-native training.

The NNX side lives in ``jaxlora.nnx`` (``LoRALinear``, ``inject``, ``merge``).
"""

from jaxlora.adapter import load_adapter, read_adapter_config, save_adapter
from jaxlora.config import LoRAConfig
from jaxlora.convert import from_torch, to_torch
from jaxlora.core import scaling
from jaxlora.hf_maps import HFLinear
from jaxlora.host import keep_freed_memory
from jaxlora.inject import Layout, inject, layouts
from jaxlora.intercept import intercept
from jaxlora.linen import LoRAConv, LoRADense, LoRADenseGeneral, LoRAEmbed
from jaxlora.merge import MergeRecord, merge, unmerge
from jaxlora.multi import AdapterStack, stack_adapters
from jaxlora.multi_linen import intercept_stack
from jaxlora.sharding import partition_specs
from jaxlora.tree import (
    ParamCount,
    combine,
    freeze_base,
    lora_mask,
    split,
    trainable_parameters,
)

__all__ = [
    "AdapterStack",
    "HFLinear",
    "Layout",
    "LoRAConfig",
    "LoRAConv",
    "LoRADense",
    "LoRADenseGeneral",
    "LoRAEmbed",
    "MergeRecord",
    "ParamCount",
    "combine",
    "freeze_base",
    "from_torch",
    "inject",
    "intercept",
    "intercept_stack",
    "keep_freed_memory",
    "layouts",
    "load_adapter",
    "lora_mask",
    "merge",
    "partition_specs",
    "read_adapter_config",
    "save_adapter",
    "scaling",
    "split",
    "stack_adapters",
    "to_torch",
    "trainable_parameters",
    "unmerge",
]
