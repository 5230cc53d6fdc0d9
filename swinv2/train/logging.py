"""What a run leaves behind to read: ``metrics.jsonl``, TensorBoard events, PNG plots, ``summary.json``.

metrics.jsonl holds one JSON object per line, ``{"split", "step", "time", **metrics}``, flushed
as written, so a killed run keeps everything up to its last complete line. It is the source of
truth: the plots and the summary are drawn from it, TensorBoard mirrors it.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import time
from pathlib import Path

from ..fileio import atomic_path, write_error, write_text

PLOTS = ("loss.png", "accuracy.png", "lr.png")
EXTRA_HINT = "pip install 'swinv2[train]'"
_KEYS = ("split", "step", "time")  # the record fields that are not metrics


def read_metrics(path) -> list[dict]:
    """Every complete record of a metrics.jsonl (a line cut short by a kill is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "split" in record and "step" in record:
            records.append(record)
    return records


def _scalar(value):
    """A plain int/float for JSON and TensorBoard (one-element tensors and numpy scalars
    included: ``json`` cannot write ``np.float32``), else None."""
    if isinstance(value, numbers.Integral):  # bool included
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "item") and math.prod(shape) == 1:
        return _scalar(value.item())
    return None


class RunLogger:
    """Metrics of the main process; ``enabled=False`` (other ranks) makes every method a no-op.

    A new run (``resume_step=None``) starts metrics.jsonl afresh and purges older TensorBoard
    events from step 0. ``resume_step=N`` keeps the records with ``step <= N`` and tells
    TensorBoard to drop its events after N, so the resumed run's steps appear once.
    ``train_resume_step=M`` (at most N) drops the train records after M as well: the
    checkpoint's averaging window began after M, so the resumed run logs that window again, in
    full, where a run stopped by ``--max-steps`` had logged it partially.

    TensorBoard events and PNG plots need the ``tensorboard`` and ``matplotlib`` packages
    (``pip install 'swinv2[train]'``); without them that output is off, with a one-line note.
    """

    def __init__(self, run_dir, *, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None,
                 train_resume_step: int | None = None):
        self.enabled = enabled
        self.dir = Path(run_dir)
        self.path = self.dir / "metrics.jsonl"
        self._file = None
        self._writer = None
        self._plots = True
        if not enabled:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(err, self.dir) from err
        kept = []
        if resume_step is not None:
            train_until = resume_step if train_resume_step is None else min(train_resume_step, resume_step)
            kept = [r for r in read_metrics(self.path)
                    if r["step"] <= (train_until if r["split"] == "train" else resume_step)]
        # Rewritten whole: this also drops a partial last line that appending would glue onto.
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        try:
            self._file = open(self.path, "a")  # noqa: SIM115 - held for the run, closed by close()
        except OSError as err:
            raise write_error(err, self.path) from err
        if tensorboard:
            purge = 0 if resume_step is None else train_until + 1
            self._writer = _summary_writer(self.dir / "tb", purge)
            # Records kept after the purge point (validation of the stopped run) go back in.
            for r in kept:
                if r["step"] >= purge:
                    self._scalars(r["split"], r["step"], {k: v for k, v in r.items() if k not in _KEYS})

    def log(self, split: str, step: int, **metrics) -> None:
        """Append ``{"split", "step", "time", **metrics}``; numeric metrics also go to TensorBoard
        as ``split/name``. Non-numeric values (strings, lists) are kept in the JSON only."""
        if not self.enabled or self._file is None:
            return
        record = {"split": split, "step": int(step), "time": time.time()}
        for name, value in metrics.items():
            scalar = _scalar(value)
            record[name] = value if scalar is None else scalar
        self._scalars(split, int(step), metrics)
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            self._close_file()
            raise write_error(err, self.path) from err

    def _scalars(self, split: str, step: int, metrics: dict) -> None:
        if self._writer is None:
            return
        try:
            for name, value in metrics.items():
                scalar = _scalar(value)
                if scalar is not None:
                    self._writer.add_scalar(f"{split}/{name}", scalar, step)
        except OSError as err:
            self._tensorboard_off(err)

    def _tensorboard_off(self, err: OSError) -> None:
        """TensorBoard mirrors metrics.jsonl: a failed event write turns it off, not the run."""
        print(f"note: TensorBoard logging off: {write_error(err, self.dir / 'tb')}", flush=True)
        writer, self._writer = self._writer, None
        with contextlib.suppress(Exception):
            writer.close()

    def records(self) -> list[dict]:
        return read_metrics(self.path) if self.enabled else []

    def plot(self) -> list[Path]:
        """Write loss.png (train loss per step, val loss at each evaluation), accuracy.png (val
        top-1/top-5, EMA top-1) and lr.png into the run folder; a plot whose metrics were never
        logged is skipped. Returns the files written (none without matplotlib)."""
        if not self.enabled:
            return []
        if self._writer is not None:
            try:
                self._writer.flush()
            except OSError as err:
                self._tensorboard_off(err)
        figure = self._figure_class()
        if figure is None:
            return []
        records = self.records()
        figures = {
            "loss.png": ("loss", [("train", "train", "loss"), ("val", "val", "loss")]),
            "accuracy.png": ("accuracy", [("val top-1", "val", "top1"), ("val top-5", "val", "top5"),
                                          ("EMA top-1", "val", "ema_top1")]),
            "lr.png": ("learning rate", [("lr", "train", "lr")]),
        }
        written = []
        for filename, (ylabel, series) in figures.items():
            lines = []
            for label, split, key in series:
                points = [(r["step"], r[key]) for r in records
                          if r["split"] == split and isinstance(r.get(key), numbers.Number) and math.isfinite(r[key])]
                if points:
                    lines.append((label, points))
            if not lines:
                continue
            # A Figure without pyplot: no global backend switch, nothing to close.
            fig = figure(figsize=(6, 4))
            ax = fig.subplots()
            for label, points in lines:
                xs, ys = zip(*points)
                # Evaluations are few: markers show where they happened.
                ax.plot(xs, ys, marker="o" if len(points) < 50 else None, markersize=3, label=label)
            ax.set_xlabel("step (optimizer update)")
            ax.set_ylabel(ylabel)
            if filename == "lr.png":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            with atomic_path(self.dir / filename) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
            written.append(self.dir / filename)
        return written

    def _figure_class(self):
        """matplotlib's Figure, or None (once with a note) where matplotlib is not installed."""
        if not self._plots:
            return None
        try:
            from matplotlib.figure import Figure
        except ImportError:
            self._plots = False
            print(f"note: PNG plots off ({EXTRA_HINT} for them)", flush=True)
            return None
        return Figure

    def summary(self, **final) -> str:
        """A few lines on the run (steps, last train loss, best and last validation) plus ``final``;
        the same content goes to summary.json."""
        if not self.enabled:
            return ""
        records = self.records()
        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "val"]
        info: dict = {}
        if train:
            info["steps"] = max(r["step"] for r in train)
            losses = [r["loss"] for r in train if isinstance(r.get("loss"), numbers.Number)]
            if losses:
                info["last_train_loss"] = losses[-1]
        scored = [r for r in val if isinstance(r.get("top1"), numbers.Number)]
        if scored:
            best = max(scored, key=lambda r: r["top1"])
            info["best_val_top1"], info["best_val_step"] = best["top1"], best["step"]
            info["last_val_top1"] = scored[-1]["top1"]
        info.update({k: (_scalar(v) if _scalar(v) is not None else v) for k, v in final.items()})
        write_text(self.dir / "summary.json", json.dumps(info, indent=2, default=str) + "\n")
        return "\n".join(f"{k}: {_format(v)}" for k, v in info.items())

    def close(self) -> None:
        """Close the event writer and metrics.jsonl. Never raises for a failed write: every
        record was flushed when logged, so a close is not where data is lost."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                writer.close()
        self._close_file()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()  # after a failed write the buffer cannot be flushed; the file closes anyway

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary_writer(folder: Path, purge_step: int):
    """TensorBoard's SummaryWriter, or None (with a note) where tensorboard is not installed
    or the events cannot be written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        print(f"note: TensorBoard logging off ({EXTRA_HINT} for it)", flush=True)
        return None
    try:
        return SummaryWriter(str(folder), purge_step=purge_step)
    except OSError as err:
        print(f"note: TensorBoard logging off: {write_error(err, folder)}", flush=True)
        return None
