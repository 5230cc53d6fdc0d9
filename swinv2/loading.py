"""Loading state dicts into a SwinTransformerV2, with a report of what happened.

Files are read without running code: safetensors, or ``torch.load(weights_only=True)``. Any
layout :mod:`swinv2.convert` knows (official, SimMIM, timm, transformers, torchvision,
mmpretrain) is detected and converted to the official one first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .convert import DERIVED_BUFFERS, UnknownFormatError, detect_format, to_official
from .layers import relative_coords_table

# DERIVED_BUFFERS (re-exported here): buffers the official code stores in checkpoints; swinv2
# derives them from the input size and window at forward time, so they are dropped on load.
HEAD_MODES = ("keep", "auto", "drop")
HEAD_PREFIX = "head."
__all__ = [
    "DERIVED_BUFFERS",
    "HEAD_MODES",
    "CheckpointError",
    "LoadReport",
    "StateDictMismatchError",
    "load_pretrained",
    "read_state_dict",
    "unwrap_state_dict",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose contents are not a state dict."""


class StateDictMismatchError(ValueError):
    """A state dict whose keys or shapes do not fit the model; the message names them."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. ``str(report)`` gives a readable summary.

    ``format``: the checkpoint's layout (see :func:`swinv2.convert.detect_format`); ``notes``:
    what its conversion did, and other remarks; ``dropped``: the derived buffers left out;
    ``discarded``: checkpoint tensors left out on purpose (a SimMIM decoder and mask token, a
    head that does not fit under ``head="auto"``); ``head``: what happened to the classifier
    when anything but a plain load.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    format: str = ""
    discarded: list[str] = field(default_factory=list)
    head: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        fmt = f" ({self.format} layout)" if self.format else ""
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}{fmt}"]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} derived buffers ({', '.join(DERIVED_BUFFERS)})")
        lines += _name_list("checkpoint tensors not loaded on purpose", self.discarded)
        if self.head:
            lines.append(f"head: {self.head}")
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
    """Tensors of a checkpoint file (safetensors, or a torch pickle read with weights_only), or
    of a Hugging Face model folder (see :mod:`swinv2.hf_folder`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from .hf_folder import read_hf_weights  # imported here: hf_folder uses this module

        return read_hf_weights(path)
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
    *,
    fmt: str | None = None,
    head: str = "keep",
    head_map: Sequence[int] | torch.Tensor | str | os.PathLike | None = None,
) -> LoadReport:
    """Load a state dict (a file, a Hugging Face model folder, or a mapping; bare or wrapped in
    {'model': ...}) into ``model`` and return a :class:`LoadReport`.

    The layout is detected (or given as ``fmt``: official, simmim, swinv2, timm, hf, torchvision,
    mmpretrain) and converted to the official one by :mod:`swinv2.convert`; the report names
    the format and what the conversion did. Derived buffers are dropped (their coordinates
    checked against the model); a SimMIM checkpoint's decoder and mask token are left out,
    unless ``model`` is a :class:`swinv2.simmim.SimMIM`, which loads them too.

    ``head`` decides what happens to the classifier (``head.weight`` / ``head.bias``):

    - ``"keep"`` (default): it is loaded like every other tensor; a missing or mis-shaped head
      is an error under ``strict``;
    - ``"auto"``: loaded if its shapes fit the model; otherwise (another class count, a model
      without a head) it is dropped, and a checkpoint without a head leaves the model's head at
      its initialisation; the report says which;
    - ``"drop"``: never loaded; the model's head keeps its initialisation.

    ``head_map`` selects checkpoint head rows before that, e.g. the 1000 ImageNet-1k rows of an
    ImageNet-22k head (the official ``data/map22kto1k.txt``): a sequence of row indices, or the
    path of a text file with one index per line.

    With ``strict=True`` any other missing, unexpected or mis-shaped key raises
    :class:`StateDictMismatchError` naming them, and the model is left untouched. With
    ``strict=False`` the matching tensors are loaded and the rest reported.
    """
    from .simmim import SimMIM  # imported here: simmim.py uses this module

    if isinstance(model, SimMIM):  # encoder + mask token + decoder: SimMIM splits the checkpoint itself
        return model.load_pretrained(source, strict, fmt=fmt, head=head, head_map=head_map)
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    if head_map is not None and head == "drop":
        raise ValueError("head_map selects rows of a head that head='drop' would not load")
    if isinstance(source, Mapping):
        name, state = "state dict", unwrap_state_dict(source)
    else:
        name, state = os.fspath(source), read_state_dict(source)

    try:
        report_format = detect_format(state) if fmt is None else fmt
    except UnknownFormatError as err:
        raise UnknownFormatError(f"{name}: {err}") from None
    state, notes = to_official(state, report_format)
    report = LoadReport(source=name, format=report_format, notes=list(notes))
    if not isinstance(source, Mapping) and os.path.isdir(name):
        from .hf_folder import config_differences, read_hf_config

        report.notes += config_differences(model, read_hf_config(name))
    report.discarded += getattr(notes, "dropped", [])
    for key in list(state):
        if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            report.dropped.append(key)
            tensor = state.pop(key)
            if key.endswith("relative_coords_table"):
                _check_coords(model, key, tensor, report)

    own = model.state_dict()
    exempt = _resolve_head(state, own, head, head_map, report)  # model head keys not required
    report.missing = [k for k in own if k not in state and k not in exempt]
    report.unexpected = [k for k in state if k not in own]
    report.mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if strict and not report.ok:
        hint = ""
        if any(k.startswith(HEAD_PREFIX) for k in report.missing + report.unexpected) or any(
            k.startswith(HEAD_PREFIX) for k, _, _ in report.mismatched
        ):
            hint = "\n(the classifier head does not fit: head='auto' or head='drop' loads the rest)"
        raise StateDictMismatchError(f"state dict does not fit the model\n{report}{hint}")
    bad = {k for k, _, _ in report.mismatched}
    loadable = {k: v for k, v in state.items() if k in own and k not in bad}
    model.load_state_dict(loadable, strict=False)
    report.loaded = sorted(loadable)
    return report


def _read_head_map(head_map) -> torch.Tensor:
    if isinstance(head_map, (str, os.PathLike)):
        with open(head_map) as f:
            rows = [int(tok) for line in f for tok in line.split()]
    else:
        rows = head_map.tolist() if isinstance(head_map, torch.Tensor) else [int(i) for i in head_map]
    return torch.tensor(rows, dtype=torch.long)


def _resolve_head(state: dict, own: Mapping, head: str, head_map, report: LoadReport) -> set[str]:
    """Apply ``head`` / ``head_map`` to the converted ``state`` (in place) and say so in the
    report; returns the model head keys that may stay missing."""
    ckpt = sorted(k for k in state if k.startswith(HEAD_PREFIX))
    model_keys = {k for k in own if k.startswith(HEAD_PREFIX)}
    rows = _classes(state)
    if head_map is not None:
        if not ckpt:
            raise ValueError("head_map given, but the checkpoint has no head")
        index = _read_head_map(head_map)
        if index.numel() and (index.min() < 0 or index.max() >= rows):
            raise ValueError(f"head_map indices must lie in [0, {rows}), got {index.min()}..{index.max()}")
        for key in ckpt:
            state[key] = state[key].index_select(0, index)
        report.head = f"selected {index.numel()} of the checkpoint's {rows} head rows with head_map"
        rows = index.numel()
    if head == "keep":
        return set()
    if not ckpt:
        if model_keys:
            report.head = "the checkpoint has no head; the model's head keeps its initialisation"
        return model_keys
    fits = model_keys == set(ckpt) and all(state[k].shape == own[k].shape for k in ckpt)
    if head == "auto" and fits:
        return set()
    for key in ckpt:
        state.pop(key)
    report.discarded += ckpt
    if head == "drop":
        why = "head='drop'"
    elif not model_keys:
        why = "the model has no head"
    else:
        why = f"it does not fit the model's head ({_classes(own)} classes)"
    kept = "; the model's head keeps its initialisation" if model_keys else ""
    report.head = f"dropped the checkpoint's head ({rows} classes): {why}{kept}"
    return model_keys


def _classes(state: Mapping) -> int:
    w = state.get("head.weight", state.get("head.bias"))
    return int(w.shape[0]) if w is not None else 0


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
