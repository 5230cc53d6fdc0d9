"""Subcommands ``train``, ``finetune``, ``pretrain`` and ``eval``."""

from __future__ import annotations

import argparse
import time

from .. import fileio
from ..cli import (
    fraction,
    non_negative_int,
    parse_side,
    positive_int,
    require,
    window_arg,
)
from ..train.config import ConfigError, TrainConfig, add_config_arguments, blame, config_from_args
from .common import recipe_path

_EPILOG = {
    "train": "Without --data it trains on the bundled handwritten digits (scikit-learn), e.g.\n"
             "  swinv2 train --config digits --output runs/digits\n"
             "Under torchrun every process runs this command: torchrun --nproc-per-node 2 -m swinv2 train ...",
    "finetune": "e.g. swinv2 finetune --checkpoint runs/pretrain/checkpoint-last.pt --model swinv2_debug "
                "--layer-decay 0.75",
    "pretrain": "SimMIM masked-image modelling; labels are ignored. e.g. swinv2 pretrain --config digits_simmim",
}
DIGITS = "for the bundled digits used without --data"


def _task_main(task: str):
    def run(args) -> int:
        # Recipes and the run's config.yaml are YAML; supervised augmentation and mixup are timm's;
        # pre-training draws a reconstruction picture (matplotlib) at the end of every epoch.
        require(task, "yaml", *(("matplotlib",) if task == "pretrain" else ("timm",)))
        digits = False
        if args.config:
            args.config = recipe_path(args.config)
        elif task in ("train", "pretrain") and not hasattr(args, "data"):
            # No data and no recipe: the bundled digits with the recipe tuned for them.
            args.config = recipe_path("digits" if task == "train" else "digits_simmim")
            digits = True
        if not hasattr(args, "output"):
            args.output = f"runs/{task}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = config_from_args(args, task=task)
        check_start(cfg)
        if digits:
            print(f"no --data: training on scikit-learn's bundled handwritten digits with {args.config}")
        if task == "pretrain":
            from .pretrain import main
        else:
            from .supervised import main
        return main(cfg)

    return run


def check_start(cfg: TrainConfig) -> None:
    """What the config alone cannot tell, checked before the run folder or any data is touched:
    the extras this run needs, the device, the precision on it, the augmentation spec and
    whether the run folder can be written."""
    from ..train.distributed import check_device
    from ..train.precision import resolve_amp

    if cfg.data is None:
        require(cfg.task, "sklearn", reason=DIGITS)
    if cfg.sharding == "deepspeed":
        require(cfg.task, "deepspeed", reason="for --sharding deepspeed")
    device = check_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    if amp == "fp16" and device.type != "cuda":
        raise blame(cfg, ConfigError("amp", f"must be bf16 or none on {device} (fp16 needs a CUDA GPU for its loss "
                                            "scaling)", cfg.amp))
    if amp == "bf16" and device.type == "cuda" and not _cuda_bf16(device):
        raise blame(cfg, ConfigError("amp", f"must be fp16 or none on {device} (it has no bf16)", cfg.amp))
    if cfg.task != "pretrain":
        try:
            check_auto_augment(cfg.auto_augment)
        except ConfigError as err:
            raise blame(cfg, err) from None
    fileio.check_writable(cfg.output, "--output", folder=True)


def _cuda_bf16(device) -> bool:
    import torch

    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported()


def check_auto_augment(spec: str | None) -> None:
    """Build the training transform with ``spec`` as timm parses it, so that a misspelt policy is
    refused at start (timm asserts) and not in the first data-loader worker. timm skips a
    ``rand``/``augmix`` section that carries no number (``rand-m9-mstd``), so such a section is
    refused here: it would silently leave a setting at its default."""
    if spec is None or spec == "none":
        return
    name, *sections = spec.split("-")
    if name in ("rand", "augmix"):
        # rand's 't' section names a transform set, no number
        bad = [s for s in sections if not any(c.isdigit() for c in s) and not (name == "rand" and s[:1] == "t")]
        if bad:
            raise ConfigError("auto_augment", f"must give every section a value, e.g. rand-m9-mstd0.5-inc1 "
                                              f"(timm would ignore {bad[0]!r})", spec)
    from ..data.transforms import train_transform

    try:
        train_transform(32, auto_augment=spec)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("auto_augment", f"must be a policy timm knows ({reason}), e.g. rand-m9-mstd0.5-inc1, "
                                          "augmix-m5, original or none", spec) from None


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
    p.add_argument("--img-size", type=parse_side, default=None, help="evaluation resolution (default: the weights')")
    p.add_argument("--window", type=window_arg, default=None, help="window size (default: the weights')")
    p.add_argument("--crop-pct", type=fraction, default=None, help="centre-crop fraction (1.0: no crop)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="none")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--threads", type=non_negative_int, default=0)
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the bundled digits' train/val split")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5 as fractions, ...)")

    def run_eval(args) -> int:
        from ..train.distributed import check_device

        check_device(args.device)
        if args.data is None:
            require("eval", "sklearn", reason=DIGITS)
        from .evaluate import main

        return main(args)

    p.set_defaults(func=run_eval)
