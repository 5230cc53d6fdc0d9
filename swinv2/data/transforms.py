"""Image transforms: the official training augmentation and the weights' evaluation policy.

Training uses timm's ``create_transform`` because the official code does (``data/build.py``):
the same RandomResizedCrop, RandAugment ``rand-m9-mstd0.5-inc1`` and RandomErasing give the same
distribution of inputs, which torchvision's RandAugment (different ops and magnitudes) would not.
Evaluation is plain torchvision: resize the shorter side, centre-crop (or squash for the 384
fine-tunes), normalise.
"""

from __future__ import annotations

import math

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERP = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def _interp(name: str) -> T.InterpolationMode:
    try:
        return _INTERP[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {name!r}") from None


def eval_transform(
    img_size: int | tuple[int, int],
    *,
    crop_pct: float = 0.875,
    crop_mode: str = "center",
    interpolation: str = "bicubic",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
):
    """PIL image -> normalised (3, H, W) tensor, the official evaluation policy.

    ``crop_mode="center"``: resize the shorter side to ``floor(size / crop_pct)`` then centre-crop
    ``size`` (official ``TEST.CROP=True``: 256 -> 292 -> 256 at crop_pct 0.875).
    ``crop_mode="squash"``: resize straight to ``size`` (``TEST.CROP=False``, the 384 fine-tunes).
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    mode = _interp(interpolation)
    if crop_mode == "center":
        if h == w:
            resize = T.Resize(math.floor(h / crop_pct + 1e-6), interpolation=mode)
        else:
            resize = T.Resize((math.floor(h / crop_pct + 1e-6), math.floor(w / crop_pct + 1e-6)), interpolation=mode)
        steps = [resize, T.CenterCrop((h, w))]
    elif crop_mode == "squash":
        steps = [T.Resize((h, w), interpolation=mode)]
    else:
        raise ValueError(f"crop_mode must be 'center' or 'squash', got {crop_mode!r}")
    return T.Compose([_RGB(), *steps, T.ToTensor(), T.Normalize(mean, std)])


def train_transform(
    img_size: int,
    *,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.4,
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
):
    """PIL image -> augmented tensor, the official supervised recipe (timm ``create_transform``).

    ``auto_augment=None`` or ``"none"`` turns RandAugment off (colour jitter then applies, as in timm).
    """
    from timm.data import create_transform

    _interp(interpolation)
    aa = None if auto_augment in (None, "", "none") else auto_augment
    tf = create_transform(
        img_size,
        is_training=True,
        scale=scale,
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=aa,
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        interpolation=interpolation,
        mean=mean,
        std=std,
    )
    return T.Compose([_RGB(), tf])


def simmim_transform(img_size: int, *, scale=(0.67, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The SimMIM pre-training view: RandomResizedCrop (bilinear), flip, normalise (official 5.1)."""
    return T.Compose(
        [
            _RGB(),
            T.RandomResizedCrop(img_size, scale=scale, ratio=(3 / 4, 4 / 3)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class _RGB:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16) to RGB before the geometric steps."""

    def __call__(self, img):
        return img if getattr(img, "mode", "RGB") == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ConvertRGB()"
