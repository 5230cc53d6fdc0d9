"""timm ``swin_transformer_v2.SwinTransformerV2`` (timm >= 0.9 layout; peers.md section 3.2).

Every name is the official one except two: patch merging sits at the start of the next stage
(official ``layers.{i}.downsample`` is timm's ``layers.{i+1}.downsample``) and the classifier is
``head.fc``. timm keeps no buffers in its state dict. (timm's other SwinV2,
``SwinTransformerV2Cr``, is a different network and cannot be converted; detection says so.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._table import Notes, Table

NAME = "timm"

TABLE = Table(
    NAME,
    [
        ("patch_embed", "patch_embed"),
        ("absolute_pos_embed", "absolute_pos_embed"),
        ("layers.{}.blocks.{}", "layers.{}.blocks.{}"),
        # the downsample index shift: end of official stage i = start of timm stage i + 1
        ("layers.{}.downsample", "layers.{+1}.downsample"),
        ("norm", "norm"),
        ("head", "head.fc"),
        ("layers.{}.blocks.{}.attn_mask", None, "shift masks (timm derives them)"),
        ("layers.{}.blocks.{}.attn.relative_coords_table", None, "coordinate tables (timm derives them)"),
        ("layers.{}.blocks.{}.attn.relative_position_index", None, "position indices (timm derives them)"),
    ],
)


def to_official(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    return TABLE.convert(state, to_official=True)


def from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return TABLE.convert(state, to_official=False)[0]
