"""The ``swinv2`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from .bench import IMPLS
from .layers import to_2tuple
from .variants import count_parameters, create_model, list_models, variant_table


def _size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '320x448' -> (320, 448)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
        return to_2tuple(parts[0] if len(parts) == 1 else parts)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None


def cmd_list(args) -> int:
    rows = [r for r in variant_table() if r["name"] in set(list_models(args.pattern))]
    if not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<36} {'params':>9} {'GFLOPs':>8} {'image':>6} {'window':>6}  {'pretrained windows':<18} classes"
    print(header)
    print("-" * len(header))
    for r in rows:
        pws = ",".join(map(str, r["pretrained_windows"])) if any(r["pretrained_windows"]) else "-"
        params = f"{r['params_m']:.2f}M" if r["params_m"] < 1000 else f"{r['params_m'] / 1000:.2f}B"
        print(
            f"{r['name']:<36} {params:>9} {r['gflops']:>8.2f} {r['img_size']:>6} {r['window']:>6}  "
            f"{pws:<18} {r['num_classes']}"
        )
    return 0


def cmd_forward(args) -> int:
    overrides = {}
    if args.window is not None:
        overrides["window_size"] = args.window
    model = create_model(args.model, **overrides).eval()
    size = args.img_size or model.img_size
    print(f"{args.model}: {count_parameters(model) / 1e6:.2f}M parameters, input {size[0]}x{size[1]}, "
          f"{model.flops(size) / 1e9:.2f} GFLOPs per image")
    for i, (res, (win, shift)) in enumerate(zip(model.stage_resolutions(size), model.stage_windows(size))):
        padded = tuple(math.ceil(r / w) * w for r, w in zip(res, win))
        note = f", padded to {padded[0]}x{padded[1]} (padding masked)" if padded != res else ""
        print(f"  stage {i}: map {res[0]}x{res[1]}, window {win[0]}x{win[1]}, shift {shift[0]},{shift[1]}{note}")
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, model.in_chans, *size)
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            logits = model(x)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(f"logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}; "
          f"median {median * 1e3:.1f} ms per batch of {args.batch_size} ({args.batch_size / median:.1f} img/s, "
          f"{torch.get_num_threads()} threads)")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    env = bench.environment(args.device)
    rates = {"fp32": bench.matmul_rate(torch.float32, args.device)}
    if "bf16" in args.dtype:
        rates["bf16"] = bench.matmul_rate(torch.bfloat16, args.device)
    print("matmul rate: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    rows = []
    for mode in args.mode:
        for dtype in args.dtype:
            for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
                case = bench.Case(args.model, args.img_size, args.batch_size, dtype, mode, compiled, args.device)
                print(case.label())
                row = dict(case=vars(case), label=case.label(), **bench.run_speed(case, args.impls, args.rounds))
                if args.memory:
                    row["memory"] = {impl: bench.peak_memory(case, impl) for impl in row["results"]}
                ref = row["results"].get("swinv2")
                for impl, r in row["results"].items():
                    ratio = f", x{r['median_s'] / ref['median_s']:.2f} swinv2" if ref else ""
                    print(f"  {impl:<13} {r['images_per_s']:8.1f} img/s{ratio}")
                rows.append(row)
    command = "swinv2 " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "swinv2 bench"
    text = bench.report_markdown(env, command, rows, rates)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"{env['date'][:10]}-{args.model}-{args.device.split(':')[0]}")
        with open(stem + ".md", "w") as f:
            f.write(text)
        with open(stem + ".json", "w") as f:
            json.dump(dict(environment=env, command=command, matmul_rate=rates, rows=rows), f, indent=1)
        print(f"report: {stem}.md")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinv2", description="Swin Transformer V2 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="the model variants: parameters, GFLOPs, image size, windows")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. '*base*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("forward", help="build a model and run a forward pass at any input size")
    p.add_argument("--model", default="swinv2_tiny_window8_256", choices=list_models(), metavar="NAME")
    p.add_argument("--img-size", type=_size, default=None, help="N or HxW (a multiple of the patch size)")
    p.add_argument("--window", type=int, default=None, help="window size (default: the variant's)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("bench", help="throughput and memory against timm, torchvision and transformers")
    p.add_argument("--model", default="swinv2_tiny_window8_256", choices=list_models(), metavar="NAME")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer"])
    p.add_argument("--compile", choices=["off", "on", "both"], default="off", help="torch.compile every model")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--rounds", type=int, default=7, help="timed iterations per implementation")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (one subprocess each)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks", help="folder for the dated report ('' to print only)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"swinv2: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
