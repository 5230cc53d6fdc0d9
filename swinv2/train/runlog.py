"""What a run leaves behind to read: metrics.jsonl, TensorBoard events, PNG plots, summary.json."""

from __future__ import annotations

import json
import time
from pathlib import Path


class RunLogger:
    """Logs metrics of the main process (``enabled=False`` on the others makes it a no-op).

    ``resume_step``: a resumed run first drops the lines logged after its checkpoint (they
    will be logged again), so metrics.jsonl and TensorBoard hold each step once.
    """

    def __init__(self, run_dir, *, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.dir = Path(run_dir)
        self.path = self.dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            kept = [r for r in self.records() if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=resume_step)

    def records(self) -> list[dict]:
        """Every complete line (a run killed mid-write leaves a partial last line: ignored)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def log(self, split: str, step: int, **metrics) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{split}/{k}", v, step)
            self.writer.flush()

    def plot(self) -> None:
        """loss.png, accuracy.png and lr.png in the run folder (skipped when a metric is absent)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "val"]
        panels = [
            ("loss.png", "loss", [("train", train, "loss"), ("val", val, "loss")]),
            ("accuracy.png", "accuracy", [("val top-1", val, "top1"), ("val top-5", val, "top5"),
                                          ("EMA top-1", val, "ema_top1")]),
            ("lr.png", "learning rate", [("lr", train, "lr")]),
        ]
        for name, ylabel, series in panels:
            lines = [(label, [(r["step"], r[key]) for r in rows if key in r]) for label, rows, key in series]
            lines = [(label, pts) for label, pts in lines if pts]
            if not lines:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, pts in lines:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=label)
            ax.set_xlabel("optimizer update")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(self.dir / name, dpi=100)
            plt.close(fig)

    def summary(self, **final) -> str:
        if not self.enabled:
            return ""
        (self.dir / "summary.json").write_text(json.dumps(final, indent=1))
        return "summary: " + json.dumps(final, indent=1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
