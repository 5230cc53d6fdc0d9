"""``swinv2 train``, ``finetune``, ``pretrain`` and ``eval``, and the flags of :class:`TrainConfig`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from ..tasks import dense_infer, dense_train, evaluate, pretrain, supervised, video, video_infer
from ..tasks.checks import check_run
from ..tasks.common import recipe_path
from ..tasks.dense import dense_task_of
from ..train.config import DENSE_TASKS, SECTIONS, TASKS, TrainConfig, field_type, flag, plain
from ..train.distributed import check_device
from .common import fraction, non_negative_int, parse_side, positive_int, require, window_arg

COMMANDS = {
    "train": "train a classifier (default data: bundled digits), or a detector or segmenter (--task)",
    "finetune": "fine-tune from a checkpoint, at another resolution or window, with layer-wise lr decay",
    "pretrain": "SimMIM self-supervised pre-training",
}
EPILOG = {
    "train": "Without --data it trains on the bundled handwritten digits (scikit-learn), e.g.\n"
             "  swinv2 train --config digits --output runs/digits\n"
             "Under torchrun every process runs this command: torchrun --nproc-per-node 2 -m swinv2 train ...",
    "finetune": "e.g. swinv2 finetune --checkpoint runs/pretrain/checkpoint-last.pt --model swinv2_debug "
                "--layer-decay 0.75",
    "pretrain": "SimMIM masked-image modelling; labels are ignored. e.g. swinv2 pretrain --config digits_simmim",
}
# The recipe a run without --data and without --config gets: the bundled digits, tuned for them.
DIGITS_RECIPES = {"train": "digits", "pretrain": "digits_simmim"}
DIGITS = "for the bundled digits used without --data"
# Dense tasks without --config: the bundled demo's recipe without --data, else the task's
# general recipe (AdamW and the paper's schedule, no starting weights).
DENSE_RECIPES = {"detection": ("detection_demo", "detection"), "segmentation": ("segmentation_demo", "segmentation")}
DEMO = "for the bundled demo images used without --data"
# Video without --config: the bundled moving-digits demo without --data, else the general recipe.
VIDEO_RECIPES = ("video_demo", "video")
VIDEO_DEMO = "for the bundled video demo used without --data"
# What each dense task needs beyond the core install (the dense extra).
DENSE_NEEDS = {"detection": ("torchmetrics", "pycocotools"), "segmentation": ("torchmetrics",)}


def add_parsers(sub) -> None:
    for task, help_text in COMMANDS.items():
        p = sub.add_parser(task, help=help_text, epilog=EPILOG[task],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(p, exclude=("command",))
        p.set_defaults(func=cmd_task)

    p = sub.add_parser("eval", help="top-1/top-5 of weights on an image folder (default: bundled digits)")
    p.add_argument("--checkpoint", default=None, help="a run's model-*.safetensors or checkpoint-*.pt, or any "
                   "checkpoint with --model NAME")
    p.add_argument("--model", default=None, help="architecture name, or a weight tag (see `swinv2 pretrained`)")
    p.add_argument("--data", default=None, help="image folder (class subfolders, or with a val/ subfolder)")
    p.add_argument("--img-size", type=parse_side, default=None, help="evaluation resolution (default: the weights')")
    p.add_argument("--window", type=window_arg, default=None, help="window size (default: the weights')")
    p.add_argument("--crop-pct", type=fraction, default=None, help="centre-crop fraction (1.0: no crop)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="none")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--threads", type=non_negative_int, default=0)
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the bundled digits' train/val split")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="what the checkpoint predicts (default: what it says; dense checkpoints say so)")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5 as fractions, ...; "
                   "detection: bbox_AP, bbox_AP50, segm_AP, segm_AP50, ...; segmentation: mIoU, mAcc, aAcc)")
    p.add_argument("--frames", type=positive_int, default=None, help="video: frames per clip (default: the run's)")
    p.add_argument("--frame-interval", type=positive_int, default=None,
                   help="video: take every N-th frame (default: the run's)")
    p.add_argument("--clips", type=positive_int, default=None,
                   help="video: clips per video, evenly spread, scores averaged (default: the run's; Video Swin 4)")
    p.add_argument("--crops", type=int, choices=(1, 3), default=None,
                   help="video: 1 centre crop or 3 along the long side (default: the run's; Video Swin 3)")
    p.add_argument("--video-root", default=None,
                   help="video: folder of the clips when --data is a Kinetics CSV (default: the CSV's folder)")
    p.set_defaults(func=cmd_eval)


# -- the flags of TrainConfig ---------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, exclude=()) -> None:
    """One flag per field (``--img-size``, ``--no-progress`` ...), listed by ``--help`` in the
    field's section. A flag not typed leaves no attribute (argparse.SUPPRESS), so recipe values are
    overridden only by flags actually given, and ``--clip-grad none`` can still set a field to None."""
    parser.add_argument("--config", default=None, metavar="YAML", help="recipe file (flags override it)")
    groups = {section: parser.add_argument_group(section) for section in SECTIONS}
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        kind, optional, is_list = field_type(f)
        if kind is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        elif is_list:
            kw = dict(type=_scalar_type(kind, False), nargs="*")
        else:
            kw = dict(type=_scalar_type(kind, optional))
        groups[f.metadata["section"]].add_argument(
            flag(f.name), default=argparse.SUPPRESS, help=f"{f.metadata['help']} [default: {plain(f.default)}]", **kw)


def _scalar_type(kind, optional: bool):
    """The argparse type of a field's values: ``kind``, and ``none``/``null`` for an optional field."""

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def config_from_args(args: argparse.Namespace, task: str | None = None) -> TrainConfig:
    """The config of parsed flags: the ``--config`` recipe with the flags typed over it."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig.from_flags(flags, recipe=getattr(args, "config", None), command=task)


# -- commands ------------------------------------------------------------------------------------


def cmd_task(args) -> int:
    """``swinv2 train``, ``finetune`` or ``pretrain``: the run's config, the checks before it
    starts, then the task's ``main``."""
    task = args.command
    dense = getattr(args, "task", None) in DENSE_TASKS
    if dense:
        return _dense_task(args)
    if getattr(args, "task", None) == "video":
        return _video_task(args)
    # Recipes and the run's config.yaml are YAML; supervised augmentation and mixup are timm's;
    # pre-training draws a reconstruction picture (matplotlib) at the end of every epoch.
    require(task, "yaml", "matplotlib" if task == "pretrain" else "timm")
    digits = not args.config and task in DIGITS_RECIPES and not hasattr(args, "data")
    if digits:
        args.config = DIGITS_RECIPES[task]
    if args.config:
        args.config = recipe_path(args.config)
    if not hasattr(args, "output"):
        args.output = f"runs/{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = config_from_args(args, task=task)
    if cfg.data is None:
        require(task, "sklearn", reason=DIGITS)
    if cfg.sharding == "deepspeed":
        require(task, "deepspeed", reason="for --sharding deepspeed")
    check_run(cfg)
    if cfg.task in DENSE_TASKS:  # a dense recipe given with --config
        return _run_dense(args.command, cfg, demo=False)
    if cfg.task == "video":  # a video recipe given with --config
        return _run_video(args.command, cfg)
    if digits:
        print(f"no --data: training on scikit-learn's bundled handwritten digits with {args.config}")
    return (pretrain.main if task == "pretrain" else supervised.main)(cfg)


def _dense_task(args) -> int:
    """``swinv2 train|finetune --task detection|segmentation``: the demo recipe without --data,
    the task's general recipe with it, unless --config names one."""
    command, task = args.command, args.task
    require(command, "yaml", *DENSE_NEEDS[task])
    demo = not hasattr(args, "data")
    if not args.config:
        args.config = DENSE_RECIPES[task][0 if demo else 1]
    args.config = recipe_path(args.config)
    if not hasattr(args, "output"):
        args.output = f"runs/{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = config_from_args(args, task=command)
    if demo and cfg.data is None:
        what = ("scikit-learn digits pasted on scikit-image pictures" if task == "detection" else
                "regions of scikit-image textures with scikit-learn digits on top")
        print(f"no --data: training on the bundled {task} demo ({what}) with {args.config}")
    return _run_dense(command, cfg, demo=cfg.data is None)


def _run_dense(command: str, cfg: TrainConfig, demo: bool) -> int:
    require(command, "yaml", *DENSE_NEEDS[cfg.task])
    if demo:
        require(command, "sklearn", "skimage", reason=DEMO)
    if cfg.sharding == "deepspeed":
        raise ValueError(f"--task {cfg.task}: --sharding deepspeed is for classification; use fsdp or zero1")
    check_run(cfg)
    return dense_train.main(cfg)


def _video_task(args) -> int:
    """``swinv2 train|finetune --task video``: the demo recipe without --data, the general video
    recipe with it, unless --config names one."""
    command = args.command
    if command == "pretrain":
        raise ValueError("--task video: SimMIM pre-training is for images; pre-train an image model and fine-tune "
                         "it with --task video (its weights inflate)")
    require(command, "yaml", "av")
    demo = not hasattr(args, "data")
    if not args.config:
        args.config = VIDEO_RECIPES[0 if demo else 1]
    args.config = recipe_path(args.config)
    if not hasattr(args, "output"):
        args.output = f"runs/video-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = config_from_args(args, task=command)
    if cfg.data is None:
        print(f"no --data: training on the bundled video demo (a handwritten digit moving over a texture; the "
              f"class is its direction) with {args.config}")
    return _run_video(command, cfg)


def _run_video(command: str, cfg: TrainConfig) -> int:
    require(command, "yaml", "av")
    if cfg.data is None:
        require(command, "sklearn", "skimage", reason=VIDEO_DEMO)
    if cfg.sharding == "deepspeed":
        raise ValueError("--task video: --sharding deepspeed is for classification; use fsdp or zero1")
    check_run(cfg)
    return video.main(cfg)


def cmd_eval(args) -> int:
    check_device(args.device)
    if args.task == "video" or video_infer.is_video_checkpoint(args.checkpoint):
        return _eval_video(args)
    dense = args.task in DENSE_TASKS or (args.checkpoint is not None and dense_task_of(args.checkpoint))
    if dense:
        return _eval_dense(args)
    if args.task not in (None, "classification"):
        raise ValueError(f"--task {args.task} needs --checkpoint of a {args.task} run")
    if args.data is None:
        require("eval", "sklearn", reason=DIGITS)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate.evaluate_weights(args.checkpoint, args.model, args.data, img_size=args.img_size,
                                       window=args.window, crop_pct=args.crop_pct, batch_size=args.batch_size,
                                       workers=args.workers, amp=args.amp, device=args.device, seed=args.seed)
    if args.json:
        print(json.dumps(result))
        return 0
    skipped = f"; {result['skipped_images']} unreadable images skipped" if result["skipped_images"] else ""
    print(f"top-1 {result['top1'] * 100:.2f}%  top-5 {result['top5'] * 100:.2f}%  loss {result['loss']:.4f}  "
          f"on {result['images']} images at {result['img_size']}px ({result['crop_mode']} crop "
          f"{result['crop_pct']}, window {result['window']}){skipped}")
    return 0


def _eval_dense(args) -> int:
    if args.checkpoint is None:
        raise ValueError("eval of a detection or segmentation model needs --checkpoint (a run's model-*.safetensors "
                         "or checkpoint-*.pt)")
    task = args.task or dense_task_of(args.checkpoint)
    require("eval", *DENSE_NEEDS[task])
    if args.data is None:
        require("eval", "sklearn", "skimage", reason=DEMO)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = dense_infer.evaluate_dense(args.checkpoint, args.data, task=args.task, img_size=args.img_size,
                                        window=args.window, batch_size=min(args.batch_size, 8),
                                        workers=args.workers, amp=args.amp, device=args.device)
    if args.json:
        print(json.dumps(result))
        return 0
    if task == "detection":
        head = (f"box AP {result['bbox_AP'] * 100:.1f} (AP50 {result['bbox_AP50'] * 100:.1f})  "
                f"mask AP {result['segm_AP'] * 100:.1f} (AP50 {result['segm_AP50'] * 100:.1f})")
    else:
        head = f"mIoU {result['mIoU'] * 100:.2f}%  mAcc {result['mAcc'] * 100:.2f}%  aAcc {result['aAcc'] * 100:.2f}%"
    skipped = f"; {result['skipped_images']} unreadable images skipped" if result.get("skipped_images") else ""
    print(f"{head}  on {result['images']} images (window {result['window']}){skipped}")
    return 0


def _eval_video(args) -> int:
    if args.checkpoint is None:
        raise ValueError("eval of a video model needs --checkpoint (a run's model-*.safetensors or checkpoint-*.pt)")
    require("eval", "av")
    if args.data is None:
        require("eval", "sklearn", "skimage", reason=VIDEO_DEMO)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = video_infer.evaluate_video_weights(
        args.checkpoint, args.data, frames=args.frames, interval=args.frame_interval, clips=args.clips,
        crops=args.crops, img_size=args.img_size, window=args.window, video_root=args.video_root,
        batch_size=min(args.batch_size, 16), workers=args.workers, amp=args.amp, device=args.device)
    if args.json:
        print(json.dumps(result))
        return 0
    skipped = f"; {result['skipped_clips']} unreadable clips skipped" if result["skipped_clips"] else ""
    print(f"top-1 {result['top1'] * 100:.2f}%  top-5 {result['top5'] * 100:.2f}%  loss {result['loss']:.4f}  on "
          f"{result['clips']} clips x {result['views']} views ({result['clips_per_video']} clips x {result['crops']} "
          f"crops) of {result['frames']} frames every {result['interval']} at {result['img_size']}px, window "
          f"{'x'.join(map(str, result['window']))}{skipped}")
    return 0
