"""The paper's ablations re-run in miniature on bundled real images (no download): Table 1
(position bias across windows), Table 6 (res-post-norm and scaled cosine attention) and
Figure 2 (activation amplitude by depth).

    python benchmarks/paper_claims.py            # full run: 3 seeds
    python benchmarks/paper_claims.py --quick    # one seed, shorter: checks the pipeline
    python benchmarks/paper_claims.py --replot benchmarks/DATE-paper-claims.json   # plots and report again

The task: scikit-learn's 8x8 digit scans, enlarged to 70-95% of the side, added at a random
place, contrast and polarity onto crops of scikit-image textures (grass, gravel, brick, moon,
camera, coins), with noise. Plain digits are solved to ~100% by any variant, which hides every
difference; digits in clutter leave room for the switches to matter while a 2M-parameter model
still learns them within minutes on a CPU (smaller or fainter digits were not learnt at all in
this budget). Training and validation use disjoint scans.
Scenes are drawn at 80 px and area-resized to the size used. Table 1 is tested two ways: at
the training size with larger windows (the position bias must cover offsets it never saw, and
nothing else changes), and, as the paper does, at twice the size and window (the same scenes
twice finer, so the digits are also twice as large in pixels).

Writes benchmarks/DATE-paper-claims.json and DATE-paper-claims-cpu.md, and
docs/images/paper-{table1,table6,figure2}.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import swinv2
from swinv2.train.optim import param_groups

ROOT = Path(__file__).resolve().parent.parent
BASE = 80  # side the training scenes are drawn at, then resized to 32 (finer sampling of the digit scans)
TRAIN = (32, 4)  # (image side, window) of training: stage maps 8,4,2,1, windows 4,4,2,1
# (side, window) tests: larger windows at the training size (stage 1 windows 6 padded, then 8 = global), and
# the paper's protocol, image and window both doubled (I256/W8 -> I512/W16)
TESTS = ((32, 6), (32, 8), (64, 8))
TEXTURES = ("grass", "gravel", "brick", "moon", "camera", "coins")
BIASES = ("log_cpb", "linear_cpb", "table")
TABLE6 = {"pre-norm + dot (V1)": dict(norm_placement="pre", attn_type="dot"),
          "res-post-norm + dot": dict(norm_placement="res_post", attn_type="dot"),
          "res-post-norm + cosine (V2)": dict(norm_placement="res_post", attn_type="cosine")}
# Block families: Table 1 runs the paper's (V2); --diagnose compares it with V1's, whose attention is
# not gated by zero-initialised post-norms. Each names its Table 6 arm, trained with log_cpb.
FAMILIES = {"V2 block": ("res-post-norm + cosine (V2)", {}),
            "V1 block": ("pre-norm + dot (V1)", dict(norm_placement="pre", attn_type="dot"))}
TABLE1_FAMILIES = ("V2 block",)
DEEP = (2, 2, 14, 2)  # Figure 2's deeper variant: a long third stage, as SwinV2-H/G have


# -- data ----------------------------------------------------------------------------------------


def _textures() -> list[torch.Tensor]:
    from skimage import data

    return [torch.from_numpy(getattr(data, name)().astype(np.float32) / 255) for name in TEXTURES]


def make_scenes(n: int, split: str, seed: int, canvas: int = BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` grey scenes (n, 1, canvas, canvas) uint8 and their digit labels. ``split`` picks
    the scans: every fifth for val, the rest for train, so no scan is seen in both. The digit's
    and the texture's sizes are in pixels: a larger canvas holds more clutter round the digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.arange(len(digits.target)) % 5 == 0
    keep = keep if split == "val" else ~keep
    scans = torch.from_numpy(digits.images[keep].astype(np.float32) / 16)
    labels = torch.from_numpy(digits.target[keep])
    textures, gen = _textures(), torch.Generator().manual_seed(seed * 7919 + (split == "val"))
    images, targets = torch.empty(n, 1, canvas, canvas, dtype=torch.uint8), torch.empty(n, dtype=torch.long)
    for i in range(n):
        j = int(torch.randint(len(scans), (1,), generator=gen))
        tex = textures[int(torch.randint(len(textures), (1,), generator=gen))]
        crop = min(int(canvas * (1 + 1.5 * float(torch.rand((), generator=gen)))), *tex.shape)  # texture scale varies
        y, x = (int(torch.randint(s - crop + 1, (1,), generator=gen)) for s in tex.shape)
        bg = F.interpolate(tex[None, None, y:y + crop, x:x + crop], size=(canvas, canvas), mode="area")[0, 0]
        bg = 0.5 + 0.6 * (bg - bg.mean())  # the clutter keeps its structure at a little less than full range
        side = int(torch.randint(56, 77, (1,), generator=gen))
        glyph = F.interpolate(scans[j][None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        top, left = (int(torch.randint(canvas - side + 1, (1,), generator=gen)) for _ in range(2))
        contrast = 0.35 + 0.35 * float(torch.rand((), generator=gen))
        sign = 1.0 if float(torch.rand((), generator=gen)) < 0.8 else -1.0  # mostly bright, some dark
        bg[top:top + side, left:left + side] += sign * contrast * glyph.clamp(0, 1)
        bg += 0.05 * torch.randn(bg.shape, generator=gen)
        images[i, 0] = (bg.clamp(0, 1) * 255).round().to(torch.uint8)
        targets[i] = labels[j]
    return images, targets


def at_size(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 scenes -> normalised float (n, 1, side, side), area-resized."""
    x = images.float() / 255
    if side != images.shape[-1]:
        x = F.interpolate(x, size=(side, side), mode="area")
    return (x - 0.5) / 0.25


# -- model, training, evaluation -------------------------------------------------------------------


def build(side: int, window: int, depths=(2, 2, 2, 2), **switches) -> swinv2.SwinTransformerV2:
    """The debug variant on grey images. ``pretrained_window_sizes`` are the training windows,
    so that a larger test window extrapolates the position bias (the coordinates stay divided by
    the training window, as the official fine-tune sets them) instead of rescaling it."""
    probe = swinv2.create_model("swinv2_debug", in_chans=1, img_size=side, window_size=window, depths=depths,
                                device="meta")
    windows = [w[0] for w, _ in probe.stage_windows()]
    return swinv2.create_model("swinv2_debug", in_chans=1, img_size=side, window_size=window, depths=depths,
                               drop_path_rate=0.1, pretrained_window_sizes=windows, **switches)


def fit(model, images, targets, side: int, epochs: int, lr: float, seed: int, batch: int = 32) -> list[float]:
    """AdamW (the official no-decay groups), linear warmup then cosine, clipping at 5, label
    smoothing 0.1, random shifts of up to 1/8 of the side; returns the mean loss of each epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    groups = param_groups(model, weight_decay=0.05)
    for g in groups:
        g.pop("names", None)
    opt = torch.optim.AdamW(groups, lr=lr)
    x_all = at_size(images, side)
    steps, pad = epochs * math.ceil(len(x_all) / batch), max(1, side // 8)
    warm, step, losses = max(1, steps // 10), 0, []
    model.train()
    for _ in range(epochs):
        order, total = torch.randperm(len(x_all), generator=gen), 0.0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            x = F.pad(x_all[idx], (pad,) * 4, mode="replicate")
            dy, dx = (int(v) for v in torch.randint(2 * pad + 1, (2,), generator=gen))
            x = x[..., dy:dy + side, dx:dx + side]  # (b, 1, side, side)
            scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
            for g in opt.param_groups:
                g["lr"] = lr * max(scale, 0.01)
            loss = F.cross_entropy(model(x), targets[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total, step = total + float(loss.detach()) * len(idx), step + 1
        losses.append(total / len(x_all))
    return losses


@torch.no_grad()
def accuracy(model, images, targets, side: int, batch: int = 200) -> float:
    model.eval()
    x = at_size(images, side)
    hits = sum(int((model(x[i:i + batch]).argmax(-1) == targets[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def at_window(model, side: int, window: int, rescale: bool = False):
    """A copy of ``model`` tested at ``side`` with ``window``: V1 tables resized bicubically
    (set_input_size). ``rescale``: CPB coordinates divided by the new window instead of the
    training one (pretrained_window_sizes 0), the other way a CPB can meet a new window."""
    cfg = dict(model.config, pretrained_window_sizes=[0] * len(model.depths)) if rescale else model.config
    copy = swinv2.SwinTransformerV2(**cfg)
    copy.load_state_dict(model.state_dict())
    copy.set_input_size(img_size=side, window_size=window)
    return copy


@torch.no_grad()
def block_amplitudes(model, x: torch.Tensor) -> list[dict]:
    """Mean and max |activation| of each block's output, the main branch (residual stream)
    the next block reads, in block order; forward hooks on every block."""
    rows, hooks = [], []
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            def hook(_module, _inputs, out, i=i, j=j):
                a = out.detach().abs().float()
                rows.append(dict(stage=i, block=j, mean=float(a.mean()), max=float(a.max())))
            hooks.append(block.register_forward_hook(hook))
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return rows


@torch.no_grad()
def attention_share(model, x: torch.Tensor) -> list[float]:
    """Per block, mean |window-attention output| / mean |block output|: how much of the main
    branch the attention (the only place position bias and window act) accounts for."""
    attn, rows = [], block_amplitudes(model, x)
    hooks = [b.attn.register_forward_hook(lambda _m, _i, out: attn.append(float(out.abs().mean())))
             for b in model.iter_blocks()]
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return [a / r["mean"] for a, r in zip(attn, rows)]


def diagnose(seed: int = 0) -> None:
    """Why a window change moves the predictions so little at this scale: one short run per
    block family, then the share of the attention per block, the logits' change at W8 and the
    fraction of changed predictions."""
    tr, va = make_scenes(1500, "train", seed), make_scenes(300, "val", seed)
    x = at_size(va[0], TRAIN[0])
    for family, (_, switches) in FAMILIES.items():
        torch.manual_seed(seed)
        model = build(*TRAIN, **switches)
        fit(model, *tr, TRAIN[0], 4, 1e-3, seed)
        with torch.no_grad():
            base, wide = model.eval()(x), at_window(model, TRAIN[0], 8).eval()(x)
        share = " ".join(f"{v:.3f}" for v in attention_share(model, x))
        top1 = float((base.argmax(-1) == va[1]).float().mean())
        changed = float((wide.argmax(-1) != base.argmax(-1)).float().mean())
        print(f"{family}: top-1 {top1:.3f}; attention / block output per block {share}; mean |logit| "
              f"{float(base.abs().mean()):.3f}, mean |change| at W8 {float((wide - base).abs().mean()):.4f}; "
              f"predictions changed {changed:.1%}")


# -- the experiments --------------------------------------------------------------------------------


def key(side: int, window: int) -> str:
    return f"{side}/W{window}"


def table1(data, seeds, epochs, ft_epochs, ft_images, trained: dict) -> dict:
    """Train each bias in each block family at 32/W4, test at each of TESTS as is and after a
    short fine-tune (``ft_epochs`` over the first ``ft_images`` training scenes at that size and
    window). ``trained``: {(Table 6 arm, seed): model} already trained with the same budget; the
    log_cpb models of both families are among them."""
    (tr_x, tr_y), (va_x, va_y) = data
    out = {family: {b: [] for b in BIASES} for family in TABLE1_FAMILIES}
    for seed in seeds:
        for family in TABLE1_FAMILIES:
            arm, switches = FAMILIES[family]
            for bias in BIASES:
                model = trained.get((arm, seed)) if bias == "log_cpb" else None
                if model is None:
                    torch.manual_seed(seed)  # the initial weights
                    model = build(*TRAIN, position_bias=bias, **switches)
                    fit(model, tr_x, tr_y, TRAIN[0], epochs, 1e-3, seed)
                row = {"seed": seed, key(*TRAIN): accuracy(model, va_x, va_y, TRAIN[0])}
                for side, window in TESTS:
                    k = key(side, window)
                    row[k] = accuracy(at_window(model, side, window), va_x, va_y, side)
                    if bias != "table":
                        row[f"{k} rescaled"] = accuracy(at_window(model, side, window, rescale=True), va_x, va_y,
                                                        side)
                    if ft_epochs:
                        tuned = at_window(model, side, window)
                        fit(tuned, tr_x[:ft_images], tr_y[:ft_images], side, ft_epochs, 3e-4, seed + 100)
                        row[f"{k} ft"] = accuracy(tuned, va_x, va_y, side)
                out[family][bias].append(row)
                print(f"table1 {family} {bias} seed {seed}: {row}", flush=True)
    return out


def table6(data, seeds, epochs, depths=(2, 2, 2, 2), arms=tuple(TABLE6), probe_images=64) -> tuple[dict, dict, dict]:
    """The ``arms`` at 32/W4 with the same budget: top-1, the mean |weight| of the LayerNorms on
    the residual branches (res-post-norm: how far the zero-initialised gains have grown), each
    model's amplitudes at initialisation and after training, and the trained models by (arm,
    seed) (for Table 1)."""
    (tr_x, tr_y), (va_x, va_y) = data
    acc, amp, models = {k: [] for k in arms}, {k: [] for k in arms}, {}
    probe = at_size(va_x[:probe_images], TRAIN[0])
    for seed in seeds:
        for name in arms:
            switches = TABLE6[name]
            torch.manual_seed(seed)  # the initial weights
            model = build(*TRAIN, depths=depths, **switches)
            init = block_amplitudes(model, probe)
            losses = fit(model, tr_x, tr_y, TRAIN[0], epochs, 1e-3, seed)
            norms = [n for b in model.iter_blocks() for n in (b.norm1, b.norm2)]
            gain = statistics.mean(float(n.weight.detach().abs().mean()) for n in norms)
            acc[name].append(dict(seed=seed, top1=accuracy(model, va_x, va_y, TRAIN[0]), last_loss=losses[-1],
                                  branch_norm_gain=gain))
            amp[name].append(dict(seed=seed, init=init, trained=block_amplitudes(model, probe)))
            print(f"depths {depths} {name} seed {seed}: top1 {acc[name][-1]['top1']:.4f}, norm gain {gain:.3f}",
                  flush=True)
            models[name, seed] = model
    return acc, amp, models


def _ms(values) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(values) -> str:
    """Mean ± sample standard deviation over seeds, in percent."""
    m, s = _ms(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    columns = [key(*TRAIN)] + [key(*t) for t in TESTS]
    fig, axes = plt.subplots(1, len(results["table1"]), figsize=(6 * len(results["table1"]), 4), squeeze=False)
    for ax, (family, biases) in zip(axes[0], results["table1"].items()):
        for bias, colour in zip(BIASES, ("C0", "C1", "C3")):
            rows = biases[bias]
            for suffix, style, label in (("", "-o", "no fine-tune"), (" ft", "--s", "fine-tuned")):
                keys = columns[:1] + [f"{c}{suffix}" for c in columns[1:]]
                if not all(k in rows[0] for k in keys):
                    continue
                m, s = zip(*(_ms(r[k] for r in rows) for k in keys))
                ax.errorbar(range(len(keys)), m, yerr=s, fmt=style, color=colour, capsize=3, label=f"{bias}, {label}")
        ax.set_xticks(range(len(columns)), columns)
        ax.set(xlabel="test image side / window", ylabel="top-1", title=f"{family}, trained at 32/W4")
        ax.legend(fontsize=8)
    fig.suptitle("Table 1 in miniature: position bias at other windows")
    fig.tight_layout()
    fig.savefig(folder / "paper-table1.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    names = list(results["table6"]["top1"])
    groups = (("depths 2-2-2-2", results["table6"]["top1"]), (f"depths {'-'.join(map(str, DEEP))}",
                                                               results["figure2"]["top1"]))
    for g, (_, arms) in enumerate(groups):
        for k, name in enumerate(names):
            if name not in arms:
                continue
            x, rows = g * (len(names) + 1) + k, arms[name]
            m, s = _ms(r["top1"] for r in rows)
            ax.bar(x, m, yerr=s, capsize=4, color=f"C{k}", alpha=0.7, label=name if g == 0 else None)
            ax.plot([x] * len(rows), [r["top1"] for r in rows], "k.")
    ax.set_xticks([g * (len(names) + 1) + 1 for g in range(len(groups))], [t for t, _ in groups])
    lo = min(r["top1"] for _, arms in groups for rows in arms.values() for r in rows)
    ax.set(ylabel="top-1", ylim=(max(0.0, lo - 0.05), None), title="Table 6 in miniature (32/W4, same budget)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "paper-table6.png", dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, amps) in zip(axes, (("depths 2-2-2-2", results["table6"]["amplitude"]),
                                        (f"depths {'-'.join(map(str, DEEP))}", results["figure2"]["amplitude"]))):
        for name, colour in zip(("pre-norm + dot (V1)", "res-post-norm + dot"), ("C3", "C0")):
            runs = amps[name]
            for stat, style in (("mean", "-"), ("max", ":")):
                curve = [statistics.mean(r["trained"][b][stat] for r in runs) for b in range(len(runs[0]["trained"]))]
                ax.plot(range(1, len(curve) + 1), curve, style, color=colour, label=f"{name.split(' +')[0]}, {stat}")
        stages = [r["stage"] for r in amps[name][0]["trained"]]
        for b in range(1, len(stages)):
            if stages[b] != stages[b - 1]:
                ax.axvline(b + 0.5, color="grey", lw=0.5)
        ax.set(yscale="log", xlabel="block", ylabel="|activation| of the block output", title=title)
        ax.legend(fontsize=8)
    fig.suptitle("Figure 2 in miniature: main-branch amplitude after training")
    fig.tight_layout()
    fig.savefig(folder / "paper-figure2.png", dpi=120)
    plt.close("all")
    return [f"docs/images/paper-{n}.png" for n in ("table1", "table6", "figure2")]


def report(results: dict, command: str, minutes: float) -> str:
    """The short CPU report: environment, command, numbers (mean ± std over seeds)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    lines = [f"# Paper claims in miniature, CPU ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `{command}`",
             f"Machine: {cpu} (shared), {results.get('threads', 1)} torch thread(s) per process; Python "
             f"{platform.python_version()}, torch {torch.__version__}; wall time {minutes:.0f} min.",
             f"Seeds {results['seeds']}; {results['train_images']} training scenes, {results['val_images']} "
             f"validation scenes; {results['epochs']} epochs at 32/W4, fine-tunes {results['ft_epochs']} epoch(s) over "
             f"{results['ft_images']} scenes at the test size and window; the deep variant {results['deep_epochs']} "
             "epochs.",
             "", "## Table 1: top-1 by test size (no fine-tune / fine-tuned; rescaled = CPB coordinates divided "
             "by the new window)", "", "| block | bias | " + " | ".join(key(*t) for t in (TRAIN, *TESTS)) + " |",
             "|---" * (len(TESTS) + 3) + "|"]
    for family, bias, rows in ((f, b, r) for f, biases in results["table1"].items() for b, r in biases.items()):
        cells = [_pct(r[key(*TRAIN)] for r in rows)]
        for test in TESTS:
            k = key(*test)
            cell = _pct(r[k] for r in rows)
            if f"{k} ft" in rows[0]:
                cell += " / " + _pct(r[f"{k} ft"] for r in rows)
            if f"{k} rescaled" in rows[0]:
                cell += f" (rescaled {100 * _ms(r[f'{k} rescaled'] for r in rows)[0]:.1f})"
            cells.append(cell)
        lines.append(f"| {family} | {bias} | " + " | ".join(cells) + " |")
    lines += ["", "## Table 6: top-1 at 32/W4 (branch gain: mean |weight| of the residual-branch LayerNorms, "
              "depths 2-2-2-2)", "", "| arm | depths 2-2-2-2 | depths " + "-".join(map(str, DEEP)) +
              " | branch gain |", "|---|---|---|---|"]
    for name, rows in results["table6"]["top1"].items():
        deep = results["figure2"]["top1"].get(name)
        gain = f"{statistics.mean(r['branch_norm_gain'] for r in rows):.3f}" if "branch_norm_gain" in rows[0] else "-"
        lines.append(f"| {name} | {_pct(r['top1'] for r in rows)} | "
                     f"{_pct(r['top1'] for r in deep) if deep else '-'} | {gain} |")
    lines += ["", "## Figure 2: mean |activation| of the last block of each stage after training; growth = last / "
              "first block of the longest stage; spread = largest / smallest block mean (the paper's discrepancy; "
              "at initialisation in brackets)", "",
              "| variant | arm | " + " | ".join(f"stage {i}" for i in range(4)) + " | growth | spread |",
              "|---" * 8 + "|"]
    for title, amps in (("2-2-2-2", results["table6"]["amplitude"]),
                        ("-".join(map(str, DEEP)), results["figure2"]["amplitude"])):
        for name, runs in amps.items():
            last = {r["stage"]: b for b, r in enumerate(runs[0]["trained"])}
            cells = [f"{statistics.mean(run['trained'][last[s]]['mean'] for run in runs):.2f}" for s in range(4)]
            shapes = [_shape(run["trained"]) for run in runs]
            init = [_shape(run["init"])[1] for run in runs if "init" in run]
            at_init = f" ({statistics.mean(init):.1f})" if init else ""
            growth, spread = (statistics.mean(v) for v in zip(*shapes))
            lines.append(f"| {title} | {name} | " + " | ".join(cells) + f" | {growth:.2f} | {spread:.1f}{at_init} |")
    return "\n".join(lines) + "\n"


def _shape(rows: list[dict]) -> tuple[float, float]:
    """(last / first block mean of the longest stage, largest / smallest block mean overall)."""
    stages = [r["stage"] for r in rows]
    longest = max(set(stages), key=stages.count)
    means = [r["mean"] for r in rows if r["stage"] == longest]
    every = [r["mean"] for r in rows]
    return means[-1] / means[0], max(every) / min(every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, fewer scenes and epochs (a few minutes)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for this tiny model)")
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="folder of the JSON and the CPU report")
    p.add_argument("--images", default=str(ROOT / "docs" / "images"), help="folder of the plots")
    p.add_argument("--diagnose", action="store_true", help="only the short check of how much the attention "
                   "carries (a minute)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="join runs of other seeds (e.g. "
                   "run in parallel with --seeds 0, --seeds 1 ...) into one JSON, report and plots")
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw the plots and write the report again "
                   "from a finished run's JSON")
    a = p.parse_args()
    if a.diagnose:
        return diagnose()
    if a.merge:
        results = _join_all([json.loads(Path(f).read_text()) for f in a.merge])
        results["command"] = " & ".join(part for part in results["command"]) + f"; then --merge {' '.join(a.merge)}"
        return _write(results, Path(a.out) / f"{time.strftime('%Y-%m-%d')}-paper-claims", Path(a.images))
    if a.replot:
        results = json.loads(Path(a.replot).read_text())
        plots(results, Path(a.images))
        Path(a.replot.removesuffix(".json") + "-cpu.md").write_text(report(
            results, results.get("command", "python benchmarks/paper_claims.py"), results["minutes"]))
        return
    torch.set_num_threads(a.threads)
    seeds = a.seeds or ([0] if a.quick else [0, 1, 2])
    n_train, n_val, epochs, ft_epochs, ft_images, deep_epochs = (
        (800, 300, 3, 1, 300, 2) if a.quick else (2000, 1000, 8, 1, 1000, 6))
    t0 = time.time()
    data = (make_scenes(n_train, "train", 0), make_scenes(n_val, "val", 0))
    results = dict(seeds=seeds, threads=a.threads, train_images=n_train, val_images=n_val, epochs=epochs,
                   ft_epochs=ft_epochs, ft_images=ft_images, deep_epochs=deep_epochs)
    top1, amp, trained = table6(data, seeds, epochs)
    results["table6"] = dict(top1=top1, amplitude=amp)
    results["table1"] = table1(data, seeds, epochs, ft_epochs, ft_images, trained)
    deep_top1, deep_amp, _ = table6(data, seeds, deep_epochs, depths=DEEP, arms=tuple(TABLE6)[:2])
    results["figure2"] = dict(depths=list(DEEP), top1=deep_top1, amplitude=deep_amp)
    minutes = (time.time() - t0) / 60
    results["minutes"] = minutes
    command = "python benchmarks/paper_claims.py" + (" --quick" if a.quick else "") + (
        f" --seeds {' '.join(map(str, seeds))}" if a.seeds else "")
    results["command"] = command
    _write(results, Path(a.out) / f"{time.strftime('%Y-%m-%d')}-paper-claims{'-quick' if a.quick else ''}",
           Path(a.images))


def _write(results: dict, stem: Path, images: Path) -> None:
    """The JSON (first: the numbers outlive a plot error), the plots and the CPU report."""
    results["plots"] = [f"docs/images/paper-{n}.png" for n in ("table1", "table6", "figure2")]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plots(results, images)
    text = report(results, results["command"], results["minutes"])
    Path(f"{stem}-cpu.md").write_text(text)
    print(text)


def _join_all(parts: list[dict]) -> dict:
    """Runs of different seeds as one: per-seed lists concatenated, equal settings kept, the
    commands listed, the wall time the longest (they ran side by side)."""
    own = ("command", "minutes", "plots")
    out = {k: v for k, v in parts[0].items() if k not in own}
    for part in parts[1:]:
        out = _join(out, {k: v for k, v in part.items() if k not in own})
    out["command"] = [p["command"] for p in parts]
    out["minutes"] = max(p["minutes"] for p in parts)
    return out


def _join(a, b):
    if a == b:
        return a
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _join(a[k], b[k]) for k in a}
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    raise ValueError(f"cannot join runs whose settings differ: {a!r} vs {b!r}")


if __name__ == "__main__":
    main()
