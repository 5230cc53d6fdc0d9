"""``swinv2 list``, ``swinv2 pretrained`` and ``swinv2 forward``: the models and weights there are."""

from __future__ import annotations

import json
import math
import statistics
import sys

import torch

from .. import bench, hub
from ..variants import count_parameters, create_model, get_variant, list_models, variant_table
from ..weights import get_pretrained, list_pretrained
from .common import check_model_size, parse_size, positive_int, size_overrides, window_arg


def add_parsers(sub) -> None:
    p = sub.add_parser("list", help="the model variants: parameters, GFLOPs, image size, windows")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. '*base*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("forward", help="build a model and run a forward pass at any input size")
    p.add_argument("--model", default="swinv2_tiny_window8_256", choices=list_models(), metavar="NAME")
    p.add_argument("--img-size", type=parse_size, default=None, help="N or HxW (a multiple of the patch size)")
    p.add_argument("--window", type=window_arg, default=None, help="window size (default: the variant's)")
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("pretrained", help="the released weights that create_model(pretrained=True) knows")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. '*base*'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pretrained)


def cmd_list(args) -> int:
    names = set(list_models(args.pattern))
    rows = [r for r in variant_table() if r["name"] in names]
    if not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<36} {'params':>9} {'GFLOPs':>8} {'image':>6} {'window':>8}  {'pretrained windows':<18} classes"
    print(header)
    print("-" * len(header))
    for r in rows:
        pws = ",".join(map(str, r["pretrained_windows"])) if any(r["pretrained_windows"]) else "-"
        params = f"{r['params_m']:.2f}M" if r["params_m"] < 1000 else f"{r['params_m'] / 1000:.2f}B"
        window = "x".join(map(str, r["window"])) if isinstance(r["window"], (tuple, list)) else r["window"]
        image = f"{r['num_frames']}x{r['img_size']}" if r.get("num_frames") else r["img_size"]
        print(f"{r['name']:<36} {params:>9} {r['gflops']:>8.2f} {image:>6} {window:>8}  "
              f"{pws:<18} {r['num_classes']}")
    return 0


def cmd_forward(args) -> int:
    if get_variant(args.model).is_video:
        raise ValueError(f"forward times image models; {args.model} is a video model (its cost: swinv2 list "
                         f"{args.model}; its memory: swinv2 memory --model {args.model})")
    model = create_model(args.model, **size_overrides(window=args.window)).eval()
    size = args.img_size or model.img_size
    check_model_size(model, size)
    print(f"{args.model}: {count_parameters(model) / 1e6:.2f}M parameters, input {size[0]}x{size[1]}, "
          f"{model.flops(size) / 1e9:.2f} GFLOPs per image")
    for i, (res, (win, shift)) in enumerate(zip(model.stage_resolutions(size), model.stage_windows(size))):
        padded = tuple(math.ceil(r / w) * w for r, w in zip(res, win))
        note = f", padded to {padded[0]}x{padded[1]} (padding masked)" if padded != res else ""
        print(f"  stage {i}: map {res[0]}x{res[1]}, window {win[0]}x{win[1]}, shift {shift[0]},{shift[1]}{note}")
    torch.manual_seed(0)
    logits, times = bench.forward_times(model, torch.randn(args.batch_size, model.in_chans, *size), args.repeats)
    median = statistics.median(times)
    print(f"logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}; "
          f"median {median * 1e3:.1f} ms per batch of {args.batch_size} ({args.batch_size / median:.1f} img/s, "
          f"{torch.get_num_threads()} threads)")
    return 0


def cmd_pretrained(args) -> int:
    weights = [get_pretrained(n) for n in list_pretrained(args.pattern)]
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
