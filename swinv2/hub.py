"""swinv2's own weight file, and downloads of weights into a cache.

- :func:`save_pretrained` writes a safetensors file whose metadata holds the model's
  ``config``, so that the file alone rebuilds the model (no pickle, no code);
  :func:`read_metadata` and :func:`config_from_metadata` read that metadata back (the reader,
  :mod:`swinv2.reading`, rebuilds the model from it).
- :func:`download` fetches a URL (the official release files among them) with torch.hub's
  downloader into ``$SWINV2_HOME`` (default ``~/.cache/swinv2``); :func:`hub_download` fetches a
  file of a Hugging Face Hub repository (timm keeps a copy of every released SwinV2 weight there)
  with huggingface_hub, an optional dependency (``pip install 'swinv2[hub]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch.hub
from torch import nn

from . import fileio
from .files import CheckpointError, check_complete, is_safetensors, read_safetensors_metadata
from .version import __version__
from .weights import HF_HUB_PREFIX, find_pretrained, get_pretrained

# -- swinv2's file format -------------------------------------------------------------------

FORMAT_NAME = "swinv2"
FORMAT_VERSION = 1
# safetensors metadata keys (the metadata is a str -> str mapping).
META_FORMAT = "swinv2.format"  # "swinv2": marks the file as ours
META_FORMAT_VERSION = "swinv2.format_version"  # layout of this metadata, an int
META_LIBRARY_VERSION = "swinv2.version"  # the swinv2 version that wrote the file
META_CONFIG = "swinv2.config"  # JSON of SwinTransformerV2.config (the constructor arguments)
RESERVED_METADATA = (META_FORMAT, META_FORMAT_VERSION, META_LIBRARY_VERSION, META_CONFIG, "format")


def save_pretrained(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model``'s weights and ``config`` as one safetensors file that
    :func:`swinv2.load_model` (or ``create_model(pretrained=path)``) rebuilds the model from.

    The file is written to a temporary name in the same directory and renamed over ``path``
    at the end, so ``path`` never holds a partial file, even if the process dies mid-write.
    ``metadata``: extra str -> str entries to store (for example the epoch or a metric).
    """
    path = Path(path)
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"save_pretrained needs a SwinTransformerV2 (with .config), got {type(model).__name__}")
    norm = getattr(model, "norm", None)
    if type(norm) is not nn.LayerNorm or norm.eps != 1e-5 or not norm.elementwise_affine:
        # norm_layer is not part of config: a file could not rebuild such a model.
        raise ValueError(
            "save_pretrained stores the constructor arguments, and norm_layer is not one of them: "
            f"only models with the default nn.LayerNorm can be saved (this one has {norm!r}); "
            "save model.state_dict() with safetensors instead"
        )
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    clash = sorted(set(meta) & set(RESERVED_METADATA))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by swinv2")
    meta.update(
        {
            "format": "pt",  # what safetensors-aware tools (e.g. transformers) expect
            META_FORMAT: FORMAT_NAME,
            META_FORMAT_VERSION: str(FORMAT_VERSION),
            META_LIBRARY_VERSION: __version__,
            META_CONFIG: json.dumps(dict(config), sort_keys=True),
        }
    )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    with fileio.atomic_path(path) as tmp:
        fileio.save_safetensors(tensors, tmp, meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The safetensors metadata of a file written by :func:`save_pretrained`, or None for any
    other file (a torch pickle, a plain safetensors state dict). Raises CheckpointError for a
    safetensors file that is truncated or corrupted, FileNotFoundError for a missing one."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise CheckpointError(f"{path} is not a regular file, so not a checkpoint")
    if not is_safetensors(path):
        return None
    meta, _ = read_safetensors_metadata(path)
    return meta if META_FORMAT in meta else None


def is_swinv2_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by :func:`save_pretrained`."""
    return read_metadata(path) is not None


def config_from_metadata(path: str | os.PathLike, meta: Mapping[str, str]) -> dict:
    """The model config stored in the metadata of a file written by :func:`save_pretrained`
    (unchecked: see :func:`swinv2.model_config.check_model_config`); CheckpointError naming
    ``path`` when the metadata is of a newer format, missing or not JSON."""
    if meta.get(META_FORMAT) != FORMAT_NAME:
        raise CheckpointError(f"{path}: unknown format marker {META_FORMAT}={meta.get(META_FORMAT)!r}")
    try:
        version = int(meta.get(META_FORMAT_VERSION, ""))
    except ValueError:
        raise CheckpointError(
            f"{path}: bad {META_FORMAT_VERSION} {meta.get(META_FORMAT_VERSION)!r} in the file's metadata"
        ) from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by swinv2 {meta.get(META_LIBRARY_VERSION, '?')} in format {version}; "
            f"this swinv2 ({__version__}) reads format {FORMAT_VERSION} at most: upgrade swinv2"
        )
    if META_CONFIG not in meta:
        raise CheckpointError(f"{path}: the swinv2 metadata has no {META_CONFIG} entry, so the model cannot be rebuilt")
    try:
        config = json.loads(meta[META_CONFIG])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the model config in the metadata is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the model config in the metadata is a {type(config).__name__}, not an object")
    return config


# -- downloads --------------------------------------------------------------------------------

CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0  # seconds without progress on a socket operation


class DownloadError(RuntimeError):
    """A download that failed (network, incomplete body) or whose SHA-256 does not match."""


def get_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SWINV2_HOME``, else ``~/.cache/swinv2``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SWINV2_HOME") or Path.home() / ".cache" / "swinv2").expanduser()


def is_url(source) -> bool:
    """Whether ``source`` is an ``http(s)://`` or ``file://`` URL."""
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https", "file")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _socket_timeout(seconds: float | None) -> Iterator[None]:
    """torch.hub's downloader opens its connection without a timeout, so a server that accepts
    and then stalls would hold it forever; the socket module's default timeout is the setting it
    reads. It is set only while no other default is in force, and put back afterwards."""
    if seconds is None or socket.getdefaulttimeout() is not None:
        yield
        return
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(None)


def download(
    tag_or_url: str,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    sha256: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """The local path of released weights (``arch.tag``, or ``arch`` for its default tag) or
    of a URL, downloaded into the cache (see :func:`get_cache_dir`) unless it is there already.

    torch.hub's downloader writes to a temporary file beside the target and checks the
    SHA-256 when one is known (``sha256``, else the table's); the file then enters the cache only
    once it reads as a whole checkpoint (see :func:`swinv2.files.check_complete`), so the cache
    never holds a partial file. Network failures raise :class:`DownloadError` saying how to
    proceed offline.
    """
    if is_url(tag_or_url):
        url, arch = tag_or_url, None
        filename = os.path.basename(urllib.parse.urlparse(url).path)
        if not filename:
            raise ValueError(f"cannot name a cache file after the URL {url!r}")
        known = find_pretrained(url=url)
        if known is not None:  # released weights given by their URL: same name, same hash
            arch, filename, sha256 = known.arch, known.file, sha256 or known.sha256
    else:
        weights = get_pretrained(tag_or_url)
        url, arch, filename = weights.url, weights.arch, weights.file
        sha256 = sha256 or weights.sha256
    sha256 = sha256.lower() if sha256 else None
    directory = get_cache_dir(cache_dir)
    target = directory / filename

    if target.is_file():
        if sha256 and _sha256_file(target) != sha256:
            raise DownloadError(
                f"the cached file {target} does not have the expected SHA-256 {sha256}: "
                "delete it to download it again"
            )
        return target

    directory.mkdir(parents=True, exist_ok=True)
    tmp = fileio.temporary_name(target)
    try:
        if progress:
            print(f"downloading {url} to {target}", file=sys.stderr)
        with _socket_timeout(timeout):
            torch.hub.download_url_to_file(url, os.fspath(tmp), hash_prefix=sha256, progress=progress)
        check_complete(tmp)
        os.replace(tmp, target)
    except CheckpointError as err:
        reason = str(err).replace(os.fspath(tmp), filename)  # the temporary name means nothing to the reader
        raise DownloadError(f"cannot download {url}: what arrived is not a whole checkpoint ({reason}); "
                            "nothing was cached") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
        raise DownloadError(
            f"cannot download {url}: {reason}. If this machine is offline, download {url} elsewhere "
            f"and pass the local path: create_model({arch or '<model name>'!r}, pretrained='/path/{filename}'), "
            f"or copy the file to {target} (the cache directory: $SWINV2_HOME, else ~/.cache/swinv2)"
        ) from err
    except RuntimeError as err:
        if "hash" not in str(err):  # torch.hub's message for a SHA-256 that does not match
            raise
        raise DownloadError(
            f"SHA-256 mismatch for {url}: expected {sha256} (torch.hub: {err}); the download was "
            "deleted (a corrupted transfer, or the file changed on the server)"
        ) from err
    finally:
        fileio.remove_quietly(tmp)
    return target


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Where Hub files go: ``cache_dir``; else ``$SWINV2_HOME/huggingface`` when that variable
    is set; else None, huggingface_hub's own cache (``$HF_HUB_CACHE``), which timm and
    transformers share, so a file either of them fetched is not fetched again."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SWINV2_HOME"):
        return get_cache_dir() / "huggingface"
    return None


def hub_download(repo_id: str, filename: str, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of ``filename`` of the Hugging Face Hub model repository ``repo_id`` (at
    ``revision``: a branch, tag or commit; default the main branch), fetched with
    huggingface_hub's ``hf_hub_download`` into :func:`hub_cache_dir` unless it is there.

    :class:`DownloadError` when huggingface_hub is not installed, the repository or file does
    not exist, or the Hub cannot be reached (with what to do offline); FileNotFoundError (also
    a DownloadError) when only the file is missing from the repository.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise DownloadError(
            f"{HF_HUB_PREFIX}{repo_id} is on the Hugging Face Hub, which needs huggingface_hub: "
            "pip install 'swinv2[hub]' (the official release files download without it: "
            "create_model(name, pretrained=True))"
        ) from None
    where = f"{HF_HUB_PREFIX}{repo_id}{'@' + revision if revision else ''}"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=hub_cache_dir(cache_dir),
                                    library_name="swinv2", library_version=__version__))
    except LocalEntryNotFoundError as err:  # the Hub could not be reached, and the file is not cached
        raise DownloadError(
            f"cannot download {filename} of {where}: {_first_line(err)}. If this machine is offline, download it "
            "elsewhere (huggingface-cli download, or the repository's web page) and pass the local path as "
            "pretrained="
        ) from err
    except EntryNotFoundError as err:
        raise HubFileNotFoundError(f"{where} has no file {filename}") from err
    except (OSError, ValueError) as err:  # no such repository or revision, a refused request, a bad name
        raise DownloadError(f"cannot download {filename} of {where}: {_first_line(err)}") from err


class HubFileNotFoundError(DownloadError, FileNotFoundError):
    """A Hub repository that exists but holds no file of the name asked for."""


def _first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
