"""Swin Transformer V2 in PyTorch: exact to the official numerics, any input size."""

from .loading import CheckpointError, LoadReport, StateDictMismatchError, load_pretrained
from .model import SwinTransformerV2
from .variants import create_model, list_models

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "LoadReport",
    "StateDictMismatchError",
    "SwinTransformerV2",
    "create_model",
    "list_models",
    "load_pretrained",
]
