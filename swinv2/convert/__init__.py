"""SwinV2 state dicts in every known layout, to and from the official one.

>>> fmt = detect_format(state_dict)                  # 'timm', 'hf', 'torchvision', ...
>>> official, notes = to_official(state_dict)        # detected, or to_official(sd, "timm")
>>> peer_sd = from_official(model.state_dict(), "hf")

Formats (one module each, mainly a key table; see ``_table`` for the table language):

==============  ==========================================================================
official        microsoft/Swin-Transformer ``SwinTransformerV2`` (with its buffers)
simmim          official SimMIM pre-training (``encoder.``, ``decoder.0``, ``mask_token``)
swinv2          this library: official names, no buffers
timm            ``timm.models.swin_transformer_v2.SwinTransformerV2``
hf              transformers ``Swinv2ForImageClassification`` (also MIM / bare model)
torchvision     ``torchvision.models.swin_v2_*``
torchvision_video  ``torchvision.models.video.swin3d_*`` (Video Swin V1), into the video model
mmpretrain      mmpretrain ``ImageClassifier`` + ``SwinTransformerV2`` backbone
==============  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import torch

from . import hf, mmpretrain, official, timm, torchvision, torchvision_video
from ._table import DERIVED_BUFFERS, ConversionError, Notes, UnknownFormatError
from .detect import detect_format

FORMATS = {
    "official": SimpleNamespace(to_official=official.to_official, from_official=official.from_official),
    "simmim": SimpleNamespace(to_official=official.simmim_to_official, from_official=official.simmim_from_official),
    "swinv2": SimpleNamespace(to_official=official.swinv2_to_official, from_official=official.swinv2_from_official),
    "timm": timm,
    "hf": hf,
    "torchvision": torchvision,
    "torchvision_video": torchvision_video,
    "mmpretrain": mmpretrain,
}

__all__ = [
    "DERIVED_BUFFERS",
    "FORMATS",
    "ConversionError",
    "UnknownFormatError",
    "detect_format",
    "from_official",
    "to_official",
]


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return fmt


def _strip_module(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    """Drop a ``module.`` prefix that every key has (a DistributedDataParallel state dict)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}, Notes(["stripped the 'module.' prefix of every key"])
    return dict(state), Notes()


def to_official(
    state_dict: Mapping[str, torch.Tensor], fmt: str | None = None
) -> tuple[dict[str, torch.Tensor], Notes]:
    """``state_dict`` (in layout ``fmt``, detected when None) -> (official-layout state dict,
    notes on what was renamed, transformed or dropped). Derived buffers the source carries are
    kept under their official names; the input is not modified. ``notes`` is a list of strings
    whose ``dropped`` attribute lists the source keys left out on purpose (a SimMIM decoder, ...)."""
    state, notes = _strip_module(state_dict)
    fmt = detect_format(state) if fmt is None else _check_format(fmt)
    out, more = FORMATS[fmt].to_official(state)
    return out, notes + more


def from_official(
    state_dict: Mapping[str, torch.Tensor],
    fmt: str,
    template: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """An official-layout (or swinv2) state dict -> layout ``fmt``.

    Derived buffers are carried over when ``state_dict`` has them. Formats that store them
    (official, torchvision, mmpretrain) need them for a strict ``load_state_dict``; pass the
    target model's own ``state_dict()`` as ``template`` to take the buffers the source lacks from
    it (only buffers named in ``DERIVED_BUFFERS`` are taken, never parameters).
    """
    _check_format(fmt)
    source = detect_format(state_dict)
    if source not in ("official", "swinv2"):
        raise ConversionError(f"from_official expects the official layout, got a {source!r} state dict")
    state, _ = official.rename_rpe_mlp(state_dict)
    out = FORMATS[fmt].from_official(state)
    if template is not None:
        for key, value in template.items():
            if key not in out and key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
                out[key] = value
    return out
