"""``LoRAConfig``, shared with torchlora: the same class on both sides."""

from _loracore.config import LoRAConfig

__all__ = ["LoRAConfig"]
