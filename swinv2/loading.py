"""The one loader: weights from any source into a model, with a report of what happened.

:func:`load_pretrained` reads the source with :func:`swinv2.reading.read_weights` (files are
never run: safetensors, or ``torch.load(weights_only=True)``), converts any layout
:mod:`swinv2.convert` knows (official, SimMIM, timm, transformers, torchvision, mmpretrain) to
the official one, and loads it into a :class:`~swinv2.SwinTransformerV2` or a
:class:`~swinv2.SimMIM`. :func:`build_model` rebuilds the model a source describes (a swinv2
file, a training checkpoint, a transformers folder) and loads it; :func:`load_model` and
:func:`load_hf_folder` are that for one kind of source each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .convert import DERIVED_BUFFERS, UnknownFormatError, detect_format, to_official
from .files import CheckpointError, is_safetensors, read_safetensors_metadata
from .hf_folder import CONFIG_NAME, config_differences, match_fixed_eps, norm_layer_for, warn_window_mismatch
from .layers import relative_coords_table
from .model import SwinTransformerV2
from .reading import Weights, read_weights
from .simmim import SimMIM
from .video import VideoSwinTransformerV2, inflate_image_state
from .windows import resize_bias_table

# DERIVED_BUFFERS: buffers the official code stores in checkpoints; swinv2 derives them from the
# input size and window at forward time, so they are dropped on load.
HEAD_MODES = ("keep", "auto", "drop")
HEAD_PREFIX = "head."
# Constructor arguments that change the windows transformers would build from a config.json.
_WINDOW_SETTINGS = ("img_size", "window_size", "window_rule", "patch_size")
__all__ = [
    "DERIVED_BUFFERS",
    "HEAD_MODES",
    "LoadReport",
    "NonFiniteWeightsWarning",
    "StateDictMismatchError",
    "build_model",
    "load_hf_folder",
    "load_model",
    "load_pretrained",
    "nonfinite_tensors",
    "warn_nonfinite",
]


class StateDictMismatchError(ValueError):
    """A state dict whose keys or shapes do not fit the model; the message names them."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. ``str(report)`` gives a readable summary.

    ``format``: the checkpoint's layout (see :func:`swinv2.convert.detect_format`); ``notes``:
    what its conversion did, and other remarks; ``dropped``: the derived buffers left out;
    ``discarded``: checkpoint tensors left out on purpose (a SimMIM decoder and mask token, a
    head that does not fit under ``head="auto"``); ``head``: what happened to the classifier
    when anything but a plain load; ``nonfinite``: the loaded tensors that hold NaN or
    infinite values (loaded as they are, and warned about).
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
    nonfinite: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        fmt = f" ({self.format} layout)" if self.format else ""
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}{fmt}"]
        if self.nonfinite:
            lines.append(f"warning: {nonfinite_summary(self.nonfinite)}")
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


class NonFiniteWeightsWarning(UserWarning):
    """Weights that hold NaN or infinite values: a model loaded from them computes NaN."""


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def nonfinite_summary(names: Sequence[str], limit: int = 5) -> str:
    """One line naming the first ``limit`` of ``names`` (tensors with NaN or inf) and their count."""
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    verb = "tensor holds" if len(names) == 1 else "tensors hold"
    return f"{len(names)} {verb} NaN or infinite values: {shown}"


def warn_nonfinite(state: Mapping[str, torch.Tensor], source: str, stacklevel: int = 2) -> list[str]:
    """Warn once (:class:`NonFiniteWeightsWarning`, naming ``source``) when tensors of ``state``
    hold NaN or infinite values; returns their names."""
    names = nonfinite_tensors(state)
    if names:
        warnings.warn(f"{source}: {nonfinite_summary(names)}", NonFiniteWeightsWarning, stacklevel=stacklevel + 1)
    return names


def _name_list(title: str, names: list[str], limit: int = 20) -> list[str]:
    if not names:
        return []
    shown = [f"  {n}" for n in names[:limit]]
    if len(names) > limit:
        shown.append(f"  ... and {len(names) - limit} more")
    return [f"{len(names)} {title}:"] + shown


def load_pretrained(
    model: nn.Module,
    source,
    strict: bool = True,
    *,
    fmt: str | None = None,
    head: str = "keep",
    head_map: Sequence[int] | torch.Tensor | str | os.PathLike | None = None,
    name: str | None = None,
) -> LoadReport:
    """Load weights from ``source`` into ``model`` and return a :class:`LoadReport`.

    ``source``: anything :func:`swinv2.reading.read_weights` reads: a file, a Hugging Face
    folder, a URL, released weights (``arch.tag``), a Hub repository (``hf-hub:...``), a
    training checkpoint, or a state dict (bare or wrapped in {'model': ...}).

    The layout is detected (or given as ``fmt``: official, simmim, swinv2, timm, hf, torchvision,
    mmpretrain) and converted to the official one by :mod:`swinv2.convert`; the report names
    the format and what the conversion did. Derived buffers are dropped (their coordinates
    checked against the model); a SimMIM checkpoint's decoder and mask token are left out,
    unless ``model`` is a :class:`swinv2.SimMIM`, which loads them too (its encoder takes the
    rest, with ``fmt``, ``head`` and ``head_map`` as here).

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

    Tensors holding NaN or infinite values are loaded as they are, listed in the report's
    ``nonfinite`` and warned about once (:class:`NonFiniteWeightsWarning`). ``name``: what the
    report and the warning call a mapping ``source`` (default "state dict"), e.g. the file
    it was read from.
    """
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    if head_map is not None and head == "drop":
        raise ValueError("head_map selects rows of a head that head='drop' would not load")
    weights = read_weights(source, name=name)
    if isinstance(model, SimMIM):  # encoder + mask token + decoder
        return _load_simmim(model, weights, strict, fmt, head, head_map)
    return _load_network(model, weights, strict, fmt, head, head_map)


def _load_network(model: nn.Module, weights: Weights, strict: bool, fmt: str | None, head: str,
                  head_map) -> LoadReport:
    """Convert ``weights`` to the official layout and load them into a network."""
    try:
        report_format = fmt or weights.format or detect_format(weights.state)
    except UnknownFormatError as err:
        raise UnknownFormatError(f"{weights.source}: {err}") from None
    state, notes = to_official(weights.state, report_format)
    report = LoadReport(source=weights.source, format=report_format, notes=list(notes))
    if weights.hf_config is not None:
        report.notes += config_differences(model, weights.hf_config, os.path.join(weights.path, CONFIG_NAME))
    report.discarded += getattr(notes, "dropped", [])
    for key in list(state):
        if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            report.dropped.append(key)
            tensor = state.pop(key)
            if key.endswith("relative_coords_table"):
                _check_coords(model, key, tensor, report)
    if isinstance(model, VideoSwinTransformerV2):
        report.notes += inflate_image_state(state, model)  # image weights into the video model
    report.notes += _fit_bias_tables(model, state)

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
    report.nonfinite = warn_nonfinite(loadable, weights.source)
    model.load_state_dict(loadable, strict=False)
    report.loaded = sorted(loadable)
    return report


def _load_simmim(sim: SimMIM, weights: Weights, strict: bool, fmt: str | None, head: str, head_map) -> LoadReport:
    """A SimMIM checkpoint into :class:`SimMIM`: official pre-training files (``encoder.*`` with
    ``encoder.mask_token``, the ``decoder.0`` convolution, buffers, the old ``rpe_mlp`` name) and
    SimMIM's own state dicts. The mask token and decoder are loaded here, the rest into the
    encoder. With ``strict`` nothing is loaded unless everything fits."""
    state = dict(weights.state)
    if state and all(k.startswith("module.") for k in state):  # a DistributedDataParallel state dict
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = {k: v for k, v in sim.state_dict().items() if not k.startswith("encoder.")}
    ours = {}
    for key in list(state):
        name = "mask_token" if key in ("mask_token", "encoder.mask_token") else key
        if name in own or key.startswith("decoder."):
            if name in ours:
                raise StateDictMismatchError(f"the checkpoint has two mask tokens: {key} and mask_token")
            ours[name] = state.pop(key)
    missing = sorted(set(own) - set(ours))
    unexpected = sorted(set(ours) - set(own))
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in ours.items()
                  if k in own and v.shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        problems = (("missing", missing), ("not in the model", unexpected),
                    ("shape differs (checkpoint vs model)", mismatched))
        raise StateDictMismatchError(
            "SimMIM checkpoint does not fit: " + "; ".join(f"{title} {items}" for title, items in problems if items)
        )
    if not state:
        raise StateDictMismatchError("the checkpoint holds no encoder tensors")
    encoder = dataclasses.replace(weights, state=state)
    report = _load_network(sim.encoder, encoder, strict, fmt, head, head_map)  # raises before loading anything
    bad = {k for k, _, _ in mismatched}
    fitting = {k: v for k, v in ours.items() if k in own and k not in bad}
    sim.load_state_dict(fitting, strict=False)
    report.loaded = sorted(fitting) + [f"encoder.{k}" for k in report.loaded]
    report.missing = missing + [f"encoder.{k}" for k in report.missing]
    report.unexpected = unexpected + [f"encoder.{k}" for k in report.unexpected]
    report.mismatched = mismatched + [(f"encoder.{k}", a, b) for k, a, b in report.mismatched]
    return report


# -- models rebuilt from their source -------------------------------------------------------


def build_model(
    source,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> SwinTransformerV2:
    """Rebuild the :class:`~swinv2.SwinTransformerV2` that ``source`` describes (a swinv2 file,
    a training checkpoint, a transformers folder: anything whose :class:`Weights` carry a
    ``config``) and load its weights strictly.

    ``overrides``: constructor arguments to change (``img_size``, ``window_size``,
    ``drop_path_rate``...); a different ``num_classes`` leaves the head freshly initialised.
    ``dtype``: default, the weights' floating dtype when they have one. ``device``: where to
    build. A transformers folder's model keeps its LayerNorm eps, and a warning names the
    stages where transformers' build-time windows differ from swinv2's.
    """
    weights = read_weights(source)
    if weights.config is None:
        raise CheckpointError(f"{weights.source} does not say which model it holds (no model config)")
    model = _construct(weights, device, overrides)
    floating = {t.dtype for t in weights.state.values() if t.is_floating_point()}
    if dtype is None and len(floating) == 1:
        dtype = floating.pop()
    if dtype is not None:
        model.to(dtype)
    new_head = "num_classes" in overrides and overrides["num_classes"] != weights.config.get("num_classes")
    try:
        load_pretrained(model, weights, strict=True, head="drop" if new_head else "keep")
    except StateDictMismatchError as err:
        raise StateDictMismatchError(f"{weights.source}: {err}") from err
    return model


def _construct(weights: Weights, device, overrides: dict) -> SwinTransformerV2:
    """The model ``weights.config`` (with ``overrides``) describes, not loaded yet. A
    transformers folder's model gets its LayerNorm eps and is checked for windows transformers
    would build otherwise."""
    kwargs = {**weights.config, **overrides}
    norm_layer = None
    if weights.hf_config is not None and "norm_layer" not in overrides:
        norm_layer = norm_layer_for(weights.hf_config)
        if norm_layer is not None:
            kwargs["norm_layer"] = norm_layer
    network = network_class(kwargs)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = network(**kwargs)
    except (TypeError, ValueError) as err:
        if weights.hf_config is not None:
            where = os.path.join(weights.path, CONFIG_NAME)
        else:
            where = f"the config stored in{' (with your overrides)' if overrides else ''} {weights.source}"
        raise CheckpointError(f"{where} cannot build a {network.__name__}: {err}") from err
    if norm_layer is not None:
        match_fixed_eps(model)
    if weights.hf_config is not None and not set(_WINDOW_SETTINGS) & set(overrides):
        warn_window_mismatch(model, weights.hf_config, weights.path)
    return model


def network_class(config: Mapping) -> type[SwinTransformerV2] | type[VideoSwinTransformerV2]:
    """The network a saved config describes: a video one says how many frames it takes."""
    return VideoSwinTransformerV2 if "num_frames" in config else SwinTransformerV2


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> SwinTransformerV2:
    """Rebuild the model saved by :func:`swinv2.save_pretrained` from the file alone and load
    its weights (safetensors: nothing is unpickled); see :func:`build_model` for the arguments.
    Any other file is refused, saying how to load it. The model is the plain one:
    ``swinv2.create_model(pretrained=path)`` (or :func:`swinv2.fast.apply`) adds the speedups."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    weights = read_weights(path)
    if weights.kind != "swinv2":
        if weights.kind == "file" and is_safetensors(path):
            _, count = read_safetensors_metadata(path)
            raise CheckpointError(
                f"{path} is a safetensors file with {count} tensors but no swinv2 metadata (a bare state dict, "
                "e.g. a timm or official export), so it does not say which architecture it is: load it into one "
                f"with swinv2.create_model(name, pretrained={path!r})"
            )
        raise CheckpointError(
            f"{path} is not a swinv2 safetensors file (an official or timm .pth checkpoint?): load it into an "
            f"architecture with swinv2.create_model(name, pretrained={path!r})"
        )
    return build_model(weights, device=device, dtype=dtype, **overrides)


def load_hf_folder(
    folder: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> SwinTransformerV2:
    """Rebuild the model of a transformers SwinV2 folder from its ``config.json`` and load its
    weights strictly (see :func:`build_model`). The head follows the weights
    (``classifier``: its rows; none: no head)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    return build_model(folder, device=device, dtype=dtype, **overrides)


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


def _fit_bias_tables(model: nn.Module, state: dict) -> list[str]:
    """Resize, in ``state``, V1 position-bias tables saved for another window to the window of
    the model's attention (bicubic, as the official loader does), so that a table checkpoint
    loads at a larger window like a CPB one. Only square saved windows can be read off a table's
    length ((2w-1)^2 rows); any other mismatch is left for the report."""
    resized = 0
    for key, table in state.items():
        if not key.endswith("relative_position_bias_table") or table.ndim != 2:
            continue
        try:
            attn = model.get_submodule(key.rsplit(".", 1)[0])
        except AttributeError:
            continue  # not in this model: reported as unexpected
        own = getattr(attn, "relative_position_bias_table", None)
        side = (math.isqrt(table.shape[0]) + 1) // 2
        if own is None or own.shape == table.shape or own.shape[1] != table.shape[1] or (2 * side - 1) ** 2 != \
                table.shape[0] or len(attn.table_window) != 2:  # image tables only: a video's has three axes
            continue
        state[key] = resize_bias_table(table.float(), (side, side), attn.table_window).to(table.dtype)
        resized += 1
    return [f"resized {resized} V1 position-bias tables bicubically to the model's windows"] if resized else []


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
