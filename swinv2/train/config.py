"""Typed run configuration: one dataclass whose fields are the command-line flags.

Every field has a one-line help text (shown by ``swinv2 train --help``). A recipe file (YAML) is
a set of field values; the command line overrides it; ``__post_init__`` checks the result. The
resolved config is written to the run folder and into every checkpoint, so a run can be
resumed, audited and reproduced from its own files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

AMP_MODES = ("auto", "bf16", "fp16", "none")
SCHEDULERS = ("cosine", "multistep", "constant")
SHARDING = ("none", "zero1", "fsdp", "deepspeed")
TASKS = ("train", "finetune", "pretrain")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a supervised run, a fine-tune or a SimMIM pre-training needs."""

    # -- what to train --------------------------------------------------------------------
    task: str = _f("train", "train (from scratch), finetune (from --checkpoint) or pretrain (SimMIM)")
    model: str = _f("swinv2_debug", "variant name (see `swinv2 list`)")
    img_size: int | None = _f(None, "training resolution (default: the variant's)")
    window: int | None = _f(None, "window size (default: the variant's)")
    drop_path: float | None = _f(None, "stochastic depth rate (default: the variant's)")
    checkpoint: str | None = _f(None, "weights to start from (finetune): any format load_pretrained reads")
    pretrained_windows: list[int] | None = _f(
        None, "pretrained_window_sizes per stage (finetune default: the checkpoint's training window)"
    )
    grad_checkpointing: bool = _f(False, "recompute each block in backward to save activation memory")
    sequential_attention: list[int] | None = _f(
        None, "stages whose window attention runs in chunks of windows (memory; paper: 0 1 at 1536px)"
    )
    # -- data -----------------------------------------------------------------------------
    data: str | None = _f(None, "image folder (class subfolders, or train/ and val/); default: bundled digits")
    val: str | None = _f(None, "validation image folder (default: DATA/val, or a held-out part of DATA)")
    val_fraction: float = _f(0.1, "held-out fraction of DATA when there is no validation folder")
    train_fraction: float = _f(1.0, "train on this per-class fraction of the labelled images")
    workers: int = _f(2, "data loader worker processes")
    auto_augment: str | None = _f("rand-m9-mstd0.5-inc1", "timm RandAugment spec ('none' to turn off)")
    color_jitter: float = _f(0.4, "colour jitter strength (timm applies it only without RandAugment)")
    reprob: float = _f(0.25, "random erasing probability")
    crop_scale: float = _f(0.08, "smallest area fraction of RandomResizedCrop")
    hflip: float = _f(0.5, "horizontal flip probability")
    mixup: float = _f(0.8, "mixup alpha (0: off)")
    cutmix: float = _f(1.0, "cutmix alpha (0: off)")
    label_smoothing: float = _f(0.1, "label smoothing")
    crop_pct: float = _f(0.875, "evaluation: centre-crop fraction (1.0: resize straight to the size)")
    mask_ratio: float = _f(0.6, "pretrain: fraction of 32px mask patches hidden")
    mask_patch: int = _f(32, "pretrain: mask patch size in pixels")
    norm_target_window: int | None = _f(47, "pretrain: local target normalisation window (None: off)")
    # -- optimisation ---------------------------------------------------------------------
    epochs: int = _f(300, "training epochs")
    warmup_epochs: float = _f(20, "linear warmup length in epochs (stepped per update)")
    batch_size: int = _f(128, "images per process per forward")
    accum_steps: int = _f(1, "gradient accumulation: forwards per optimizer update")
    lr: float = _f(5e-4, "base learning rate per 512 images of global batch (scaled linearly)")
    warmup_lr: float = _f(5e-7, "learning rate at step 0, per 512 images")
    min_lr: float = _f(5e-6, "final learning rate of the cosine, per 512 images")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on norms, biases, logit scales, CPB MLP, pos. emb.)")
    betas: list[float] = _f((0.9, 0.999), "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    clip_grad: float | None = _f(5.0, "clip the global gradient norm (None: off)")
    layer_decay: float = _f(1.0, "layer-wise learning-rate decay (finetune; 1.0: off)")
    scheduler: str = _f("cosine", "cosine, multistep or constant (after warmup)")
    milestones: list[float] = _f((), "multistep: epochs at which the learning rate is multiplied by gamma")
    gamma: float = _f(0.1, "multistep: decay factor")
    scale_lr: bool = _f(True, "scale lr, warmup_lr and min_lr by global batch / 512 (official)")
    amp: str = _f("auto", "mixed precision: auto (bf16 where the device has native bf16, else none), bf16 "
                          "(CPU and GPU), fp16 (GPU, with loss scaling) or none")
    ema: float = _f(0.0, "exponential moving average decay of the weights (0: off), evaluated alongside")
    # -- run ------------------------------------------------------------------------------
    output: str = _f("runs/run", "run folder: checkpoints, metrics.jsonl, TensorBoard, plots "
                                 "(command line default: runs/TASK-DATE-TIME)")
    resume: bool = _f(False, "continue the run in --output from its last checkpoint")
    seed: int = _f(0, "seed of everything: sampling, augmentation, mixup, stochastic depth")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    threads: int = _f(0, "torch CPU threads (0: torch's default)")
    compile: bool = _f(False, "torch.compile the model")
    eval_every: int = _f(1, "validate every N epochs (and after the last)")
    save_every_steps: int = _f(0, "also checkpoint every N optimizer updates (0: at epoch ends only)")
    log_every: int = _f(10, "log training metrics every N updates")
    max_steps: int | None = _f(None, "stop after this many updates (for smoke tests and debugging)")
    tensorboard: bool = _f(True, "write TensorBoard logs")
    progress: bool = _f(True, "show progress bars")
    sharding: str = _f("none", "across torchrun processes: zero1 (optimizer states), fsdp (everything) or "
                               "deepspeed (DeepSpeed ZeRO stage 1 or 2, see --deepspeed-config)")
    deepspeed_config: str | None = _f(None, "with --sharding deepspeed: DeepSpeed JSON config, its zero_optimization "
                                            "section (default: ZeRO stage 1)")

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.milestones = tuple(float(m) for m in self.milestones)
        checks = [
            (self.task in TASKS, f"task must be one of {TASKS}"),
            (self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}"),
            (self.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}"),
            (self.sharding in SHARDING, f"sharding must be one of {SHARDING}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.accum_steps >= 1, "accum_steps must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (0 < self.train_fraction <= 1, "train_fraction must be in (0, 1]"),
            (0 < self.crop_pct <= 1, "crop_pct must be in (0, 1]"),
            (0 <= self.ema < 1, "ema must be in [0, 1)"),
            (0 < self.mask_ratio < 1, "mask_ratio must be in (0, 1)"),
            (len(self.betas) == 2, "betas needs two values"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 (or None)"),
            (self.task != "finetune" or self.checkpoint, "finetune needs --checkpoint"),
            (self.sharding != "deepspeed" or self.amp != "fp16",
             "sharding deepspeed: use --amp auto, bf16 or none (fp16 loss scaling is not wired through DeepSpeed)"),
            (self.sharding != "deepspeed" or not self.compile, "sharding deepspeed: --compile is not supported"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"config: {message}")

    # -- io -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown} (see `swinv2 train --help`)")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        return cls.from_dict({**read_recipe(path), **overrides})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def read_recipe(path: str | os.PathLike) -> dict:
    """Field values of a YAML recipe. A recipe may carry documentation keys (``command``,
    ``hardware``, ``time``, ``expected``, ``notes``) under ``about:``; they are not fields."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a mapping of field: value")
    values.pop("about", None)
    return values


def write_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# -- command line ---------------------------------------------------------------------------


def _field_type(f: dataclasses.Field):
    """(base type, is_optional, is_list) of a field annotation like ``int | None``."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _parse_scalar(kind, optional):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, exclude=()) -> None:
    """One flag per field (``--img-size``, ``--no-progress`` ...). A flag not typed leaves no
    attribute (argparse.SUPPRESS), so recipe values are overridden only by flags actually given,
    and ``--clip-grad none`` can still set a field to None."""
    parser.add_argument("--config", default=None, metavar="YAML", help="recipe file (flags override it)")
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, optional, is_list = _field_type(f)
        help_text = f"{f.metadata['help']} [default: {_plain(f.default)}]"
        if kind is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        elif is_list:
            kw = dict(type=_parse_scalar(kind, False), nargs="*")
        else:
            kw = dict(type=_parse_scalar(kind, optional))
        parser.add_argument(flag, default=argparse.SUPPRESS, help=help_text, **kw)


def config_from_args(args: argparse.Namespace, **fixed) -> TrainConfig:
    values = read_recipe(args.config) if getattr(args, "config", None) else {}
    for f in fields(TrainConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    task = fixed.get("task")
    recipe_task = values.get("task", task)
    # A supervised recipe also serves fine-tuning; SimMIM and supervised recipes do not mix.
    if task and recipe_task != task and not (recipe_task == "train" and task == "finetune"):
        raise ValueError(
            f"{args.config} is a {values['task']} recipe: run it with `swinv2 {values['task']} --config {args.config}`"
        )
    values.update(fixed)
    cfg = TrainConfig.from_dict(values)
    cfg._given = {f.name for f in fields(TrainConfig) if hasattr(args, f.name)}  # what the user typed
    return cfg
