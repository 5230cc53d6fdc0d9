"""The SwinV2 family as data, and ``create_model`` / ``list_models``.

Names follow timm's, so they can be looked up there too. Stochastic-depth rates are those of
the official training configs (H and G: the paper's §4 / appendix values). The released weights
of these architectures are listed beside them, in :mod:`swinv2.weights`.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from .loading import StateDictMismatchError, build_model, load_pretrained, network_class
from .model import SwinTransformerV2
from .reading import read_weights
from .video import VideoSwinTransformerV2
from .weights import get_pretrained

try:  # the speedups are a package of their own: without it create_model builds the plain model
    from .fast import apply as apply_speedups
except ModuleNotFoundError as missing:
    if missing.name != f"{__package__}.fast":
        raise
    apply_speedups = None


@dataclass(frozen=True)
class Variant:
    """One architecture: the constructor arguments that define it, and a description. A video
    variant has ``num_frames`` (0 for images) and a (time, height, width) window."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    img_size: int
    window_size: int | tuple[int, ...]
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    num_classes: int = 1000
    drop_path_rate: float = 0.2
    extra_norm_period: int = 0
    num_frames: int = 0
    description: str = ""
    extra: Mapping = field(default_factory=dict)

    def kwargs(self) -> dict:
        kw = asdict(self)
        kw.pop("description")
        kw.update(kw.pop("extra"))
        if not kw["extra_norm_period"]:
            kw.pop("extra_norm_period")
        if not kw["num_frames"]:
            kw.pop("num_frames")
        return kw

    @property
    def is_video(self) -> bool:
        return self.num_frames > 0


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_FT = (12, 12, 12, 6)  # windows of the 192/w12 ImageNet-22k checkpoints, per stage
_G = dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128))
# Video Swin V1 (torchvision's swin3d_*): pre-norm, dot-product attention, a learned bias table
_V1 = dict(norm_placement="pre", attn_type="dot", position_bias="table", merge_norm="pre")

VARIANTS: dict[str, Variant] = {
    "swinv2_debug": Variant(
        embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), img_size=64, window_size=4,
        num_classes=10, drop_path_rate=0.1,
        description="tiny test network: every code path (shift, global window) at 64 px",
    ),
    "swinv2_tiny_window8_256": Variant(**_T, img_size=256, window_size=8, description="SwinV2-T, ImageNet-1k"),
    "swinv2_tiny_window16_256": Variant(**_T, img_size=256, window_size=16, description="SwinV2-T, ImageNet-1k"),
    "swinv2_small_window8_256": Variant(
        **_S, img_size=256, window_size=8, drop_path_rate=0.3, description="SwinV2-S, ImageNet-1k"
    ),
    "swinv2_small_window16_256": Variant(
        **_S, img_size=256, window_size=16, drop_path_rate=0.3, description="SwinV2-S, ImageNet-1k"
    ),
    "swinv2_base_window8_256": Variant(
        **_B, img_size=256, window_size=8, drop_path_rate=0.5, description="SwinV2-B, ImageNet-1k"
    ),
    "swinv2_base_window16_256": Variant(
        **_B, img_size=256, window_size=16, drop_path_rate=0.5, description="SwinV2-B, ImageNet-1k"
    ),
    "swinv2_base_window12_192": Variant(
        **_B, img_size=192, window_size=12, num_classes=21841, description="SwinV2-B, ImageNet-22k pre-training"
    ),
    "swinv2_large_window12_192": Variant(
        **_L, img_size=192, window_size=12, num_classes=21841, description="SwinV2-L, ImageNet-22k pre-training"
    ),
    "swinv2_base_window12to16_192to256": Variant(
        **_B, img_size=256, window_size=16, pretrained_window_sizes=_FT, description="SwinV2-B, 22k -> 1k fine-tune"
    ),
    "swinv2_base_window12to24_192to384": Variant(
        **_B, img_size=384, window_size=24, pretrained_window_sizes=_FT, description="SwinV2-B, 22k -> 1k fine-tune"
    ),
    "swinv2_large_window12to16_192to256": Variant(
        **_L, img_size=256, window_size=16, pretrained_window_sizes=_FT, description="SwinV2-L, 22k -> 1k fine-tune"
    ),
    "swinv2_large_window12to24_192to384": Variant(
        **_L, img_size=384, window_size=24, pretrained_window_sizes=_FT, description="SwinV2-L, 22k -> 1k fine-tune"
    ),
    "swinv2_huge_window12_192": Variant(
        embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), img_size=192, window_size=12,
        extra_norm_period=6, description="SwinV2-H (paper §3.6): 658M, extra main-branch norm every 6 blocks",
    ),
    "swinv2_giant_window12_192": Variant(
        **_G, img_size=192, window_size=12,
        drop_path_rate=0.3, extra_norm_period=6,
        description="SwinV2-G (paper §3.6): 3.0B, extra main-branch norm every 6 blocks",
    ),
}


# Video: the paper's K400 setting is 8 frames with a 16x16x8 window at 256 px (then 20x20x8 at
# 320 px); the temporal patch is not stated, and with Video Swin's 2 the 8-frame window covers
# the clip's 4 token frames. Stochastic depth as Video Swin's K400 recipes (T 0.1, S 0.2, B 0.3).
VARIANTS.update({
    "video_swinv2_debug": Variant(
        embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), img_size=64, window_size=(2, 4, 4),
        num_frames=8, num_classes=10, drop_path_rate=0.1,
        description="tiny video test network: shifts in time and space at 8 x 64 px",
    ),
    "video_swinv2_tiny_window16_256": Variant(**_T, img_size=256, window_size=(8, 16, 16), num_frames=8,
                                              num_classes=400, drop_path_rate=0.1, description="Video SwinV2-T, K400"),
    "video_swinv2_small_window16_256": Variant(**_S, img_size=256, window_size=(8, 16, 16), num_frames=8,
                                               num_classes=400, drop_path_rate=0.2,
                                               description="Video SwinV2-S, K400"),
    "video_swinv2_base_window16_256": Variant(**_B, img_size=256, window_size=(8, 16, 16), num_frames=8,
                                              num_classes=400, drop_path_rate=0.3, description="Video SwinV2-B, K400"),
    "video_swinv2_large_window16_256": Variant(**_L, img_size=256, window_size=(8, 16, 16), num_frames=8,
                                               num_classes=400, drop_path_rate=0.3,
                                               description="Video SwinV2-L, K400"),
    "video_swinv2_giant_window16_256": Variant(
        **_G, img_size=256, window_size=(8, 16, 16), num_frames=8, num_classes=400, drop_path_rate=0.3,
        extra_norm_period=6, description="Video SwinV2-G (paper appendix A2.2, stage 1 of K400; 86.8 top-1)",
    ),
    "video_swin_tiny_patch244_window877": Variant(
        **_T, img_size=224, window_size=(8, 7, 7), num_frames=32, num_classes=400, drop_path_rate=0.1, extra=_V1,
        description="Video Swin V1-T (torchvision swin3d_t), K400",
    ),
    "video_swin_small_patch244_window877": Variant(
        **_S, img_size=224, window_size=(8, 7, 7), num_frames=32, num_classes=400, drop_path_rate=0.2, extra=_V1,
        description="Video Swin V1-S (torchvision swin3d_s), K400",
    ),
    "video_swin_base_patch244_window877": Variant(
        **_B, img_size=224, window_size=(8, 7, 7), num_frames=32, num_classes=400, drop_path_rate=0.3, extra=_V1,
        description="Video Swin V1-B (torchvision swin3d_b), K400",
    ),
})


def list_models(pattern: str | None = None) -> list[str]:
    """Variant names, optionally filtered by a shell-style ``pattern`` such as ``*base*``."""
    names = list(VARIANTS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_variant(name: str) -> Variant:
    base = name.split(".", 1)[0]  # accept timm-style "name.tag"
    if base not in VARIANTS:
        close = [n for n in VARIANTS if base.replace("swinv2_", "") in n] or list(VARIANTS)
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(close)}")
    return VARIANTS[base]


def create_model(
    name: str | None = None,
    pretrained=False,
    device: str | torch.device | None = None,
    fast: bool = True,
    **overrides,
) -> SwinTransformerV2:
    """Build a variant by name; keyword arguments override its constructor arguments.

    ``fast``: apply the default speedups of :mod:`swinv2.fast` (same values, faster on CPUs;
    the C kernel stays opt-in); False gives the plain model of the paper.

    ``pretrained``:

    - ``True``: the released weights of ``name`` (``arch.tag``, or ``arch`` for its default
      tag; see :func:`swinv2.weights.list_pretrained`), downloaded into the cache on first use;
    - a source that says what model it holds: a file written by :func:`swinv2.save_pretrained`,
      a training checkpoint, a Hugging Face transformers folder (``config.json`` + weights): the
      model is rebuilt from its own config (``name`` may then be None; overrides still apply);
    - released weights by name (``"arch.tag"``, or timm's copy on the Hub,
      ``"hf-hub:timm/arch.tag"``): ``name`` may be None;
    - any other source :func:`swinv2.reading.read_weights` reads (a checkpoint path, an
      ``http(s)://`` URL, a Hub repository, a state dict): loaded into the named architecture
      (see :func:`swinv2.load_pretrained`).

    A ``num_classes`` override that differs from the weights' own leaves the head freshly
    initialised. ``device``: where to build; ``"meta"`` builds without allocating memory (for
    planning and sharded initialisation of the large sizes).
    """
    model = _create(name, pretrained, device, **overrides)
    return apply_speedups(model) if fast and apply_speedups is not None else model


def _create(name, pretrained, device, **overrides) -> SwinTransformerV2:
    variant = get_variant(name) if name is not None else None
    if pretrained is False or pretrained is None:
        if variant is None:
            raise ValueError("create_model needs a model name (see list_models()), unless pretrained is a file "
                             "written by swinv2.save_pretrained or a Hugging Face model folder")
        return _build({**variant.kwargs(), **overrides}, device)
    if pretrained is True:
        if name is None:
            raise ValueError("pretrained=True needs a model name (see list_models())")
        try:
            pretrained = get_pretrained(name)
        except ValueError as err:
            raise ValueError(f"pretrained=True: {err}") from None  # names tags and "checkpoint path"
    weights = read_weights(pretrained, arch=name)  # downloads before anything is built
    if weights.config is not None:  # the source says what to build
        model = build_model(weights, device=device, **overrides)
        if variant is not None and _structure(model.config) != _structure(variant.kwargs()):
            warnings.warn(f"{weights.source} holds a model of another structure than {name!r}; it was built from "
                          "its own config", stacklevel=2)
        return model
    arch = name or weights.arch
    if arch is None:
        raise ValueError(
            f"{weights.source} is not a file written by swinv2.save_pretrained (nor a Hugging Face folder or "
            "released weights), so it does not say which architecture it is: create_model needs a model name to "
            "load it into (see list_models())"
        )
    kwargs = get_variant(arch).kwargs()
    released = weights.release is not None and weights.release.arch == arch.split(".", 1)[0]
    if released:
        kwargs["num_classes"] = weights.release.num_classes
    kwargs.update(overrides)
    model = _build(kwargs, device)
    new_head = released and kwargs["num_classes"] != weights.release.num_classes
    try:
        load_pretrained(model, weights, head="drop" if new_head else "keep")
    except StateDictMismatchError as err:
        if not released:
            raise
        raise StateDictMismatchError(f"{weights.source}: {err}") from err
    return model


def _build(kwargs: dict, device) -> SwinTransformerV2 | VideoSwinTransformerV2:
    network = network_class(kwargs)
    if device is None:
        return network(**kwargs)
    with torch.device(device):
        return network(**kwargs)


def _structure(config: Mapping) -> tuple:
    """What decides the shapes of the weights, to compare a file's config with a variant."""
    return tuple(
        tuple(config[k]) if isinstance(config[k], (list, tuple)) else config[k]
        for k in ("embed_dim", "depths", "num_heads")
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def variant_table() -> list[dict]:
    """One row per variant: name, parameters, GFLOPs at its own size, size, windows."""
    rows = []
    for name, v in VARIANTS.items():
        model = create_model(name, device="meta")
        rows.append(
            dict(
                name=name,
                params_m=count_parameters(model) / 1e6,
                gflops=model.flops() / 1e9,
                img_size=v.img_size,
                num_frames=v.num_frames,
                window=v.window_size,
                pretrained_windows=v.pretrained_window_sizes,
                num_classes=v.num_classes,
                description=v.description,
            )
        )
    return rows
