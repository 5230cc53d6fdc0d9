"""Subcommands ``train``, ``finetune``, ``pretrain`` and ``eval``."""

from __future__ import annotations

import argparse
import time

from ..train.config import add_config_arguments, config_from_args
from .common import recipe_path

_EPILOG = {
    "train": "Without --data it trains on the bundled handwritten digits (scikit-learn), e.g.\n"
             "  swinv2 train --config digits --output runs/digits\n"
             "Under torchrun every process runs this command: torchrun --nproc-per-node 2 -m swinv2 train ...",
    "finetune": "e.g. swinv2 finetune --checkpoint runs/pretrain/checkpoint-last.pt --model swinv2_debug "
                "--layer-decay 0.75",
    "pretrain": "SimMIM masked-image modelling; labels are ignored. e.g. swinv2 pretrain --config digits_simmim",
}


def _task_main(task: str):
    def run(args) -> int:
        if args.config:
            args.config = recipe_path(args.config)
        elif task in ("train", "pretrain") and not hasattr(args, "data"):
            # No data and no recipe: the bundled digits with the recipe tuned for them.
            args.config = recipe_path("digits" if task == "train" else "digits_simmim")
            print(f"no --data: training on scikit-learn's bundled handwritten digits with {args.config}")
        if not hasattr(args, "output"):
            args.output = f"runs/{task}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = config_from_args(args, task=task)
        if task == "pretrain":
            from .pretrain import main
        else:
            from .supervised import main
        return main(cfg)

    return run


def register(sub) -> None:
    for task, help_text in (
        ("train", "train a classifier from scratch (default data: bundled digits)"),
        ("finetune", "fine-tune from a checkpoint, at another resolution or window, with layer-wise lr decay"),
        ("pretrain", "SimMIM self-supervised pre-training"),
    ):
        p = sub.add_parser(task, help=help_text, epilog=_EPILOG[task],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(p, exclude=("task",))
        p.set_defaults(func=_task_main(task))

    p = sub.add_parser("eval", help="top-1/top-5 of weights on an image folder (default: bundled digits)")
    p.add_argument("--checkpoint", default=None, help="a run's model-*.safetensors or checkpoint-*.pt, or any "
                   "checkpoint with --model NAME")
    p.add_argument("--model", default=None, help="architecture name, or a weight tag (see `swinv2 pretrained`)")
    p.add_argument("--data", default=None, help="image folder (class subfolders, or with a val/ subfolder)")
    p.add_argument("--img-size", type=int, default=None, help="evaluation resolution (default: the weights')")
    p.add_argument("--window", type=int, default=None, help="window size (default: the weights')")
    p.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction (1.0: no crop)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="seed of the bundled digits' train/val split")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5 as fractions, ...)")

    def run_eval(args) -> int:
        from .evaluate import main

        return main(args)

    p.set_defaults(func=run_eval)
