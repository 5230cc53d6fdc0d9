"""The run folder under trouble: a full disk, a second run into it, a read-only or impossible
--output, a start that fails, a missing TensorBoard. Each gives one clear line, and the folder
keeps its last good checkpoint (resumable) or, when the run never got to one, nothing at all."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import poison_loss_after

from swinv2 import fileio
from swinv2.cli import main as cli
from swinv2.tasks import common, supervised
from swinv2.train import checkpoint as ckpt
from swinv2.train.config import TrainConfig

# Tiny and quick: 70 digits, 8 updates per epoch of 8 images, no augmentation to speak of.
QUICK = dict(model="swinv2_debug", img_size=32, batch_size=8, epochs=2, warmup_epochs=0, drop_path=0.0,
             auto_augment="none", mixup=0.0, cutmix=0.0, reprob=0.0, hflip=0.0, amp="none", workers=0,
             progress=False, tensorboard=False, log_every=1, train_fraction=0.05, threads=1)


def _cfg(output, **kw) -> TrainConfig:
    return TrainConfig(**{**QUICK, "output": str(output), **kw})


def _flags(output, **kw) -> list[str]:
    out = ["train", "--output", str(output)]
    for k, v in {**QUICK, **kw}.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [flag, str(v)]
    return out


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def _temporaries(run) -> list[str]:
    return sorted(p.name for p in Path(run).rglob("*") if ".tmp" in p.name)


@pytest.fixture
def quick_eval(monkeypatch):
    """Validation is not what these tests are about: a fixed score, each epoch better."""
    scores = iter(range(1, 1000))
    monkeypatch.setattr(supervised, "evaluate_classifier",
                        lambda *args: dict(top1=next(scores) / 1000, top5=1.0, loss=1.0, images=10))


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swinv2: error: "), err
    return lines[0]


# -- a full disk ---------------------------------------------------------------------------------


class FullDisk:
    """Python-level writes to files under ``root`` fail with ENOSPC once ``when(events)`` says
    the disk is full; ``events`` lists ("open", name) and ("write", name) as they happen."""

    def __init__(self, monkeypatch, root, when):
        self.root, self.when, self.full, self.events = os.fspath(root), when, False, []
        real = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            if (isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(self.root)
                    and any(c in mode for c in "wax+")):
                self.event("open", Path(file).name)
                return _Filling(f, self, Path(file).name)
            return f

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    def event(self, kind: str, name: str) -> None:
        self.events.append((kind, name))
        self.full = self.full or self.when(self.events)

    def write(self, name: str) -> None:
        self.event("write", name)
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _Filling:
    def __init__(self, file, disk: FullDisk, name: str):
        self._file, self._disk, self._name = file, disk, name

    def write(self, data):
        self._disk.write(self._name)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _nth(kind: str, name: str, n: int):
    return lambda events: sum(1 for k, f in events if k == kind and name in f) >= n


def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint({"step": 1, "w": torch.zeros(10)}, path)
    with monkeypatch.context() as m:
        FullDisk(m, tmp_path, _nth("write", "c.tmp", 3))  # full part way through
        with pytest.raises(fileio.WriteError, match=r"^no space left on device writing .*c\.pt$"):
            ckpt.save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, path)
    assert ckpt.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["c.pt"]
    # network file systems may report the full disk only when the data is synced
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
        with pytest.raises(fileio.WriteError, match=r"^disk quota exceeded writing .*c\.pt$"):
            ckpt.save_checkpoint({"step": 2}, path)
    assert ckpt.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["c.pt"]
    ckpt.save_checkpoint({"step": 3}, path)  # room again
    assert ckpt.load_checkpoint(path)["step"] == 3


# Where the disk fills in a 2-epoch run of 8 updates per epoch, logged at every update; the
# file the error names; the update of the checkpoint that survives (None: the run had none).
FULL_AT = {
    "first checkpoint": (_nth("open", "checkpoint-last", 1), "checkpoint-last.pt", None),
    "second checkpoint": (_nth("open", "checkpoint-last", 2), "checkpoint-last.pt", 8),
    "metrics in epoch 2": (_nth("write", "metrics.jsonl", 12), "metrics.jsonl", 8),
    "first plot": (_nth("open", "loss", 1), "loss.png", 8),
}


@pytest.mark.parametrize("where", list(FULL_AT))
def test_a_full_disk_stops_the_run_with_one_line_and_it_resumes_once_there_is_room(
        tmp_path, monkeypatch, capsys, quick_eval, where):
    when, named, kept = FULL_AT[where]
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        FullDisk(m, tmp_path, when)
        assert cli(_flags(run)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"swinv2: error: no space left on device writing {run / named}")
    if kept is None:
        assert not run.exists()  # nothing to resume: nothing left behind
        return
    assert f"{run / ckpt.LAST} is intact" in line and "--resume" in line
    assert _temporaries(run) == []
    assert ckpt.load_checkpoint(run / ckpt.LAST)["run"]["step"] == kept
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with monkeypatch.context() as m:  # still full: refused again, nothing lost
        FullDisk(m, tmp_path, lambda events: True)
        assert cli(["train", "--output", str(run), "--resume"]) == 2
    assert "no space left on device" in _one_error_line(capsys.readouterr().err)
    assert _temporaries(run) == [] and {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert cli(["train", "--output", str(run), "--resume"]) == 0  # room again
    assert ckpt.load_checkpoint(run / ckpt.LAST)["run"]["step"] == 16
    best = ckpt.load_checkpoint(run / ckpt.BEST)["run"]
    assert best["step"] == best["best_step"] == 16
    if where == "second checkpoint":  # the logged losses are those of a run that never stopped
        assert cli(_flags(tmp_path / "whole")) == 0
        assert _losses(run) == _losses(tmp_path / "whole")


# -- one folder, one run -------------------------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, monkeypatch, capsys, quick_eval):
    from swinv2.train.engine import Trainer

    run = tmp_path / "run"
    fit, tried = Trainer.fit, []

    def fit_while_another_run_starts(self):
        with pytest.raises(common.RunFolderBusyError, match="in use by another swinv2 run"):
            supervised.main(_cfg(run, max_steps=1))
        capsys.readouterr()
        assert cli(_flags(run, max_steps=1)) == 2
        tried.append(_one_error_line(capsys.readouterr().err))
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", fit_while_another_run_starts)
    assert supervised.main(_cfg(run, max_steps=2)) == 0
    assert "in use by another swinv2 run" in tried[0] and f"process {os.getpid()}" in tried[0]
    monkeypatch.setattr(Trainer, "fit", fit)
    assert ckpt.load_checkpoint(run / ckpt.LAST)["run"]["step"] == 2  # the first run's, whole
    assert supervised.main(_cfg(run, resume=True, max_steps=3)) == 0  # its lock went with it


def test_a_killed_run_leaves_no_stale_lock(tmp_path, quick_eval):
    """The lock belongs to a process: while one holds it, a run is refused before it writes a
    thing; once that process is killed, the folder is free."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)", str(run / common.LOCK)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(common.RunFolderBusyError, match="in use by another swinv2 run"):
            supervised.main(_cfg(run, max_steps=1))
        assert os.listdir(run) == [common.LOCK]
    finally:
        holder.kill()
        holder.wait()
    assert supervised.main(_cfg(run, max_steps=1)) == 0


# -- --output that cannot be written -------------------------------------------------------------


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(supervised, "load_datasets", lambda cfg: pytest.fail("the run started"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path):
        if os.path.abspath(path).startswith(str(read_only)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for output, words in ((a_file, "is not a folder"), (a_file / "run", "notes.txt is a file"),
                          (read_only, "cannot write in"), (read_only / "run", "cannot write in")):
        with pytest.raises(ValueError, match=words) as caught:
            supervised.main(_cfg(output))
        assert str(output) in str(caught.value)
        assert cli(_flags(output)) == 2
        assert words in _one_error_line(capsys.readouterr().err)
    assert a_file.read_text() == "mine" and os.listdir(read_only) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot write in"):
            supervised.main(_cfg(locked / "run"))
    finally:
        locked.chmod(0o755)


# -- a start that fails leaves nothing -----------------------------------------------------------


def test_a_start_that_fails_leaves_no_run_folder(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    assert cli(["train", "--data", str(tmp_path / "nope"), "--output", str(run)]) == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("folder", ["new", "the user's"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_the_folder_as_it_was(
        tmp_path, monkeypatch, quick_eval, error, folder):
    from swinv2.data import mixup as sampling

    real, calls = sampling.train_criterion, []

    def failing(mixup, smoothing):
        loss_fn = real(mixup, smoothing)

        def fn(logits, targets):
            calls.append(1)
            if len(calls) == 3:
                raise error("boom")
            return loss_fn(logits, targets)

        return fn

    monkeypatch.setattr(sampling, "train_criterion", failing)
    run = tmp_path / "runs" / "run"
    if folder != "new":
        run.mkdir(parents=True)
        (run / "notes.txt").write_text("mine")
    with pytest.raises(error, match="boom"):
        supervised.main(_cfg(run, tensorboard=True))
    if folder == "new":
        assert not (tmp_path / "runs").exists()
    else:
        assert os.listdir(run) == ["notes.txt"]
    # once a checkpoint is written, the run is kept for --resume
    calls.clear()
    with pytest.raises(error, match="boom"):
        supervised.main(_cfg(run, save_every_steps=1))
    assert ckpt.load_checkpoint(run / ckpt.LAST)["run"]["step"] == 2
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()


# -- optional extras -----------------------------------------------------------------------------


def test_training_without_tensorboard_and_matplotlib(tmp_path, monkeypatch, capsys, quick_eval):
    for name in [n for n in sys.modules if n.split(".")[0] in ("tensorboard", "matplotlib")
                 or n.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("tensorboard", "matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # not installed
    run = tmp_path / "run"
    assert supervised.main(_cfg(run, max_steps=2, tensorboard=True)) == 0
    out = capsys.readouterr().out
    assert "note: TensorBoard logging off (pip install 'swinv2[train]' for it)" in out
    assert out.count("note: PNG plots off (pip install 'swinv2[train]' for them)") == 1
    assert not (run / "tb").exists() and not list(run.glob("*.png"))
    assert (run / ckpt.LAST).is_file() and len(_losses(run)) == 2


def test_a_run_that_diverges_before_its_first_checkpoint_keeps_its_metrics(tmp_path, monkeypatch):
    """A non-finite loss is a result, not a failed start: exit 3, and the folder keeps what was
    logged up to it."""
    poison_loss_after(monkeypatch, 2)
    run = tmp_path / "run"
    assert supervised.main(_cfg(run)) == 3
    assert (run / "config.yaml").is_file() and not (run / ckpt.LAST).exists()
    assert len(_losses(run)) >= 1
