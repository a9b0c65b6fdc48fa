"""torchlora: the PyTorch reference LoRA layers that jaxlora mirrors."""

from torchlora.adapter import load_adapter, read_adapter_config, save_adapter
from torchlora.config import LoRAConfig
from torchlora.core import scaling
from torchlora.inject import (
    ParamCount,
    inject,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge,
    set_adapter,
    trainable_parameters,
)
from torchlora.layer import Linear

__all__ = [
    "Linear",
    "LoRAConfig",
    "ParamCount",
    "inject",
    "load_adapter",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge",
    "read_adapter_config",
    "save_adapter",
    "scaling",
    "set_adapter",
    "trainable_parameters",
]
