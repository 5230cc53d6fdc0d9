"""The bundled recipes (swinv2/recipes/*.yaml): they parse as TrainConfig values, build their
model, and the official ones state the paper's hyper-parameters at their stated global batch."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest
import torch
import yaml

import swinv2
from swinv2.train.config import TrainConfig, read_recipe
from swinv2.train.optim import Schedule

RECIPES = Path(swinv2.__file__).resolve().parent / "recipes"
ALL = sorted(p.stem for p in RECIPES.glob("*.yaml"))
ABOUT_KEYS = {"paper", "command", "hardware", "time", "expected", "weights", "global_batch"}
FT_WINDOWS = [12, 12, 12, 6]

# name: (task, global batch, peak lr at that batch, epochs, warmup epochs, weight decay)
OFFICIAL = {
    **{
        f"swinv2_{size}_window{w}_256_in1k": ("train", 1024, 1e-3, 300, 20, 0.05)
        for size in ("tiny", "small", "base")
        for w in (8, 16)
    },
    "swinv2_base_window12_192_22k": ("train", 4096, 1e-3, 90, 5, 0.1),
    "swinv2_large_window12_192_22k": ("train", 4096, 1e-3, 90, 5, 0.1),
    **{
        f"swinv2_{size}_window12to{w}_192to{img}_22kto1k_ft": ("finetune", 1024, 4e-5, 30, 5, 1e-8)
        for size in ("base", "large")
        for w, img in ((16, 256), (24, 384))
    },
    "simmim_pretrain_swinv2_base_window12_192_800ep": ("pretrain", 2048, 4e-4, 800, 10, 0.05),
    "simmim_finetune_swinv2_base_window14_224_800ep": ("finetune", 2048, 5e-3, 100, 20, 0.05),
}


def load(name: str) -> TrainConfig:
    """The recipe as a config; a fine-tune gets a stand-in --checkpoint, as on the command line."""
    path = RECIPES / f"{name}.yaml"
    extra = {"checkpoint": "stand-in.pth"} if read_recipe(path).get("command") == "finetune" else {}
    return TrainConfig.from_file(path, **extra)


def about(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text()).get("about") or {}


def test_every_official_recipe_is_bundled():
    assert set(OFFICIAL) <= set(ALL), sorted(set(OFFICIAL) - set(ALL))


def test_unknown_field_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: swinv2_debug\nwindow_size: 8\nabout:\n  paper: x\n")
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_file(bad)


@pytest.mark.parametrize("name", ALL)
def test_recipe_parses_and_builds_its_model(name):
    cfg = load(name)
    overrides = {}
    if cfg.img_size:
        overrides["img_size"] = cfg.img_size
    video = cfg.task == "video"
    if cfg.window or cfg.temporal_window:
        window = list(swinv2.variants.get_variant(cfg.model).window_size) if video else [cfg.window] * 2
        window[-2:] = [cfg.window or window[-1]] * 2
        if cfg.temporal_window:
            window[0] = cfg.temporal_window
        overrides["window_size"] = window
    if video and cfg.frames:
        overrides["num_frames"] = cfg.frames
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    if cfg.pretrained_windows:
        overrides["pretrained_window_sizes"] = list(cfg.pretrained_windows)
    if cfg.command == "pretrain":
        overrides["num_classes"] = 0
    with torch.device("meta"):
        model = swinv2.create_model(cfg.model, **overrides)
    size = cfg.img_size or model.img_size[0]
    assert model.img_size[0] == size
    assert (model.flops(img_size=size) if video else model.flops(size)) > 0


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipe_values(name):
    task, global_batch, peak, epochs, warmup, wd = OFFICIAL[name]
    cfg = load(name)
    info = about(name)
    assert ABOUT_KEYS <= set(info), sorted(ABOUT_KEYS - set(info))
    assert all(str(info[k]).strip() for k in ABOUT_KEYS)
    assert "estimate" in info["time"]
    assert info["global_batch"] == global_batch
    assert (cfg.command, cfg.epochs, cfg.warmup_epochs) == (task, epochs, warmup)
    assert math.isclose(cfg.weight_decay, wd)
    assert "checkpoint" not in read_recipe(RECIPES / f"{name}.yaml")  # left to the command line
    assert cfg.scale_lr and cfg.clip_grad == 5.0
    # the lr per 512 images, scaled to the stated global batch, is the paper's peak lr
    schedule = Schedule.from_config(cfg, steps_per_epoch=100, global_batch=info["global_batch"])
    assert math.isclose(schedule.peak, peak, rel_tol=1e-9)
    assert math.isclose(schedule(schedule.warmup_steps), peak, rel_tol=1e-9)
    assert schedule(0) < peak / 100


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_command_matches_recipe(name):
    cfg, info = load(name), about(name)
    argv = shlex.split(info["command"])
    assert argv[0] == "torchrun"
    opt = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    gpus = int(opt["--nproc-per-node"]) * int(opt.get("--nnodes", 1))
    assert gpus * cfg.batch_size * cfg.accum_steps == info["global_batch"]
    module = argv.index("-m")
    assert argv[module + 1: module + 3] == ["swinv2", cfg.command]  # the subcommand sets the task
    assert opt["--config"] == name
    assert {"--data", "--output"} <= set(opt)
    assert ("--checkpoint" in opt) == (cfg.command == "finetune")
    if gpus > 8:
        assert {"--rdzv-backend", "--rdzv-endpoint"} <= set(opt)


@pytest.mark.parametrize("name", sorted(n for n, v in OFFICIAL.items() if v[0] == "finetune"))
def test_finetunes_start_from_192_window12(name):
    cfg = load(name)
    assert list(cfg.pretrained_windows) == FT_WINDOWS
    assert "checkpoint" in about(name)


def test_evaluation_crop():
    for name in OFFICIAL:
        cfg = load(name)
        if cfg.command == "pretrain":
            continue
        expected = 1.0 if cfg.img_size == 384 else 0.875  # official TEST.CROP False only at 384
        assert cfg.crop_pct == expected, name


def test_simmim_recipes():
    pt = load("simmim_pretrain_swinv2_base_window12_192_800ep")
    assert (pt.scheduler, list(pt.milestones), pt.gamma) == ("multistep", [700.0], 0.1)
    assert (pt.mask_ratio, pt.mask_patch, pt.norm_target_window) == (0.6, 32, 47)
    assert (pt.img_size, pt.window, pt.drop_path) == (192, 12, 0.1)
    schedule = Schedule.from_config(pt, steps_per_epoch=10, global_batch=2048)
    assert math.isclose(schedule(699 * 10), 4e-4) and math.isclose(schedule(700 * 10), 4e-5)
    ft = load("simmim_finetune_swinv2_base_window14_224_800ep")
    assert (ft.img_size, ft.window, ft.layer_decay, ft.drop_path) == (224, 14, 0.75, 0.1)
    assert ft.scheduler == "cosine" and math.isclose(ft.min_lr, 2.5e-7)
