"""A video training step and inference at 8 x 256 x 256: Video SwinV2-T beside torchvision's
``swin3d_t`` (Video Swin V1-T), and swinv2's own Video Swin V1-T (the V1 switches).

Each case runs in a fresh subprocess (so peak memory is its own): warm-up, then the median of
``--steps`` timed steps; a training step is forward, cross-entropy, backward and AdamW on a
random clip batch; peak memory is the process's maximum resident set (ru_maxrss). Cases run
interleaved over ``--rounds`` so that machine noise falls on all alike. Writes a markdown report.

    python benchmarks/video_step.py --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

IMPLS = ("swinv2", "swinv2_v1", "torchvision")
NAMES = {"swinv2": "swinv2 Video SwinV2-T (window 8x16x16)",
         "swinv2_v1": "swinv2 Video Swin V1-T (V1 switches, window 8x7x7)",
         "torchvision": "torchvision swin3d_t (Video Swin V1-T, window 8x7x7)"}


def _build(impl: str, frames: int, size: int):
    if impl == "torchvision":
        from torchvision.models.video import swin3d_t

        return swin3d_t(num_classes=400)
    import swinv2

    name = "video_swinv2_tiny_window16_256" if impl == "swinv2" else "video_swin_tiny_patch244_window877"
    return swinv2.create_model(name, num_frames=frames, img_size=size, num_classes=400)


def run_one(impl: str, mode: str, batch: int, frames: int, size: int, steps: int, amp: str) -> dict:
    torch.manual_seed(0)
    model = _build(impl, frames, size)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, frames, size, size)
    y = torch.randint(0, 400, (batch,))
    ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")  # noqa: E731
    times = []
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model.eval()
    for i in range(steps + 2):
        t0 = time.perf_counter()
        if mode == "train":
            with ctx():
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), ctx():
                model(x)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return dict(impl=impl, mode=mode, params_m=params / 1e6, median_s=statistics.median(times), times=times,
                peak_mib=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--amp", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("--out", default="", help="folder for the dated report ('' to print only)")
    args = parser.parse_args()
    common = ["--batch", str(args.batch), "--frames", str(args.frames), "--size", str(args.size), "--steps",
              str(args.steps), "--amp", args.amp]
    if args.one:
        print(json.dumps(run_one(*args.one, args.batch, args.frames, args.size, args.steps, args.amp)))
        return
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for mode in args.modes:
            for impl in args.impls:
                proc = subprocess.run([sys.executable, __file__, "--one", impl, mode, *common], capture_output=True,
                                      text=True)
                row = (dict(impl=impl, mode=mode, error=proc.stderr.strip().splitlines()[-1]) if proc.returncode
                       else json.loads(proc.stdout.strip().splitlines()[-1]))
                results.setdefault((mode, impl), []).append(row)
                print(row, flush=True)
    lines = []
    for mode in args.modes:
        runs = {impl: [r for r in results[(mode, impl)] if "error" not in r] for impl in args.impls}
        ours = statistics.median(t for r in runs.get("swinv2", []) for t in r["times"]) if runs.get("swinv2") else None
        for impl in args.impls:
            if not runs[impl]:
                error = results[(mode, impl)][0]["error"][:120]
                lines.append(f"| {mode} | {NAMES[impl]} | - | fails: {error} | - | - |")
                continue
            med = statistics.median(t for r in runs[impl] for t in r["times"])
            peak = statistics.median(r["peak_mib"] for r in runs[impl])
            ratio = f"{med / ours:.2f}x" if ours else "-"
            lines.append(f"| {mode} | {NAMES[impl]} | {runs[impl][0]['params_m']:.1f}M | {med:.2f} s | {ratio} | "
                         f"{peak:.0f} MiB |")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = ", native bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else ""
    report = "\n".join([
        f"# Video step at {args.frames}x{args.size}x{args.size} on a CPU ({time.strftime('%Y-%m-%d')})", "",
        f"Command: `python benchmarks/video_step.py --batch {args.batch} --frames {args.frames} --size {args.size} "
        f"--steps {args.steps} --rounds {args.rounds} --amp {args.amp}`",
        f"Machine: {cpu} ({isa}{bf16}), {torch.get_num_threads()} threads; torch {torch.__version__}. Median of "
        f"{args.steps} steps x {args.rounds} interleaved rounds, each case in its own process; peak resident memory "
        "of that process (median over rounds). Batch of random clips, 400 classes.", "",
        "| mode | implementation | parameters | median | time / swinv2 V2-T's | peak resident memory |",
        "|---|---|---|---|---|---|", *lines, ""])
    print(report)
    if args.out:
        path = Path(args.out) / f"{time.strftime('%Y-%m-%d')}-video-step-cpu.md"
        path.write_text(report)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
