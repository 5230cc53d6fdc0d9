"""Mask R-CNN (or Faster R-CNN) with an FPN on the Swin V2 backbone, built from torchvision.

The paper's COCO results use Mask R-CNN / HTC with an FPN over the four stage maps (mmdet's
Swin recipe); here the detector is torchvision's, so its losses, sampling, box coding and
post-processing are those of a well-kept library, and only the backbone is this package's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..model import SwinTransformerV2
from .backbone import SwinV2Backbone

_BODY = "model.backbone.body."  # where the SwinV2Backbone sits inside the torchvision model


class SwinV2FPN(nn.Module):
    """The backbone's stage maps through torchvision's FPN (256 channels, no norm) with an extra
    max-pooled level on top, as mmdet's FPN with ``num_outs=5`` for four stages. Returns the FPN's
    ordered dict: ``"0"``... one per stage, then ``"pool"``."""

    def __init__(self, backbone: SwinV2Backbone, out_channels: int = 256):
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(in_channels_list=list(backbone.out_channels), out_channels=out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # torchvision's detection heads read this

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


class Detector(nn.Module):
    """A torchvision ``MaskRCNN`` (``FasterRCNN`` with ``masks=False``) around :class:`SwinV2FPN`.

    ``num_classes``: object classes WITHOUT the background; the torchvision model is built with
    ``num_classes + 1`` and predicts labels 1..num_classes (0 is the background).

    Images are resized by torchvision's ``GeneralizedRCNNTransform``: the short side to
    ``min_size`` unless the long side would pass ``max_size``, then padded to a multiple of
    ``size_divisible`` (a multiple of the patch size). A tuple ``min_size`` is multi-scale
    training: each training image draws one of them at random; evaluation uses the last entry.
    The same transform normalises with ``image_mean`` / ``image_std``, so inputs are RGB in 0..1.

    Anchors are one size per level, 8x the level's stride (32 .. 512 for strides 4 .. 64, which
    is torchvision's default), three aspect ratios; the RoI poolers read every stage level.
    ``rcnn_kwargs`` go to the torchvision constructor (e.g. ``box_detections_per_img``,
    ``rpn_anchor_generator``) and override these defaults.
    """

    def __init__(self, backbone: SwinV2Backbone, num_classes: int, *, masks: bool = True,
                 min_size: int | tuple[int, ...] = 800, max_size: int = 1333, size_divisible: int = 32,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 fpn_channels: int = 256, **rcnn_kwargs):
        super().__init__()
        if not isinstance(backbone, SwinV2Backbone):
            raise TypeError(f"Detector: backbone must be a SwinV2Backbone, got {type(backbone).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Detector: num_classes must be a positive int (object classes, background not "
                             f"counted), got {num_classes!r}")
        min_sizes, max_size = _check_sizes(min_size, max_size)
        patch = backbone.body.patch_size
        if not isinstance(size_divisible, int) or size_divisible < 1 or any(size_divisible % p for p in patch):
            raise ValueError(f"Detector: size_divisible must be a positive multiple of the patch size {patch}, got "
                             f"{size_divisible!r}")
        self.num_classes, self.masks = num_classes, masks
        if isinstance(fpn_channels, bool) or not isinstance(fpn_channels, int) or fpn_channels < 1:
            raise ValueError(f"Detector: fpn_channels must be a positive int, got {fpn_channels!r}")
        fpn = SwinV2FPN(backbone, out_channels=fpn_channels)
        classes = num_classes + 1  # torchvision counts the background
        if masks and fpn_channels != 256:
            # torchvision's mask head is 256 wide whatever the FPN's width; narrow it with the FPN.
            # Giving the predictors means torchvision takes no class count (num_classes=None).
            rcnn_kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1))
            rcnn_kwargs.setdefault("mask_predictor", MaskRCNNPredictor(fpn_channels, fpn_channels, classes))
            rcnn_kwargs.setdefault("box_head", TwoMLPHead(fpn_channels * 7 * 7, 1024))
            rcnn_kwargs.setdefault("box_predictor", FastRCNNPredictor(1024, classes))
            classes = None
        levels = [str(j) for j in range(len(backbone.strides))]
        sizes = tuple((8 * s,) for s in backbone.strides) + ((16 * backbone.strides[-1],),)  # + the pooled level
        rcnn_kwargs.setdefault("rpn_anchor_generator", AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)))
        rcnn_kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2))
        if masks:
            rcnn_kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2))
        build = MaskRCNN if masks else FasterRCNN
        self.model = build(fpn, num_classes=classes, min_size=min_sizes, max_size=max_size,
                           image_mean=list(image_mean), image_std=list(image_std), size_divisible=size_divisible,
                           **rcnn_kwargs)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        """``images``: (3, H, W) float RGB tensors in 0..1, any sizes. Training (``targets``: one
        dict per image with ``boxes`` (N, 4) xyxy in input pixels, ``labels`` (N,) in
        1..num_classes and, with masks, ``masks`` (N, H, W) uint8) -> torchvision's loss dict.
        Evaluation -> one dict per image: ``boxes`` xyxy in input pixels, ``labels``, ``scores``
        and, with masks, ``masks`` (N, 1, H, W) probabilities."""
        if not isinstance(images, (list, tuple)) or not all(isinstance(i, torch.Tensor) for i in images):
            raise TypeError(f"Detector: images must be a list of (3, H, W) tensors, got {type(images).__name__}")
        return self.model(list(images), targets)

    @property
    def backbone(self) -> SwinV2Backbone:
        """The :class:`SwinV2Backbone` inside the torchvision model (not registered twice)."""
        return self.model.backbone.body

    @property
    def encoder(self) -> SwinTransformerV2:
        """The network inside, e.g. to load ImageNet weights into it."""
        return self.backbone.body

    def set_window(self, window_size: int | tuple[int, int]) -> None:
        """Test-time window enlargement, same weights (see :meth:`SwinV2Backbone.set_window`)."""
        self.backbone.set_window(window_size)

    def set_sizes(self, min_size: int | tuple[int, ...], max_size: int | None = None) -> None:
        """Change the resize of the torchvision transform, e.g. to evaluate at another scale;
        ``max_size`` None keeps the current one."""
        transform = self.model.transform
        transform.min_size, transform.max_size = _check_sizes(min_size,
                                                              transform.max_size if max_size is None else max_size)

    # -- layer-wise lr decay, weight decay -------------------------------------------------------

    @property
    def num_layer_ids(self) -> int:
        return self.backbone.num_layer_ids

    def layer_id(self, name: str) -> int:
        """Backbone parameters: the backbone's id; FPN, RPN and RoI heads: the top id (no decay)."""
        if name.startswith(_BODY):
            return self.backbone.layer_id(name[len(_BODY):])
        return self.num_layer_ids - 1

    def no_weight_decay(self) -> set[str]:
        return {_BODY + n for n in self.backbone.no_weight_decay()}

    def no_weight_decay_keywords(self) -> set[str]:
        return self.backbone.no_weight_decay_keywords()


def _check_sizes(min_size, max_size) -> tuple[tuple[int, ...], int]:
    sizes = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"Detector: min_size must be a positive int or a tuple of them, got {min_size!r}")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < max(sizes):
        raise ValueError(f"Detector: max_size must be an int at least max(min_size) = {max(sizes)}, got "
                         f"{max_size!r}")
    return sizes, max_size
