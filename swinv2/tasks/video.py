"""Video classification: ``swinv2 train|finetune --task video``.

Reads top-down: clips, model (a fine-tune from an image checkpoint inflates it), the loop's
pieces, then the loop (the classification engine: AMP, accumulation, DDP/FSDP, exact resume).
Validation averages the class probabilities of every view of a clip (``--test-clips`` clips x
``--test-crops`` crops), as Video Swin tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import datasets as D
from ..data import loader as L
from ..data import mixup as M
from ..data.video import KineticsClips, VideoClipDataset, VideoFolder, VideoViewsDataset, build_video_loader
from ..data.video_demo import prepare_video_demo
from ..data.video_transforms import video_eval_transform, video_train_transform
from ..train.config import TrainConfig
from ..train.distributed import Dist, all_reduce_sum
from ..train.engine import Loop, autocast
from ..variants import create_model, get_variant
from ..video import VideoSwinTransformerV2
from .common import in_process_group, model_overrides, model_saver, prepare_run, run_loop, set_threads
from .supervised import network_from_checkpoint, prepare_model


class ClipList:
    """Clips as (path, target) ``samples`` with ``classes`` and ``targets``: a held-out part of
    a source, in the shape the clip datasets read."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], root=None):
        self.samples, self.classes, self.root = samples, list(classes), root
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)


# -- data ----------------------------------------------------------------------------------------


def load_video_sources(cfg: TrainConfig):
    """(train, val, class names, demo): the bundled moving-digits demo without ``--data``; a
    folder of class subfolders (with ``train/`` and ``val/``, or a held-out part); or Kinetics
    annotation CSVs (``--data train.csv --val validate.csv``, clips under ``--video-root``)."""
    if cfg.data is None:
        root = prepare_video_demo()
        return VideoFolder(root / "train", min_classes=2), VideoFolder(root / "val"), None, True
    if cfg.data.lower().endswith(".csv"):
        root = Path(cfg.video_root or os.path.dirname(os.path.abspath(cfg.data)))
        train = KineticsClips(cfg.data, root)
        val = KineticsClips(cfg.val, Path(cfg.video_root or os.path.dirname(os.path.abspath(cfg.val))),
                            classes=train.classes) if cfg.val else None
    else:
        train_root, val_root = D.resolve_folders(cfg.data, cfg.val)
        train = VideoFolder(train_root, min_classes=2)
        val = VideoFolder(val_root) if val_root is not None else None
        if val is not None:
            D.check_same_classes(train, val)
    if val is None:
        keep, held = D._stratified_split(train.targets, cfg.val_fraction, cfg.seed)
        root = getattr(train, "root", None)
        train, val = (ClipList([train.samples[i] for i in part], train.classes, root) for part in (keep, held))
    if cfg.train_fraction < 1:
        keep, _ = D._stratified_split(train.targets, 1 - cfg.train_fraction, cfg.seed)
        train = ClipList([train.samples[i] for i in keep], train.classes, getattr(train, "root", None))
    return train, val, list(train.classes), False


def clip_settings(cfg: TrainConfig, model: VideoSwinTransformerV2) -> dict:
    """Frames, interval, crop size, short side and test views of a run (saved with its model)."""
    img = cfg.img_size or model.img_size[0]
    return dict(frames=cfg.frames or model.num_frames, interval=cfg.frame_interval, img_size=img,
                short_side=cfg.short_side or round(img * 8 / 7), test_clips=cfg.test_clips,
                test_crops=cfg.test_crops)


def views_loader(source, settings: dict, batch_size: int, workers: int, seed: int, env: Dist) -> DataLoader:
    """Every view of each clip, (B, V, C, T, H, W); each process takes every world_size-th clip."""
    tf = video_eval_transform(settings["img_size"], short_side=settings["short_side"],
                              num_crops=settings["test_crops"])
    views = VideoViewsDataset(source, tf, clip_len=settings["frames"], interval=settings["interval"],
                              num_clips=settings["test_clips"], seed=seed)
    indices = [(0, i) for i in range(env.rank, len(source), env.world_size)]
    return DataLoader(views, batch_size=batch_size, sampler=indices, num_workers=workers,
                      collate_fn=L.collate_skip, persistent_workers=False)


# -- model ---------------------------------------------------------------------------------------


def build_video_model(cfg: TrainConfig, num_classes: int) -> tuple[VideoSwinTransformerV2, str | None]:
    """The video network to train, and for ``finetune`` the load report of its start weights
    (an image checkpoint is inflated; its training windows become the spatial
    ``pretrained_window_sizes``)."""
    variant = get_variant(cfg.model)
    if not variant.is_video:
        raise ValueError(f"--task video needs a video model (swinv2 list shows them: video_swinv2_debug, "
                         f"video_swinv2_tiny_window16_256, ...), got {cfg.model}")
    overrides = model_overrides(cfg, num_classes=num_classes)
    window = list(variant.window_size)
    if cfg.window:
        window[1:] = [cfg.window, cfg.window]
    if cfg.temporal_window:
        window[0] = cfg.temporal_window
    overrides.update(window_size=window, num_frames=cfg.frames or variant.num_frames)
    report = None
    if cfg.command == "finetune":
        model, report = network_from_checkpoint(cfg, overrides, head="auto")
    else:
        model = create_model(cfg.model, **overrides)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, report


# -- loop ----------------------------------------------------------------------------------------


def evaluate_views(model: nn.Module, loader, env: Dist, cfg: TrainConfig, num_classes: int,
                   clips_per_forward: int | None = None) -> dict:
    """Top-1, top-5 (fractions), the loss of the averaged probabilities, clips and views: each
    clip's class probabilities averaged over its views, summed across processes."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # correct1, correct5, nll, clips
    k, views = min(5, num_classes), 0
    chunk = clips_per_forward or cfg.batch_size
    with torch.no_grad():
        for clips, targets, _ in loader:
            if clips.shape[0] == 0:
                continue
            B, views = clips.shape[:2]
            flat = clips.flatten(0, 1)  # (B*V, C, T, H, W)
            outs = []
            for part in flat.split(chunk):
                with autocast(cfg, env.device):
                    outs.append(model(part.to(env.device)).float())
            probs = torch.cat(outs).softmax(-1).view(B, views, -1).mean(1)  # (B, classes)
            targets = targets.to(env.device)
            hit = probs.topk(k, dim=1).indices == targets[:, None]
            nll = -probs.gather(1, targets[:, None]).clamp_min(1e-12).log().sum()
            sums += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), nll,
                                 torch.tensor(B, device=env.device)]).to(sums)
    all_reduce_sum(sums)
    model.train(was_training)
    n = max(float(sums[3]), 1.0)
    return dict(top1=float(sums[0]) / n, top5=float(sums[1]) / n, loss=float(sums[2]) / n, clips=int(sums[3]),
                views=int(views))


def require_clips(metrics: dict, source, split: str = "validation") -> dict:
    """``metrics``, or a ValueError when not one clip of the split could be decoded."""
    if metrics["clips"] == 0:
        where = getattr(source, "root", None)
        raise ValueError(f"no readable clip in the {split} data{f' ({where})' if where else ''}: all {len(source)} "
                         "clips were skipped as unreadable")
    return metrics


def make_loop(cfg: TrainConfig, env: Dist, train, val, classes, settings: dict) -> Loop:
    if cfg.cutmix > 0:
        raise ValueError("--task video: CutMix cuts image boxes; set --cutmix 0 (mixup alone works on clips)")
    tf_train = video_train_transform(settings["img_size"], crop="resized", scale=(cfg.crop_scale, 1.0),
                                     short_side=settings["short_side"], hflip=cfg.hflip)
    clips = VideoClipDataset(train, tf_train, clip_len=settings["frames"], interval=settings["interval"],
                             seed=cfg.seed)
    loader = build_video_loader(clips, batch_size=cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed,
                                rank=env.rank, world_size=env.world_size, pin_memory=env.device.type == "cuda")
    val_loader = views_loader(val, settings, cfg.batch_size, cfg.workers, cfg.seed, env)
    mixup = M.build_mixup(len(classes), mixup=cfg.mixup, cutmix=0.0, label_smoothing=cfg.label_smoothing)
    criterion = M.train_criterion(mixup, cfg.label_smoothing)

    def objective(model, inputs, seed):
        batch, targets = (t.to(env.device, non_blocking=True) for t in inputs)  # (B, C, T, H, W), (B,)
        if mixup is not None:
            batch, targets = M.apply_mixup(mixup, batch, targets, seed)
        return criterion(model(batch).float(), targets), batch.shape[0]

    def loader_for(epoch, start_batch):
        loader.batch_sampler.set_epoch(epoch, start_batch) if hasattr(loader.batch_sampler, "set_epoch") \
            else loader.sampler.set_epoch(epoch, start_batch)
        return iter(loader)

    return Loop(
        objective=objective,
        loader_for=loader_for,
        batches_per_epoch=len(loader),
        evaluate=lambda model: require_clips(evaluate_views(model, val_loader, env, cfg, len(classes)), val),
        select=("top1", True),
        extra_state=lambda: dict(class_names=list(classes)),
        save_model=model_saver(cfg, classes, extra={"video": settings}),
    )


def main(cfg: TrainConfig) -> int:
    return in_process_group(_run, cfg)


def _run(cfg: TrainConfig, env: Dist) -> int:
    set_threads(cfg)
    cfg, state = prepare_run(cfg, env)
    torch.manual_seed(cfg.seed)
    train, val, classes, demo = load_video_sources(cfg)
    classes = classes or list(train.classes)
    model, report = build_video_model(cfg, len(classes))
    if report and env.main:
        print(f"start weights: {cfg.checkpoint}\n{report}")
    settings = clip_settings(cfg, model)
    ema, wrapped, optimizer = prepare_model(model, cfg, env)
    loop = make_loop(cfg, env, train, val, classes, settings)
    n = sum(p.numel() for p in model.parameters())
    views = settings["test_clips"] * settings["test_crops"]
    intro = (f"{cfg.command} {cfg.model} ({n / 1e6:.2f}M parameters) on {len(train)} clips of {settings['frames']} "
             f"frames (every {settings['interval']}), {len(classes)} classes, validating on {len(val)} clips x "
             f"{views} view{'s' if views > 1 else ''}")
    return run_loop(cfg, env, wrapped, optimizer, loop, state, intro, ema=ema, summary=lambda final: dict(
        task="video", command=cfg.command, model=cfg.model, updates=final.step, best_top1=final.best,
        best_epoch=final.best_epoch, skipped_clips=final.skipped_images,
        last=final.history[-1] if final.history else None, output=cfg.output))
