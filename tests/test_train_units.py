"""Units of the training engine: config, parameter groups, schedule, checkpoints."""

import argparse
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import swinv2
from swinv2.cli.training import add_config_arguments, config_from_args
from swinv2.loading import CheckpointError
from swinv2.train import checkpoint as ckpt
from swinv2.train.config import TrainConfig
from swinv2.train.optim import Schedule, param_groups, set_lr

# -- config ----------------------------------------------------------------------------------


def test_config_checks_values():
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="finetune needs --checkpoint"):
        TrainConfig(command="finetune")
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


# -- the training loop on a toy task ----------------------------------------------------------


class _Log:
    """A RunLogger stand-in that keeps what the trainer logs."""

    def __init__(self):
        self.records = []

    def log(self, split, step, **metrics):
        self.records.append(dict(split=split, step=step, **metrics))

    def plot(self):
        return []

    def train_losses(self):
        return {r["step"]: r["loss"] for r in self.records if r["split"] == "train"}


def _toy_trainer(tmp_path, losses, *, steps_per_epoch, evaluate=None, save_model=None, **cfg):
    """A Trainer whose update ``i`` (0-based, one micro-batch of one image) has loss ``losses[i]``
    and changes nothing (lr 0): the loop's bookkeeping alone."""
    from torch import nn

    from swinv2.train.distributed import Dist
    from swinv2.train.engine import Loop, Trainer

    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def loader_for(epoch, start_batch):
        for b in range(start_batch, steps_per_epoch):
            yield torch.full((1, 2), float(epoch * steps_per_epoch + b)), 0

    def objective(net, inputs, seed):
        index = int(inputs[0][0, 0])
        return net(inputs[0]).sum() * 0.0 + losses[index], 1

    loop = Loop(objective=objective, loader_for=loader_for, batches_per_epoch=steps_per_epoch, evaluate=evaluate,
                save_model=save_model)
    config = TrainConfig(**{**dict(output=str(tmp_path), batch_size=1, epochs=2, warmup_epochs=0, progress=False,
                                   tensorboard=False, amp="none", clip_grad=None), **cfg})
    return Trainer(config, Dist(), model, optimizer, loop, _Log())


@pytest.mark.parametrize(("log_every", "expected"), [
    (4, {4: (1 + 2 + 3 + 4) / 4, 8: (5 + 6 + 7 + 8) / 4, 12: (9 + 10 + 11 + 12) / 4}),
    (5, {5: (1 + 2 + 3 + 4 + 5) / 5, 10: (6 + 7 + 8 + 9 + 10) / 5, 12: (11 + 12) / 2}),
])
def test_logged_train_loss_is_the_mean_of_its_window_across_epochs(tmp_path, log_every, expected):
    """Epochs of 6 updates: a logging window that straddles an epoch end averages all its
    updates; the last step, off the grid, averages the updates since the last logged one."""
    trainer = _toy_trainer(tmp_path, [float(k) for k in range(1, 13)], steps_per_epoch=6, log_every=log_every)
    trainer.fit()
    assert trainer.logger.train_losses() == pytest.approx(expected, rel=1e-12)


def test_the_host_waits_for_the_device_once_per_logged_step(tmp_path, monkeypatch):
    """Loss, counts and the non-finite check stay on the device between logged steps: the
    engine reads a tensor on the host once per logged step, not per micro-batch."""
    import sys

    from swinv2.train import engine

    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == engine.__file__:
                reads.append(name)
            return original(self, *args, **kwargs)

        return read

    trainer = _toy_trainer(tmp_path, [1.0] * 24, steps_per_epoch=24, epochs=1, log_every=8, accum_steps=1)
    monkeypatch.setattr(engine.Trainer, "_end_of_epoch", lambda self, epoch, last: None)
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    trainer.fit()
    assert len(trainer.logger.train_losses()) == 3
    assert len(reads) == 3, reads


def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(tmp_path):
    losses = [1.0] * 12
    losses[5] = float("nan")
    trainer = _toy_trainer(tmp_path, losses, steps_per_epoch=12, epochs=1, log_every=4, save_every_steps=7)
    from swinv2.train.engine import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="at update 5 "):
        trainer.fit()
    assert trainer.state.step == 7  # found at the checkpoint after it, which was not written
    assert not (tmp_path / ckpt.LAST).exists()
    assert list(trainer.logger.train_losses()) == [4]


class _Killed(BaseException):
    """The process dies here (nothing after it runs, nothing in memory survives)."""


def _best_run(tmp_path, monkeypatch, kill_at: int | None):
    """Two epochs of two updates, each epoch better than the last; the run is killed before
    the ``kill_at``-th file write of the second epoch's end."""
    import json

    writes = []
    trainer = None

    def evaluate(model):
        return dict(top1=trainer.state.step / 10)

    def count(what):
        writes.append(what)
        if kill_at is not None and len(writes) == 6 + kill_at:  # the first epoch end writes 5 files
            raise _Killed

    def save_model(state, path, info):
        count("model")
        Path(path).write_text(json.dumps(info))

    from swinv2 import fileio

    real_save, real_copy, real_write = ckpt.save_checkpoint, fileio.copy_file, fileio.write_text

    def save(state, path):
        count("last")
        return real_save(state, path)

    def copy(src, dst):
        count("best")
        return real_copy(src, dst)

    def write(path, text):
        count("mark")
        return real_write(path, text)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    monkeypatch.setattr(fileio, "copy_file", copy)
    monkeypatch.setattr(fileio, "write_text", write)
    trainer = _toy_trainer(tmp_path, [1.0] * 4, steps_per_epoch=2, evaluate=evaluate, save_model=save_model,
                           log_every=1)
    return trainer, writes


EPOCH_END = ["last", "best", "model", "model", "mark"]


@pytest.mark.parametrize("kill_at", [0, 1, 2, 3, 4, None])
def test_best_and_last_agree_after_a_kill_at_any_epoch_end_write(tmp_path, monkeypatch, kill_at):
    """An epoch end writes checkpoint-last.pt, checkpoint-best.pt, model-last, model-best and a
    mark that they are all there. A kill before any of them at the second epoch end, then
    --resume, ends with all four files saying the same: the best is epoch 2, at update 4."""
    import json

    trainer, writes = _best_run(tmp_path, monkeypatch, kill_at)
    try:
        trainer.fit()
    except _Killed:
        pass
    assert writes == EPOCH_END + (EPOCH_END if kill_at is None else EPOCH_END[:kill_at + 1])
    monkeypatch.undo()  # a new process: the kill is gone
    resumed, rewrites = _best_run(tmp_path, monkeypatch, None)
    resumed.resume(ckpt.load_checkpoint(tmp_path / ckpt.LAST))
    final = resumed.fit()
    if kill_at is None:
        assert rewrites == []  # everything was in place: nothing written again
    assert (final.best_epoch, final.best_step) == (2, 4)
    best = ckpt.load_checkpoint(tmp_path / ckpt.BEST)["run"]
    assert (best["step"], best["best_epoch"], best["best_step"]) == (4, 2, 4)
    assert ckpt.load_checkpoint(tmp_path / ckpt.LAST)["run"]["step"] == 4
    for name in ("model-last.safetensors", "model-best.safetensors"):
        assert json.loads((tmp_path / name).read_text())["step"] == 4, name
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
