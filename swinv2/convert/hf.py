"""Hugging Face transformers ``Swinv2ForImageClassification`` (release 5.x layout; peers.md 3.5).

Separate ``query``/``key``/``value`` Linears (``key`` without bias) instead of one ``qkv``: the
official ``qkv.weight`` is their row-wise concatenation, ``q_bias``/``v_bias`` are the query and
value biases. The merging keeps its stage index. Buffers are not persistent.

Also read: ``Swinv2ForMaskedImageModeling`` (its ``decoder`` and ``embeddings.mask_token`` are
dropped, noted) and bare ``Swinv2Model`` / ``Swinv2Backbone`` state dicts without the ``swinv2.``
prefix (a backbone's per-stage ``hidden_states_norms`` are dropped, noted). Written:
``Swinv2ForImageClassification`` (``classifier`` only when the state dict has a head).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._table import Notes, Table, Transform

NAME = "hf"
PREFIX = "swinv2."
# Top-level modules of a bare Swinv2Model / Swinv2Backbone, which get the ``swinv2.`` prefix.
BARE_ROOTS = ("embeddings.", "encoder.", "layernorm.", "hidden_states_norms.")

_B = "swinv2.encoder.layers.{}.blocks.{}."


def merge_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor]:
    """HF query/key/value weights (C, C) each -> official ``qkv.weight`` (3C, C)."""
    return (torch.cat([query, key, value], dim=0),)


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official ``qkv.weight`` (3C, C) -> HF query, key, value weights (separate tensors)."""
    if qkv.shape[0] % 3:
        raise ValueError(f"qkv.weight has {qkv.shape[0]} rows, not a multiple of 3")
    return tuple(part.clone() for part in qkv.chunk(3, dim=0))


TABLE = Table(
    NAME,
    [
        ("patch_embed.proj", "swinv2.embeddings.patch_embeddings.projection"),
        ("patch_embed.norm", "swinv2.embeddings.norm"),
        # res-post-norm: HF's layernorm_before is applied to the attention output, as official norm1
        ("layers.{}.blocks.{}.norm1", _B + "layernorm_before"),
        ("layers.{}.blocks.{}.norm2", _B + "layernorm_after"),
        ("layers.{}.blocks.{}.attn.logit_scale", _B + "attention.self.logit_scale"),
        ("layers.{}.blocks.{}.attn.cpb_mlp", _B + "attention.self.continuous_position_bias_mlp"),
        ("layers.{}.blocks.{}.attn.q_bias", _B + "attention.self.query.bias"),
        ("layers.{}.blocks.{}.attn.v_bias", _B + "attention.self.value.bias"),
        Transform(
            "merged query/key/value weights into qkv.weight",
            official=("layers.{}.blocks.{}.attn.qkv.weight",),
            peer=tuple(_B + f"attention.self.{part}.weight" for part in ("query", "key", "value")),
            to_official=merge_qkv,
            from_official=split_qkv,
        ),
        ("layers.{}.blocks.{}.attn.proj", _B + "attention.output.dense"),
        ("layers.{}.blocks.{}.mlp.fc1", _B + "intermediate.dense"),
        ("layers.{}.blocks.{}.mlp.fc2", _B + "output.dense"),
        ("layers.{}.downsample", "swinv2.encoder.layers.{}.downsample"),
        ("norm", "swinv2.layernorm"),
        ("head", "classifier"),
        ("layers.{}.blocks.{}.attn_mask", None, "shift masks (HF derives them)"),
        ("layers.{}.blocks.{}.attn.relative_coords_table", None, "coordinate tables (HF buffers are not saved)"),
        ("layers.{}.blocks.{}.attn.relative_position_index", None, "position indices (HF buffers are not saved)"),
        (None, "swinv2.embeddings.mask_token", "masked-image-modeling mask token"),
        (None, "decoder", "masked-image-modeling decoder"),
        (None, "swinv2.hidden_states_norms", "Swinv2Backbone per-stage output norms"),
    ],
)


def to_official(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    notes = Notes()
    if not any(k.startswith(PREFIX) for k in state) and any(k.startswith(BARE_ROOTS) for k in state):
        state = {(PREFIX + k if k.startswith(BARE_ROOTS) else k): v for k, v in state.items()}
        notes.append("hf: bare Swinv2Model/Swinv2Backbone state dict (no 'swinv2.' prefix)")
    out, more = TABLE.convert(state, to_official=True)
    return out, notes + more


def from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return TABLE.convert(state, to_official=False)[0]
