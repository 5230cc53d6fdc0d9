"""The official layout (microsoft/Swin-Transformer), swinv2's own, and official SimMIM pre-training.

official
    ``models/swin_transformer_v2.py`` state dicts, classification and SimMIM fine-tuning alike:
    the reference layout, with the persistent buffers ``relative_coords_table``,
    ``relative_position_index`` and ``attn_mask``. Some SimMIM-era files call the position-bias
    MLP ``rpe_mlp``; it is renamed ``cpb_mlp``.
swinv2
    The same names without the buffers (swinv2 derives them at forward time).
simmim
    ``models/simmim.py`` pre-training checkpoints: the encoder under ``encoder.`` (plus
    ``encoder.mask_token``) and the decoder ``decoder.0.{weight,bias}``. Converting keeps the
    encoder; the mask token and decoder have no place in a classifier and are dropped (noted).
    Writing this format gives the encoder part only (``encoder.`` + official names, no head),
    which the official SimMIM fine-tuning loader reads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._table import DERIVED_BUFFERS, Notes, sample_keys

OLD_CPB_NAME = ".rpe_mlp."
SIMMIM_ENCODER = "encoder."
SIMMIM_DROPPED = {
    "encoder.mask_token": "the SimMIM mask token",
    "mask_token": "the SimMIM mask token",  # swinv2.SimMIM keeps it beside the encoder
    "decoder.": "the SimMIM decoder",
}


def rename_rpe_mlp(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    """``rpe_mlp`` (older official SimMIM name) -> ``cpb_mlp``."""
    old = [k for k in state if OLD_CPB_NAME in k]
    if not old:
        return dict(state), Notes()
    out = {k.replace(OLD_CPB_NAME, ".cpb_mlp."): v for k, v in state.items()}
    if len(out) != len(state):
        raise ValueError("the state dict has both rpe_mlp and cpb_mlp names for one block")
    return out, Notes([f"official: renamed {len(old)} rpe_mlp keys to cpb_mlp (older SimMIM name)"])


def to_official(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    return rename_rpe_mlp(state)


def from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state)


def swinv2_to_official(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    return rename_rpe_mlp(state)


def swinv2_from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}


def simmim_to_official(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Notes]:
    out, notes, dropped = {}, [], {}
    for key, value in state.items():
        why = next((w for p, w in SIMMIM_DROPPED.items() if key == p or (p.endswith(".") and key.startswith(p))), None)
        if why:
            dropped.setdefault(why, []).append(key)
        elif key.startswith(SIMMIM_ENCODER):
            out[key[len(SIMMIM_ENCODER) :]] = value
        else:
            out[key] = value
            notes.append(f"simmim: kept {key!r} (neither encoder nor decoder) unchanged")
    notes = Notes(
        [f"simmim: dropped {why}: {sample_keys(keys)}" for why, keys in dropped.items()] + notes,
        dropped=[k for keys in dropped.values() for k in keys],
    )
    notes.append("simmim: stripped the 'encoder.' prefix")
    out, more = rename_rpe_mlp(out)
    return out, notes + more


def simmim_from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {SIMMIM_ENCODER + k: v for k, v in state.items() if not k.startswith("head.")}
