"""What detection and segmentation share: the backbone and its starting weights, the image
sizes a run uses, and the model files a run writes and ``eval`` / ``predict`` read back.

A dense run's files hold the whole network (backbone, neck, heads). ``model-*.safetensors``
carries in its metadata what rebuilds it: the task, the backbone's constructor arguments, the
run's config and the class names; a training checkpoint (``checkpoint-*.pt``) carries the same
in its own fields.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from .. import fileio
from ..dense.backbone import SwinV2Backbone
from ..dense.detection import Detector
from ..dense.segmentation import Segmenter
from ..files import CheckpointError, is_safetensors, read_safetensors_metadata
from ..loading import StateDictMismatchError
from ..model import SwinTransformerV2
from ..train import checkpoint as ckpt
from ..train.config import DENSE_TASKS, TrainConfig
from ..variants import apply_speedups, create_model, get_variant
from .common import model_overrides
from .supervised import network_from_checkpoint

DENSE_FORMAT = "swinv2-dense"  # metadata "format" of a dense model file
DEFAULT_SHORT_SIDES = tuple(range(480, 801, 32))  # the recipe's multi-scale training (480..800)
DEFAULT_TEST_SHORT_SIDE, DEFAULT_MAX_SIDE = 800, 1333
DEFAULT_CROP = 512  # ADE20K: 512x512 crops of images rescaled to a 512 short side (x 0.5..2)


# -- sizes ----------------------------------------------------------------------------------------


def detection_sizes(cfg: TrainConfig) -> tuple[tuple[int, ...], int, int]:
    """(training short sides, long-side cap, evaluation short side). ``--img-size`` sets the
    scale for small data: one short side, the cap 5/3 of it (800 -> 1333, the recipe's ratio)."""
    img = cfg.img_size
    short = tuple(cfg.short_sides) if cfg.short_sides else (img,) if img else DEFAULT_SHORT_SIDES
    test = cfg.test_short_side or img or DEFAULT_TEST_SHORT_SIDE
    cap = cfg.max_side or (round(img * DEFAULT_MAX_SIDE / DEFAULT_TEST_SHORT_SIDE) if img else DEFAULT_MAX_SIDE)
    if cap < max(*short, test):
        raise ValueError(f"--max-side {cap} is below the short side {max(*short, test)}: images could not reach it")
    return short, cap, test


def segmentation_sizes(cfg: TrainConfig) -> tuple[int, int]:
    """(crop side, base short side). ``--img-size`` sets both for small data."""
    crop = cfg.crop_size or cfg.img_size or DEFAULT_CROP
    return crop, cfg.base_size or crop


# -- building -------------------------------------------------------------------------------------


def build_backbone(cfg: TrainConfig) -> tuple[SwinV2Backbone, str | None]:
    """The SwinV2 backbone of a dense run, and the load report of its starting weights.

    ``--checkpoint`` (any source :func:`~swinv2.load_pretrained` reads, e.g. an ImageNet
    classifier) starts the backbone: its classifier is dropped, its final norm becomes the last
    stage's output norm, and the windows it was trained with become ``pretrained_window_sizes``,
    so the log-spaced position bias transfers to this run's window, as in fine-tuning."""
    overrides = model_overrides(cfg, num_classes=0)
    report = None
    if cfg.checkpoint:
        trained_for = dense_task_of(cfg.checkpoint)  # None for anything but a local dense model file
        if trained_for:
            raise ValueError(f"--checkpoint {cfg.checkpoint} is a whole {trained_for} model; --checkpoint starts the "
                             "backbone from a classifier or pre-trained network (continue a dense run with --resume)")
        network, report = network_from_checkpoint(cfg, overrides, head="drop")
    else:
        get_variant(cfg.model)  # a clear error for an unknown name before any data work
        if cfg.pretrained_windows:
            overrides["pretrained_window_sizes"] = list(cfg.pretrained_windows)
        network = create_model(cfg.model, **overrides)
    if cfg.grad_checkpointing:
        network.set_grad_checkpointing(True)
    return SwinV2Backbone(network, frozen_stages=cfg.frozen_stages), report


def build_head(cfg: TrainConfig, backbone: SwinV2Backbone, num_classes: int) -> nn.Module:
    """The task's network around ``backbone``: Mask R-CNN with FPN, or UPerNet."""
    if cfg.task == "detection":
        short, cap, _ = detection_sizes(cfg)
        return Detector(backbone, num_classes, min_size=short, max_size=cap, fpn_channels=cfg.fpn_channels,
                        box_batch_size_per_image=cfg.box_samples)
    if cfg.task == "segmentation":
        return Segmenter(backbone, num_classes, channels=cfg.decoder_channels,
                         aux_channels=cfg.decoder_channels // 2, aux_weight=cfg.aux_weight)
    raise ValueError(f"not a dense task: {cfg.task!r}")


# -- model files ----------------------------------------------------------------------------------


def dense_saver(cfg: TrainConfig, class_names: list[str], extra: dict | None = None):
    """Writes ``model-*.safetensors`` files that :func:`load_dense` rebuilds alone."""

    def save(state: dict, path: str, info: dict) -> None:
        meta = {
            "format": DENSE_FORMAT,
            "task": cfg.task,
            "model_config": json.dumps(state["model_config"]),
            "run_config": json.dumps(state["config"]),
            "class_names": json.dumps(class_names),
            "extra": json.dumps(extra or {}),
            "train_info": json.dumps(info),
        }
        tensors = {k: v.detach().contiguous() for k, v in state["model"].items()}
        with fileio.atomic_path(path) as tmp:
            fileio.save_safetensors(tensors, tmp, metadata=meta)

    return save


@dataclass
class DenseWeights:
    """A dense model file or training checkpoint, read but not yet built."""

    path: Path
    task: str
    model_config: dict
    config: TrainConfig
    class_names: list[str]
    state: dict = field(repr=False)
    extra: dict = field(default_factory=dict)


def dense_task_of(path: str | os.PathLike) -> str | None:
    """The dense task a model file or training checkpoint was trained for; None for anything
    else (a classifier, weights in another format)."""
    path = Path(path)
    if not path.is_file():
        return None
    if is_safetensors(path):
        meta, _ = read_safetensors_metadata(path)
        return meta.get("task") if meta.get("format") == DENSE_FORMAT else None
    try:
        state = ckpt.load_checkpoint(path)
    except CheckpointError:
        return None
    task = TrainConfig.from_dict(state["config"]).task
    return task if task in DENSE_TASKS else None


def read_dense(path: str | os.PathLike, task: str | None = None) -> DenseWeights:
    """Read a dense run's ``model-*.safetensors`` or ``checkpoint-*.pt``. ``task``, when given,
    must be the one the file was trained for."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        meta, _ = read_safetensors_metadata(path)
        if meta.get("format") != DENSE_FORMAT:
            raise CheckpointError(f"{path} is not a dense model file of swinv2 (it holds "
                                  f"{'a classifier' if 'config' in meta else 'weights without a dense task'})")
        state = load_file(os.fspath(path))
        weights = DenseWeights(path, meta["task"], json.loads(meta["model_config"]),
                               TrainConfig.from_dict(json.loads(meta["run_config"])),
                               json.loads(meta["class_names"]), state, json.loads(meta.get("extra") or "{}"))
    else:
        saved = ckpt.load_checkpoint(path)
        config = TrainConfig.from_dict(saved["config"])
        weights = DenseWeights(path, config.task, dict(saved["model_config"]), config,
                               list(saved.get("class_names") or []), saved["model"],
                               dict(saved.get("dense_extra") or {}))
    if weights.task not in DENSE_TASKS:
        raise CheckpointError(f"{path} holds a {weights.task} model, not a detection or segmentation one")
    if task is not None and task != weights.task:
        raise CheckpointError(f"{path} holds a {weights.task} model, not a {task} one (drop --task, or give a "
                              f"{task} checkpoint)")
    return weights


def build_dense(weights: DenseWeights, window: int | None = None) -> nn.Module:
    """The network ``weights`` describe, with its weights loaded (strict: a mismatch names the
    keys); ``window`` enlarges the window at test time (weights unchanged)."""
    network = SwinTransformerV2(**weights.model_config)
    if apply_speedups is not None:
        apply_speedups(network)
    cfg = weights.config.replace(grad_checkpointing=False)
    model = build_head(cfg, SwinV2Backbone(network, frozen_stages=cfg.frozen_stages), len(weights.class_names))
    result = model.load_state_dict(weights.state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = [f"missing {sorted(result.missing_keys)[:8]}" if result.missing_keys else "",
                 f"unexpected {sorted(result.unexpected_keys)[:8]}" if result.unexpected_keys else ""]
        raise StateDictMismatchError(f"{weights.path} does not fit a {weights.task} model: "
                                     + "; ".join(p for p in parts if p))
    if window:
        model.set_window(window)
    return model


def to_device_targets(targets: list[dict], device: torch.device) -> list[dict]:
    """Detection targets on ``device`` as plain tensors (torchvision's models index them)."""
    return [{k: v.as_subclass(torch.Tensor).to(device) if isinstance(v, torch.Tensor) else v
             for k, v in t.items()} for t in targets]


def same_buffers_everywhere(model: nn.Module) -> None:
    """Give every process the first process's buffers (BatchNorm running statistics) before a
    validation. Without synchronised BatchNorm each process's last training batch leaves its own
    statistics behind; the checkpoint holds the first process's, so this is what makes a run's
    validation equal the evaluation of its checkpoint."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def epoch_batches(loader):
    """The loop's ``loader_for``: this process's batches of an epoch from ``start_batch`` on."""

    def loader_for(epoch: int, start_batch: int):
        loader.sampler.set_epoch(epoch, start_batch)
        return iter(loader)

    return loader_for
