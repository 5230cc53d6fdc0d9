"""SimMIM pre-training on the bundled digits, then fine-tuning on a small labelled fraction,
against training from scratch on the same fraction with the same supervised budget.

    python benchmarks/simmim_digits.py --seeds 0 1 2 --fraction 0.1

Pre-training sees every training image without its label; fine-tuning and the scratch baseline
see the labelled fraction only (the same images for a given seed) and are scored on the 359
held-out digits. Writes benchmarks/DATE-simmim-digits.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "swinv2", *args, "--no-progress", "--no-tensorboard"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: swinv2 {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def best_top1(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["best_top1"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=40, help="supervised epochs on the labelled fraction")
    p.add_argument("--out", default="runs/simmim-digits")
    a = p.parse_args()
    root = Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    sup = ["--config", "digits", "--train-fraction", str(a.fraction), "--epochs", str(a.epochs)]
    rows = []
    t0 = time.time()
    for seed in a.seeds:
        pt = root / f"pretrain-{seed}"
        run(["pretrain", "--output", str(pt), "--seed", str(seed), "--epochs", str(a.pretrain_epochs)])
        ft, sc = root / f"finetune-{seed}", root / f"scratch-{seed}"
        run(["finetune", *sup, "--seed", str(seed), "--model", "swinv2_debug", "--checkpoint",
             str(pt / "checkpoint-last.pt"), "--output", str(ft)])
        run(["train", *sup, "--seed", str(seed), "--output", str(sc)])
        rows.append(dict(seed=seed, pretrain_val_loss=json.loads((pt / "summary.json").read_text())["best_val_loss"],
                         finetune=best_top1(ft), scratch=best_top1(sc)))
        print(rows[-1], flush=True)
    minutes = (time.time() - t0) / 60
    date = time.strftime("%Y-%m-%d")
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("finetune", "scratch")}
    lines = [
        f"# SimMIM pre-training on bundled digits: fine-tune vs scratch ({date})",
        "",
        f"Command: `python benchmarks/simmim_digits.py --seeds {' '.join(map(str, a.seeds))} --fraction {a.fraction} "
        f"--pretrain-epochs {a.pretrain_epochs} --epochs {a.epochs}`",
        f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
        f"wall time {minutes:.0f} min (shared machine).",
        "",
        f"swinv2_debug at 64 px. Pre-training: SimMIM on all 1,438 training digits without labels "
        f"({a.pretrain_epochs} epochs, recipe digits_simmim). Then both arms train on the same "
        f"{a.fraction:.0%} labelled per-class fraction for {a.epochs} epochs (recipe digits); top-1 is the best "
        "epoch on the 359 held-out digits.",
        "",
        "| seed | SimMIM val loss | fine-tuned top-1 | scratch top-1 |",
        "|---|---|---|---|",
        *[f"| {r['seed']} | {r['pretrain_val_loss']:.4f} | {r['finetune']:.2%} | {r['scratch']:.2%} |" for r in rows],
        f"| mean | | {mean['finetune']:.2%} | {mean['scratch']:.2%} |",
        "",
    ]
    out = Path(__file__).parent / f"{date}-simmim-digits"
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(dict(args=vars(a), rows=rows, minutes=minutes), indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
