"""Image transforms: the official training augmentation and the weights' evaluation policy.

Training uses timm's ``create_transform`` because the official code does (``data/build.py``):
the same RandomResizedCrop, RandAugment ``rand-m9-mstd0.5-inc1`` and RandomErasing give the same
distribution of inputs, which torchvision's RandAugment (different ops and magnitudes) would not.
Evaluation is plain torchvision: resize the shorter side, centre-crop (or squash for the 384
fine-tunes), normalise. Every transform first makes the image 8-bit RGB with
:func:`swinv2.data.images.to_rgb`.
"""

from __future__ import annotations

import math

from torchvision import transforms as T

from .images import to_rgb

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
    _keep_posterize_defined(tf)
    return T.Compose([_RGB(), tf])


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, defined for 0 bits as well: keeping no bit masks every bit.

    timm's increasing posterize (the ``inc1`` of the official policy) asks for ``4 - int(m / 10
    * 4)`` bits, 0 when the noisy magnitude reaches 10. Pillow computes ``i & ~(2 ** (8 - bits) -
    1)`` per channel value, which for 0 bits is 0: older releases returned that black image,
    newer ones refuse the argument. The official runs trained with the black image."""
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _keep_posterize_defined(transform) -> None:
    """Swap :func:`_posterize` in for timm's posterize in the RandAugment, AutoAugment or AugMix
    ops of a timm transform. Only the function an op applies changes: each op still draws its
    probability and magnitude as before, so every other image is augmented exactly as timm does."""
    from timm.data import auto_augment as aa

    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, aa.AutoAugment):
            ops = [op for sub_policy in step.policy for op in sub_policy]
        else:
            ops = getattr(step, "ops", None) if isinstance(step, (aa.RandAugment, aa.AugMixAugment)) else None
        for op in ops or ():
            if op.aug_fn is aa.posterize:
                op.aug_fn = _posterize


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
    """Convert any PIL mode (L, P, RGBA, CMYK, 16-bit grey) to 8-bit RGB before the geometric steps."""

    def __call__(self, img):
        return img if getattr(img, "mode", "RGB") == "RGB" else to_rgb(img)

    def __repr__(self) -> str:
        return "ConvertRGB()"
