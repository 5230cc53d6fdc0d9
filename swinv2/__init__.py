"""Swin Transformer V2 in PyTorch: exact to the official numerics, any input size."""

from . import convert, hf_folder, hub
from .fileio import WriteError
from .files import CheckpointError, UnsafeCheckpointError
from .hf_folder import save_hf_folder
from .hub import DownloadError, download, save_pretrained
from .loading import (
    LoadReport,
    NonFiniteWeightsWarning,
    StateDictMismatchError,
    load_model,
    load_pretrained,
)
from .model import SwinTransformerV2
from .reading import Weights, read_weights
from .simmim import MaskGenerator, SimMIM
from .variants import create_model, list_models
from .version import __version__
from .video import VideoSwinTransformerV2
from .weights import PretrainedWeights, get_pretrained, list_pretrained

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
    "VideoSwinTransformerV2",
    "Weights",
    "WriteError",
    "__version__",
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
    "read_weights",
    "save_hf_folder",
    "save_pretrained",
]
