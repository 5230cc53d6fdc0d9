"""swinv2's own weight file, the registry of released weights, and their download.

- :func:`save_pretrained` / :func:`load_model`: a safetensors file whose metadata holds the
  model's ``config``, so that the file alone rebuilds the model (no pickle, no code).
- :data:`PRETRAINED` / :func:`list_pretrained` / :func:`get_pretrained`: the 12 checkpoints
  released by the official repository, named as in timm (``arch.tag``).
- :func:`download`: fetch one of them (or any URL) into a cache directory, atomically.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import fileio
from .loading import (
    CheckpointError,
    StateDictMismatchError,
    check_safetensors_length,
    load_pretrained,
    read_checkpoint,
    read_state_dict,
    safetensors_error,
    unwrap_state_dict,
)
from .model import SwinTransformerV2
from .model_config import check_model_config, check_weights_fit

# -- swinv2's file format -------------------------------------------------------------------

FORMAT_NAME = "swinv2"
FORMAT_VERSION = 1
# safetensors metadata keys (the metadata is a str -> str mapping).
META_FORMAT = "swinv2.format"  # "swinv2": marks the file as ours
META_FORMAT_VERSION = "swinv2.format_version"  # layout of this metadata, an int
META_LIBRARY_VERSION = "swinv2.version"  # the swinv2 version that wrote the file
META_CONFIG = "swinv2.config"  # JSON of SwinTransformerV2.config (the constructor arguments)
RESERVED_METADATA = (META_FORMAT, META_FORMAT_VERSION, META_LIBRARY_VERSION, META_CONFIG, "format")


def _library_version() -> str:
    import swinv2  # late: this module is imported while the package initialises

    return getattr(swinv2, "__version__", "unknown")


def save_pretrained(
    model: SwinTransformerV2, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``model``'s weights and ``config`` as one safetensors file that
    :func:`load_model` (or ``create_model(pretrained=path)``) rebuilds the model from.

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
            META_LIBRARY_VERSION: _library_version(),
            META_CONFIG: json.dumps(dict(config), sort_keys=True),
        }
    )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    with fileio.atomic_path(path) as tmp:
        fileio.save_safetensors(tensors, tmp, meta)
    return path


def _is_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file: an 8-byte header length, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _safetensors_metadata(path: Path) -> tuple[dict[str, str], int]:
    """The metadata of a safetensors file and its tensor count; CheckpointError if unreadable."""
    from safetensors import safe_open

    check_safetensors_length(path)
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {}), len(list(f.keys()))
    except Exception as err:  # noqa: BLE001 - every reader failure becomes one clear message
        raise safetensors_error(path, err) from err


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
    if not _is_safetensors(path):
        return None
    meta, _ = _safetensors_metadata(path)
    return meta if META_FORMAT in meta else None


def is_swinv2_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by :func:`save_pretrained`."""
    return read_metadata(path) is not None


def _config_from_metadata(path: Path, meta: Mapping[str, str]) -> dict:
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
            f"this swinv2 ({_library_version()}) reads format {FORMAT_VERSION} at most: upgrade swinv2"
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


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> SwinTransformerV2:
    """Rebuild the model saved by :func:`save_pretrained` from the file alone and load its
    weights (safetensors: nothing is unpickled).

    ``overrides``: constructor arguments to change (``img_size``, ``window_size``,
    ``drop_path_rate``...); a different ``num_classes`` leaves the head freshly initialised.
    ``dtype``: default, the file's floating dtype. ``device``: where to build.
    """
    path = Path(path)
    meta = read_metadata(path)
    if meta is None:
        if _is_safetensors(path):
            _, count = _safetensors_metadata(path)
            if not count:
                raise CheckpointError(f"{path} holds no tensors")
            raise CheckpointError(
                f"{path} is a safetensors file with {count} tensors but no swinv2 metadata (a bare state dict, "
                "e.g. a timm or official export), so it does not say which architecture it is: load it into one "
                f"with swinv2.create_model(name, pretrained={os.fspath(path)!r})"
            )
        read_state_dict(path)  # a file that is no checkpoint, or holds no tensors, gets its own message
        raise CheckpointError(
            f"{path} is not a swinv2 safetensors file (an official or timm .pth checkpoint?): load it into an "
            f"architecture with swinv2.create_model(name, pretrained={os.fspath(path)!r})"
        )
    config = _config_from_metadata(path, meta)
    check_model_config(config, os.fspath(path))  # before anything is built or read
    state = _read_tensors(path)
    check_weights_fit(config, state, os.fspath(path))
    kwargs = {**config, **overrides}
    try:
        if device is not None:
            with torch.device(device):
                model = SwinTransformerV2(**kwargs)
        else:
            model = SwinTransformerV2(**kwargs)
    except (TypeError, ValueError) as err:
        source = "the config stored in" if not overrides else "the config stored in (with your overrides)"
        raise CheckpointError(f"{source} {path} cannot build a SwinTransformerV2: {err}") from err

    floating = {t.dtype for t in state.values() if t.is_floating_point()}
    if dtype is None and len(floating) == 1:
        dtype = floating.pop()
    if dtype is not None:
        model.to(dtype)
    drop_head = "num_classes" in overrides and overrides["num_classes"] != config.get("num_classes")
    load_state(model, state, source=os.fspath(path), drop_head=drop_head)
    return model


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return unwrap_state_dict(read_checkpoint(path), source=os.fspath(path))


def load_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, drop_head: bool = False
) -> None:
    """Load ``state`` strictly, naming ``source`` on failure. ``drop_head``: the checkpoint's
    classifier is left out (the model has another number of classes) and the model keeps its own."""
    try:
        load_pretrained(model, dict(state), strict=True, head="drop" if drop_head else "keep", name=source)
    except StateDictMismatchError as err:
        raise StateDictMismatchError(f"{source}: {err}") from err


# -- the registry of released weights ---------------------------------------------------------

OFFICIAL_URL = "https://github.com/SwinTransformer/storage/releases/download/v2.0.0/{file}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedWeights:
    """One released checkpoint and how to evaluate it.

    ``crop_mode``: ``"center"`` resizes the shorter side to ``resize_size`` (bicubic) and
    centre-crops ``img_size`` (official ``TEST.CROP=True``: ``int(256 / 224 * size)``, i.e.
    ``crop_pct`` 0.875); ``"squash"`` resizes straight to ``img_size`` x ``img_size``
    (``TEST.CROP=False``, the 384 fine-tunes; ``crop_pct`` 1.0).
    """

    arch: str
    tag: str
    file: str
    img_size: int
    window_size: int
    num_classes: int
    dataset: str
    top1: float | None = None  # ImageNet-1k val, as reported by the official README
    top5: float | None = None
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # The SHA-256 of the file. None: unknown (the official release publishes no hashes and
    # the registry was written offline), so downloads are not verified; fill it in to verify.
    sha256: str | None = None
    url: str = ""

    def __post_init__(self):
        if not self.url:
            object.__setattr__(self, "url", OFFICIAL_URL.format(file=self.file))

    @property
    def name(self) -> str:
        """The timm-style name, ``arch.tag``."""
        return f"{self.arch}.{self.tag}"

    @property
    def resize_size(self) -> int:
        """The shorter side before the centre crop (``img_size`` for ``squash``)."""
        return math.floor(self.img_size / self.crop_pct + 1e-6)

    def as_dict(self) -> dict:
        return dict(asdict(self), name=self.name, resize_size=self.resize_size)


def _official(arch: str, tag: str, file: str, **kw) -> tuple[str, PretrainedWeights]:
    w = PretrainedWeights(arch=arch, tag=tag, file=f"{file}.pth", **kw)
    return w.name, w


_IN1K, _IN22K, _FT = "imagenet-1k", "imagenet-22k", "imagenet-22k, fine-tuned on imagenet-1k"
_W12 = (12, 12, 12, 6)  # per-stage windows of the 192/w12 ImageNet-22k pre-training
_384 = dict(crop_pct=1.0, crop_mode="squash")  # TEST.CROP False in the official 384 configs

# The official release (README "Swin-V2" table; official.md §2.3), in timm's order and names.
# The first tag registered for an architecture is its default for create_model(arch, pretrained=True).
PRETRAINED: dict[str, PretrainedWeights] = dict(
    [
        _official("swinv2_tiny_window8_256", "ms_in1k", "swinv2_tiny_patch4_window8_256",
                  img_size=256, window_size=8, num_classes=1000, dataset=_IN1K, top1=81.8, top5=95.9),
        _official("swinv2_tiny_window16_256", "ms_in1k", "swinv2_tiny_patch4_window16_256",
                  img_size=256, window_size=16, num_classes=1000, dataset=_IN1K, top1=82.8, top5=96.2),
        _official("swinv2_small_window8_256", "ms_in1k", "swinv2_small_patch4_window8_256",
                  img_size=256, window_size=8, num_classes=1000, dataset=_IN1K, top1=83.7, top5=96.6),
        _official("swinv2_small_window16_256", "ms_in1k", "swinv2_small_patch4_window16_256",
                  img_size=256, window_size=16, num_classes=1000, dataset=_IN1K, top1=84.1, top5=96.8),
        _official("swinv2_base_window8_256", "ms_in1k", "swinv2_base_patch4_window8_256",
                  img_size=256, window_size=8, num_classes=1000, dataset=_IN1K, top1=84.2, top5=96.9),
        _official("swinv2_base_window16_256", "ms_in1k", "swinv2_base_patch4_window16_256",
                  img_size=256, window_size=16, num_classes=1000, dataset=_IN1K, top1=84.6, top5=97.0),
        # ImageNet-22k pre-training (21841 classes): no ImageNet-1k accuracy is reported.
        _official("swinv2_base_window12_192", "ms_in22k", "swinv2_base_patch4_window12_192_22k",
                  img_size=192, window_size=12, num_classes=21841, dataset=_IN22K),
        _official("swinv2_large_window12_192", "ms_in22k", "swinv2_large_patch4_window12_192_22k",
                  img_size=192, window_size=12, num_classes=21841, dataset=_IN22K),
        _official("swinv2_base_window12to16_192to256", "ms_in22k_ft_in1k",
                  "swinv2_base_patch4_window12to16_192to256_22kto1k_ft", img_size=256, window_size=16,
                  pretrained_window_sizes=_W12, num_classes=1000, dataset=_FT, top1=86.2, top5=97.9),
        _official("swinv2_base_window12to24_192to384", "ms_in22k_ft_in1k",
                  "swinv2_base_patch4_window12to24_192to384_22kto1k_ft", img_size=384, window_size=24,
                  pretrained_window_sizes=_W12, num_classes=1000, dataset=_FT, top1=87.1, top5=98.2, **_384),
        _official("swinv2_large_window12to16_192to256", "ms_in22k_ft_in1k",
                  "swinv2_large_patch4_window12to16_192to256_22kto1k_ft", img_size=256, window_size=16,
                  pretrained_window_sizes=_W12, num_classes=1000, dataset=_FT, top1=86.9, top5=98.0),
        _official("swinv2_large_window12to24_192to384", "ms_in22k_ft_in1k",
                  "swinv2_large_patch4_window12to24_192to384_22kto1k_ft", img_size=384, window_size=24,
                  pretrained_window_sizes=_W12, num_classes=1000, dataset=_FT, top1=87.6, top5=98.3, **_384),
    ]
)


def list_pretrained(pattern: str | None = None) -> list[str]:
    """Registered weights as ``arch.tag`` names, optionally filtered by a shell-style pattern."""
    names = list(PRETRAINED)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_pretrained(name: str) -> PretrainedWeights:
    """The registered weights for ``arch.tag``, or for ``arch`` alone (its default tag).

    Raises ValueError listing the registered tags when there are none for ``name``.
    """
    if name in PRETRAINED:
        return PRETRAINED[name]
    arch, _, tag = name.partition(".")
    if not tag:
        for weights in PRETRAINED.values():
            if weights.arch == arch:
                return weights
    tags = [n for n in PRETRAINED if n.split(".", 1)[0] == arch]
    raise ValueError(
        f"no pretrained weights registered as {name!r}; "
        + (f"{arch!r} has: {', '.join(tags)}" if tags else f"registered: {', '.join(PRETRAINED)}")
        + "; or pass a checkpoint path or a state dict as pretrained="
    )


# -- download ---------------------------------------------------------------------------------

CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0  # seconds without progress on a socket operation


class DownloadError(RuntimeError):
    """A download that failed (network, incomplete body) or whose SHA-256 does not match."""


def get_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SWINV2_HOME``, else ``~/.cache/swinv2``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SWINV2_HOME") or Path.home() / ".cache" / "swinv2").expanduser()


def _is_url(s) -> bool:
    return isinstance(s, str) and s.split("://", 1)[0].lower() in ("http", "https", "file")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download(
    tag_or_url: str,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    sha256: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """The local path of a registered checkpoint (``arch.tag``, or ``arch`` for its default
    tag) or of a URL, downloading it into the cache (see :func:`get_cache_dir`) unless it is
    there already.

    The body is streamed to a temporary file in the cache directory and renamed into place
    only when complete (and, when a SHA-256 is known, verified), so the cache never holds a
    partial file. ``sha256`` overrides the registry's hash. Network failures raise
    :class:`DownloadError` saying how to proceed offline.
    """
    if _is_url(tag_or_url):
        url, arch = tag_or_url, None
        filename = os.path.basename(urllib.parse.urlparse(url).path)
        if not filename:
            raise ValueError(f"cannot name a cache file after the URL {url!r}")
        known = next((w for w in PRETRAINED.values() if w.url == url), None)
        if known is not None:  # a registered file given by its URL: same name, same hash
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
        try:
            digest = _fetch(url, tmp, filename, progress, timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
            raise DownloadError(
                f"cannot download {url}: {reason}. If this machine is offline, download {url} elsewhere "
                f"and pass the local path: create_model({arch or '<model name>'!r}, pretrained='/path/{filename}'), "
                f"or copy the file to {target} (the cache directory: $SWINV2_HOME, else ~/.cache/swinv2)"
            ) from err
        if sha256 and digest != sha256:
            raise DownloadError(
                f"SHA-256 mismatch for {url}: expected {sha256}, got {digest}; the download was "
                "deleted (a corrupted transfer, or the file changed on the server)"
            )
        os.replace(tmp, target)
    finally:
        fileio.remove_quietly(tmp)
    return target


def _fetch(url: str, dest: Path, desc: str, progress: bool, timeout: float) -> str:
    """Stream ``url`` into ``dest`` (created, must not exist); return its SHA-256."""
    request = urllib.request.Request(url, headers={"User-Agent": f"swinv2/{_library_version()}"})
    h = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "xb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
        try:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if total is not None and received != total:
            raise http.client.IncompleteRead(b"", total - received)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()
