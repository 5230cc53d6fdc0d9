"""Typed run configuration: one dataclass whose fields are the command-line flags.

Every field has a one-line help text and a section (``swinv2 train --help`` lists the fields by
section). A recipe file (YAML) is a set of field values; the command line overrides it;
``__post_init__`` checks the result. The resolved config is written to the run folder and into
every checkpoint, so a run can be resumed, audited and reproduced from its own files.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

AMP_MODES = ("auto", "bf16", "fp16", "none")
SCHEDULERS = ("cosine", "multistep", "constant", "poly")
SHARDING = ("none", "zero1", "fsdp", "deepspeed")
COMMANDS = ("train", "finetune", "pretrain")
# What the network predicts. Dense tasks train a SwinV2 backbone inside torchvision's Mask R-CNN
# (detection: boxes and instance masks) or inside UPerNet (segmentation: a class per pixel).
TASKS = ("classification", "detection", "segmentation", "video")
DENSE_TASKS = ("detection", "segmentation")
SEG_EVAL_MODES = ("whole", "slide")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
# The paper's ablation switches (the model's keyword-only arguments of the same names; the
# values mirror swinv2.layers and swinv2.model, kept here so that reading a config needs no torch).
NORM_PLACEMENTS = ("res_post", "pre", "post", "sandwich")
ATTN_TYPES = ("cosine", "dot")
POSITION_BIASES = ("log_cpb", "linear_cpb", "table", "none")
MERGE_NORMS = ("post", "pre")
# The largest image side (and window) any command accepts. The paper's largest input is 1536 px
# (SwinV2-G); at 8192 px one image's first-stage activations already take gigabytes, and a slip
# such as 100000 would otherwise end as an out-of-memory failure deep inside an image resize.
MAX_IMG_SIZE = 8192
MAX_FRAMES = 4096  # frames per clip


# The sections a field belongs to, in the order ``swinv2 train --help`` shows them.
SECTIONS = ("model", "data", "optimisation", "schedule", "runtime", "logging")


def _f(section: str, default, help: str, **bounds):
    """A field of ``section`` with its help text and, for numbers, its valid range: ``ge``/``gt``
    (lower bound, inclusive/exclusive), ``le``/``lt`` (upper), ``choices``; a list field's every
    value is checked."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; one of {SECTIONS}")
    return field(default=default, metadata={"help": help, "section": section, **bounds})


def flag(name: str) -> str:
    """The command-line flag of a field: ``eval_every`` -> ``--eval-every``."""
    return "--" + name.replace("_", "-")


class ConfigError(ValueError):
    """A field value the run cannot use. The message names the flag (``--eval-every must be >= 1,
    got 0``); :meth:`in_recipe` names the recipe file and field instead, when the value came from one."""

    def __init__(self, name: str, rule: str, value):
        self.name, self.rule, self.value = name, rule, value
        super().__init__(f"{flag(name)} {rule}, got {value!r}")

    def in_recipe(self, path) -> ValueError:
        return ValueError(f"recipe {path}: {self.name} {self.rule}, got {self.value!r}")


@dataclass
class TrainConfig:
    """Everything a supervised run, a fine-tune or a SimMIM pre-training needs."""

    # -- model ----------------------------------------------------------------------------
    command: str = _f("model", "train", "train (from scratch), finetune (from --checkpoint) or pretrain (SimMIM)",
                      choices=COMMANDS)
    task: str = _f("model", "classification", "classification, detection (Mask R-CNN with FPN, COCO layout) or "
                                              "segmentation (UPerNet, ADE20K layout) or video (clip classification)",
                  choices=TASKS)
    model: str = _f("model", "swinv2_debug", "variant name (see `swinv2 list`)")
    img_size: int | None = _f("model", None, "training resolution (default: the variant's)", ge=1, le=MAX_IMG_SIZE)
    window: int | None = _f("model", None, "window size (default: the variant's)", ge=1, le=MAX_IMG_SIZE)
    drop_path: float | None = _f("model", None, "stochastic depth rate (default: the variant's)", ge=0, lt=1)
    norm_placement: str | None = _f("model", None, "ablation (Table 6/7): res_post (V2), pre (V1), post or sandwich "
                                                   "(default: the variant's)", choices=NORM_PLACEMENTS)
    attn_type: str | None = _f("model", None, "ablation (Table 6): cosine (V2 scaled cosine) or dot (V1) (default: the "
                                              "variant's)", choices=ATTN_TYPES)
    position_bias: str | None = _f("model", None, "ablation (Table 1): log_cpb (V2), linear_cpb, table (V1, resized "
                                                  "bicubically) or none (default: the variant's)",
                                   choices=POSITION_BIASES)
    extra_norm_period: int | None = _f("model", None, "a LayerNorm on the main branch after every N-th block of a "
                                                      "stage, 0 for none (default: the variant's)", ge=0)
    merge_norm: str | None = _f("model", None, "patch merging's LayerNorm: post (V2) or pre (V1) (default: the "
                                               "variant's)", choices=MERGE_NORMS)
    checkpoint: str | None = _f("model", None, "weights to start from (finetune): any format load_pretrained reads")
    pretrained_windows: list[int] | None = _f(
        "model", None, "pretrained_window_sizes per stage (finetune default: the checkpoint's training window)",
        ge=0, le=MAX_IMG_SIZE,
    )
    grad_checkpointing: bool = _f("model", False, "recompute each block in backward to save activation memory")
    sequential_attention: list[int] | None = _f(
        "model", None, "stages whose window attention runs in chunks of windows (memory; paper: 0 1 at 1536px)", ge=0
    )
    temporal_window: int | None = _f("model", None, "video: window size in time, in token frames (default: the "
                                                    "variant's; --window sets height and width)", ge=1,
                                     le=MAX_IMG_SIZE)
    frozen_stages: int = _f("model", -1, "dense tasks: freeze the patch embedding (0) and the first N stages (N); "
                                         "-1 freezes nothing", ge=-1)
    eval_window: int | None = _f("model", None, "dense tasks: window for validation, e.g. 32 after training at 16 "
                                                "(test-time window enlargement, Table 1); default: --window",
                                 ge=1, le=MAX_IMG_SIZE)
    fpn_channels: int = _f("model", 256, "detection: width of the FPN and the mask head (256 as the paper's "
                                         "detectors)", ge=1)
    box_samples: int = _f("model", 512, "detection: regions sampled per image for the box head in training (512 "
                                        "as the paper's detectors)", ge=1)
    decoder_channels: int = _f("model", 512, "segmentation: width of UPerNet's decoder (512 as the paper's); the "
                                             "auxiliary head gets half", ge=2)
    aux_weight: float = _f("model", 0.4, "segmentation: loss weight of the auxiliary FCN head on stage 3 (0: no "
                                         "auxiliary head)", ge=0)
    # -- data -----------------------------------------------------------------------------
    data: str | None = _f("data", None, "image folder (class subfolders, or train/ and val/); default: bundled "
                                        "digits")
    val: str | None = _f("data", None, "validation image folder (default: DATA/val, or a held-out part of DATA)")
    val_fraction: float = _f("data", 0.1, "held-out fraction of DATA when there is no validation folder", gt=0, lt=1)
    train_fraction: float = _f("data", 1.0, "train on this per-class fraction of the labelled images", gt=0, le=1)
    workers: int = _f("data", 2, "data loader worker processes", ge=0)
    auto_augment: str | None = _f("data", "rand-m9-mstd0.5-inc1", "timm RandAugment spec ('none' to turn off)")
    color_jitter: float = _f("data", 0.4, "colour jitter strength (timm applies it only without RandAugment)", ge=0)
    reprob: float = _f("data", 0.25, "random erasing probability", ge=0, le=1)
    crop_scale: float = _f("data", 0.08, "smallest area fraction of RandomResizedCrop", gt=0, le=1)
    hflip: float = _f("data", 0.5, "horizontal flip probability", ge=0, le=1)
    mixup: float = _f("data", 0.8, "mixup alpha (0: off)", ge=0)
    cutmix: float = _f("data", 1.0, "cutmix alpha (0: off)", ge=0)
    label_smoothing: float = _f("data", 0.1, "label smoothing", ge=0, lt=1)
    crop_pct: float = _f("data", 0.875, "evaluation: centre-crop fraction (1.0: resize straight to the size)", gt=0,
                         le=1)
    mask_ratio: float = _f("data", 0.6, "pretrain: fraction of 32px mask patches hidden", gt=0, lt=1)
    mask_patch: int = _f("data", 32, "pretrain: mask patch size in pixels", ge=1, le=MAX_IMG_SIZE)
    norm_target_window: int | None = _f("data", 47, "pretrain: local target normalisation window, odd (None: off)",
                                        ge=3, le=MAX_IMG_SIZE)
    frames: int | None = _f("data", None, "video: frames per clip (default: the variant's num_frames)", ge=1,
                            le=MAX_FRAMES)
    frame_interval: int = _f("data", 2, "video: take every N-th frame (Video Swin: 32 frames at interval 2)", ge=1,
                             le=MAX_FRAMES)
    video_root: str | None = _f("data", None, "video: folder holding the clips when --data/--val are Kinetics "
                                              "annotation CSVs (default: the CSV's folder)")
    short_side: int | None = _f("data", None, "video: frames are resized to this short side before cropping "
                                              "(default: --img-size x 8/7, Video Swin's 256 for 224)",
                                ge=1, le=MAX_IMG_SIZE)
    test_clips: int = _f("data", 1, "video validation and eval: clips per video, evenly spread (Video Swin: 4)",
                         ge=1, le=64)
    test_crops: int = _f("data", 1, "video validation and eval: 1 centre crop or 3 crops along the long side "
                                    "(Video Swin: 3)", ge=1, le=3)
    short_sides: list[int] | None = _f(
        "data", None, "detection: training short sides, one drawn per batch (multi-scale); default 480 512 ... 800, "
                      "or --img-size", ge=1, le=MAX_IMG_SIZE)
    max_side: int | None = _f("data", None, "detection: cap on the long side (default 1333, or --img-size x 5/3)",
                              ge=1, le=MAX_IMG_SIZE)
    test_short_side: int | None = _f("data", None, "detection: evaluation short side (default 800, or --img-size)",
                                     ge=1, le=MAX_IMG_SIZE)
    crop_size: int | None = _f("data", None, "segmentation: training crop side (default 512, or --img-size)", ge=1,
                               le=MAX_IMG_SIZE)
    base_size: int | None = _f("data", None, "segmentation: short side images are rescaled to, keeping their aspect "
                                             "with the long side at most 4x (default: the crop side)",
                               ge=1, le=MAX_IMG_SIZE)
    ratio_range: list[float] = _f("data", (0.5, 2.0), "segmentation: training rescale range of --base-size (two "
                                                      "values)", gt=0)
    eval_mode: str = _f("data", "whole", "segmentation validation: whole images, or slide (crops of --crop-size, "
                                         "2/3 overlap)", choices=SEG_EVAL_MODES)
    eval_scales: list[float] = _f("data", (1.0,), "segmentation validation scales of --base-size (several: "
                                                  "multi-scale testing)", gt=0)
    eval_flip: bool = _f("data", False, "segmentation validation: also the flipped images (flip testing)")
    # -- optimisation ---------------------------------------------------------------------
    batch_size: int = _f("optimisation", 128, "images per process per forward", ge=1)
    accum_steps: int = _f("optimisation", 1, "gradient accumulation: forwards per optimizer update", ge=1)
    lr: float = _f("optimisation", 5e-4, "base learning rate per 512 images of global batch (scaled linearly)", gt=0)
    scale_lr: bool = _f("optimisation", True, "scale lr, warmup_lr and min_lr by global batch / 512 (official)")
    weight_decay: float = _f("optimisation", 0.05, "AdamW weight decay (not on norms, biases, logit scales, CPB MLP, "
                                                   "pos. emb.)", ge=0)
    betas: list[float] = _f("optimisation", (0.9, 0.999), "AdamW betas (two values)", ge=0, lt=1)
    eps: float = _f("optimisation", 1e-8, "AdamW epsilon", gt=0)
    clip_grad: float | None = _f("optimisation", 5.0, "clip the global gradient norm (None: off)", gt=0)
    layer_decay: float = _f("optimisation", 1.0, "layer-wise learning-rate decay (finetune; 1.0: off)", gt=0, le=1)
    amp: str = _f("optimisation", "auto", "mixed precision: auto (bf16 where the device has native bf16, else "
                                          "none), bf16 (CPU and GPU), fp16 (GPU, with loss scaling) or none",
                  choices=AMP_MODES)
    ema: float = _f("optimisation", 0.0, "exponential moving average decay of the weights (0: off), evaluated "
                                         "alongside", ge=0, lt=1)
    # -- schedule -------------------------------------------------------------------------
    epochs: int = _f("schedule", 300, "training epochs", ge=1)
    warmup_epochs: float = _f("schedule", 20, "linear warmup length in epochs (stepped per update)", ge=0)
    warmup_lr: float = _f("schedule", 5e-7, "learning rate at step 0, per 512 images", ge=0)
    min_lr: float = _f("schedule", 5e-6, "final learning rate of the cosine, per 512 images", ge=0)
    scheduler: str = _f("schedule", "cosine", "cosine, multistep, constant or poly (linear decay to --min-lr, "
                                              "mmseg's poly with power 1) after warmup", choices=SCHEDULERS)
    milestones: list[float] = _f("schedule", (), "multistep: epochs at which the learning rate is multiplied by "
                                                 "gamma", ge=0)
    gamma: float = _f("schedule", 0.1, "multistep: decay factor", gt=0)
    max_steps: int | None = _f("schedule", None, "stop after this many updates (for smoke tests and debugging)",
                               ge=1)
    # -- runtime --------------------------------------------------------------------------
    resume: bool = _f("runtime", False, "continue the run in --output from its last checkpoint")
    seed: int = _f("runtime", 0, "seed of everything: sampling, augmentation, mixup, stochastic depth", ge=0,
                   lt=2**32)
    device: str = _f("runtime", "auto", "cpu, cuda, cuda:N, mps or auto")
    threads: int = _f("runtime", 0, "torch CPU threads (0: torch's default)", ge=0)
    compile: bool = _f("runtime", False, "torch.compile the model")
    sharding: str = _f("runtime", "none", "across torchrun processes: zero1 (optimizer states), fsdp (everything) "
                                          "or deepspeed (DeepSpeed ZeRO stage 1 or 2, see --deepspeed-config)",
                       choices=SHARDING)
    deepspeed_config: str | None = _f("runtime", None, "with --sharding deepspeed: DeepSpeed JSON config, its "
                                                       "zero_optimization section (default: ZeRO stage 1)")
    # -- logging --------------------------------------------------------------------------
    output: str = _f("logging", "runs/run", "run folder: checkpoints, metrics.jsonl, TensorBoard, plots "
                                            "(command line default: runs/TASK-DATE-TIME)")
    eval_every: int = _f("logging", 1, "validate every N epochs (and after the last)", ge=1)
    save_every_steps: int = _f("logging", 0, "also checkpoint every N optimizer updates (0: at epoch ends only)",
                               ge=0)
    log_every: int = _f("logging", 10, "log training metrics every N updates", ge=1)
    tensorboard: bool = _f("logging", True, "write TensorBoard logs")
    progress: bool = _f("logging", True, "show progress bars")

    # Where the values came from, set by :meth:`from_flags`: the names of the fields typed as
    # flags (a set; None for a config built in Python) and the recipe file (or None). Left without
    # annotations so that they are no fields: they are not part of the run's recipe.
    given_flags = None
    recipe_file = None

    def __post_init__(self):
        """Check every field against its type and range (a one-line ConfigError naming the flag),
        converting what a recipe may spell loosely: ``5e-4`` (which YAML reads as a string), ``300.0``."""
        for f in fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        if len(self.ratio_range) != 2 or self.ratio_range[0] > self.ratio_range[1]:
            raise ConfigError("ratio_range", "needs two values, low <= high", list(self.ratio_range))
        if not self.eval_scales:
            raise ConfigError("eval_scales", "needs at least one scale", list(self.eval_scales))
        if self.test_crops not in (1, 3):
            raise ConfigError("test_crops", "must be 1 (centre) or 3 (along the long side)", self.test_crops)
        if self.short_sides is not None and not self.short_sides:
            raise ConfigError("short_sides", "needs at least one side", list(self.short_sides))
        if self.command == "pretrain" and self.task != "classification":
            raise ValueError(f"pretrain (SimMIM) trains the backbone alone: --task {self.task} does not apply")
        if len(self.betas) != 2:
            raise ConfigError("betas", "needs two values", list(self.betas))
        if self.norm_target_window is not None and self.norm_target_window % 2 == 0:
            raise ConfigError("norm_target_window", "must be odd (a window centred on each pixel)",
                              self.norm_target_window)
        if self.auto_augment is not None and self.auto_augment.lower() in ("", "none"):
            self.auto_augment = "none"
        if not self.output:
            raise ConfigError("output", "must name a folder", self.output)
        _check_device_name(self.device)
        if self.command == "finetune" and not self.checkpoint:
            raise ValueError("finetune needs --checkpoint (the weights to start from)")
        if self.sharding == "deepspeed" and self.amp == "fp16":
            raise ValueError("--sharding deepspeed: use --amp auto, bf16 or none (fp16 loss scaling is not wired "
                             "through DeepSpeed)")
        if self.sharding == "deepspeed" and self.compile:
            raise ValueError("--sharding deepspeed: --compile is not supported")

    # -- io -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = _legacy(values)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown} (see `swinv2 train --help`)")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        """The recipe at ``path`` with ``overrides``; a bad value of the recipe's own is reported
        with the file's name."""
        recipe = read_recipe(path)
        return _from_recipe(path, recipe, {**recipe, **overrides}, set(recipe) - set(overrides))

    @classmethod
    def from_flags(cls, flags: dict, recipe: str | os.PathLike | None = None, command: str | None = None
                   ) -> TrainConfig:
        """A command line's config: the ``recipe`` file's values, the fields typed as ``flags``
        over them, and ``command`` (the subcommand). A bad value is named as its flag, or as the recipe's field when
        it came from the recipe. A supervised recipe also serves fine-tuning; SimMIM and
        supervised recipes do not mix."""
        values = read_recipe(recipe) if recipe else {}
        recipe_command = {**values, **flags}.get("command", command)
        if recipe_command is not None and recipe_command not in COMMANDS:
            raise ConfigError("command", f"must be one of {', '.join(COMMANDS)}", recipe_command).in_recipe(recipe)
        if command and recipe_command != command and not (recipe_command == "train" and command == "finetune"):
            raise ValueError(f"{recipe} is a {recipe_command} recipe: run it with "
                             f"`swinv2 {recipe_command} --config {recipe}`")
        fixed = {"command": command} if command else {}
        cfg = _from_recipe(recipe, values, {**values, **flags, **fixed}, set(values) - set(flags) - set(fixed))
        cfg.given_flags = frozenset(flags)
        cfg.recipe_file = os.fspath(recipe) if values else None
        return cfg

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _from_recipe(path, recipe: dict, values: dict, from_recipe: set) -> TrainConfig:
    """``TrainConfig.from_dict(values)``, naming the recipe file in the error when the bad value
    (or an unknown field) is one of ``from_recipe``, the fields the file set and no flag overrode."""
    unknown = sorted(set(recipe) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"recipe {path}: unknown fields {unknown} (see `swinv2 train --help`)")
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as err:
        if err.name in from_recipe:
            raise err.in_recipe(path) from None
        raise


def _legacy(values: dict) -> dict:
    """Configs written before dense tasks existed named the subcommand ``task``; read them as
    ``command`` (the task was then always classification)."""
    if "command" not in values and values.get("task") in COMMANDS:
        values = {**values, "command": values["task"]}
        del values["task"]
    return values


def plain(value):
    """A field value as YAML and JSON write it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def _range_text(bounds: dict) -> str | None:
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if lo and hi:
        return f"must be in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    if lo:
        return f"must be {'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f"must be {'<=' if hi[1] == ']' else '<'} {hi[0]}"
    return None


def _in_range(value, bounds: dict) -> bool:
    return not (("ge" in bounds and value < bounds["ge"]) or ("gt" in bounds and value <= bounds["gt"])
                or ("le" in bounds and value > bounds["le"]) or ("lt" in bounds and value >= bounds["lt"]))


def _scalar(kind, name: str, value):
    """``value`` as ``kind`` (int, float, bool or str), or a ConfigError. Booleans are never
    numbers here (YAML's ``yes`` is a bool), and strings are read as numbers only for numeric fields."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, "must be true or false", value)
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(name, "must be a string", value)
    if isinstance(value, bool):
        raise ConfigError(name, "must be an integer" if kind is int else "must be a number", value)
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(name, "must be an integer", value)
    if not isinstance(value, (int, float, str)):
        raise ConfigError(name, "must be a number", value)
    try:
        value = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(name, "must be a number", value) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(name, "must be a finite number", value)
    return value


def _checked(f: dataclasses.Field, value):
    """A field's value converted to its annotated type and checked against its range."""
    kind, optional, is_list = field_type(f)
    if value is None:
        if optional:
            return None
        raise ConfigError(f.name, "needs a value", value)
    bounds = {k: v for k, v in f.metadata.items() if k in ("ge", "gt", "le", "lt")}
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ConfigError(f.name, f"must be one of {', '.join(f.metadata['choices'])}", value)
    if is_list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f.name, "must be a list", value)
        items = [_scalar(kind, f.name, v) for v in value]
        if not all(_in_range(v, bounds) for v in items):
            raise ConfigError(f.name, f"values {_range_text(bounds)}", list(value))
        return tuple(items) if isinstance(f.default, tuple) else items
    value = _scalar(kind, f.name, value)
    if bounds and not _in_range(value, bounds):
        raise ConfigError(f.name, _range_text(bounds), value)
    return value


def _check_device_name(device: str) -> None:
    """The form of ``--device`` (whether this machine has it is checked when a run starts:
    a config read back from a GPU run's checkpoint stays readable on a CPU machine)."""
    kind, colon, index = device.partition(":")
    numbered = index.isdigit() and (kind != "cpu" or index == "0")
    if device == "auto" or (kind in DEVICE_TYPES and (not colon or numbered)):
        return
    raise ConfigError("device", f"must be auto, {', '.join(DEVICE_TYPES)} or TYPE:N (e.g. cuda:1)", device)


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
    return _legacy(values)


def write_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# -- field types --------------------------------------------------------------------------


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def field_type(f: dataclasses.Field):
    """(base type, is_optional, is_list) of a field annotation like ``int | None``."""
    hint = _hints()[f.name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def blame(cfg: TrainConfig, err: ConfigError) -> ValueError:
    """``err`` about a field of ``cfg`` (found after the config was built, e.g. an augmentation
    spec timm refuses), naming the recipe file when the value came from it."""
    if cfg.recipe_file and err.name not in (cfg.given_flags or ()):
        return err.in_recipe(cfg.recipe_file)
    return err
