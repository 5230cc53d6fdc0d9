"""What a run leaves behind to read: ``metrics.jsonl``, TensorBoard events, PNG plots, ``summary.json``.

metrics.jsonl holds one JSON object per line, ``{"split", "step", "time", **metrics}``, flushed
as written, so a killed run keeps everything up to its last complete line. It is the source of
truth: the plots and the summary are drawn from it, TensorBoard mirrors it.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from pathlib import Path

PLOTS = ("loss.png", "accuracy.png", "lr.png")


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
    """

    def __init__(self, run_dir, *, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.dir = Path(run_dir)
        self.path = self.dir / "metrics.jsonl"
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        # Rewritten whole: this also drops a partial last line that appending would glue onto.
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 - held for the run, closed by close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir / "tb"), purge_step=0 if resume_step is None else resume_step + 1)

    def log(self, split: str, step: int, **metrics) -> None:
        """Append ``{"split", "step", "time", **metrics}``; numeric metrics also go to TensorBoard
        as ``split/name``. Non-numeric values (strings, lists) are kept in the JSON only."""
        if not self.enabled:
            return
        record = {"split": split, "step": int(step), "time": time.time()}
        for name, value in metrics.items():
            scalar = _scalar(value)
            record[name] = value if scalar is None else scalar
            if self._writer is not None and scalar is not None:
                self._writer.add_scalar(f"{split}/{name}", scalar, int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def records(self) -> list[dict]:
        return read_metrics(self.path) if self.enabled else []

    def plot(self) -> list[Path]:
        """Write loss.png (train loss per step, val loss at each evaluation), accuracy.png (val
        top-1/top-5, EMA top-1) and lr.png into the run folder; a plot whose metrics were never
        logged is skipped. Returns the files written."""
        if not self.enabled:
            return []
        if self._writer is not None:
            self._writer.flush()
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt

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
            fig, ax = plt.subplots(figsize=(6, 4))
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
            fig.savefig(self.dir / filename, dpi=100)
            plt.close(fig)
            written.append(self.dir / filename)
        return written

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
        tmp = self.dir / "summary.json.tmp"
        tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
        tmp.replace(self.dir / "summary.json")
        return "\n".join(f"{k}: {_format(v)}" for k, v in info.items())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
