"""Spatial transforms of video clips: one crop, one flip, one resize for every frame of a clip.

A clip enters as uint8 frames (T, 3, H, W), wrapped as a torchvision ``tv_tensors.Video``: the
``transforms.v2`` steps then draw their parameters once per call and apply them to all frames,
so an object keeps its place from frame to frame (a per-frame crop would add motion that is not
in the video). Random draws come from torch's global generator, which the video datasets seed
per (seed, epoch, index). The result is float32 (C, T, H, W), normalised with the ImageNet
statistics like the image model's input, so image weights inflate into the video model.

* Training (Video Swin's recipe): optionally resize the short side (256), then a random resized
  crop (area 8-100%) to the model size, or a plain random crop of a short-side resize; a
  horizontal flip.
* Evaluation: resize the short side to ``short_side`` (the crop size by default), then one
  centre crop or three crops along the long side (Video Swin's 3-crop test).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .transforms import IMAGENET_MEAN, IMAGENET_STD

CROPS = ("resized", "random")
_INTERP = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
           "nearest": v2.InterpolationMode.NEAREST}


def video_train_transform(size: int | Sequence[int], *, crop: str = "resized", scale: Sequence[float] = (0.08, 1.0),
                          ratio: Sequence[float] = (3 / 4, 4 / 3), short_side: int | None = None, hflip: float = 0.5,
                          interpolation: str = "bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable:
    """uint8 frames (T, 3, H, W) -> float32 (3, T, h, w) with ``(h, w) = size``, one draw per clip.

    ``crop="resized"``: a random resized crop (area fraction in ``scale``, aspect ratio in
    ``ratio``) after an optional short-side resize to ``short_side`` (Video Swin: 256, then 224
    crops). ``crop="random"``: the short side resized to ``short_side`` (default: the larger crop
    side) and a random ``size`` crop. Then a horizontal flip with probability ``hflip``.
    """
    h, w = _pair(size, "size")
    mode = _interp(interpolation)
    if not 0 <= hflip <= 1:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
    if crop == "resized":
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must be (min, max) area fractions with 0 < min <= max <= 1, got {tuple(scale)}")
        steps = [v2.Resize(short_side, interpolation=mode, antialias=True)] if short_side else []
        steps.append(v2.RandomResizedCrop((h, w), scale=(lo, hi), ratio=tuple(ratio), interpolation=mode,
                                          antialias=True))
    elif crop == "random":
        side = short_side or max(h, w)
        if side < max(h, w):
            raise ValueError(f"short_side {side} is smaller than the crop {h}x{w}")
        steps = [v2.Resize(side, interpolation=mode, antialias=True), v2.RandomCrop((h, w))]
    else:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    steps += [v2.RandomHorizontalFlip(hflip), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return _ClipPipeline(v2.Compose(steps))


def video_eval_transform(size: int | Sequence[int], *, short_side: int | None = None, num_crops: int = 1,
                         interpolation: str = "bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable:
    """uint8 frames (T, 3, H, W) -> float32 (num_crops, 3, T, h, w): the short side resized to
    ``short_side`` (default: the larger crop side), then ``num_crops`` crops of ``size``: 1 in
    the centre, or 3 along the long side (its start, centre and end; centred across it)."""
    h, w = _pair(size, "size")
    side = short_side or max(h, w)
    if side < max(h, w):
        raise ValueError(f"short_side {side} is smaller than the crop {h}x{w}")
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 (centre) or 3 (along the long side), got {num_crops}")
    return _EvalCrops((h, w), side, num_crops, _interp(interpolation), mean, std)


def three_crop_boxes(height: int, width: int, crop: Sequence[int]) -> list[tuple[int, int]]:
    """(top, left) of three ``crop`` boxes along the long side of a height x width frame:
    flush with its start, centred, flush with its end; centred on the other axis."""
    ch, cw = crop
    if ch > height or cw > width:
        raise ValueError(f"a {ch}x{cw} crop does not fit a {height}x{width} frame")
    top, left = (height - ch) // 2, (width - cw) // 2
    if width - cw >= height - ch:
        return [(top, 0), (top, left), (top, width - cw)]
    return [(0, left), (top, left), (height - ch, left)]


class _ClipPipeline:
    """Runs v2 steps on the frames as one Video, then puts channels first: (T, C, H, W) -> (C, T, H, W)."""

    def __init__(self, steps: v2.Compose):
        self.steps = steps

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        out = self.steps(tv_tensors.Video(_frames(frames)))  # (T, C, h, w)
        return out.as_subclass(torch.Tensor).permute(1, 0, 2, 3).contiguous()  # (C, T, h, w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.steps})"


class _EvalCrops:
    def __init__(self, crop: tuple[int, int], short_side: int, num_crops: int, mode, mean, std):
        self.crop, self.short_side, self.num_crops, self.mode = crop, short_side, num_crops, mode
        self.mean, self.std = list(mean), list(std)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        video = F.resize(tv_tensors.Video(_frames(frames)), [self.short_side], interpolation=self.mode,
                         antialias=True).as_subclass(torch.Tensor)  # (T, C, H', W'), short side = short_side
        height, width = video.shape[-2:]
        if self.num_crops == 1:
            boxes = [((height - self.crop[0]) // 2, (width - self.crop[1]) // 2)]
        else:
            boxes = three_crop_boxes(height, width, self.crop)
        crops = torch.stack([video[..., t:t + self.crop[0], left:left + self.crop[1]] for t, left in boxes])
        crops = F.normalize(F.to_dtype(crops, torch.float32, scale=True), self.mean, self.std)  # (crops, T, C, h, w)
        return crops.permute(0, 2, 1, 3, 4).contiguous()  # (crops, C, T, h, w)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop={self.crop}, short_side={self.short_side}, num_crops={self.num_crops}, "
                f"interpolation={self.mode.value})")


def _frames(frames: torch.Tensor) -> torch.Tensor:
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"video transforms take frames (T, 3, H, W), got shape {tuple(frames.shape)}")
    return frames


def _pair(size, name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return pair


def _interp(name: str):
    try:
        return _INTERP[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {name!r}") from None


__all__ = ["CROPS", "three_crop_boxes", "video_eval_transform", "video_train_transform"]
