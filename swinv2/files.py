"""Checkpoint files read without running code from them.

A file is read as safetensors, or with ``torch.load(weights_only=True)``, which rebuilds tensors
in plain containers and nothing else. A pickle that names other Python objects is refused with
one line naming them (found by reading its opcodes; nothing is unpickled), and every file that
cannot be read (missing, a folder, empty, truncated, damaged, neither format) gets one line
naming it. Everything else that reads weights (:mod:`swinv2.reading`, the training checkpoints)
comes through here.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "check_complete",
    "check_safetensors_length",
    "is_safetensors",
    "read_checkpoint",
    "read_safetensors_metadata",
    "safetensors_error",
    "unwrap_state_dict",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose contents are not a state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that refers to Python objects other than tensors: refused, never unpickled."""


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


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether the file starts like a safetensors file: an 8-byte header length, then '{'."""
    with open(path, "rb") as f:
        return _is_safetensors_head(f.read(9))


def read_safetensors_metadata(path: str | os.PathLike) -> tuple[dict[str, str], int]:
    """The metadata of a safetensors file and its tensor count, without reading the tensors;
    :class:`CheckpointError` when the file is truncated or damaged."""
    check_safetensors_length(path)
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {}), len(list(f.keys()))
    except Exception as err:  # noqa: BLE001 - every reader failure becomes one clear message
        raise safetensors_error(path, err) from err


def check_complete(path: str | os.PathLike) -> None:
    """:class:`CheckpointError` unless ``path`` is a whole checkpoint file, checked from its
    structure without reading its tensors: the header and the data it announces of a
    safetensors file, the directory at the end of a torch zip archive and its pickle. A legacy
    torch file (a bare pickle stream) has no such structure and is read in full. A download is
    checked with this before it enters the cache, since a server that closes the connection
    early leaves a shorter file behind without an error."""
    path = os.fspath(path)
    if not os.path.getsize(path):
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(9)
    if _is_safetensors_head(head):
        read_safetensors_metadata(path)
    elif head.startswith(_ZIP_MAGIC):
        _check_zip(path)
    else:
        read_checkpoint(path)


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
    check_safetensors_length(path)
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # noqa: BLE001 - every reader failure becomes one clear message
        raise safetensors_error(path, err) from err


def _check_zip(path: str) -> None:
    """A torch zip archive that is whole (its directory sits at the end) and holds a pickle."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is a truncated or damaged PyTorch file (its zip directory is missing)")
    if _zip_pickle_name(path) is None:
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch file (it has no data.pkl)")


def _read_torch(path: str, zipped: bool):
    if zipped:
        _check_zip(path)
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


