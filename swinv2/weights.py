"""The released SwinV2 weights as data, beside the architectures of :mod:`swinv2.variants`.

The 12 checkpoints of the official repository, named as in timm (``arch.tag``). Each is reached
two ways: the official release file (``url``, fetched with torch.hub's downloader), and the copy
timm keeps on the Hugging Face Hub (``hf_hub_id``, the same weights in timm's layout, fetched
with huggingface_hub). Each entry also says how its images are prepared for evaluation.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass

OFFICIAL_URL = "https://github.com/SwinTransformer/storage/releases/download/v2.0.0/{file}"
HF_HUB_PREFIX = "hf-hub:"  # how a source names a Hugging Face Hub repository (timm's spelling)

__all__ = ["OFFICIAL_URL", "PRETRAINED", "PretrainedWeights", "find_pretrained", "get_pretrained", "list_pretrained"]


@dataclass(frozen=True)
class PretrainedWeights:
    """One released checkpoint and how to evaluate it.

    ``crop_mode``: ``"center"`` resizes the shorter side to ``resize_size`` (bicubic) and
    centre-crops ``img_size`` (official ``TEST.CROP=True``: ``int(256 / 224 * size)``, i.e.
    ``crop_pct`` 0.875); ``"squash"`` resizes straight to ``img_size`` x ``img_size``
    (``TEST.CROP=False``, the 384 fine-tunes; ``crop_pct`` 1.0). Every release normalises with
    the ImageNet mean and std, the transforms' default.
    """

    arch: str
    tag: str
    file: str
    img_size: int
    window_size: int
    num_classes: int
    dataset: str
    top1: float | None = None  # ImageNet-1k val, as reported by the official README
    top5: float | None = None
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    # The SHA-256 of the file. None: unknown (the official release publishes no hashes and
    # the table was written offline), so downloads are not verified; fill it in to verify.
    sha256: str | None = None
    url: str = ""
    # The Hugging Face Hub repository of timm's copy (default ``timm/<arch>.<tag>``) and its file.
    hf_hub_id: str = ""
    hf_hub_filename: str = "model.safetensors"

    def __post_init__(self):
        if not self.url:
            object.__setattr__(self, "url", OFFICIAL_URL.format(file=self.file))
        if not self.hf_hub_id:
            object.__setattr__(self, "hf_hub_id", f"timm/{self.name}")

    @property
    def name(self) -> str:
        """The timm-style name, ``arch.tag``."""
        return f"{self.arch}.{self.tag}"

    @property
    def resize_size(self) -> int:
        """The shorter side before the centre crop (``img_size`` for ``squash``)."""
        return math.floor(self.img_size / self.crop_pct + 1e-6)

    @property
    def hub_source(self) -> str:
        """The source string that fetches timm's copy from the Hub: ``hf-hub:timm/<arch>.<tag>``."""
        return HF_HUB_PREFIX + self.hf_hub_id

    @property
    def preprocess(self) -> dict:
        """The evaluation transform's arguments (see :func:`swinv2.data.transforms.eval_transform`)."""
        return dict(img_size=self.img_size, crop_pct=self.crop_pct, crop_mode=self.crop_mode,
                    interpolation=self.interpolation)

    def as_dict(self) -> dict:
        return dict(asdict(self), name=self.name, resize_size=self.resize_size)


def _official(arch: str, tag: str, file: str, **kw) -> tuple[str, PretrainedWeights]:
    w = PretrainedWeights(arch=arch, tag=tag, file=f"{file}.pth", **kw)
    return w.name, w


_IN1K, _IN22K, _FT = "imagenet-1k", "imagenet-22k", "imagenet-22k, fine-tuned on imagenet-1k"
_W12 = (12, 12, 12, 6)  # per-stage windows of the 192/w12 ImageNet-22k pre-training
_384 = dict(crop_pct=1.0, crop_mode="squash")  # TEST.CROP False in the official 384 configs

# The official release (README "Swin-V2" table; official.md §2.3), in timm's order and names.
# The first tag listed for an architecture is its default for create_model(arch, pretrained=True).
PRETRAINED: dict[str, PretrainedWeights] = dict(
    [
        _official("swinv2_tiny_window8_256", "ms_in1k", "swinv2_tiny_patch4_window8_256",
                  img_size=256, window_size=8, num_classes=1000, dataset=_IN1K, top1=81.8, top5=95.9),
        _official("swinv2_tiny_window16_256", "ms_in1k", "swinv2_tiny_patch4_window16_256",
                  img_size=256, window_size=16, num_classes=1000, dataset=_IN1K, top1=82.8, top5=96.2),
        _official("swinv2_small_window8_256", "ms_in1k", "swinv2_small_patch4_window8_256",
                  img_size=256, window_size=8, num_classes=1000, dataset=_IN1K, top1=83.7, top5=96.6),
        _official("swinv2_small_window16_256", "ms_in1k", "swinv2_small_patch4_window16_256",
                  img_size=256, window_size=16, num_classes=1000, dataset=_IN1K, top1=84.1, top5=96.8),
        _official("swinv2_base_window8_256", "ms_in1k", "swinv2_base_patch4_window8_256",
                  img_size=256, window_size=8, num_classes=1000, dataset=_IN1K, top1=84.2, top5=96.9),
        _official("swinv2_base_window16_256", "ms_in1k", "swinv2_base_patch4_window16_256",
                  img_size=256, window_size=16, num_classes=1000, dataset=_IN1K, top1=84.6, top5=97.0),
        # ImageNet-22k pre-training (21841 classes): no ImageNet-1k accuracy is reported.
        _official("swinv2_base_window12_192", "ms_in22k", "swinv2_base_patch4_window12_192_22k",
                  img_size=192, window_size=12, num_classes=21841, dataset=_IN22K),
        _official("swinv2_large_window12_192", "ms_in22k", "swinv2_large_patch4_window12_192_22k",
                  img_size=192, window_size=12, num_classes=21841, dataset=_IN22K),
        _official("swinv2_base_window12to16_192to256", "ms_in22k_ft_in1k",
                  "swinv2_base_patch4_window12to16_192to256_22kto1k_ft", img_size=256, window_size=16,
                  pretrained_window_sizes=_W12, num_classes=1000, dataset=_FT, top1=86.2, top5=97.9),
        _official("swinv2_base_window12to24_192to384", "ms_in22k_ft_in1k",
                  "swinv2_base_patch4_window12to24_192to384_22kto1k_ft", img_size=384, window_size=24,
                  pretrained_window_sizes=_W12, num_classes=1000, dataset=_FT, top1=87.1, top5=98.2, **_384),
        _official("swinv2_large_window12to16_192to256", "ms_in22k_ft_in1k",
                  "swinv2_large_patch4_window12to16_192to256_22kto1k_ft", img_size=256, window_size=16,
                  pretrained_window_sizes=_W12, num_classes=1000, dataset=_FT, top1=86.9, top5=98.0),
        _official("swinv2_large_window12to24_192to384", "ms_in22k_ft_in1k",
                  "swinv2_large_patch4_window12to24_192to384_22kto1k_ft", img_size=384, window_size=24,
                  pretrained_window_sizes=_W12, num_classes=1000, dataset=_FT, top1=87.6, top5=98.3, **_384),
    ]
)


def list_pretrained(pattern: str | None = None) -> list[str]:
    """Released weights as ``arch.tag`` names, optionally filtered by a shell-style pattern."""
    names = list(PRETRAINED)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_pretrained(name: str) -> PretrainedWeights:
    """The released weights ``arch.tag``, or the default tag of ``arch`` alone.

    Raises ValueError listing the tags there are when there are none for ``name``.
    """
    if name in PRETRAINED:
        return PRETRAINED[name]
    arch, _, tag = name.partition(".")
    if not tag:
        for weights in PRETRAINED.values():
            if weights.arch == arch:
                return weights
    tags = [n for n in PRETRAINED if n.split(".", 1)[0] == arch]
    raise ValueError(
        f"no pretrained weights registered as {name!r}; "
        + (f"{arch!r} has: {', '.join(tags)}" if tags else f"registered: {', '.join(PRETRAINED)}")
        + "; or pass a checkpoint path or a state dict as pretrained="
    )


def find_pretrained(*, url: str | None = None, file: str | None = None, hf_hub_id: str | None = None,
                    arch: str | None = None) -> PretrainedWeights | None:
    """The released weights a source is, if any: by download URL, by file name (a local copy
    of a release file, e.g. fetched elsewhere for an offline machine) or by Hub repository;
    ``arch`` (when known) must agree."""
    for weights in PRETRAINED.values():
        if arch is not None and weights.arch != arch.split(".", 1)[0]:
            continue
        if (url and weights.url == url) or (file and weights.file == file) or (hf_hub_id and
                                                                              weights.hf_hub_id == hf_hub_id):
            return weights
    return None
