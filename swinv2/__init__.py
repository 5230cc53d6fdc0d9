"""Swin Transformer V2 in PyTorch: exact to the official numerics, any input size."""

from . import convert, hf_folder, hub
from .fileio import WriteError
from .hf_folder import save_hf_folder
from .hub import (
    DownloadError,
    PretrainedWeights,
    download,
    get_pretrained,
    list_pretrained,
    load_model,
    save_pretrained,
)
from .loading import (
    CheckpointError,
    LoadReport,
    NonFiniteWeightsWarning,
    StateDictMismatchError,
    UnsafeCheckpointError,
    load_pretrained,
)
from .model import SwinTransformerV2
from .simmim import MaskGenerator, SimMIM
from .variants import create_model, list_models

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "DownloadError",
    "LoadReport",
    "MaskGenerator",
    "NonFiniteWeightsWarning",
    "PretrainedWeights",
    "SimMIM",
    "StateDictMismatchError",
    "SwinTransformerV2",
    "UnsafeCheckpointError",
    "WriteError",
    "convert",
    "create_model",
    "download",
    "get_pretrained",
    "hf_folder",
    "hub",
    "list_models",
    "list_pretrained",
    "load_model",
    "load_pretrained",
    "save_hf_folder",
    "save_pretrained",
]
