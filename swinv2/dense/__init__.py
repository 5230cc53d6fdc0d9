"""Dense prediction on the same ``SwinTransformerV2``: a backbone adapter (stage maps with their
own norms), Mask R-CNN / Faster R-CNN with an FPN from torchvision, and UPerNet."""

from __future__ import annotations

from .backbone import SwinV2Backbone
from .detection import Detector, SwinV2FPN
from .segmentation import (
    FCNHead,
    Segmenter,
    UPerHead,
    multiscale_inference,
    slide_inference,
    state_dict_from_transformers,
)

__all__ = [
    "Detector",
    "FCNHead",
    "Segmenter",
    "SwinV2Backbone",
    "SwinV2FPN",
    "UPerHead",
    "multiscale_inference",
    "slide_inference",
    "state_dict_from_transformers",
]
