"""Small reference models with exact Flax twins in ``jaxlora.models``."""
