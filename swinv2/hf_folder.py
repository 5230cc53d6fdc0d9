"""Hugging Face transformers model folders (what ``save_pretrained`` writes), read and written.

A folder holds ``config.json`` (a ``Swinv2Config``, ``model_type`` "swinv2") and the weights in
the transformers layout (:mod:`swinv2.convert.hf`): ``model.safetensors``, the shards listed in
``model.safetensors.index.json``, or ``pytorch_model.bin`` (read with ``weights_only``).

- :func:`read_hf_config`, :func:`read_hf_weights`, :func:`model_kwargs_from_hf`: the folder's
  config, its tensors and the constructor arguments they describe, for the reader
  (:mod:`swinv2.reading`), through which ``create_model(pretrained=folder)`` and
  ``load_pretrained(model, folder)`` read it; :func:`norm_layer_for`, :func:`match_fixed_eps`
  and :func:`warn_window_mismatch` finish a model built from such a config;
- :func:`save_hf_folder`: write ``config.json`` + ``model.safetensors`` that
  ``Swinv2ForImageClassification.from_pretrained`` (or ``Swinv2Model`` without a head) loads.

transformers fixes each stage's window and shift when it builds the model, from
``image_size``: the map of stage i is taken as ``grid // 2**i`` (rounded down) and the window
shrinks to it on axis 0 only, the same square window serving both axes. swinv2 derives them
from the actual map at forward time (rounded up). The two agree on square images whose grid
halves evenly at every stage (all released checkpoints); otherwise a model built from the folder warns,
naming the stages, and the outputs differ there. At other input sizes transformers keeps the
windows it was built with, where swinv2 recomputes them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .convert import from_official
from .fileio import give_default_mode, save_safetensors, write_error
from .files import CheckpointError, read_checkpoint, unwrap_state_dict
from .layers import to_2tuple
from .model import SwinTransformerV2
from .model_config import check_model_config

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHTS_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PICKLE_NAME, PICKLE_INDEX_NAME)
MODEL_TYPE = "swinv2"
CLASSIFIER, BARE_MODEL = "Swinv2ForImageClassification", "Swinv2Model"

# Swinv2Config's defaults: a config.json may leave out any field that has its default value.
HF_DEFAULTS = dict(
    image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
    window_size=7, pretrained_window_sizes=[0, 0, 0, 0], mlp_ratio=4.0, qkv_bias=True, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, drop_path_rate=0.1, hidden_act="gelu", use_absolute_embeddings=False,
    layer_norm_eps=1e-5,
)
# transformers' LayerNorms without the config's eps: the patch-embedding and patch-merging norms.
_FIXED_EPS = 1e-5
# Our constructor arguments that transformers cannot express, with the only value it has.
_HF_FIXED = dict(
    norm_placement="res_post", attn_type="cosine", position_bias="log_cpb", extra_norm_period=0,
    cpb_hidden_dim=512, ape=False, patch_norm=True,
)


# -- reading ------------------------------------------------------------------------------


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with a ``config.json`` (its content is not checked)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` of a transformers SwinV2 folder; :class:`CheckpointError` naming the
    folder when it is not one (no config.json, unreadable, another ``model_type``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    path = folder / CONFIG_NAME
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise CheckpointError(
            f"{folder} is not a Hugging Face model folder: it has no {CONFIG_NAME} "
            f"(it holds: {', '.join(found) if found else 'nothing'})"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not a model config object")
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{path} describes a model of type {config.get('model_type')!r}, not {MODEL_TYPE!r} "
            "(transformers Swinv2Config): swinv2 reads only SwinV2 folders"
        )
    return config


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a transformers SwinV2 folder (its config.json is checked first), from
    ``model.safetensors``, its sharded index, or ``pytorch_model.bin`` (and its index)."""
    folder = Path(folder)
    read_hf_config(folder)
    for name in WEIGHTS_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_tensors(path)
        return _read_shards(path)
    raise CheckpointError(f"{folder} has a {CONFIG_NAME} but no weights: none of {', '.join(WEIGHTS_NAMES)}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return unwrap_state_dict(read_checkpoint(path), source=os.fspath(path))


def _read_shards(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"cannot read the shard index {index_path}: {type(err).__name__}: {err}") from err
    missing = [f for f in files if not (index_path.parent / f).is_file()]
    if missing:
        raise CheckpointError(f"{index_path} lists shards that are not in the folder: {', '.join(missing)}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(_read_tensors(index_path.parent / name))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(f"{index_path}: {len(absent)} tensors it lists are in no shard, e.g. {absent[:3]}")
    return state


# config.json's names for the constructor arguments it sets, for the messages of check_model_config.
_HF_NAMES = dict(
    img_size="image_size", in_chans="num_channels", drop_rate="hidden_dropout_prob",
    attn_drop_rate="attention_probs_dropout_prob", num_classes="id2label/num_labels",
)


def model_kwargs_from_hf(config: Mapping, source: str = "config.json") -> dict:
    """SwinTransformerV2 constructor arguments for a ``Swinv2Config`` (as a dict). The class
    count is ``len(id2label)`` for ``Swinv2ForImageClassification``, else 0 (no head).
    :class:`CheckpointError` for what swinv2 cannot build the same way, and (naming the field)
    for a value of the wrong type or out of range (see :mod:`swinv2.model_config`)."""
    c = {**HF_DEFAULTS, **config}
    if c["hidden_act"] != "gelu":
        raise CheckpointError(f"{source}: hidden_act {c['hidden_act']!r}; swinv2's MLP uses 'gelu' only")
    if c["use_absolute_embeddings"]:
        # transformers sizes this embedding for one token more than the patches (as if there were
        # a class token) and adds it unchanged, so such a model does not run as configured.
        raise CheckpointError(f"{source}: use_absolute_embeddings is not supported (transformers' embedding "
                              "has one position more than there are patches)")
    eps = c["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise CheckpointError(f"{source}: layer_norm_eps must be a number in (0, 1), got {eps!r}")
    depths, pretrained = c["depths"], c["pretrained_window_sizes"]
    if isinstance(depths, list) and isinstance(pretrained, list) and len(pretrained) != len(depths) \
            and not any(pretrained):
        pretrained = [0] * len(depths)
    num_classes = 0
    if CLASSIFIER in (config.get("architectures") or []):
        num_classes = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    kwargs = dict(
        img_size=c["image_size"], patch_size=c["patch_size"], in_chans=c["num_channels"], num_classes=num_classes,
        embed_dim=c["embed_dim"], depths=depths, num_heads=c["num_heads"], window_size=c["window_size"],
        mlp_ratio=c["mlp_ratio"], qkv_bias=c["qkv_bias"], drop_rate=c["hidden_dropout_prob"],
        attn_drop_rate=c["attention_probs_dropout_prob"], drop_path_rate=c["drop_path_rate"],
        pretrained_window_sizes=pretrained,
    )
    check_model_config(kwargs, source, names=_HF_NAMES)  # types and ranges, before any conversion
    return dict(
        kwargs, img_size=_size(kwargs["img_size"]), patch_size=_size(kwargs["patch_size"]),
        depths=list(depths), num_heads=list(kwargs["num_heads"]), mlp_ratio=float(kwargs["mlp_ratio"]),
        drop_rate=float(kwargs["drop_rate"]), attn_drop_rate=float(kwargs["attn_drop_rate"]),
        drop_path_rate=float(kwargs["drop_path_rate"]), pretrained_window_sizes=list(pretrained),
    )


def _size(value) -> int | list[int]:
    return int(value) if isinstance(value, (int, float)) else [int(v) for v in value]


def class_names(config: Mapping) -> list[str] | None:
    """The class names of ``id2label``, in index order; None when absent or the generated
    placeholders ``LABEL_0``, ``LABEL_1``, ... (which say nothing)."""
    id2label = config.get("id2label") or {}
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def hf_stage_windows(config: Mapping) -> list[tuple[int, int]]:
    """(window, shift) per stage as transformers fixes them when it builds the model (see the
    module docstring): square, from the rounded-down map at ``image_size``."""
    c = {**HF_DEFAULTS, **config}
    grid = [s // p for s, p in zip(to_2tuple(_size(c["image_size"])), to_2tuple(_size(c["patch_size"])))]
    window = int(c["window_size"])
    out = []
    for i in range(len(c["depths"])):
        h = grid[0] // 2**i
        win = min(h, window)
        out.append((win, 0 if h <= win else window // 2))
    return out


def config_differences(model: SwinTransformerV2, config: Mapping, source: str = CONFIG_NAME) -> list[str]:
    """The settings of ``config`` (read from ``source``) that shape the outputs but not the
    weights (image size, window, pretrained windows) where ``model`` was built otherwise, one
    line each."""
    if not isinstance(getattr(model, "config", None), Mapping):
        return []
    theirs = model_kwargs_from_hf(config, source)
    out = []
    for hf_name, ours in (("image_size", "img_size"), ("window_size", "window_size")):
        if to_2tuple(theirs[ours]) != to_2tuple(model.config[ours]):
            out.append(f"{hf_name} {theirs[ours]} in config.json, {model.config[ours]} in the model")
    pretrained = [to_2tuple(p) for p in theirs["pretrained_window_sizes"]]
    if pretrained != [to_2tuple(p) for p in model.config["pretrained_window_sizes"]]:
        out.append(f"pretrained_window_sizes {theirs['pretrained_window_sizes']} in config.json, "
                   f"{model.config['pretrained_window_sizes']} in the model")
    return out


def norm_layer_for(config: Mapping):
    """The ``norm_layer`` that gives a model the block and final LayerNorm eps of ``config``
    (``layer_norm_eps``), or None for the default 1e-5. transformers keeps 1e-5 in the
    patch-embedding and merging norms: :func:`match_fixed_eps` sets them back once built."""
    eps = float(config.get("layer_norm_eps", HF_DEFAULTS["layer_norm_eps"]))
    return functools.partial(nn.LayerNorm, eps=eps) if eps != _FIXED_EPS else None


def match_fixed_eps(model: SwinTransformerV2) -> None:
    """Give the patch-embedding and merging norms of ``model`` transformers' fixed eps (1e-5)."""
    for norm in [model.patch_embed.norm] + [s.downsample.norm for s in model.layers if s.downsample]:
        norm.eps = _FIXED_EPS


def warn_window_mismatch(model: SwinTransformerV2, config: Mapping, where: str | os.PathLike) -> None:
    """Warn, naming the stages, where the windows transformers fixes at build time from
    ``config`` differ from those ``model`` derives (see the module docstring)."""
    theirs = hf_stage_windows(config)
    ours = model.stage_windows()
    differ = [
        f"stage {i}: window {w}, shift {s} vs {tuple(ow)}, {tuple(os_)}"
        for i, ((w, s), (ow, os_)) in enumerate(zip(theirs, ours))
        if ow != (w, w) or os_ != (s, s)
    ]
    if differ:
        warnings.warn(
            f"{where}: transformers fixes its windows when it builds the model and swinv2 derives them from "
            f"each stage's map, and at {tuple(model.img_size)} they differ (transformers vs swinv2): "
            + "; ".join(differ) + ". Outputs differ from transformers' there.",
            stacklevel=3,
        )


# -- writing ------------------------------------------------------------------------------


def hf_config_from_model(model: SwinTransformerV2, class_names: Sequence[str] | None = None) -> dict:
    """The ``config.json`` content of ``model`` for transformers; ValueError naming what it
    cannot express (another block design, non-square windows, absolute embeddings, ...)."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"save_hf_folder needs a SwinTransformerV2 (with .config), got {type(model).__name__}")
    problems = [f"{k}={cfg.get(k)!r} (transformers has only {v!r})" for k, v in _HF_FIXED.items() if cfg.get(k) != v]
    window = to_2tuple(cfg["window_size"])
    if window[0] != window[1]:
        problems.append(f"window_size={window} (transformers has square windows only)")
    pretrained = [to_2tuple(p) for p in cfg["pretrained_window_sizes"]]
    if any(h != w for h, w in pretrained):
        problems.append(f"pretrained_window_sizes={pretrained} (square only in transformers)")
    if model.num_classes and cfg.get("global_pool", "avg") != "avg":
        problems.append(f"global_pool={cfg.get('global_pool')!r} with a head (transformers averages)")
    eps = _norm_eps(model, problems)
    if problems:
        raise ValueError("transformers' Swinv2 cannot express this model: " + "; ".join(problems))
    depths = list(cfg["depths"])
    out = dict(
        architectures=[CLASSIFIER if model.num_classes else BARE_MODEL],
        model_type=MODEL_TYPE,
        image_size=_plain(cfg["img_size"]), patch_size=_plain(cfg["patch_size"]), num_channels=cfg["in_chans"],
        embed_dim=cfg["embed_dim"], depths=depths, num_heads=list(cfg["num_heads"]), window_size=window[0],
        pretrained_window_sizes=[h for h, _ in pretrained], mlp_ratio=cfg["mlp_ratio"], qkv_bias=cfg["qkv_bias"],
        hidden_dropout_prob=cfg["drop_rate"], attention_probs_dropout_prob=cfg["attn_drop_rate"],
        drop_path_rate=cfg["drop_path_rate"], hidden_act="gelu", use_absolute_embeddings=False,
        layer_norm_eps=eps, initializer_range=0.02, encoder_stride=32,
    )
    if model.num_classes:
        names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(model.num_classes)]
        if len(names) != model.num_classes:
            raise ValueError(f"{len(names)} class names for a model with {model.num_classes} classes")
        out["id2label"] = {str(i): str(n) for i, n in enumerate(names)}
        out["label2id"] = {str(n): i for i, n in enumerate(names)}
    floating = {p.dtype for p in model.state_dict().values() if p.is_floating_point()}
    if len(floating) == 1:
        out["dtype"] = str(floating.pop()).removeprefix("torch.")
    return out


def _plain(value):
    t = to_2tuple(value)
    return t[0] if t[0] == t[1] else list(t)


def _norm_eps(model: SwinTransformerV2, problems: list[str]) -> float:
    """transformers' eps for the block and final norms (``layer_norm_eps``); its patch-embedding
    and merging norms always use 1e-5."""
    fixed = [model.patch_embed.norm] + [s.downsample.norm for s in model.layers if s.downsample is not None]
    configurable = [model.norm] + [n for s in model.layers for b in s.blocks for n in (b.norm1, b.norm2)]
    if any(type(n) is not nn.LayerNorm or not n.elementwise_affine for n in fixed + configurable):
        problems.append("norms other than nn.LayerNorm")
        return _FIXED_EPS
    if {n.eps for n in fixed} != {_FIXED_EPS}:
        problems.append("patch-embedding/merging LayerNorm eps other than 1e-5")
    eps = {n.eps for n in configurable}
    if len(eps) != 1:
        problems.append(f"block LayerNorms with different eps {sorted(eps)}")
    return eps.pop() if len(eps) == 1 else _FIXED_EPS


def hf_state_dict(model: SwinTransformerV2) -> dict[str, torch.Tensor]:
    """``model``'s weights in transformers' names (bare ``Swinv2Model`` names without a head)."""
    state = from_official(model.state_dict(), "hf")
    if not model.num_classes:
        state = {k.removeprefix("swinv2."): v for k, v in state.items()}
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_hf_folder(
    model: SwinTransformerV2, folder: str | os.PathLike, class_names: Sequence[str] | None = None
) -> Path:
    """Write ``model`` as a transformers folder: ``config.json`` and ``model.safetensors``.

    ``Swinv2ForImageClassification.from_pretrained(folder)`` (``Swinv2Model`` for a model
    without a head) then loads it with no missing or unexpected keys. ``class_names`` become
    ``id2label``. The folder is written under a temporary name beside ``folder`` and renamed
    into place at the end, so it never holds a partial write. An existing ``folder`` is replaced
    only when empty or holding nothing but those two files; otherwise FileExistsError. Warns
    when transformers would build other windows than swinv2 uses (see the module docstring).
    """

    folder = Path(folder)
    config = hf_config_from_model(model, class_names)
    state = hf_state_dict(model)
    warn_window_mismatch(model, config, folder)
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder")
        other = sorted(p.name for p in folder.iterdir() if p.name not in (CONFIG_NAME, SAFETENSORS_NAME))
        if other:
            raise FileExistsError(f"{folder} already holds other files ({', '.join(other[:5])}); write to a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    old = tmp.with_name(tmp.name + ".old")
    try:
        tmp.mkdir()
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_safetensors(state, tmp / SAFETENSORS_NAME, metadata={"format": "pt"})
        give_default_mode(tmp / SAFETENSORS_NAME)
        for name in (CONFIG_NAME, SAFETENSORS_NAME):  # on disk before the rename makes them visible
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        if isinstance(err, OSError):
            raise write_error(err, folder) from err
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return folder
