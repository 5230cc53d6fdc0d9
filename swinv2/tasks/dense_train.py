"""``swinv2 train|finetune --task detection|segmentation``: one run on the classification engine.

The task modules give the data and the loop pieces; this module builds the network, the
optimizer (AdamW with layer-wise lr decay through the backbone's layer ids) and runs the loop
with the same checkpoints, exact resume, logs and plots as classification.
"""

from __future__ import annotations

import torch
from torch import nn

from ..train.config import TrainConfig
from ..train.distributed import Dist, wrap_model
from . import detection, segmentation
from .common import in_process_group, make_ema, prepare_run, run_loop, set_threads
from .dense import build_backbone, build_head, dense_saver, detection_sizes, segmentation_sizes
from .supervised import make_optimizer


def main(cfg: TrainConfig) -> int:
    return in_process_group(_run, cfg)


def _run(cfg: TrainConfig, env: Dist) -> int:
    set_threads(cfg)
    cfg, state = prepare_run(cfg, env)
    torch.manual_seed(cfg.seed)  # the initial weights of the heads come from the seed
    if cfg.task == "detection":
        train, val, classes, category_ids = detection.load_data(cfg)
        extra = dict(category_ids=category_ids)
    else:
        train, val, classes = segmentation.load_data(cfg)
        extra = {}
    backbone, report = build_backbone(cfg)
    if report and env.main:
        print(f"backbone start weights: {cfg.checkpoint}\n{report}")
    model = build_head(cfg, backbone, len(classes)).to(env.device)
    if env.enabled and env.device.type == "cuda":
        # UPerNet's BatchNorms see a few crops per GPU: statistics over every process's batch,
        # as the paper's setup (SyncBN). PyTorch synchronises them on CUDA only.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = make_ema(model, cfg.ema)
    wrapped = wrap_model(model, env, cfg.sharding)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    optimizer = make_optimizer(wrapped, model, cfg)
    if cfg.task == "detection":
        loop = detection.make_loop(cfg, env, train, val, classes, category_ids)
    else:
        loop = segmentation.make_loop(cfg, env, train, val, classes)
    loop.save_model = dense_saver(cfg, classes, extra)
    metric, _ = loop.select
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    intro = (f"{cfg.command} {cfg.task} {cfg.model} backbone ({n / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M "
             f"trainable) on {len(train)} images, {len(classes)} classes, validating on {len(val)}; "
             f"{describe_sizes(cfg)}")
    return run_loop(cfg, env, wrapped, optimizer, loop, state, intro, ema=ema, summary=lambda final: dict(
        task=f"{cfg.command} {cfg.task}", model=cfg.model, updates=final.step, **{f"best_{metric}": final.best},
        best_epoch=final.best_epoch, skipped_images=final.skipped_images,
        last=final.history[-1] if final.history else None, output=cfg.output))


def describe_sizes(cfg: TrainConfig) -> str:
    if cfg.task == "detection":
        short, cap, test = detection_sizes(cfg)
        sides = f"{short[0]}" if len(short) == 1 else f"{short[0]}-{short[-1]} ({len(short)} scales)"
        return f"short side {sides}, long side at most {cap}, evaluated at {test}"
    crop, base = segmentation_sizes(cfg)
    return f"{crop}x{crop} crops of images rescaled to a {base} short side x {cfg.ratio_range}"
