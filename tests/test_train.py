"""Training runs end to end on the bundled digits: golden losses, exact resume after kill -9,
correct accumulation, DDP equal to one process, bad input, and the run's outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import poison_loss_after

import swinv2
from swinv2.tasks import supervised
from swinv2.train.config import TrainConfig

GOLDEN = Path(__file__).parent / "assets" / "golden_losses_digits.json"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

# Small and deterministic: fp32, no stochastic depth, one thread, no worker processes.
FAST = dict(model="swinv2_debug", img_size=32, batch_size=8, epochs=2, warmup_epochs=0.2, lr=4e-3,
            drop_path=0.0, auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, reprob=0.25,
            hflip=0.0, amp="none", workers=0, progress=False, tensorboard=False, log_every=1, train_fraction=0.1,
            threads=1)


def _cfg(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig(**{**FAST, "output": str(tmp_path / name), **kw})


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _cli(*args, env=ENV) -> list[str]:
    return [sys.executable, "-m", "swinv2", *args]


def _flags(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def test_golden_losses(tmp_path):
    """The per-update losses of a short run with the full official augmentation (RandAugment,
    mixup/cutmix, erasing) are pinned: any change to data order, augmentation seeding, model
    numerics, schedule or optimizer shows up here."""
    cfg = _cfg(tmp_path, max_steps=8)
    assert supervised.main(cfg) == 0
    losses = _losses(cfg.output)
    if os.environ.get("SWINV2_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": FAST, "max_steps": 8, "losses": losses}, indent=1))
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert len(losses) == len(golden) == 8
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(golden), rtol=2e-4, atol=0)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    base = {**FAST, "save_every_steps": 3, "epochs": 2}
    full = tmp_path / "full"
    subprocess.run(_cli("train", *_flags(base), "--output", str(full)), env=ENV, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", *_flags(base), "--output", str(killed)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: shared CI machines can be slow
    while not (killed / "checkpoint-last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it run on past the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "checkpoint-last.pt", weights_only=True)
    steps_per_run = len(_losses(full))
    assert 0 < state["run"]["step"] < steps_per_run, "the kill should land mid-run"
    subprocess.run(_cli("train", "--output", str(killed), "--resume", "--no-progress"), env=ENV, check=True,
                   capture_output=True)
    assert _losses(killed) == _losses(full)  # bit for bit, including the steps after the resume
    a = swinv2.create_model(pretrained=str(full / "checkpoint-last.pt"))
    b = swinv2.create_model(pretrained=str(killed / "checkpoint-last.pt"))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_logged_losses_after_stops_mid_window_equal_an_uninterrupted_run(tmp_path, monkeypatch):
    """The logged train loss is the mean over the updates since the last logged step, windows
    crossing epoch ends included. A run stopped by --max-steps in the middle of a window (and
    of an epoch), resumed, stopped again and resumed, logs exactly the losses of a run that was
    never stopped: the window is saved with the checkpoint, and the stop's partial record is
    replaced by the whole window's."""
    monkeypatch.setattr(supervised, "evaluate_classifier",
                        lambda *args: dict(top1=0.5, top5=1.0, loss=1.0, images=10))  # not under test
    base = dict(epochs=2, train_fraction=0.05, log_every=3)  # 8 updates per epoch: windows 7-9, 16
    whole = _cfg(tmp_path, "whole", **base)
    assert supervised.main(whole) == 0
    staged = _cfg(tmp_path, "staged", max_steps=4, **base)
    assert supervised.main(staged) == 0
    for stop in (11, 100):
        again = TrainConfig(output=staged.output, resume=True, max_steps=stop, progress=False, workers=0,
                            tensorboard=False, threads=1)
        assert supervised.main(again) == 0

    def train(run):
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]

    assert [s for s, _ in train(whole.output)] == [3, 6, 9, 12, 15, 16]
    assert train(staged.output) == train(whole.output)  # bit for bit


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    common = dict(mixup=0.0, cutmix=0.0, max_steps=2, epochs=1, clip_grad=None)
    one = _cfg(tmp_path, "one", batch_size=8, accum_steps=1, **common)
    two = _cfg(tmp_path, "two", batch_size=4, accum_steps=2, **common)
    assert supervised.main(one) == 0 and supervised.main(two) == 0
    torch.testing.assert_close(torch.tensor(_losses(one.output)), torch.tensor(_losses(two.output)), rtol=1e-5, atol=0)
    a = swinv2.create_model(pretrained=str(Path(one.output) / "checkpoint-last.pt"))
    b = swinv2.create_model(pretrained=str(Path(two.output) / "checkpoint-last.pt"))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    common = {**FAST, "mixup": 0.0, "cutmix": 0.0, "epochs": 1, "max_steps": 3}
    single = tmp_path / "single"
    subprocess.run(_cli("train", *_flags({**common, "batch_size": 8}), "--output", str(single)),
                   env=ENV, check=True, capture_output=True)
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
           "-m", "swinv2", "train", *_flags({**common, "batch_size": 4}), "--output", str(ddp)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(ddp)), torch.tensor(_losses(single)), rtol=1e-5, atol=0)
    a = swinv2.create_model(pretrained=str(single / "checkpoint-last.pt"))
    b = swinv2.create_model(pretrained=str(ddp / "checkpoint-last.pt"))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)


def test_run_outputs_and_eval(tmp_path, capsys):
    cfg = _cfg(tmp_path, max_steps=4, ema=0.9, tensorboard=True)
    assert supervised.main(cfg) == 0
    run = Path(cfg.output)
    for name in ("checkpoint-last.pt", "checkpoint-best.pt", "model-last.safetensors", "model-best.safetensors",
                 "config.yaml", "metrics.jsonl", "summary.json", "loss.png", "accuracy.png", "lr.png"):
        assert (run / name).stat().st_size > 0, name
    assert list((run / "tb").glob("events.out.tfevents*"))
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x][-1]
    assert {"top1", "top5", "ema_top1"} <= set(val)
    # eval of the saved model reproduces the run's own validation numbers
    capsys.readouterr()
    from swinv2.cli import main

    assert main(["eval", "--checkpoint", str(run / "model-last.safetensors"), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(val["top1"]) and result["top5"] == pytest.approx(val["top5"])
    model = swinv2.create_model(pretrained=str(run / "model-last.safetensors"))
    again = swinv2.create_model(pretrained=str(run / "checkpoint-last.pt"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), again.eval()(x))


def test_finetune_at_another_size_and_window(tmp_path):
    src = _cfg(tmp_path, "src", max_steps=2)
    assert supervised.main(src) == 0
    ft = _cfg(tmp_path, "ft", command="finetune", checkpoint=str(Path(src.output) / "checkpoint-last.pt"),
              img_size=64, window=8, layer_decay=0.75, max_steps=2)
    model, report = supervised.build_classifier(ft, 10)
    # the source trained at 32 px with window 4: stage maps 8,4,2,1 -> windows 4,4,2,1
    assert [a.attn.pretrained_window_size for a in (s.blocks[0] for s in model.layers)] == [
        (4, 4), (4, 4), (2, 2), (1, 1)]
    assert "missing" not in report.lower() or "missing: 0" in report.lower() or "[]" in report
    assert supervised.main(ft) == 0


def test_bad_input_is_refused_clearly(tmp_path, capsys):
    from swinv2.cli import main

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    assert main(["train", "--data", str(empty), "--output", str(tmp_path / "r1")]) == 2
    assert "holds no images" in capsys.readouterr().err
    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(one / "cat" / f"{i}.png")
    assert main(["train", "--data", str(one), "--output", str(tmp_path / "r2")]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "r3")]) == 2
    assert "not found" in capsys.readouterr().err
    # a run folder that already holds a run is not overwritten
    cfg = _cfg(tmp_path, "done", max_steps=1)
    assert supervised.main(cfg) == 0
    with pytest.raises(FileExistsError, match="--resume"):
        supervised.main(cfg)
    # weights of another architecture: the mismatched keys are named
    bad = _cfg(tmp_path, "bad", command="finetune", model="swinv2_tiny_window8_256",
               checkpoint=str(Path(cfg.output) / "checkpoint-last.pt"))
    with pytest.raises(ValueError, match="layers.0.blocks.0"):
        supervised.build_classifier(bad, 10)


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (36, 36), (200 if c == "a" else 0, i * 10, 50)).save(root / c / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "b" / "empty.jpg").write_bytes(b"")
    cfg = _cfg(tmp_path, data=str(root), val_fraction=0.25, train_fraction=1.0, epochs=2, batch_size=4,
               mixup=0.0, cutmix=0.0)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert supervised.main(cfg) == 0
    summary = json.loads((Path(cfg.output) / "summary.json").read_text())
    assert summary["skipped_images"] >= 1  # the broken files that fell in training batches


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_loss_after(monkeypatch, 5)
    cfg = _cfg(tmp_path, save_every_steps=2, max_steps=10)
    assert supervised.main(cfg) == 3
    state = torch.load(Path(cfg.output) / "checkpoint-last.pt", weights_only=True)
    assert state["run"]["step"] == 4  # saved at update 4; update 6 hit the NaN and nothing was saved after
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


DEEPSPEED = pytest.param("deepspeed", marks=pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install swinv2[deepspeed])"))


@pytest.mark.parametrize("sharding", ["zero1", "fsdp", DEEPSPEED])
def test_sharded_runs_equal_one_process_and_resume_from_full_state(tmp_path, sharding):
    """ZeRO-1 (optimizer states sharded), FSDP2 (everything sharded) and DeepSpeed ZeRO over 2
    gloo processes give the single-process losses; their checkpoints hold full state dicts, so a
    sharded run stopped after 2 updates and resumed ends where the uninterrupted single process
    does. DeepSpeed runs stage 2 (gradients sharded too) from a config file first, and resumes
    under the bundled stage-1 config."""
    common = {**FAST, "mixup": 0.0, "cutmix": 0.0, "epochs": 1}
    single = tmp_path / "single"
    subprocess.run(_cli("train", *_flags({**common, "batch_size": 8, "max_steps": 3}), "--output", str(single)),
                   env=ENV, check=True, capture_output=True)
    run = tmp_path / sharding
    port = {"zero1": "29741", "fsdp": "29742", "deepspeed": "29743"}[sharding]
    first_extra, again_extra = [], []
    if sharding == "deepspeed":
        zero2 = tmp_path / "zero2.json"
        zero2.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 10**6}}))
        bundled = Path(swinv2.__file__).parent / "recipes" / "deepspeed_zero1.json"
        first_extra, again_extra = ["--deepspeed-config", str(zero2)], ["--deepspeed-config", str(bundled)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
              "-m", "swinv2", "train"]
    first = subprocess.run([*launch, *_flags({**common, "batch_size": 4, "max_steps": 2}), "--sharding", sharding,
                            *first_extra, "--output", str(run)], env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(run / "checkpoint-last.pt", weights_only=True)
    assert state["run"]["step"] == 2 and state["optimizer"]["state"], "a full optimizer state was saved"
    again = subprocess.run([*launch, "--output", str(run), "--resume", "--max-steps", "3", *again_extra], env=ENV,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(single)), rtol=1e-5, atol=0)
    a = swinv2.create_model(pretrained=str(single / "checkpoint-last.pt"))
    b = swinv2.create_model(pretrained=str(run / "checkpoint-last.pt"))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)
