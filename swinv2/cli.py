"""The ``swinv2`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time

import torch

from .bench import IMPLS
from .hub import DownloadError
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
    if args.malloc == "keep" and not args.device.startswith("cuda"):
        from .runtime import keep_freed_memory

        kept = keep_freed_memory()
        env["allocator"] = ("glibc, freed memory kept in the process for every implementation"
                            " (swinv2.runtime.keep_freed_memory)" if kept else "not glibc: left as it is")
    else:
        env["allocator"] = "as the system sets it"
    kernels = {"fp32": bench.matmul_rates(torch.float32, args.device)}
    if "bf16" in args.dtype:
        kernels["bf16"] = bench.matmul_rates(torch.bfloat16, args.device)
    rates = {k: max(v.values()) for k, v in kernels.items()}
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
    text = bench.report_markdown(env, command, rows, rates, kernels)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"{args.model}-{args.device.split(':')[0]}"
        day, hhmm = env["date"][:10], env["date"][11:16].replace(":", "")
        stem, n = os.path.join(args.out, f"{day}-{name}"), 1
        while os.path.exists(stem + ".md") or os.path.exists(stem + ".json"):  # keep earlier reports
            n += 1
            stem = os.path.join(args.out, f"{day}-{hhmm}{'' if n == 2 else f'-{n - 1}'}-{name}")
        with open(stem + ".md", "w") as f:
            f.write(text)
        with open(stem + ".json", "w") as f:
            json.dump(dict(environment=env, command=command, matmul_rate=rates, matmul_kernels=kernels, rows=rows),
                      f, indent=1)
        print(f"report: {stem}.md")
    else:
        print(text)
    return 0


def cmd_convert(args) -> int:
    from . import convert, hub
    from .hf_folder import class_names, load_hf_folder, read_hf_config, save_hf_folder
    from .loading import DERIVED_BUFFERS, read_state_dict

    names = None  # class names, carried between swinv2 files and Hugging Face folders
    if os.path.isdir(args.input):
        model = load_hf_folder(args.input)
        state, fmt = model.state_dict(), "hf folder"
        names = class_names(read_hf_config(args.input))
    elif hub.is_swinv2_file(args.input):
        model = hub.load_model(args.input)
        state, fmt = model.state_dict(), "swinv2"
        meta = hub.read_metadata(args.input)
        names = json.loads(meta["class_names"]) if meta.get("class_names") else None
    else:
        state = read_state_dict(args.input)
        fmt = args.from_format or convert.detect_format(state)
        state, notes = convert.to_official(state, fmt)
        for note in notes:
            print(f"note: {note}")
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}
        model = None
    print(f"read {args.input}: {fmt} layout, {len(state)} tensors")
    hf_folder = args.to == "hf" and (os.path.isdir(args.output) or not os.path.splitext(args.output)[1])
    if args.to == "swinv2" or hf_folder:
        if model is None:
            if not args.model:
                raise ValueError(f"--to {args.to} {'(a folder) ' if hf_folder else ''}needs --model NAME "
                                 "(the architecture the weights belong to)")
            num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
            model = create_model(args.model, num_classes=num_classes, **_size_overrides(args))
            from .loading import load_pretrained

            load_pretrained(model, state)
        if hf_folder:
            save_hf_folder(model, args.output, class_names=names)
            print(f"wrote {args.output}: Hugging Face folder (config.json, model.safetensors)")
            return 0
        meta = {"class_names": json.dumps(names)} if names else None
        hub.save_pretrained(model, args.output, metadata=meta)
    else:
        out = convert.from_official(state, args.to)
        if args.output.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in out.items()}, args.output)
        else:
            torch.save({"model": out} if args.to == "official" else out, args.output)
    print(f"wrote {args.output}: {args.to} layout")
    return 0


def _size_overrides(args) -> dict:
    out = {}
    if getattr(args, "img_size", None):
        out["img_size"] = args.img_size
    if getattr(args, "window", None):
        out["window_size"] = args.window
    return out


def cmd_pretrained(args) -> int:
    from . import hub

    weights = [hub.get_pretrained(n) for n in hub.list_pretrained(args.pattern)]
    if args.json:
        print(json.dumps([w.as_dict() for w in weights], indent=2))
        return 0
    print(f"{'weights':<52} {'image':>5} {'window':>6} {'classes':>7} {'top-1':>6}  eval crop")
    for w in weights:
        top1 = f"{w.top1:.1f}" if w.top1 else "-"
        crop = f"resize {w.resize_size}, crop {w.img_size}" if w.crop_mode == "center" else f"resize {w.img_size}"
        print(f"{w.name:<52} {w.img_size:>5} {w.window_size:>6} {w.num_classes:>7} {top1:>6}  {crop}")
    print(f"cache: {hub.get_cache_dir()}")
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

    p = sub.add_parser("convert", help="convert a checkpoint between layouts (official, timm, hf, ...)")
    p.add_argument("input", help="checkpoint in any known layout (detected), or a Hugging Face model folder")
    p.add_argument("output", help=".safetensors or .pth; with --to hf, a folder (a path without an extension, "
                   "or an existing folder) gets config.json + model.safetensors for from_pretrained")
    p.add_argument("--to", required=True, choices=["swinv2", "official", "timm", "hf", "torchvision", "mmpretrain"])
    p.add_argument("--from", dest="from_format", default=None, help="input layout (default: detect)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="architecture, needed for --to swinv2 and an hf folder unless the input says it")
    p.add_argument("--img-size", type=_size, default=None, help="with --model: the model's image size")
    p.add_argument("--window", type=int, default=None, help="with --model: the model's window")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("pretrained", help="the released weights that create_model(pretrained=True) knows")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. '*base*'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pretrained)

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
    p.add_argument("--malloc", choices=["system", "keep"], default="system",
                   help="CPU: 'system' (default) leaves the allocator as it is, as users run; 'keep' makes glibc "
                        "keep freed memory for reuse, for every implementation alike, so that steps are not timed "
                        "re-faulting their activations page by page (swinv2.runtime)")
    p.add_argument("--out", default="benchmarks", help="folder for the dated report ('' to print only)")
    p.set_defaults(func=cmd_bench)

    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if not name.startswith(err.name or "\0"):
                raise
            continue
        module.register(sub)
    return parser


# Modules that add their own subcommands through ``register(subparsers)``; each sets ``func``.
_SUBCOMMAND_MODULES = ("swinv2.predict", "swinv2.export", "swinv2.memory", "swinv2.tasks.cli", "swinv2.reconstruct")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, DownloadError) as err:  # incl. checkpoint errors
        print(f"swinv2: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
