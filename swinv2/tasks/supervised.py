"""Supervised training and fine-tuning of a classifier: ``swinv2 train`` and ``swinv2 finetune``.

Reads top-down: data, model, optimizer, loop pieces, then the loop.
"""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import datasets as D
from ..data import loader as L
from ..data import mixup as M
from ..data.transforms import eval_transform, train_transform
from ..hf_folder import hf_stage_windows
from ..loading import load_pretrained, network_class
from ..model import SwinTransformerV2
from ..reading import read_weights
from ..train.config import TrainConfig, flag
from ..train.distributed import Dist, unwrap, wrap_model
from ..train.engine import Loop
from ..train.optim import build_optimizer, param_groups
from ..variants import create_model, get_variant
from ..video import VideoSwinTransformerV2
from .common import (
    ARCH_SWITCHES,
    evaluate_classifier,
    in_process_group,
    make_ema,
    model_overrides,
    model_saver,
    prepare_run,
    run_loop,
    set_threads,
)


def load_datasets(cfg: TrainConfig):
    """(train, val, class names): the bundled digits without ``--data``, else image folders.

    A split in which not one image can be read is refused here, before any model is built."""
    if cfg.data is None:
        train = D.DigitsDataset("train", seed=cfg.seed)
        val = D.DigitsDataset("val", seed=cfg.seed)
        classes = list(train.classes)
    else:
        train_root, val_root = D.resolve_folders(cfg.data, cfg.val)
        train = D.ImageFolderDataset(train_root, min_classes=2)
        classes = list(train.classes)
        if val_root is None:
            train, val = D.split_holdout(train, cfg.val_fraction, cfg.seed)
        else:
            val = D.ImageFolderDataset(val_root, min_classes=1)
            D.check_same_classes(train, val)
    if cfg.train_fraction < 1:
        train = D.subset_fraction(train, cfg.train_fraction, cfg.seed)
    D.require_readable(train, "training")
    D.require_readable(val, "validation")
    return train, val, classes


def build_classifier(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, str | None]:
    """The model to train, and for ``finetune`` the load report of its starting weights."""
    overrides = model_overrides(cfg, num_classes=num_classes)
    report = None
    if cfg.command == "finetune":
        model, report = network_from_checkpoint(cfg, overrides, head="auto")
    else:
        get_variant(cfg.model)  # a clear error for an unknown name before any data work
        model = create_model(cfg.model, **overrides)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, report


def network_from_checkpoint(cfg: TrainConfig, overrides: dict, head: str) -> tuple[SwinTransformerV2, str]:
    """``cfg.model`` built with ``overrides`` and started from ``cfg.checkpoint`` (``head`` as
    :func:`~swinv2.load_pretrained` takes it), and the load report. The windows the checkpoint
    was trained with become ``pretrained_window_sizes`` unless the config names them, so the
    log-spaced position bias transfers to the new window (an image checkpoint's windows are the
    spatial ones of a video model it inflates into)."""
    weights = read_weights(cfg.checkpoint, arch=cfg.model)  # a training checkpoint gives its 'model'
    windows = cfg.pretrained_windows or checkpoint_windows(weights)
    if windows is not None:
        overrides = {**overrides, "pretrained_window_sizes": list(windows)}
    switches = checkpoint_switches(cfg, weights.config)
    model = create_model(cfg.model, **{**overrides, **switches})
    report = str(load_pretrained(model, weights, head=head))
    adopted = ", ".join(f"{k}={v}" for k, v in switches.items() if getattr(cfg, k) is None)
    return model, report + (f"\nnote: architecture switches of the checkpoint: {adopted}" if adopted else "")


def checkpoint_switches(cfg: TrainConfig, saved: dict | None) -> dict:
    """The ablation switches (``--norm-placement`` ...) a checkpoint's stored model config was
    built with: adopted where the config leaves them unset, since the weights only fit that
    architecture (a pre-norm checkpoint even loads silently into a res-post-norm model, the
    parameter names being the same). One set to another value is a ValueError. A checkpoint
    without a model config (official, timm ...) gives none: the flags and the variant decide."""
    out = {}
    for name in ARCH_SWITCHES:
        if not saved or name not in saved:
            continue
        asked = getattr(cfg, name)
        if asked is not None and asked != saved[name]:
            raise ValueError(f"--checkpoint {cfg.checkpoint} holds a model with {name} {saved[name]!r}, not the "
                             f"{flag(name)} {asked} asked: its weights only fit their own architecture (leave "
                             f"{flag(name)} out to fine-tune it as it is)")
        out[name] = saved[name]
    return out


def checkpoint_windows(source) -> list[int] | None:
    """The window each stage was trained with, which becomes ``pretrained_window_sizes``
    (official: a model pre-trained at 192 with window 12 is fine-tuned with 12,12,12,6).

    ``source``: anything :func:`swinv2.reading.read_weights` reads. From a Hugging Face
    folder's config.json (the windows transformers builds from it), from the model config a
    swinv2 file or training checkpoint stores (the effective per-stage windows at the size it
    was trained at), or from the shape of the coordinate tables that official and timm
    checkpoints carry ((2w-1) x (2w-1) per stage).
    """
    weights = read_weights(source)
    if weights.hf_config is not None:
        return [w for w, _ in hf_stage_windows(weights.hf_config)]
    if weights.config is not None:  # checked by the reader before this builds anything
        with torch.device("meta"):
            model = network_class(weights.config)(**weights.config)
        if isinstance(model, VideoSwinTransformerV2):  # (time, height, width) per stage
            return [list(w) for w, _ in model.stage_windows()]
        size = (weights.run_config or {}).get("img_size") or model.img_size
        return [w[0] for w, _ in model.stage_windows(size)]
    windows = {}
    for key, value in weights.state.items():
        key = key.removeprefix("module.").removeprefix("encoder.")
        if key.endswith("attn.relative_coords_table") and key.startswith("layers."):
            stage = int(key.split(".")[1])
            windows.setdefault(stage, (value.shape[1] + 1) // 2)
    if not windows:
        return None
    return [windows[i] for i in sorted(windows)]


def make_loop(cfg: TrainConfig, env: Dist, train, val, classes, model_img: int) -> Loop:
    img = cfg.img_size or model_img
    tf_train = train_transform(
        img, auto_augment=cfg.auto_augment, color_jitter=cfg.color_jitter, reprob=cfg.reprob,
        scale=(cfg.crop_scale, 1.0), hflip=cfg.hflip,
    )
    tf_eval = eval_transform(img, crop_pct=cfg.crop_pct, crop_mode="center" if cfg.crop_pct < 1 else "squash")
    train_set = L.TransformedDataset(train, tf_train, seed=cfg.seed)
    loader = L.build_loader(
        train_set, batch_size=cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed,
        rank=env.rank, world_size=env.world_size, pin_memory=env.device.type == "cuda",
    )
    val_loader = eval_loader(val, tf_eval, cfg, env)
    mixup = M.build_mixup(len(classes), mixup=cfg.mixup, cutmix=cfg.cutmix, label_smoothing=cfg.label_smoothing)
    criterion = M.train_criterion(mixup, cfg.label_smoothing)

    def objective(model, inputs, seed):
        images, targets = (t.to(env.device, non_blocking=True) for t in inputs)
        if mixup is not None:
            images, targets = M.apply_mixup(mixup, images, targets, seed)
        logits = model(images)
        return criterion(logits.float(), targets), images.shape[0]

    def loader_for(epoch, start_batch):
        loader.batch_sampler.set_epoch(epoch, start_batch) if hasattr(loader.batch_sampler, "set_epoch") \
            else loader.sampler.set_epoch(epoch, start_batch)
        return iter(loader)

    return Loop(
        objective=objective,
        loader_for=loader_for,
        batches_per_epoch=len(loader),
        evaluate=lambda model: require_images(evaluate_classifier(model, val_loader, env, cfg, len(classes)), val),
        select=("top1", True),
        extra_state=lambda: dict(class_names=list(classes)),
        save_model=model_saver(cfg, classes),
    )


def require_images(metrics: dict, dataset, split: str = "validation") -> dict:
    """``metrics`` of an evaluation pass, or a ValueError when it saw no image (every file of the
    split failed to decode): 0.0 on 0 images must not pass for a score or select a checkpoint."""
    if metrics.get("images", 1) == 0:
        root = D.root_of(dataset)
        raise ValueError(f"no readable image in the {split} data{f' ({root})' if root else ''}: all "
                         f"{len(dataset)} image files were skipped as unreadable")
    return metrics


def eval_loader(dataset, transform, cfg: TrainConfig, env: Dist) -> DataLoader:
    """Each process evaluates every world_size-th image: no padding, so no image counts twice."""
    keyed = L.TransformedDataset(dataset, transform, seed=cfg.seed)
    indices = [(0, i) for i in range(env.rank, len(dataset), env.world_size)]
    return DataLoader(keyed, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.workers,
                      collate_fn=L.collate_skip, persistent_workers=False)


def main(cfg: TrainConfig) -> int:
    return in_process_group(_run, cfg)


def _run(cfg: TrainConfig, env: Dist) -> int:
    set_threads(cfg)
    cfg, state = prepare_run(cfg, env)
    torch.manual_seed(cfg.seed)  # the initial weights (and mask token, decoder) come from the seed
    train, val, classes = load_datasets(cfg)
    model, report = build_classifier(cfg, len(classes))
    if report and env.main:
        print(f"start weights: {cfg.checkpoint}\n{report}")
    ema, wrapped, optimizer = prepare_model(model, cfg, env)
    loop = make_loop(cfg, env, train, val, classes, model.img_size[0])
    n = sum(p.numel() for p in model.parameters())
    intro = (f"{cfg.command} {cfg.model} ({n / 1e6:.2f}M parameters) on {len(train)} images, {len(classes)} classes, "
             f"validating on {len(val)}")
    return run_loop(cfg, env, wrapped, optimizer, loop, state, intro, ema=ema, summary=lambda final: dict(
        task=cfg.command, model=cfg.model, updates=final.step, best_top1=final.best, best_epoch=final.best_epoch,
        skipped_images=final.skipped_images, last=final.history[-1] if final.history else None,
        output=cfg.output))


def prepare_model(model: nn.Module, cfg: TrainConfig, env: Dist):
    """(EMA or None, the wrapped model to train, its optimizer) for a built network: on the
    run's device, wrapped for its sharding, compiled when asked."""
    model.to(env.device)
    ema = make_ema(model, cfg.ema)
    wrapped = wrap_model(model, env, cfg.sharding)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return ema, wrapped, make_optimizer(wrapped, model, cfg)


def make_optimizer(wrapped: nn.Module, model: nn.Module, cfg: TrainConfig):
    """AdamW with the official groups; ZeRO-1 (sharded states) under ``--sharding zero1``."""
    if cfg.sharding == "zero1" and torch.distributed.is_initialized():
        from torch.distributed.optim import ZeroRedundancyOptimizer

        groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
        for g in groups:
            g.pop("names")
        first, rest = groups[0], groups[1:]
        # Each process keeps the AdamW states of its shard of the parameters only (ZeRO-1).
        opt = ZeroRedundancyOptimizer(first["params"], optimizer_class=torch.optim.AdamW, lr=cfg.lr,
                                      betas=cfg.betas, eps=cfg.eps, weight_decay=first["weight_decay"])
        opt.param_groups[0].update({k: v for k, v in first.items() if k != "params"})
        for g in rest:
            opt.add_param_group(g)
        return opt
    return build_optimizer(unwrap(wrapped), cfg)


def describe(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=1)
