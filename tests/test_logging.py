"""Run logging: metrics.jsonl (resume-safe), TensorBoard events, plots, summary."""

from __future__ import annotations

import json

import numpy as np
import torch

from swinv2.train.logging import RunLogger, read_metrics


def _run(run_dir, steps, *, resume_step=None, val_every=5, tensorboard=False):
    with RunLogger(run_dir, tensorboard=tensorboard, resume_step=resume_step) as log:
        for s in steps:
            log.log("train", s, loss=2.0 / s, lr=1e-3 * min(1.0, s / 4))
            if s % val_every == 0:
                log.log("val", s, loss=1.5 / s, top1=s / 20, top5=min(1.0, s / 10), epoch=s // val_every)
    return read_metrics(run_dir / "metrics.jsonl")


def test_lines_are_flushed_and_values_plain(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    log.log("train", 1, loss=torch.tensor(0.5), lr=np.float32(0.25), images=np.int64(8), note="warmup")
    line = json.loads((tmp_path / "metrics.jsonl").read_text())  # readable before close
    assert line["split"] == "train" and line["step"] == 1 and isinstance(line["time"], float)
    assert line["loss"] == 0.5 and line["lr"] == 0.25 and line["images"] == 8 and line["note"] == "warmup"
    log.close()


def test_resume_truncates_later_steps_and_a_partial_line(tmp_path):
    _run(tmp_path, range(1, 11))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 11, "lo')  # the run was killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")][-1] == 10
    records = _run(tmp_path, range(7, 13), resume_step=6)
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == list(range(1, 13))  # each step once
    assert [r["step"] for r in records if r["split"] == "val"] == [5, 10]
    assert _run(tmp_path, [1, 2]) and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_plots_summary_and_tensorboard(tmp_path):
    _run(tmp_path, range(1, 21), tensorboard=True)
    log = RunLogger(tmp_path, tensorboard=False, resume_step=20)
    written = log.plot()
    assert sorted(p.name for p in written) == ["accuracy.png", "loss.png", "lr.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    text = log.summary(test_top1=0.9)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_val_top1"] == 1.0 and summary["best_val_step"] == 20 and summary["test_top1"] == 0.9
    assert "best_val_top1: 1" in text and summary["steps"] == 20
    log.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "val/top1", "val/top5"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("val/top1")] == [5, 10, 15, 20]


def test_missing_metrics_skip_their_plot(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log("train", 1, loss=1.0)
        log.log("train", 2, loss=0.8)
        assert [p.name for p in log.plot()] == ["loss.png"]
    assert not (tmp_path / "accuracy.png").exists() and not (tmp_path / "lr.png").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(tmp_path / "rank1", enabled=False, resume_step=3)
    log.log("train", 1, loss=1.0)
    assert log.plot() == [] and log.summary(top1=1.0) == ""
    log.close()
    assert not (tmp_path / "rank1").exists()


def test_tensorboard_holds_each_step_once_after_resume(tmp_path):
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, range(1, 11), tensorboard=True)
    time.sleep(1.1)  # event files are ordered by their whole-second timestamp
    _run(tmp_path, range(7, 13), resume_step=6, tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))


def test_a_resumed_run_logs_the_stopped_window_again(tmp_path):
    """A run stopped by --max-steps at step 10 logged a partial window (steps 9-10); its
    checkpoint carries that window, so the resumed run logs it whole at step 12: the partial
    record goes, validation at the stop stays, in metrics.jsonl and in TensorBoard alike."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, tensorboard=True) as log:
        for s in (4, 8, 10):
            log.log("train", s, loss=float(s))
        log.log("val", 10, top1=0.5)
    with RunLogger(tmp_path, tensorboard=True, resume_step=10, train_resume_step=8) as log:
        log.log("train", 12, loss=12.0)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [("train", 4), ("train", 8), ("val", 10), ("train", 12)]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [4, 8, 12]
    assert [e.step for e in acc.Scalars("val/top1")] == [10]


def test_tensorboard_and_matplotlib_are_optional(tmp_path, monkeypatch, capsys):
    import sys

    for name in [n for n in sys.modules if n.split(".")[0] in ("tensorboard", "matplotlib")
                 or n.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("tensorboard", "matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # not installed
    with RunLogger(tmp_path, tensorboard=True) as log:
        log.log("train", 1, loss=1.0)
        assert log.plot() == [] and log.plot() == []
        log.summary()
    out = capsys.readouterr().out.splitlines()
    assert out == ["note: TensorBoard logging off (pip install 'swinv2[train]' for it)",
                   "note: PNG plots off (pip install 'swinv2[train]' for them)"]
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "summary.json"]


def test_a_full_disk_while_logging_is_one_clear_error(tmp_path, monkeypatch):
    import pytest
    from test_run_folder import FullDisk

    from swinv2.fileio import WriteError

    def second_record(events):
        return sum(1 for kind, name in events if kind == "write" and name == "metrics.jsonl") >= 2

    with monkeypatch.context() as m:
        FullDisk(m, tmp_path, second_record)
        log = RunLogger(tmp_path, tensorboard=False)
        log.log("train", 1, loss=1.0)
        with pytest.raises(WriteError, match=r"^no space left on device writing .*metrics\.jsonl$"):
            log.log("train", 2, loss=0.5)
        with pytest.raises(WriteError, match=r"^no space left on device writing .*loss\.png$"):
            log.plot()
        with pytest.raises(WriteError, match=r"^no space left on device writing .*summary\.json$"):
            log.summary()
        log.close()  # does not raise: every record was flushed as it was logged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
