"""Units of the training engine: config, parameter groups, schedule, checkpoints."""

import argparse
import math
import random

import numpy as np
import pytest
import torch

import swinv2
from swinv2.loading import CheckpointError
from swinv2.train import checkpoint as ckpt
from swinv2.train.config import TrainConfig, add_config_arguments, config_from_args
from swinv2.train.optim import Schedule, param_groups, set_lr

# -- config ----------------------------------------------------------------------------------


def test_config_checks_values():
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="finetune needs --checkpoint"):
        TrainConfig(task="finetune")
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_flags_override_recipe_only_when_given(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("about:\n  paper: x\nepochs: 7\nlr: 0.002\nmixup: 0.0\nbetas: [0.8, 0.9]\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(recipe), "--lr", "0.1", "--no-progress"]))
    assert (cfg.epochs, cfg.lr, cfg.mixup, cfg.betas, cfg.progress) == (7, 0.1, 0.0, (0.8, 0.9), False)
    cfg = config_from_args(parser.parse_args(["--clip-grad", "none", "--sequential-attention", "0", "1"]))
    assert cfg.clip_grad is None and cfg.sequential_attention == [0, 1] and cfg.epochs == 300


def test_config_round_trips_through_dict():
    cfg = TrainConfig(epochs=3, betas=(0.5, 0.6), milestones=(1.5,))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# -- parameter groups ------------------------------------------------------------------------


def _debug(**kw):
    return swinv2.create_model("swinv2_debug", **kw)


def test_weight_decay_groups_follow_the_official_rule():
    model = _debug()
    groups = param_groups(model, weight_decay=0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert decay.isdisjoint(no_decay) and decay | no_decay == {n for n, _ in model.named_parameters()}
    for name in no_decay:
        assert (name.endswith(("bias", "logit_scale")) or ".norm" in name or "cpb_mlp" in name
                or name.startswith("norm.") or "patch_embed.norm" in name), name
    for name in decay:
        assert name.endswith("weight") and "norm" not in name and "cpb_mlp" not in name, name
    assert "layers.0.blocks.0.attn.cpb_mlp.0.weight" in no_decay  # 2-D, exempt by keyword
    assert "layers.0.blocks.0.attn.qkv.weight" in decay
    assert "head.weight" in decay


def test_layer_decay_scales_follow_layer_ids():
    model = _debug()
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    top = model.num_layer_ids - 1
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["patch_embed.proj.weight"] == 0.5**top
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == 1.0
    assert scale["layers.1.blocks.0.mlp.fc1.weight"] == 0.5 ** (top - 3)  # id = depths[0] + 0 + 1 = 3
    assert scale["layers.0.downsample.reduction.weight"] == 0.5 ** (top - 2)  # shares stage 0's last block
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1.0)
    set_lr(opt, 2.0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2.0 * g["lr_scale"])  # applied exactly once


# -- schedule --------------------------------------------------------------------------------


def test_schedule_scales_per_512_and_follows_warmup_then_cosine():
    cfg = TrainConfig(lr=5e-4, warmup_lr=5e-7, min_lr=5e-6, epochs=10, warmup_epochs=2)
    s = Schedule.from_config(cfg, steps_per_epoch=100, global_batch=1024)
    assert s.peak == pytest.approx(1e-3) and s.warmup_steps == 200 and s.total_steps == 1000
    assert s(0) == pytest.approx(1e-6)
    assert s(100) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert s(200) == pytest.approx(1e-3)
    assert s(600) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # cosine midpoint
    assert s(1000) == pytest.approx(1e-5)
    values = [s(t) for t in range(200, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_multistep_schedule():
    cfg = TrainConfig(scheduler="multistep", milestones=(3, 5), gamma=0.1, warmup_epochs=0, epochs=8, lr=512e-4)
    s = Schedule.from_config(cfg, steps_per_epoch=10, global_batch=512)
    assert [s(t) for t in (0, 29, 30, 49, 50)] == pytest.approx([0.0512, 0.0512, 0.00512, 0.00512, 0.000512])


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_with_rng(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(2), random.random())
    path = ckpt.save_checkpoint({"model": {"w": torch.ones(2)}, "rng": state, "config": {"a": 1}}, tmp_path / "c.pt")
    loaded = ckpt.load_checkpoint(path)  # weights_only: numpy state stored as tensors
    ckpt.set_rng_state(loaded["rng"])
    got = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint({"step": 1}, path)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # the process is interrupted in the middle of writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"step": 2}, path)
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_bad_checkpoints_are_named(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        ckpt.load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.ones(1)}}, other)
    with pytest.raises(CheckpointError, match="not a swinv2 training checkpoint"):
        ckpt.load_checkpoint(other)
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_lr_at_zero_warmup_is_peak():
    cfg = TrainConfig(warmup_epochs=0, epochs=1, lr=1e-3)
    s = Schedule.from_config(cfg, steps_per_epoch=4, global_batch=512)
    assert s(0) == pytest.approx(1e-3) and math.isclose(s(4), cfg.min_lr)


# -- mixed precision ---------------------------------------------------------------------------


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(False, False, "none"), (True, False, "bf16"),
                                                               (False, True, "bf16")])
def test_amp_auto_follows_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    from swinv2.train import engine
    from swinv2.train.precision import describe_amp, resolve_amp

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert TrainConfig().amp == "auto"
    assert resolve_amp("auto", "cpu") == expected
    assert resolve_amp("bf16", "cpu") == "bf16" and resolve_amp("none", "cpu") == "none"  # explicit wins
    assert f"-> {expected}" in describe_amp("auto", "cpu")
    with engine.autocast(TrainConfig(), torch.device("cpu")):
        dtype = torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype
    assert dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)
