"""torchvision ``SwinTransformer`` with ``SwinTransformerBlockV2`` / ``PatchMergingV2`` (``swin_v2_*``;
peers.md section 3.4).

One ``features`` Sequential: ``features.0`` is the stem (``0`` conv, ``1`` a Permute, ``2`` the
LayerNorm), ``features.{2i+1}.{j}`` block j of stage i, ``features.{2i+2}`` the merging after
stage i; the MLP is ``mlp.0`` / ``mlp.3``. Attention has one ``qkv.bias`` (3C) whose key slice is
zeroed at forward time: it splits into ``q_bias`` / ``v_bias`` (and a nonzero key slice, which
torchvision ignores, is noted). Its ``relative_coords_table`` and ``relative_position_index``
buffers are persistent; the index is stored flat (N*N,) where the official one is (N, N).

torchvision has no ``pretrained_window_size`` and never shrinks a window to a smaller map, so
its outputs equal the official ones only where every stage map is a multiple of the window and
the last one equals it (e.g. 256 px, window 8).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ._table import Notes, Table, Transform

NAME = "torchvision"

_B = "features.{2*+1}.{}."


def split_qkv_bias(qkv_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision ``qkv.bias`` (3C) -> official ``q_bias``, ``v_bias`` (C each); the key slice,
    which torchvision zeroes at forward time, is left out."""
    if qkv_bias.shape[0] % 3:
        raise ValueError(f"qkv.bias has {qkv_bias.shape[0]} entries, not a multiple of 3")
    q, _, v = qkv_bias.chunk(3)
    return q.clone(), v.clone()


def merge_qkv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> tuple[torch.Tensor]:
    """Official ``q_bias``, ``v_bias`` -> torchvision ``qkv.bias`` = [q, 0, v]."""
    return (torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]),)


def unflatten_index(index: torch.Tensor) -> tuple[torch.Tensor]:
    """torchvision's flat (N*N,) ``relative_position_index`` -> the official (N, N)."""
    n = math.isqrt(index.numel())
    if n * n != index.numel() or index.ndim != 1:
        raise ValueError(f"relative_position_index of shape {tuple(index.shape)} is not a flat N*N index")
    return (index.reshape(n, n).clone(),)


def flatten_index(index: torch.Tensor) -> tuple[torch.Tensor]:
    return (index.reshape(-1).clone(),)


TABLE = Table(
    NAME,
    [
        ("patch_embed.proj", "features.0.0"),
        ("patch_embed.norm", "features.0.2"),
        ("layers.{}.blocks.{}", _B[:-1]),
        ("layers.{}.blocks.{}.mlp.fc1", _B + "mlp.0"),
        ("layers.{}.blocks.{}.mlp.fc2", _B + "mlp.3"),
        Transform(
            "split qkv.bias into q_bias and v_bias",
            official=("layers.{}.blocks.{}.attn.q_bias", "layers.{}.blocks.{}.attn.v_bias"),
            peer=(_B + "attn.qkv.bias",),
            to_official=split_qkv_bias,
            from_official=merge_qkv_bias,
        ),
        Transform(
            "reshaped relative_position_index (N*N,) <-> (N, N)",
            official=("layers.{}.blocks.{}.attn.relative_position_index",),
            peer=(_B + "attn.relative_position_index",),
            to_official=unflatten_index,
            from_official=flatten_index,
        ),
        ("layers.{}.blocks.{}.attn_mask", None, "shift masks (torchvision builds them per forward)"),
        ("layers.{}.downsample", "features.{2*+2}"),
        ("norm", "norm"),
        ("head", "head"),
    ],
)


def to_official(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    notes = Notes()
    for key, value in state.items():
        if key.endswith(".attn.qkv.bias") and value.shape[0] % 3 == 0:
            k_slice = value.chunk(3)[1]
            if k_slice.abs().max() > 0:
                notes.append(
                    f"torchvision: {key} has a nonzero key slice (max |b| = {k_slice.abs().max().item():.3g}); "
                    "torchvision zeroes it at forward time, so it is dropped"
                )
    out, more = TABLE.convert(state, to_official=True)
    return out, more + notes


def from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return TABLE.convert(state, to_official=False)[0]
