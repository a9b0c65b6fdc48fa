"""torchlora: the PyTorch reference LoRA layers (Linear, Embedding, Conv1d/2d/3d) that jaxlora
mirrors."""

from torchlora.adapter import load_adapter, read_adapter_config, save_adapter
from torchlora.base import LoRALayer
from torchlora.config import LoRAConfig
from torchlora.conv import Conv1d, Conv2d, Conv3d
from torchlora.core import scaling
from torchlora.embedding import Embedding
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
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "Linear",
    "LoRAConfig",
    "LoRALayer",
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
