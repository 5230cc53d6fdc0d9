"""Writing files so that nothing is lost: every file swinv2 writes goes through here.

A file is written to a temporary name in its own folder, synced to disk, given the mode a plain
``open()`` would have created it with, and renamed over its target: a reader (or a run killed at
any moment) sees the previous version or the complete new one, never a partial file. A write
that fails (disk full, quota, read-only or forbidden folder, an interrupt) removes its temporary
file, leaves the previous version in place and raises :class:`WriteError`, one line naming the
file meant and the reason. :func:`check_writable` finds such a folder before the work whose
result it would hold.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path


class WriteError(ValueError):
    """A file could not be written: disk full, quota exceeded, read-only or forbidden folder.

    The message is one line naming the file and the reason; the file's previous version (if
    any) is intact and no temporary file is left behind.
    """


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file is in the way of a folder",
}


def os_reason(err: OSError) -> str:
    """The reason of an OSError in a few lowercase words."""
    return _REASONS.get(err.errno) or (err.strerror or str(err) or type(err).__name__).lower()


def write_error(err: OSError, path: str | os.PathLike) -> WriteError:
    """``err`` as a one-line :class:`WriteError` naming ``path`` (the file meant, not its temporary)."""
    return WriteError(f"{os_reason(err)} writing {path}")


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it, which would
    race with other threads creating files); set-and-restore where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode ``open(path, "w")`` creates files with (0o666 less the umask):
    temporary files made by mkstemp or by safetensors are private (0o600)."""
    os.chmod(path, 0o666 & ~_umask())


def temporary_name(path: str | os.PathLike) -> Path:
    """A unique hidden name next to ``path``, with its suffix kept (writers such as savefig pick
    the format from it), so that the final rename stays within one folder and is atomic."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def remove_quietly(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; some file systems refuse to sync a folder, which
    costs durability only, so their refusal is ignored."""
    with contextlib.suppress(OSError):
        _fsync(folder)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for the caller to write; once the block ends it is
    synced to disk, given the default mode and renamed over ``path`` (its folder is created
    first). On any exception (an interrupt included) the temporary file is removed and ``path``
    keeps its previous content; an OSError becomes a :class:`WriteError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, path) from err
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync(tmp)  # the bytes are on disk before the rename makes them visible
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        remove_quietly(tmp)
        if isinstance(err, OSError):
            raise write_error(err, path) from err
        raise
    _fsync_folder(path.parent)


class _Recorder:
    """A file wrapper that remembers the first OSError of a write. torch.save reports a failed
    write as a RuntimeError about stream positions ("unexpected pos"), which hides the cause."""

    def __init__(self, file):
        self._file = file
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self._file.flush()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[_Recorder]:
    """A file-like object (``write``, ``flush``) whose content replaces ``path`` atomically
    when the block ends; failures as in :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        sink = _Recorder(f)
        try:
            yield sink
        except Exception as err:
            if sink.error is not None and sink.error is not err:
                raise sink.error from err  # the write's own error, e.g. no space left
            raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` by ``text`` atomically."""
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically."""
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` a copy of ``src`` atomically. A hard link where the file system has them:
    instant and no extra space while both names hold the same content (files written here are
    replaced by rename, never rewritten in place, so the names part when ``src`` is next saved)."""
    with contextlib.suppress(OSError):
        if os.path.samefile(src, dst):
            return Path(dst)  # already (a rename of a link onto its twin would do nothing)
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here: copy the bytes
            remove_quietly(tmp)
            shutil.copyfile(src, tmp)
    return Path(dst)


def save_safetensors(tensors: Mapping, path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """safetensors' ``save_file``, with a failed write raised as the OSError it is: safetensors
    reports one as its own error type with the errno only in the text (so a full disk becomes
    :class:`WriteError` in :func:`atomic_path`)."""
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), os.fspath(path), metadata=None if metadata is None else dict(metadata))
    except OSError:
        raise
    except Exception as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), os.fspath(path)) from err


def check_writable(path: str | os.PathLike, flag: str, *, folder: bool = False) -> None:
    """Fail now, with one line naming ``path``, when it cannot be written: before the work whose
    result it would hold. ``path`` is a file to write (or with ``folder``, a folder to create or
    fill); the nearest existing folder on its way gets a probe file, created and removed, so that
    a read-only file system, a missing permission or a file in the way is found without leaving
    anything behind."""
    target = Path(path)
    if not folder and target.is_dir():
        raise WriteError(f"{flag} {path} is a folder: give a file name")
    if folder and target.exists() and not target.is_dir():
        raise WriteError(f"{flag} {path} exists and is not a folder")
    base = target if folder else target.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise WriteError(f"{flag} {path}: cannot create it, {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".swinv2-write-check-", dir=base)
    except OSError as err:
        raise WriteError(f"{flag} {path}: cannot write in {base} ({os_reason(err)})") from None
    os.close(fd)
    os.remove(probe)
