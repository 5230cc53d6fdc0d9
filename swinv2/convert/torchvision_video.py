"""torchvision's ``SwinTransformer3d`` (``swin3d_t/s/b``: Video Swin V1) into
:class:`swinv2.video.VideoSwinTransformerV2` built with the V1 switches.

``patch_embed`` keeps its name; ``features.{2i}.{j}`` is block j of stage i and
``features.{2i+1}`` the merging after stage i (there is no stem in ``features``); the MLP is
``mlp.0`` / ``mlp.3``. Attention has one ``qkv.bias`` (3C) with a key slice that torchvision
uses: with dot-product attention a key bias adds ``q . b_k`` to every logit of a query's row,
which the softmax removes, so it is dropped exactly (and noted). The persistent
``relative_position_index`` is derived from the window and dropped.

torchvision attends to the zeros it pads a map with and, where a window shrinks to a smaller
map, indexes its bias table with the first rows of the full window's index; swinv2 masks padded
keys and indexes the smaller window's own offsets. The outputs are equal wherever neither
happens: every stage map a multiple of the window (or not larger than it on an axis), as at
torchvision's own 32 x 224 x 224 with window 8 x 7 x 7.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._table import Notes, Table, Transform
from .torchvision import merge_qkv_bias, split_qkv_bias

NAME = "torchvision_video"

_B = "features.{2*}.{}."

TABLE = Table(
    NAME,
    [
        ("patch_embed.proj", "patch_embed.proj"),
        ("patch_embed.norm", "patch_embed.norm"),
        ("layers.{}.blocks.{}", _B[:-1]),
        ("layers.{}.blocks.{}.mlp.fc1", _B + "mlp.0"),
        ("layers.{}.blocks.{}.mlp.fc2", _B + "mlp.3"),
        Transform(
            "split qkv.bias into q_bias and v_bias (the key bias cancels in the softmax)",
            official=("layers.{}.blocks.{}.attn.q_bias", "layers.{}.blocks.{}.attn.v_bias"),
            peer=(_B + "attn.qkv.bias",),
            to_official=split_qkv_bias,
            from_official=merge_qkv_bias,
        ),
        ("layers.{}.blocks.{}.attn.relative_position_index", _B + "attn.relative_position_index"),
        ("layers.{}.downsample", "features.{2*+1}"),
        ("norm", "norm"),
        ("head", "head"),
    ],
)


def to_official(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    keyed = [k for k, v in state.items() if k.endswith(".attn.qkv.bias") and v.shape[0] % 3 == 0
             and v.chunk(3)[1].abs().max() > 0]
    out, notes = TABLE.convert(state, to_official=True)
    if keyed:
        notes = notes + [f"torchvision video: dropped the key slice of {len(keyed)} qkv biases (with dot-product "
                         "attention it adds the same value to a query's every logit, which the softmax removes)"]
    return out, notes


def from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return TABLE.convert(state, to_official=False)[0]
