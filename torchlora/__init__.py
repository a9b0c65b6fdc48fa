"""torchlora: the PyTorch reference LoRA layers that jaxlora mirrors."""

from torchlora.core import scaling
from torchlora.layer import Linear

__all__ = ["Linear", "scaling"]
