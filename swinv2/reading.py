"""The one reader of weights: any source -> :class:`Weights` (a state dict and what the source
says about it).

A source is any of:

- a checkpoint file: safetensors, or a torch file read with ``weights_only`` (see
  :mod:`swinv2.files`), in any layout :mod:`swinv2.convert` knows, bare or under
  ``model`` / ``state_dict`` / ``module``;
- a file written by :func:`swinv2.save_pretrained`: its metadata gives the model config, and
  may give the class names and the preprocessing;
- a checkpoint of ``swinv2 train`` or ``swinv2 pretrain`` (a dict with ``model`` and
  ``model_config``; its ``config`` gives the run's settings, ``class_names`` the classes),
  a file or already in memory;
- a Hugging Face transformers folder (``config.json`` + weights, see :mod:`swinv2.hf_folder`);
- a URL, fetched into the cache with torch.hub's downloader; released weights (``arch.tag``,
  or a :class:`~swinv2.weights.PretrainedWeights`); a Hugging Face Hub repository
  (``hf-hub:timm/swinv2_tiny_window8_256.ms_in1k``, or a transformers SwinV2 repository),
  fetched with huggingface_hub;
- a state dict (a mapping of tensors), or :class:`Weights` read before.

A model config a source carries is checked (types, ranges, and that the weights could fill
it: :mod:`swinv2.model_config`) before anything is built from it. Nothing here builds a model
or converts a layout: :mod:`swinv2.loading` does both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import CheckpointError, read_checkpoint, unwrap_state_dict
from .hf_folder import CONFIG_NAME, MODEL_TYPE, class_names, model_kwargs_from_hf, read_hf_config, read_hf_weights
from .hub import (
    HubFileNotFoundError,
    config_from_metadata,
    download,
    hub_download,
    is_url,
    read_metadata,
)
from .model_config import check_model_config, check_weights_fit
from .weights import HF_HUB_PREFIX, PRETRAINED, PretrainedWeights, find_pretrained, get_pretrained

# The arguments of swinv2.data.transforms.eval_transform that a source may state.
PREPROCESS_KEYS = ("img_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
# What a Hub repository holds its weights in, in the order they are looked for.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

__all__ = ["PREPROCESS_KEYS", "Weights", "read_state_dict", "read_weights"]


@dataclass
class Weights:
    """A state dict and what its source says about it.

    ``state``: the tensors as stored (not converted: :func:`swinv2.load_pretrained` detects and
    converts the layout). ``source``: what messages call it. ``kind``: ``"state dict"``,
    ``"file"`` (a checkpoint that says nothing of its model), ``"swinv2"`` (a
    :func:`~swinv2.save_pretrained` file), ``"checkpoint"`` (a training or pre-training
    checkpoint with its model config) or ``"hf folder"``. ``format``: the layout when the source
    fixes it (``"hf"`` for a transformers folder), else None. ``config``: the
    :class:`~swinv2.SwinTransformerV2` constructor arguments, checked, when the source carries
    them. ``preprocess``: the evaluation transform's arguments the source states (a subset of
    :data:`PREPROCESS_KEYS`). ``release``: the released weights these are, when known.
    ``run_config``: the settings a training checkpoint stores; ``hf_config``: a transformers
    folder's ``config.json``; ``path``: the local file or folder read.
    """

    state: dict[str, torch.Tensor]
    source: str
    kind: str
    format: str | None = None
    config: dict | None = None
    class_names: list[str] | None = None
    preprocess: dict | None = None
    release: PretrainedWeights | None = None
    run_config: dict | None = None
    hf_config: dict | None = None
    path: str | None = None

    @property
    def arch(self) -> str | None:
        """The variant name (see :func:`swinv2.list_models`) of released weights, else None."""
        return self.release.arch if self.release is not None else None


def read_weights(
    source,
    *,
    name: str | None = None,
    arch: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Weights:
    """``source`` (see the module docstring) as :class:`Weights`.

    ``name``: what messages call a mapping ``source`` (default "state dict"), e.g. the file it
    was read from. ``arch``: the variant the weights are meant for, when known: a local copy of
    a release file is recognised by its name only when its architecture agrees.
    ``cache_dir`` and ``progress``: for downloads (see :func:`swinv2.hub.download`).

    Errors are one line naming the source: FileNotFoundError, :class:`~swinv2.CheckpointError`
    (unreadable, unsafe, not a state dict, a bad model config),
    :class:`~swinv2.hub.DownloadError`.
    """
    if isinstance(source, Weights):
        return source
    if isinstance(source, PretrainedWeights):
        return _read_release(source, cache_dir, progress)
    if isinstance(source, Mapping):
        return _from_object(source, name or "state dict")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot read weights from a {type(source).__name__}: give a path, URL, weight tag, "
                        "Hugging Face Hub repository (hf-hub:...) or state dict")
    text = os.fspath(source)
    if text.startswith(HF_HUB_PREFIX):
        return _read_hub(text, cache_dir)
    if is_url(text):
        release = find_pretrained(url=text)
        if release is not None:
            return _read_release(release, cache_dir, progress)
        return _read_download(download(text, cache_dir=cache_dir, progress=progress), text, None)
    if os.path.isdir(text):
        return _read_hf_folder(text, text)
    if not os.path.lexists(text) and _names_a_release(text):
        return _read_release(get_pretrained(text), cache_dir, progress)  # ValueError naming the tags there are
    return _read_file(text, release=find_pretrained(file=os.path.basename(text), arch=arch))


def _names_a_release(text: str) -> bool:
    """Whether ``text`` reads as ``arch.tag`` of an architecture with released weights."""
    arch, dot, _ = text.partition(".")
    return bool(dot) and any(w.arch == arch for w in PRETRAINED.values())


def read_state_dict(source) -> dict[str, torch.Tensor]:
    """The tensors of any source :func:`read_weights` reads, as stored."""
    return read_weights(source).state


# -- files ----------------------------------------------------------------------------------


def _read_file(path: str, source: str | None = None, release: PretrainedWeights | None = None) -> Weights:
    """A checkpoint file: a swinv2 file (its config is checked before its tensors are read), or
    any other, which may hold a training checkpoint."""
    source = source or path
    meta = read_metadata(path)  # FileNotFoundError / CheckpointError for what is not a file
    if meta is None:
        return _from_object(read_checkpoint(path), source, path=path, release=release)
    config = check_model_config(config_from_metadata(path, meta), path)
    state = unwrap_state_dict(read_checkpoint(path), source=path)
    check_weights_fit(config, state, path)
    return Weights(state, source, "swinv2", config=config, path=path, release=release,
                   class_names=_names(_json_entry(meta, "class_names", path)),
                   preprocess=_preprocess(_json_entry(meta, "preprocess", path), path) or _released(release))


def _from_object(obj, source: str, path: str | None = None, release: PretrainedWeights | None = None) -> Weights:
    """What a torch file (or a mapping in memory) holds: a state dict, bare or wrapped, and for
    a training checkpoint its model config, run settings and class names."""
    state = unwrap_state_dict(obj, source=source)
    entries = obj if isinstance(obj, Mapping) else {}
    model_config = entries.get("model_config")
    if not model_config:
        return Weights(state, source, "file" if path else "state dict", path=path, release=release,
                       preprocess=_released(release))
    config = check_model_config(model_config, source)  # before anything is built from its numbers
    check_weights_fit(config, state, source)
    run = dict(entries["config"]) if isinstance(entries.get("config"), Mapping) else None
    return Weights(state, source, "checkpoint", config=config, path=path, run_config=run, release=release,
                   class_names=_names(entries.get("class_names")),
                   preprocess=_run_preprocess(run) or _released(release))


def _names(value) -> list[str] | None:
    """Class names as a source stores them (a list), else None."""
    return [str(n) for n in value] if isinstance(value, (list, tuple)) and value else None


def _json_entry(meta: Mapping[str, str], key: str, path: str):
    try:
        return json.loads(meta[key]) if meta.get(key) else None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: unreadable {key} metadata ({err})") from err


def _preprocess(fields, path: str) -> dict | None:
    """The evaluation settings a swinv2 file states (``preprocess`` metadata, as ``swinv2 train``
    writes it), pairs as tuples."""
    if fields is None:
        return None
    if not isinstance(fields, Mapping):
        raise CheckpointError(f"{path}: unreadable preprocess metadata (a JSON {type(fields).__name__})")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in PREPROCESS_KEYS}


def _run_preprocess(run: Mapping | None) -> dict | None:
    """The evaluation settings of a training run: its crop (centre crop below 1, else squash)
    and, when it set one, its image size."""
    if run is None:
        return None
    crop = float(run.get("crop_pct") or 0.875)
    out = dict(crop_pct=crop, crop_mode="center" if crop < 1 else "squash")
    if run.get("img_size"):
        out["img_size"] = run["img_size"]
    return out


def _released(release: PretrainedWeights | None) -> dict | None:
    return release.preprocess if release is not None else None


# -- Hugging Face folders -------------------------------------------------------------------


def _read_hf_folder(folder: str, source: str) -> Weights:
    """A transformers SwinV2 folder: its config.json gives the model config and class names."""
    hf_config = read_hf_config(folder)
    state = read_hf_weights(folder)
    config = model_kwargs_from_hf(hf_config, source=os.path.join(folder, CONFIG_NAME))
    head = state.get("classifier.weight")
    config["num_classes"] = int(head.shape[0]) if head is not None else 0  # the head follows the weights
    check_weights_fit(config, state, folder)
    return Weights(state, source, "hf folder", format="hf", config=config, class_names=class_names(hf_config),
                   hf_config=hf_config, path=folder)


# -- downloads ------------------------------------------------------------------------------


def _read_release(release: PretrainedWeights, cache_dir, progress: bool) -> Weights:
    path = download(release.name, cache_dir=cache_dir, progress=progress)  # before anything is built
    return _read_download(path, f"{release.name} ({path})", release)


def _read_download(path: Path, source: str, release: PretrainedWeights | None) -> Weights:
    try:
        return _read_file(os.fspath(path), source, release=release)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (the cached download may be damaged: delete it to fetch it again)") from err


def _read_hub(spec: str, cache_dir) -> Weights:
    """``hf-hub:REPO[@REVISION]``: timm's copy of released weights (known by its repository),
    a transformers SwinV2 repository (config.json with model_type swinv2: read as a folder), or
    any repository holding a state dict in ``model.safetensors`` / ``pytorch_model.bin``."""
    repo, _, revision = spec[len(HF_HUB_PREFIX):].partition("@")
    revision = revision or None
    release = find_pretrained(hf_hub_id=repo)
    if release is None:
        try:
            config_path = hub_download(repo, CONFIG_NAME, revision, cache_dir)
        except HubFileNotFoundError:
            config_path = None
        if config_path is not None and _is_transformers_config(config_path):
            _hub_weights(repo, revision, cache_dir, spec)  # beside config.json, in the same snapshot
            return _read_hf_folder(os.fspath(config_path.parent), spec)
    names = (release.hf_hub_filename,) if release is not None else HUB_WEIGHT_FILES
    path = _hub_weights(repo, revision, cache_dir, spec, names)
    return _read_download(path, f"{spec} ({path})", release)


def _hub_weights(repo: str, revision: str | None, cache_dir, spec: str, names=HUB_WEIGHT_FILES) -> Path:
    """The first of ``names`` the repository holds, downloaded."""
    for filename in names:
        try:
            return hub_download(repo, filename, revision, cache_dir)
        except HubFileNotFoundError:
            continue
    raise HubFileNotFoundError(f"{spec} holds none of {', '.join(names)}")


def _is_transformers_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE
