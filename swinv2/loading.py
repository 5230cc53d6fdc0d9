"""Loading state dicts into a SwinTransformerV2, with a report of what happened.

Files are read without running code: safetensors, or ``torch.load(weights_only=True)``. Any
layout :mod:`swinv2.convert` knows (official, SimMIM, timm, transformers, torchvision,
mmpretrain) is detected and converted to the official one first.
"""

from __future__ import annotations

import os
import warnings
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
    "NonFiniteWeightsWarning",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "load_pretrained",
    "nonfinite_tensors",
    "read_checkpoint",
    "read_state_dict",
    "unwrap_state_dict",
    "warn_nonfinite",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose contents are not a state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that refers to Python objects other than tensors: refused, never unpickled."""


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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (safetensors, or a torch file read with weights_only; see
    :func:`read_checkpoint`), or of a Hugging Face model folder (see :mod:`swinv2.hf_folder`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from .hf_folder import read_hf_weights  # imported here: hf_folder uses this module

        return read_hf_weights(path)
    return unwrap_state_dict(read_checkpoint(path), source=path)


# What a file starts with: safetensors (an 8-byte little-endian header length, then the JSON
# header), a zip archive (torch.save since 1.6), or a pickle (torch.save's older format).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_PROTO = 0x80
# How much pickle data is scanned to name the Python objects of a refused file.
_SCAN_LIMIT = 64 << 20


def read_checkpoint(path: str | os.PathLike):
    """The content of a checkpoint file, read without running code from it: a safetensors
    file gives its dict of tensors, a torch file what ``torch.load(weights_only=True)`` gives
    (tensors in plain containers, numbers, strings).

    Every file that cannot be read gets one line naming it: missing (FileNotFoundError), a
    folder, empty, neither safetensors nor a torch file, truncated or damaged
    (:class:`CheckpointError`); a pickle naming Python objects other than tensors is refused
    (:class:`UnsafeCheckpointError`) without unpickling them.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise CheckpointError(f"{path} is not a regular file, so not a checkpoint")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(9)
    if _is_safetensors_head(head):
        return _read_safetensors(path)
    if head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTO]):
        return _read_torch(path, zipped=head.startswith(_ZIP_MAGIC))
    raise CheckpointError(f"{path} is not a readable checkpoint (neither safetensors nor a PyTorch file)")


def _is_safetensors_head(head: bytes) -> bool:
    # safetensors refuses headers of 100 MB or more, so a larger length is not one
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def check_safetensors_length(path: str | os.PathLike) -> None:
    """CheckpointError when a file that starts like safetensors is shorter than the header it
    announces (cut while it was written or copied)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if 8 + header_len > size:
        raise CheckpointError(
            f"{os.fspath(path)} is a truncated safetensors file: its header announces {header_len} bytes, "
            f"the file has {size}"
        )


def safetensors_error(path: str | os.PathLike, err: Exception) -> CheckpointError:
    """The one-line error for a safetensors file that safetensors cannot read."""
    reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return CheckpointError(f"{os.fspath(path)} is a truncated or damaged safetensors file ({type(err).__name__}: "
                           f"{reason})")


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    check_safetensors_length(path)
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # noqa: BLE001 - every reader failure becomes one clear message
        raise safetensors_error(path, err) from err


def _read_torch(path: str, zipped: bool):
    import pickle
    import zipfile

    if zipped and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is a truncated or damaged PyTorch file (its zip directory is missing)")
    if zipped and _zip_pickle_name(path) is None:
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch file (it has no data.pkl)")
    try:
        with warnings.catch_warnings():  # torch's remark on an unusual pickle protocol, before our own error
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reader failure becomes one clear message
        objects = _foreign_objects(path, zipped)
        # torch names a refused global "GLOBAL module.name" in every release that has weights_only
        if objects or (isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err)):
            named = f" ({', '.join(objects[:3])}{', ...' if len(objects) > 3 else ''})" if objects else ""
            raise UnsafeCheckpointError(
                f"refused to load {path}: it contains Python objects other than tensors{named}; "
                "only safetensors files and plain tensor files are read"
            ) from None
        if isinstance(err, pickle.UnpicklingError):
            reason = "its pickle is damaged or was not written by torch.save"
        else:
            reason = _one_line(err)
        raise CheckpointError(f"{path} is a truncated or damaged PyTorch file ({reason})") from err


def _one_line(err: BaseException) -> str:
    """The first line of an exception's message, without advice to load with weights_only=False."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if "weights_only" in text:
        text = "torch.load refused it"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _foreign_objects(path: str, zipped: bool) -> list[str]:
    """The Python objects (``module.name``) a torch file's pickle refers to beyond what
    ``torch.load(weights_only=True)`` accepts, found by reading its opcodes (nothing is run);
    [] when there are none or the pickle cannot be parsed."""
    import zipfile

    try:
        if zipped:
            name = _zip_pickle_name(path)
            if name is None:
                return []
            with zipfile.ZipFile(path) as archive, archive.open(name) as f:
                data = f.read(_SCAN_LIMIT)
        else:
            with open(path, "rb") as f:
                data = f.read(_SCAN_LIMIT)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return []
    allowed = _tensor_globals()
    return sorted({name for name in _pickle_globals(data) if name not in allowed})


def _zip_pickle_name(path: str) -> str | None:
    """The member of a torch zip archive that holds its pickle (``<name>/data.pkl``), or None."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def _tensor_globals() -> set[str]:
    """The ``module.name`` globals ``torch.load(weights_only=True)`` accepts."""
    try:
        from torch import _weights_only_unpickler

        allowed = set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # a torch without that helper: the few names every tensor file uses
        allowed = set()
    safe = getattr(torch.serialization, "get_safe_globals", lambda: [])()
    allowed |= {f"{g.__module__}.{g.__qualname__}" if callable(g) else str(g) for g in safe if not isinstance(g, tuple)}
    return allowed or {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}


def _pickle_globals(data: bytes) -> set[str]:
    """``module.name`` of each global a pickle stream refers to (GLOBAL, INST, STACK_GLOBAL),
    read with :mod:`pickletools` (which parses, never executes). A legacy torch file holds
    several pickles one after the other; each is read."""
    import io
    import pickletools

    found: set[str] = set()
    stream = io.BytesIO(data)
    for _ in range(5):  # legacy files: magic number, protocol, system info, the object, storage keys
        pushed: list = []  # recent stack pushes: strings, or None for anything else
        memo: dict = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.add(_python3_name(*str(arg).split(" ", 1)))
                elif op.name == "STACK_GLOBAL":
                    if len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                        found.add(_python3_name(pushed[-2], pushed[-1]))
                    else:
                        found.add("an unnamed global")
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op.name == "STOP":
                    break
                else:
                    is_text = isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name)
                    pushed.append(arg if is_text else None)
                del pushed[:-2]
        except (ValueError, EOFError, UnicodeDecodeError):
            break
        if stream.tell() >= len(data):
            break
    return found


def _python3_name(module: str, name: str = "") -> str:
    # protocol 0-2 pickles name Python 2 modules, which unpickling maps to their Python 3 names
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
    return f"{module}.{name}"


def unwrap_state_dict(obj, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: itself, or under 'model' / 'state_dict' / 'module'."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds no state dict (got {type(obj).__name__}, not a mapping of tensors)")
    if not obj:
        raise CheckpointError(f"{source} holds no tensors")
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
    name: str | None = None,
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

    Tensors holding NaN or infinite values are loaded as they are, listed in the report's
    ``nonfinite`` and warned about once (:class:`NonFiniteWeightsWarning`). ``name``: what the
    report and the warning call a mapping ``source`` (default "state dict"), e.g. the file
    it was read from.
    """
    from .simmim import SimMIM  # imported here: simmim.py uses this module

    if isinstance(model, SimMIM):  # encoder + mask token + decoder: SimMIM splits the checkpoint itself
        return model.load_pretrained(source, strict, fmt=fmt, head=head, head_map=head_map)
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    if head_map is not None and head == "drop":
        raise ValueError("head_map selects rows of a head that head='drop' would not load")
    if isinstance(source, Mapping):
        name, state = name or "state dict", unwrap_state_dict(source, source=name or "state dict")
    else:
        name, state = os.fspath(source), read_state_dict(source)

    try:
        report_format = detect_format(state) if fmt is None else fmt
    except UnknownFormatError as err:
        raise UnknownFormatError(f"{name}: {err}") from None
    state, notes = to_official(state, report_format)
    report = LoadReport(source=name, format=report_format, notes=list(notes))
    if not isinstance(source, Mapping) and os.path.isdir(name):
        from .hf_folder import CONFIG_NAME, config_differences, read_hf_config

        report.notes += config_differences(model, read_hf_config(name), os.path.join(name, CONFIG_NAME))
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
    report.nonfinite = warn_nonfinite(loadable, name)
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
