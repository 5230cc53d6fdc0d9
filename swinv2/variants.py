"""The SwinV2 family as data, and ``create_model`` / ``list_models``.

Names follow timm's, so they can be looked up there too. Stochastic-depth rates are those of
the official training configs (H and G: the paper's §4 / appendix values).
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from . import hub
from .loading import CheckpointError, load_pretrained, read_state_dict, unwrap_state_dict
from .model import SwinTransformerV2
from .model_config import check_model_config, check_weights_fit


@dataclass(frozen=True)
class Variant:
    """One architecture: the constructor arguments that define it, and a description."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    img_size: int
    window_size: int
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    num_classes: int = 1000
    drop_path_rate: float = 0.2
    extra_norm_period: int = 0
    description: str = ""
    extra: Mapping = field(default_factory=dict)

    def kwargs(self) -> dict:
        kw = asdict(self)
        kw.pop("description")
        kw.update(kw.pop("extra"))
        if not kw["extra_norm_period"]:
            kw.pop("extra_norm_period")
        return kw


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_FT = (12, 12, 12, 6)  # windows of the 192/w12 ImageNet-22k checkpoints, per stage

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
        embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), img_size=192, window_size=12,
        drop_path_rate=0.3, extra_norm_period=6,
        description="SwinV2-G (paper §3.6): 3.0B, extra main-branch norm every 6 blocks",
    ),
}


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
    pretrained: bool | str | os.PathLike | Mapping[str, torch.Tensor] = False,
    device: str | torch.device | None = None,
    **overrides,
) -> SwinTransformerV2:
    """Build a variant by name; keyword arguments override its constructor arguments.

    ``pretrained``:

    - ``True``: the registered weights of ``name`` (``arch.tag``, or ``arch`` for its default
      tag; see :func:`swinv2.hub.list_pretrained`), downloaded into the cache on first use;
    - a file written by :func:`swinv2.hub.save_pretrained`, or a Hugging Face transformers
      folder (``config.json`` + weights, see :mod:`swinv2.hf_folder`): the model is rebuilt from
      its own config (``name`` may then be None; overrides still apply);
    - any other checkpoint path, an ``http(s)://`` URL, or a state dict: loaded into the named
      architecture (see :func:`load_pretrained`).

    A ``num_classes`` override that differs from the registered weights' (or a swinv2 file's)
    leaves the head freshly initialised. ``device``: where to build; ``"meta"`` builds without
    allocating memory (for planning and sharded initialisation of the large sizes).
    """
    variant = get_variant(name) if name is not None else None
    if isinstance(pretrained, (str, os.PathLike)) and hub._is_url(pretrained):
        pretrained = hub.download(pretrained)
    if isinstance(pretrained, (str, os.PathLike)) and _is_training_checkpoint(pretrained):
        return _from_training_checkpoint(pretrained, device, overrides)
    if isinstance(pretrained, (str, os.PathLike)) and os.path.isdir(pretrained):
        from .hf_folder import load_hf_folder

        model = load_hf_folder(pretrained, device=device, **overrides)
    elif isinstance(pretrained, (str, os.PathLike)) and hub.is_swinv2_file(pretrained):
        model = hub.load_model(pretrained, device=device, **overrides)
    else:
        model = None
    if model is not None:
        if variant is not None and _structure(model.config) != _structure(variant.kwargs()):
            warnings.warn(
                f"{os.fspath(pretrained)} holds a model of another structure than {name!r}; "
                "it was built from its own config",
                stacklevel=2,
            )
        return model
    if variant is None:
        if isinstance(pretrained, (str, os.PathLike)):
            read_state_dict(pretrained)  # a file that is no checkpoint at all gets its own message
            raise ValueError(
                f"{os.fspath(pretrained)} is not a file written by swinv2.hub.save_pretrained (nor a Hugging "
                "Face folder), so it does not say which architecture it is: create_model needs a model name "
                "to load it into "
                "(see list_models())"
            )
        raise ValueError(
            "create_model needs a model name (see list_models()), unless pretrained is a file written "
            "by swinv2.hub.save_pretrained or a Hugging Face model folder"
        )

    kwargs = variant.kwargs()
    weights = None
    if pretrained is True:
        try:
            weights = hub.get_pretrained(name)
        except ValueError as err:
            raise ValueError(f"pretrained=True: {err}") from None  # names tags and "checkpoint path"
        kwargs["num_classes"] = weights.num_classes
        path = hub.download(weights.name)  # before building: fail fast when offline
    kwargs.update(overrides)
    if device is not None:
        with torch.device(device):
            model = SwinTransformerV2(**kwargs)
    else:
        model = SwinTransformerV2(**kwargs)

    if weights is not None:
        try:
            state = read_state_dict(path)
        except CheckpointError as err:
            raise CheckpointError(f"{err} (the cached download may be damaged: delete it to fetch it again)") from err
        drop_head = kwargs["num_classes"] != weights.num_classes
        hub.load_state(model, state, source=f"{weights.name} ({path})", drop_head=drop_head)
    elif pretrained is not False and pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def _is_training_checkpoint(path) -> bool:
    """A ``checkpoint-*.pt`` of ``swinv2 train``: a torch zip archive (not safetensors) that
    names the swinv2 training-checkpoint kind. Decided without reading the tensors."""
    import zipfile

    path = os.fspath(path)
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") for name in archive.namelist()) and path.endswith(".pt")


def _from_training_checkpoint(path, device, overrides: dict) -> SwinTransformerV2:
    """Rebuild the model of a training checkpoint from its stored config and load its weights."""
    from .train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    config = state.get("model_config")
    if not config:
        raise CheckpointError(f"{os.fspath(path)} has no model config, so the model cannot be rebuilt")
    check_model_config(config, os.fspath(path))  # before anything is built
    weights = unwrap_state_dict(state.get("model"), source=os.fspath(path))
    check_weights_fit(config, weights, os.fspath(path))
    config = dict(config)
    kwargs = {**config, **overrides}
    if device is not None:
        with torch.device(device):
            model = SwinTransformerV2(**kwargs)
    else:
        model = SwinTransformerV2(**kwargs)
    head = "auto" if kwargs.get("num_classes") != config.get("num_classes") else "keep"
    load_pretrained(model, weights, head=head, strict=True, name=os.fspath(path))  # SimMIM wrappers are detected
    return model


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
                window=v.window_size,
                pretrained_windows=v.pretrained_window_sizes,
                num_classes=v.num_classes,
                description=v.description,
            )
        )
    return rows
