"""Small reference models with exact PyTorch twins in ``torchlora.models``."""
