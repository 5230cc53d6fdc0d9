"""mmpretrain ``ImageClassifier`` with the ``SwinTransformerV2`` backbone (peers.md section 3.6).

Keys live under ``backbone.`` (a bare backbone state dict without the prefix is read too):
``patch_embed.projection`` / ``patch_embed.norm``; ``stages.{i}.blocks.{j}.`` with the attention
under ``attn.w_msa.`` (official names below it, buffers included), the MLP as
``ffn.layers.0.0`` / ``ffn.layers.1`` and the H/G extra norm as ``norm3``; the merging at the
start of the next stage (``stages.{i+1}.downsample``); one output LayerNorm ``norm{k}`` per
``out_indices`` entry, of which ``norm{last stage}`` is the official final ``norm`` (the
others have no official counterpart and are dropped, noted); ``head.fc`` for the classifier.

The merging gathers its 2x2 neighbourhood with ``nn.Unfold``: the 4C input of the reduction
is channel-major (index c*4 + k) over the kernel positions k = (0,0), (0,1), (1,0), (1,1)
(row, col), while the official concatenation is position-major (u*C + c) over (0,0), (1,0),
(0,1), (1,1). The reduction weight's columns are permuted accordingly; its LayerNorm, which
comes after the reduction in V2, is not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ._table import Notes, Table, Transform, stage_count

NAME = "mmpretrain"
PREFIX = "backbone."
# Sub-patch (row, col) orders: official (0,0), (1,0), (0,1), (1,1); nn.Unfold (0,0), (0,1), (1,0),
# (1,1). Unfold position k is official position SUBPATCH_PERM[k] and vice versa (the permutation
# swaps the middle two, so it is its own inverse).
SUBPATCH_PERM = (0, 2, 1, 3)

_B = "backbone.stages.{}.blocks.{}."


def reduction_to_unfold_order(weight: torch.Tensor) -> tuple[torch.Tensor]:
    """Official reduction weight (out, 4C), columns u*C + c -> mmpretrain's, columns c*4 + k."""
    out_dim, in_dim = weight.shape
    if in_dim % 4:
        raise ValueError(f"reduction weight of shape {tuple(weight.shape)}: input is not 4C")
    w = weight.reshape(out_dim, 4, in_dim // 4)[:, list(SUBPATCH_PERM), :]  # (out, k, C)
    return (w.transpose(1, 2).reshape(out_dim, in_dim).contiguous(),)


def reduction_from_unfold_order(weight: torch.Tensor) -> tuple[torch.Tensor]:
    """mmpretrain reduction weight (out, 4C), columns c*4 + k -> official, columns u*C + c."""
    out_dim, in_dim = weight.shape
    if in_dim % 4:
        raise ValueError(f"reduction weight of shape {tuple(weight.shape)}: input is not 4C")
    w = weight.reshape(out_dim, in_dim // 4, 4).transpose(1, 2)  # (out, k, C)
    return (w[:, list(SUBPATCH_PERM), :].reshape(out_dim, in_dim).contiguous(),)


TABLE = Table(
    NAME,
    [
        ("patch_embed.proj", "backbone.patch_embed.projection"),
        ("patch_embed.norm", "backbone.patch_embed.norm"),
        ("absolute_pos_embed", "backbone.absolute_pos_embed"),
        ("layers.{}.blocks.{}", _B[:-1]),  # norm1, norm2, norm3 keep their names
        ("layers.{}.blocks.{}.attn", _B + "attn.w_msa"),
        ("layers.{}.blocks.{}.mlp.fc1", _B + "ffn.layers.0.0"),
        ("layers.{}.blocks.{}.mlp.fc2", _B + "ffn.layers.1"),
        ("layers.{}.blocks.{}.attn_mask", None, "shift masks (mmpretrain builds them per forward)"),
        ("layers.{}.downsample", "backbone.stages.{+1}.downsample"),
        Transform(
            "permuted the merging reduction weight between nn.Unfold and official order",
            official=("layers.{}.downsample.reduction.weight",),
            peer=("backbone.stages.{+1}.downsample.reduction.weight",),
            to_official=reduction_from_unfold_order,
            from_official=reduction_to_unfold_order,
        ),
        ("head", "head.fc"),
        (None, "data_preprocessor", "data preprocessor buffers"),
    ],
)

_OUT_NORM = re.compile(r"backbone\.norm(\d+)\.(.+)")


def to_official(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    notes = Notes()
    if not any(k.startswith(PREFIX) for k in state):
        state = {(k if k.startswith(("head.", "data_preprocessor.")) else PREFIX + k): v for k, v in state.items()}
        notes.append("mmpretrain: bare backbone state dict (no 'backbone.' prefix)")
    last = stage_count(state, r"backbone\.stages\.(\d+)\.") - 1
    rest, final_norm, other_norms = {}, {}, []
    for key, value in state.items():
        m = _OUT_NORM.fullmatch(key)
        if m and int(m.group(1)) == last:
            final_norm[f"norm.{m.group(2)}"] = value
        elif m:
            other_norms.append(key)
        else:
            rest[key] = value
    out, more = TABLE.convert(rest, to_official=True)
    out.update(final_norm)
    if other_norms:
        notes.dropped += other_norms
        notes.append(
            f"mmpretrain: dropped {len(other_norms)} output norms of earlier stages (out_indices), which the "
            f"official model does not have: {', '.join(other_norms)}"
        )
    if not final_norm:
        notes.append(f"mmpretrain: no output norm of the last stage (backbone.norm{last}); out_indices without it?")
    return out, notes + more


def from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    last = stage_count(state, r"layers\.(\d+)\.") - 1
    norm = {k: v for k, v in state.items() if k.startswith("norm.")}
    out = TABLE.convert({k: v for k, v in state.items() if k not in norm}, to_official=False)[0]
    out.update({f"backbone.norm{last}.{k[len('norm.'):]}": v for k, v in norm.items()})
    return out
