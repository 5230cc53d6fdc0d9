"""Joint image + target transforms for detection and segmentation, their collates and loader.

Every transform acts on torchvision ``tv_tensors`` (Image, BoundingBoxes, Mask) through
``torchvision.transforms.v2``, so a flip or crop moves boxes and masks with the pixels. Every
random draw comes from torch's global generator, which :class:`JointTransformedDataset` seeds
from (seed, epoch, index) around each sample: an augmentation is a pure function of those,
whatever the worker count, batch or resume point.

* Detection only flips and converts to float: torchvision's detectors resize and normalise
  inside the model (``GeneralizedRCNNTransform``), which is where the recipe's multi-scale
  short side lives.
* Segmentation follows mmseg's ADE20K pipeline: keep-ratio rescale into ``scale`` times a
  random ratio, a random crop that avoids crops dominated by one class, flip, photometric
  distortion, ImageNet normalisation, padding to the crop size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .loader import EpochSampler, TransformedDataset, derive_seed, seeded
from .transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
_CROP_TRIES = 10  # mmseg's: after these the last drawn crop is taken, dominated or not


def detection_train_transform(hflip: float = 0.5) -> Callable:
    """``(image, target) -> (image float32 0..1 (3, H, W), target)``, flipped with probability
    ``hflip`` (boxes and masks with it)."""
    _check_probability(hflip, "hflip")
    return v2.Compose([v2.RandomHorizontalFlip(hflip), v2.ToDtype(torch.float32, scale=True)])


def detection_eval_transform() -> Callable:
    """``(image, target) -> (image float32 0..1 (3, H, W), target)``, nothing else changed."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


def segmentation_train_transform(crop: Sequence[int] = (512, 512), scale: Sequence[int] = (2048, 512),
                                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                                 hflip: float = 0.5, photometric: bool = True,
                                 ignore_index: int = IGNORE_INDEX) -> Callable:
    """``(image uint8 (3, H, W), mask (H, W)) -> (image float32 normalised (3, h, w), mask int64 (h, w))``
    with ``(h, w) = crop``.

    ``scale`` is (long side, short side) as in mmseg's ``scale=(2048, 512)``: the image is
    rescaled, ratio kept, to fit ``scale * r`` for ``r`` uniform in ``ratio_range``. The crop
    is redrawn up to 10 times while one class covers ``cat_max_ratio`` or more of its labelled
    (not ignored) pixels; smaller images are padded at the bottom and right, the image with 0
    after normalisation and the mask with ``ignore_index``.
    """
    crop = _pair(crop, "crop")
    if not 0 < cat_max_ratio <= 1:
        raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
    _check_probability(hflip, "hflip")
    steps = [
        _RandomKeepRatioRescale(scale, ratio_range),
        _CategoryBalancedCrop(crop, cat_max_ratio, ignore_index),
        v2.RandomHorizontalFlip(hflip),
        v2.ToDtype(torch.float32, scale=True),  # the image only; the mask keeps its labels
    ]
    if photometric:
        steps.append(_PhotometricDistortion())
    steps += [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), _PadTo(crop, ignore_index)]
    return _SegmentationPipeline(v2.Compose(steps))


def segmentation_eval_transform(scale: Sequence[int] = (2048, 512)) -> Callable:
    """``(image, mask) -> (image float32 normalised, resized to fit scale with its ratio kept;
    mask int64 at its ORIGINAL size)``: the metric is computed at the annotation's resolution,
    after the caller resizes the logits back (mmseg's test pipeline)."""
    return _SegmentationEval(scale)


class JointTransformedDataset(TransformedDataset):
    """``ds[(epoch, i)] -> transform(*base[i])``, or None where ``base[i]`` is None.

    Like :class:`~swinv2.data.loader.TransformedDataset` (and accepted by its loaders), but the
    transform takes and returns the pair, so the target moves with the image. It runs inside
    :func:`~swinv2.data.loader.seeded` with ``derive_seed("aug", seed, epoch, i)``; a plain int
    key means epoch 0.
    """

    def __getitem__(self, key):
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        sample = self.base[index]
        if sample is None or sample[0] is None:
            return None
        if self.transform is None:
            return sample
        with seeded(derive_seed("aug", self.seed, epoch, index)):
            return self.transform(*sample)


def collate_detection(batch: list) -> tuple[list, list, int]:
    """``(images, targets, n_skipped)``: lists of the readable samples (detectors take images of
    different sizes) and how many were None. A batch of Nones gives two empty lists."""
    kept = [s for s in batch if s is not None]
    return [s[0] for s in kept], [s[1] for s in kept], len(batch) - len(kept)


def collate_segmentation(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(images (B, 3, H, W), masks (B, H, W), n_skipped)`` of same-size samples (training
    crops). A batch of Nones gives ``torch.empty(0)`` and ``torch.empty(0, dtype=torch.long)``."""
    kept = [s for s in batch if s is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    sizes = {tuple(s[0].shape) for s in kept}
    if len(sizes) > 1:
        raise ValueError(f"collate_segmentation stacks samples of one size, got {sorted(sizes)}: use "
                         "collate_segmentation_lists for samples of different sizes")
    images = torch.stack([s[0].as_subclass(torch.Tensor) for s in kept])  # (B, 3, H, W)
    masks = torch.stack([s[1].as_subclass(torch.Tensor) for s in kept])  # (B, H, W)
    return images, masks, skipped


def collate_segmentation_lists(batch: list) -> tuple[list, list, int]:
    """``(images, masks, n_skipped)`` as lists, for evaluation where every image keeps its size."""
    return collate_detection(batch)


def build_dense_loader(dataset: TransformedDataset, *, collate: Callable, batch_size: int, train: bool,
                       workers: int, seed: int, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False) -> DataLoader:
    """:func:`~swinv2.data.loader.build_loader`'s DataLoader with ``collate`` for its batches.

    The same :class:`~swinv2.data.loader.EpochSampler` (shuffled and full global batches only
    when ``train``; call ``loader.sampler.set_epoch(epoch, start_batch)`` before each epoch)
    and the same private generator for worker seeds, so resuming is exact here too.
    """
    if not isinstance(dataset, TransformedDataset):
        raise TypeError(f"build_dense_loader needs a JointTransformedDataset (keys are (epoch, index) pairs), got "
                        f"{type(dataset).__name__}")
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size, drop_last=train,
                           batch_size=batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,  # the sampler already dropped or padded
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        # a private generator: drawing the workers' base seed must not move the global torch RNG
        generator=torch.Generator().manual_seed(derive_seed("loader", seed, rank)),
    )


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """(h, w) of an image rescaled, ratio kept, as large as fits ``scale`` = (long, short)
    in either orientation (mmcv's ``rescale_size``, rounding to the nearest pixel)."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class _SegmentationPipeline:
    """Wraps the pair as tv_tensors for the v2 steps and returns plain tensors."""

    def __init__(self, steps: v2.Compose):
        self.steps = steps

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.steps(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.steps})"


class _SegmentationEval:
    def __init__(self, scale: Sequence[int]):
        self.scale = _pair(scale, "scale")

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = keep_ratio_size(*image.shape[-2:], self.scale)
        image = F.resize(tv_tensors.Image(image), list(size), antialias=True)  # (3, h, w)
        image = F.normalize(F.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"


class _RandomKeepRatioRescale(v2.Transform):
    """mmseg's ``RandomResize(scale, ratio_range, keep_ratio=True)``. torchvision's ScaleJitter
    differs: it fits ``target_size`` in the image's own orientation, so a portrait image would
    get a long side of 512 where mmseg gives it a short side of 512."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float]):
        super().__init__()
        self.scale = _pair(scale, "scale")
        lo, hi = (float(r) for r in ratio_range)
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {tuple(ratio_range)}")
        self.ratio_range = (lo, hi)

    def make_params(self, flat_inputs: list) -> dict:
        lo, hi = self.ratio_range
        ratio = lo + float(torch.rand(())) * (hi - lo)
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return {"size": list(keep_ratio_size(*_size_of(flat_inputs), scale))}

    def transform(self, inpt, params: dict):
        return F.resize(inpt, params["size"], antialias=True)  # masks are resized with nearest neighbours


class _CategoryBalancedCrop(v2.Transform):
    """mmseg's ``RandomCrop(crop, cat_max_ratio)``: a crop is redrawn while one class covers
    ``cat_max_ratio`` or more of its labelled pixels (or it holds a single class), so that
    training crops of large scenes are not mostly sky or wall."""

    def __init__(self, crop: tuple[int, int], cat_max_ratio: float, ignore_index: int):
        super().__init__()
        self.crop, self.cat_max_ratio, self.ignore_index = crop, cat_max_ratio, ignore_index

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.crop[0], height), min(self.crop[1], width)
        top = int(torch.randint(0, height - ch + 1, ()))
        left = int(torch.randint(0, width - cw + 1, ()))
        return top, left, ch, cw

    def make_params(self, flat_inputs: list) -> dict:
        height, width = _size_of(flat_inputs)
        box = self._draw(height, width)
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        if mask is not None and self.cat_max_ratio < 1:
            for _ in range(_CROP_TRIES):
                top, left, ch, cw = box
                labels, counts = mask[..., top:top + ch, left:left + cw].unique(return_counts=True)
                counts = counts[labels != self.ignore_index]
                if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                    break
                box = self._draw(height, width)
        return dict(zip(("top", "left", "height", "width"), box))

    def transform(self, inpt, params: dict):
        return F.crop(inpt, **params)


class _PhotometricDistortion(v2.Transform):
    """mmseg's ``PhotoMetricDistortion`` on float images in 0..1, each step with probability 1/2:
    brightness + U(-32, 32)/255, contrast x U(0.5, 1.5) before or after the colour steps,
    saturation x U(0.5, 1.5) (HSV's S, capped at 1), hue + an integer of U[-18, 18] in OpenCV's
    half-degree units. torchvision's RandomPhotometricDistort scales brightness, blends contrast
    and saturation with grey and permutes channels instead."""

    def make_params(self, flat_inputs: list) -> dict:
        draw = lambda lo, hi: lo + float(torch.rand(())) * (hi - lo)
        coin = lambda: bool(torch.rand(()) < 0.5)
        return {
            "brightness": draw(-32, 32) / 255 if coin() else None,
            "contrast_first": coin(),
            "contrast": draw(0.5, 1.5) if coin() else None,
            "saturation": draw(0.5, 1.5) if coin() else None,
            "hue": int(torch.randint(-18, 19, ())) / 180 if coin() else None,
        }

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        x = inpt.as_subclass(torch.Tensor)
        if params["brightness"] is not None:
            x = (x + params["brightness"]).clamp(0, 1)
        if params["contrast"] is not None and params["contrast_first"]:
            x = (x * params["contrast"]).clamp(0, 1)
        if params["saturation"] is not None:
            x = _scale_saturation(x, params["saturation"])
        if params["hue"] is not None:
            x = F.adjust_hue(x, params["hue"])
        if params["contrast"] is not None and not params["contrast_first"]:
            x = (x * params["contrast"]).clamp(0, 1)
        return tv_tensors.wrap(x, like=inpt)


def _scale_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """HSV saturation times ``factor`` (capped at 1), hue and value kept. Each RGB channel is
    ``V - S * V * f(H)``, so scaling S scales every channel's distance below the maximum V."""
    value = x.amax(dim=-3, keepdim=True)  # (1, H, W)
    spread = value - x.amin(dim=-3, keepdim=True)  # S * V
    limit = torch.where(spread > 0, value / spread.clamp_min(1e-12), torch.inf)  # factor giving S = 1
    return value - torch.minimum(torch.full_like(value, factor), limit) * (value - x)


class _PadTo(v2.Transform):
    """Pad at the bottom and right up to ``size``: images with 0, masks with the ignored index."""

    def __init__(self, size: tuple[int, int], ignore_index: int):
        super().__init__()
        self.size, self.ignore_index = size, ignore_index

    def make_params(self, flat_inputs: list) -> dict:
        height, width = _size_of(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - width), max(0, self.size[0] - height)]}

    def transform(self, inpt, params: dict):
        if not any(params["padding"]):
            return inpt
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
        return F.pad(inpt, params["padding"], fill=fill)


def _size_of(flat_inputs: list) -> tuple[int, int]:
    """(height, width) of the first image or mask among a transform's inputs."""
    for x in flat_inputs:
        if isinstance(x, (tv_tensors.Image, tv_tensors.Mask)):
            height, width = F.get_size(x)
            return height, width
    raise TypeError("a segmentation transform needs a tv_tensors.Image or Mask among its inputs")


def _pair(value, name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or pair of ints, got {value!r}")
    return pair


def _check_probability(p: float, name: str) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


__all__ = [
    "IGNORE_INDEX",
    "JointTransformedDataset",
    "build_dense_loader",
    "collate_detection",
    "collate_segmentation",
    "collate_segmentation_lists",
    "detection_eval_transform",
    "detection_train_transform",
    "keep_ratio_size",
    "segmentation_eval_transform",
    "segmentation_train_transform",
]
