"""``swinv2 bench`` and ``swinv2 memory``: speed beside the peer implementations, training memory."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import bench, fileio, memory
from ..train.distributed import check_device
from ..variants import get_variant, list_models
from .common import non_negative_int, parse_side, positive_float, positive_int, window_arg

try:  # a speedup of swinv2.fast, a package of its own: without it --malloc keep is unavailable
    from ..fast.allocator import keep_freed_memory
except ModuleNotFoundError as missing:
    if not (missing.name or "").startswith("swinv2.fast"):
        raise
    keep_freed_memory = None

COMPILE = {"off": (False,), "on": (True,), "both": (False, True)}


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="throughput and memory against timm, torchvision and transformers")
    p.add_argument("--model", default="swinv2_tiny_window8_256", choices=list_models(), metavar="NAME")
    p.add_argument("--img-size", type=parse_side, default=256)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer"])
    p.add_argument("--compile", choices=list(COMPILE), default="off", help="torch.compile every model")
    p.add_argument("--impls", nargs="+", default=list(bench.IMPLS), choices=list(bench.IMPLS))
    p.add_argument("--rounds", type=positive_int, default=7, help="timed iterations per implementation")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (one subprocess each)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--malloc", choices=["system", "keep"], default="system",
                   help="CPU: 'system' (default) leaves the allocator as it is, as users run; 'keep' makes glibc "
                        "keep freed memory for reuse, for every implementation alike, so that steps are not timed "
                        "re-faulting their activations page by page (swinv2.fast.allocator)")
    p.add_argument("--native", action="store_true",
                   help="also use swinv2's native attention kernel (opt-in: compiles C code on this machine)")
    p.add_argument("--out", default="benchmarks", help="folder for the dated report ('' to print only)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("memory", help="estimate (and optionally measure) training memory")
    p.add_argument("--model", default="swinv2_tiny_window8_256", metavar="NAME")
    p.add_argument("--img-size", type=parse_side, default=None)
    p.add_argument("--window", type=_window_sides, default=None, metavar="N|TxHxW",
                   help="window size; for a video model N or time x height x width")
    p.add_argument("--frames", type=positive_int, default=None, metavar="T",
                   help="clip length of a video model (default: the variant's)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--dtype", choices=sorted(memory.DTYPES), default="fp32", help="bf16/fp16: autocast")
    p.add_argument("--checkpointing", nargs="*", type=non_negative_int, default=None, metavar="STAGE",
                   help="activation checkpointing (no stages: all)")
    p.add_argument("--sequential", nargs="*", type=non_negative_int, default=None, metavar="STAGE",
                   help="sequential attention (no stages: all)")
    p.add_argument("--chunk", type=positive_int, default=None,
                   help="windows per sequential chunk (default: from budget)")
    p.add_argument("--budget-mb", type=positive_float, default=None, help="sequential attention score budget (MiB)")
    p.add_argument("--optimizer", choices=sorted(memory.OPTIMIZER_STATES), default="adamw")
    p.add_argument("--zero", type=positive_int, default=1, help="ZeRO-1 world size (shards optimizer states)")
    p.add_argument("--fsdp", type=positive_int, default=1, help="FSDP world size (shards weights, grads, states)")
    p.add_argument("--measure", action="store_true", help="also run real training steps and measure peak RSS")
    p.set_defaults(func=cmd_memory)


def cmd_bench(args) -> int:
    check_device(args.device)
    if args.out:
        fileio.check_writable(args.out, "--out", folder=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.native:  # opt-in; the environment variable reaches the memory subprocesses too
        os.environ["SWINV2_NATIVE"] = "1"
    env = bench.environment(args.device)
    env["allocator"] = _allocator(args.malloc, args.device)
    rates, kernels = bench.machine_rates(args.dtype, args.device)
    print("matmul rate: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    cases = [bench.Case(args.model, args.img_size, args.batch_size, dtype, mode, compiled, args.device)
             for mode in args.mode for dtype in args.dtype for compiled in COMPILE[args.compile]]
    rows = []
    for case in cases:
        print(case.label())
        rows.append(bench.run_case(case, args.impls, args.rounds, memory=args.memory))
        ref = rows[-1]["results"].get("swinv2")
        for impl, r in rows[-1]["results"].items():
            ratio = f", x{r['median_s'] / ref['median_s']:.2f} swinv2" if ref else ""
            print(f"  {impl:<13} {r['images_per_s']:8.1f} img/s{ratio}")
    command = "swinv2 " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "swinv2 bench"
    if args.out:
        print(f"report: {bench.save_report(args.out, env, command, rows, rates, kernels)}.md")
    else:
        print(bench.report_markdown(env, command, rows, rates, kernels))
    return 0


def _allocator(malloc: str, device: str) -> str:
    """``--malloc keep`` applied (on a CPU), and the report's line saying what the allocator did."""
    if malloc != "keep" or device.startswith("cuda"):
        return "as the system sets it"
    if keep_freed_memory is None:
        raise ValueError("--malloc keep needs swinv2.fast, which is not installed here")
    if keep_freed_memory():
        return ("glibc, freed memory kept in the process for every implementation "
                "(swinv2.fast.allocator.keep_freed_memory)")
    return "not glibc: left as it is"


def _window_sides(text: str) -> int | tuple[int, int, int]:
    """``--window``: one side (N) for every axis, or a video window's time x height x width."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        return window_arg(text)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected N or TxHxW (time x height x width), got {text!r}")
    return tuple(window_arg(p) for p in parts)


def cmd_memory(args) -> int:
    ckpt, seq = _stages(args.checkpointing), _stages(args.sequential)
    video = get_variant(args.model).is_video
    if args.frames is not None and not video:
        raise ValueError(f"--frames is for video models; {args.model} is an image model")
    if isinstance(args.window, tuple) and not video:
        raise ValueError(f"--window {'x'.join(map(str, args.window))} has three sides (time x height x width); "
                         f"{args.model} is an image model: give one number")
    settings = dict(img_size=args.img_size, window=args.window, batch_size=args.batch_size, dtype=args.dtype,
                    grad_checkpointing=ckpt, sequential_attention=seq, chunk_windows=args.chunk,
                    memory_budget_mb=args.budget_mb, optimizer=args.optimizer, num_frames=args.frames)
    est = memory.estimate_training_memory(args.model, **settings, zero_world_size=args.zero,
                                          fsdp_world_size=args.fsdp)
    chunks = f", {args.chunk} windows per chunk" if seq is not False and args.chunk else ""
    frames = f"{est.case['num_frames']} frames x " if video else ""
    window = "x".join(map(str, est.case["window"]))
    print(f"{args.model}: {est.num_params / 1e6:.2f}M parameters, {frames}{est.case['img_size'][0]}px, "
          f"window {window}, batch {args.batch_size}, {args.dtype}, "
          f"checkpointing {ckpt or 'off'}, sequential attention {seq or 'off'}{chunks}")
    if video:
        maps = ", ".join("x".join(map(str, m)) for m in est.case["token_maps"])
        print(f"token maps (T' x H' x W') per stage: {maps}")
    print(est.table())
    if args.measure:
        sharded = args.zero > 1 or args.fsdp > 1
        if sharded:
            print("--measure runs one process: the measured number is unsharded", file=sys.stderr)
            est = memory.estimate_training_memory(args.model, **settings)
        measured = memory.measure_training_memory(args.model, est.case["img_size"][0], args.window, args.batch_size,
                                                  args.dtype, ckpt, est.case["sequential_attention"] or False,
                                                  num_frames=args.frames)
        print(f"measured peak RSS increase: {measured / memory.MiB:.1f} MiB; predicted {est.peak / memory.MiB:.1f} "
              f"MiB ({(est.peak - measured) / measured:+.1%})")
    return 0


def _stages(values: list[int] | None) -> bool | list[int]:
    """A stage-list flag: absent -> False (off); given alone -> True (all stages); else the stages."""
    if values is None:
        return False
    return True if len(values) == 0 else list(values)
