"""Loading state dicts into a SwinTransformerV2, with a report of what happened.

Files are read without running code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import relative_coords_table

# Buffers the official code stores in checkpoints; here they are derived from the input size
# and window at forward time, so they are dropped on load.
DERIVED_BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose contents are not a state dict."""


class StateDictMismatchError(ValueError):
    """A state dict whose keys or shapes do not fit the model; the message names them."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. ``str(report)`` gives a readable summary."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} derived buffers ({', '.join(DERIVED_BUFFERS)})")
        lines += _name_list("missing from the checkpoint", self.missing)
        lines += _name_list("not in the model", self.unexpected)
        lines += _name_list(
            "shape differs (checkpoint vs model)",
            [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched],
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _name_list(title: str, names: list[str], limit: int = 20) -> list[str]:
    if not names:
        return []
    shown = [f"  {n}" for n in names[:limit]]
    if len(names) > limit:
        shown.append(f"  ... and {len(names) - limit} more")
    return [f"{len(names)} {title}:"] + shown


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (safetensors, or a torch pickle read with weights_only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if path.endswith(".safetensors") or _looks_like_safetensors(head):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reader failure becomes one clear message
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    return unwrap_state_dict(obj, source=path)


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors files start with the little-endian length of a JSON header, then '{'.
    return len(head) == 8 and int.from_bytes(head, "little") < 100_000_000 and not head.startswith(b"PK")


def unwrap_state_dict(obj, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: itself, or under 'model' / 'state_dict' / 'module'."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:5]}")
    return dict(obj)


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
) -> LoadReport:
    """Load an official-layout state dict (bare or wrapped in {'model': ...}, with or without
    the derived buffers) into ``model`` and return a :class:`LoadReport`.

    With ``strict=True`` any missing, unexpected or mis-shaped key raises
    :class:`StateDictMismatchError` naming them, and the model is left untouched. With
    ``strict=False`` the matching tensors are loaded and the rest reported.
    """
    if isinstance(source, Mapping):
        name, state = "state dict", unwrap_state_dict(source)
    else:
        name, state = os.fspath(source), read_state_dict(source)

    report = LoadReport(source=name)
    for key in list(state):
        if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            report.dropped.append(key)
            tensor = state.pop(key)
            if key.endswith("relative_coords_table"):
                _check_coords(model, key, tensor, report)
    # Older official SimMIM checkpoints call the position-bias MLP rpe_mlp.
    for key in [k for k in state if ".rpe_mlp." in k]:
        state[key.replace(".rpe_mlp.", ".cpb_mlp.")] = state.pop(key)

    own = model.state_dict()
    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    report.mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if strict and not report.ok:
        raise StateDictMismatchError(f"state dict does not fit the model\n{report}")
    bad = {k for k, _, _ in report.mismatched}
    loadable = {k: v for k, v in state.items() if k in own and k not in bad}
    model.load_state_dict(loadable, strict=False)
    report.loaded = sorted(loadable)
    return report


def _check_coords(model: nn.Module, key: str, table: torch.Tensor, report: LoadReport) -> None:
    """Note when a checkpoint's coordinate table disagrees with the model's at the same window:
    the model was then built with other ``pretrained_window_sizes`` than the checkpoint."""
    attn = model.get_submodule(key.rsplit(".", 1)[0]) if hasattr(model, "get_submodule") else None
    if attn is None or getattr(attn, "position_bias", None) not in ("log_cpb", "linear_cpb"):
        return
    window = ((table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2)
    spacing = "log" if attn.position_bias == "log_cpb" else "linear"
    ours = relative_coords_table(window, attn.pretrained_window_size, spacing)
    if ours.shape == table.shape and not torch.allclose(ours, table.float(), atol=1e-5):
        report.notes.append(
            f"{key}: the checkpoint's coordinates differ from the model's for window {window}; "
            "was it trained with other pretrained_window_sizes?"
        )
