"""The ``swinv2`` command line."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch

from . import fileio
from .bench import IMPLS
from .hub import DownloadError
from .train.config import MAX_IMG_SIZE
from .variants import count_parameters, create_model, list_models, variant_table

# -- optional dependencies -------------------------------------------------------------------

# The optional dependencies: import name -> (pip name, the extra of pyproject.toml that installs it).
OPTIONAL = {
    "timm": ("timm", "train"),
    "yaml": ("pyyaml", "train"),
    "sklearn": ("scikit-learn", "train"),
    "tensorboard": ("tensorboard", "train"),
    "matplotlib": ("matplotlib", "train"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "onnxscript": ("onnxscript", "export"),
    "deepspeed": ("deepspeed", "deepspeed"),
}


class MissingExtraError(Exception):
    """A command needs an optional dependency that is not installed; the message says which extra."""


def missing_extra(command: str, module: str, reason: str = "") -> MissingExtraError:
    name, extra = OPTIONAL[module]
    return MissingExtraError(f"swinv2 {command} needs {name}{' ' + reason if reason else ''} "
                             f"(pip install 'swinv2[{extra}]')")


def require(command: str, *modules: str, reason: str = "") -> None:
    """Fail with one line naming the extra to install when one of ``modules`` (import names,
    keys of OPTIONAL) is not installed: before the command does any work."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise missing_extra(command, module, reason)


def _missing_optional(err: ModuleNotFoundError) -> str | None:
    """The optional dependency whose absence raised ``err``, or None (a missing core module, or
    a submodule of an installed package, is a bug to show in full)."""
    top = (err.name or "").partition(".")[0]
    if top in OPTIONAL and importlib.util.find_spec(top) is None:
        return top
    return None


# -- argument types ----------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """An image size flag: '256' -> (256, 256); '320x448' -> (320, 448); every side 1 to
    MAX_IMG_SIZE (whether it suits the model, a multiple of its patch size, is checked once the
    model is known: :func:`check_model_size`)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    size = (parts[0], parts[-1])
    if not all(1 <= s <= MAX_IMG_SIZE for s in size):
        raise argparse.ArgumentTypeError(f"each side must be 1 to {MAX_IMG_SIZE} pixels, got {text!r} (the paper's "
                                         "largest input is 1536)")
    return size


def parse_side(text: str) -> int:
    """A square image size flag (one number), bounded as :func:`parse_size`."""
    h, w = parse_size(text)
    if "x" in text.lower() and h != w:
        raise argparse.ArgumentTypeError(f"expected one number (a square size), got {text!r}")
    return h


def _integer(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def window_arg(text: str) -> int:
    """A window size: 1 to MAX_IMG_SIZE (a window larger than a feature map is cut to the map)."""
    value = positive_int(text)
    if value > MAX_IMG_SIZE:
        raise argparse.ArgumentTypeError(f"expected a window of 1 to {MAX_IMG_SIZE}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A fraction in (0, 1], such as a centre-crop fraction."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def check_model_size(model, size: tuple[int, int], flag: str = "--img-size") -> None:
    """A one-line error when ``size`` does not suit ``model``: every side a multiple of its patch size."""
    ph, pw = model.patch_size
    if size[0] % ph or size[1] % pw:
        fit = (max(ph, size[0] // ph * ph), max(pw, size[1] // pw * pw))
        raise ValueError(f"{flag} {size[0]}x{size[1]} is not a multiple of the patch size {ph}x{pw} "
                         f"(e.g. {fit[0]}x{fit[1]})")


# -- output files ------------------------------------------------------------------------------


def _describe_os_error(err: OSError) -> str:
    """One line: the path(s) and the system's reason, without the errno decoration."""
    if err.strerror and err.filename is not None:
        where = os.fsdecode(err.filename)
        if err.filename2 is not None:
            where += f" -> {os.fsdecode(err.filename2)}"
        return f"{where}: {err.strerror}"
    return str(err) or type(err).__name__


# -- commands ----------------------------------------------------------------------------------


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
    from .train.distributed import check_device

    check_device(args.device)
    if args.out:
        fileio.check_writable(args.out, "--out", folder=True)
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
        fileio.write_text(stem + ".md", text)
        fileio.write_text(stem + ".json", json.dumps(
            dict(environment=env, command=command, matmul_rate=rates, matmul_kernels=kernels, rows=rows), indent=1))
        print(f"report: {stem}.md")
    else:
        print(text)
    return 0


def cmd_convert(args) -> int:
    from . import convert, hub
    from .hf_folder import class_names, read_hf_config, save_hf_folder
    from .loading import DERIVED_BUFFERS, load_hf_folder, load_model, warn_nonfinite
    from .reading import read_state_dict

    if not os.path.exists(args.input):
        raise FileNotFoundError(f"no such checkpoint file or folder: {args.input}")
    hf_folder = args.to == "hf" and (os.path.isdir(args.output) or not os.path.splitext(args.output)[1])
    _check_convert_output(args.output, hf_folder, args.force)
    names = None  # class names, carried between swinv2 files and Hugging Face folders
    if os.path.isdir(args.input):
        _check_from(args, "hf", "a Hugging Face folder")
        model = load_hf_folder(args.input)
        state, fmt = model.state_dict(), "hf folder"
        names = class_names(read_hf_config(args.input))
    elif hub.is_swinv2_file(args.input):
        _check_from(args, "swinv2", "a swinv2 file")
        model = load_model(args.input)
        state, fmt = model.state_dict(), "swinv2"
        meta = hub.read_metadata(args.input)
        names = json.loads(meta["class_names"]) if meta.get("class_names") else None
    else:
        state = read_state_dict(args.input)
        warn_nonfinite(state, args.input)  # copied as they are, but said
        fmt = _input_layout(args, state)
        state, notes = convert.to_official(state, fmt)
        for note in notes:
            print(f"note: {note}")
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}
        model = None
    print(f"read {args.input}: {fmt} layout, {len(state)} tensors")
    if args.to == "swinv2" or hf_folder:
        if model is None:
            if not args.model:
                raise ValueError(f"--to {args.to} {'(a folder) ' if hf_folder else ''}needs --model NAME "
                                 "(the architecture the weights belong to)")
            num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
            model = create_model(args.model, num_classes=num_classes, **_size_overrides(args))
            from .loading import NonFiniteWeightsWarning, load_pretrained

            with warnings.catch_warnings():  # NaN or inf in the weights: said once, when the file was read
                warnings.simplefilter("ignore", NonFiniteWeightsWarning)
                load_pretrained(model, state)
        if hf_folder:
            save_hf_folder(model, args.output, class_names=names)  # written beside it, then renamed into place
            print(f"wrote {args.output}: Hugging Face folder (config.json, model.safetensors)")
            return 0
        meta = {"class_names": json.dumps(names)} if names else None
        hub.save_pretrained(model, args.output, metadata=meta)  # atomic
    else:
        out = convert.from_official(state, args.to)
        # Serialised in memory and written with plain file writes, so that a full disk is an
        # OSError naming the file (torch's own writer reports it as an 'unexpected pos').
        if args.output.endswith(".safetensors"):
            from safetensors.torch import save

            data = save({k: v.contiguous() for k, v in out.items()})
        else:
            buffer = io.BytesIO()
            torch.save({"model": out} if args.to == "official" else out, buffer)
            data = buffer.getbuffer()
        fileio.write_bytes(args.output, data)  # atomic
    print(f"wrote {args.output}: {args.to} layout")
    return 0


# Layouts that name the weights alike: official checkpoints carry derived buffers that swinv2's own
# state dicts leave out, so a buffer-less official file reads as 'swinv2'.
_SAME_LAYOUT = ({"official", "swinv2"},)


def _same_layout(a: str, b: str) -> bool:
    return a == b or any(a in group and b in group for group in _SAME_LAYOUT)


def _check_from(args, detected: str, what: str) -> None:
    if args.from_format and not _same_layout(args.from_format, detected):
        raise ValueError(f"--from {args.from_format} does not match {args.input}: it is {what} ({detected} layout)")


def _input_layout(args, state) -> str:
    """The layout of a state dict: detected, and checked against ``--from`` when given; ``--from``
    alone decides only when detection finds no known layout."""
    from .convert import UnknownFormatError, detect_format

    try:
        detected = detect_format(state)
    except UnknownFormatError:
        if args.from_format is None:
            raise
        return args.from_format
    if args.from_format is None:
        return detected
    if not _same_layout(args.from_format, detected):
        raise ValueError(f"--from {args.from_format} does not match {args.input}: its keys are in the {detected} "
                         "layout (leave out --from to use it)")
    return args.from_format


def _check_convert_output(output: str, folder: bool, force: bool) -> None:
    """Before any reading: an existing output is replaced only with ``--force`` (an empty folder
    for a Hugging Face folder is fine), and the place must be writable."""
    fileio.check_writable(output, "output", folder=folder)
    if not os.path.lexists(output) or force:
        return
    if folder and os.path.isdir(output) and not any(os.scandir(output)):
        return
    raise FileExistsError(f"{output} exists: add --force to replace it (or choose another output)")


def _size_overrides(args) -> dict:
    out = {}
    if getattr(args, "img_size", None) is not None:
        out["img_size"] = args.img_size
    if getattr(args, "window", None) is not None:
        out["window_size"] = args.window
    return out


def cmd_pretrained(args) -> int:
    from . import hub
    from .weights import get_pretrained, list_pretrained

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


class _UsageError(Exception):
    """A command line argparse refuses; main() prints it as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported as one line (exit code 2) instead of the usage text."""

    def error(self, message):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    from .convert import FORMATS as LAYOUTS

    parser = _Parser(prog="swinv2", description="Swin Transformer V2 models.")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("convert", help="convert a checkpoint between layouts (official, timm, hf, ...)")
    p.add_argument("input", help="checkpoint in any known layout (detected), or a Hugging Face model folder")
    p.add_argument("output", help=".safetensors or .pth; with --to hf, a folder (a path without an extension, "
                   "or an existing folder) gets config.json + model.safetensors for from_pretrained")
    p.add_argument("--to", required=True, choices=["swinv2", "official", "timm", "hf", "torchvision", "mmpretrain"])
    p.add_argument("--from", dest="from_format", default=None, choices=list(LAYOUTS),
                   help="input layout (default: detected; when given, it must match what is detected)")
    p.add_argument("--force", action="store_true", help="replace an existing output file or folder")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="architecture, needed for --to swinv2 and an hf folder unless the input says it")
    p.add_argument("--img-size", type=parse_size, default=None, help="with --model: the model's image size")
    p.add_argument("--window", type=window_arg, default=None, help="with --model: the model's window")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("pretrained", help="the released weights that create_model(pretrained=True) knows")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. '*base*'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pretrained)

    p = sub.add_parser("bench", help="throughput and memory against timm, torchvision and transformers")
    p.add_argument("--model", default="swinv2_tiny_window8_256", choices=list_models(), metavar="NAME")
    p.add_argument("--img-size", type=parse_side, default=256)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer"])
    p.add_argument("--compile", choices=["off", "on", "both"], default="off", help="torch.compile every model")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--rounds", type=positive_int, default=7, help="timed iterations per implementation")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (one subprocess each)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--malloc", choices=["system", "keep"], default="system",
                   help="CPU: 'system' (default) leaves the allocator as it is, as users run; 'keep' makes glibc "
                        "keep freed memory for reuse, for every implementation alike, so that steps are not timed "
                        "re-faulting their activations page by page (swinv2.runtime)")
    p.add_argument("--out", default="benchmarks", help="folder for the dated report ('' to print only)")
    p.set_defaults(func=cmd_bench)

    for name, commands in _SUBCOMMAND_MODULES.items():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            missing = _missing_optional(err)
            if missing is None:
                raise
            for command in commands:
                _unavailable(sub, command, missing)
            continue
        module.register(sub)
    return parser


# Modules that add their own subcommands through ``register(subparsers)`` (each sets ``func``), and
# the commands each adds: named here so that --help lists them even where a module cannot load.
_SUBCOMMAND_MODULES = {
    "swinv2.predict": ("predict",),
    "swinv2.export": ("export",),
    "swinv2.memory": ("memory",),
    "swinv2.tasks.cli": ("train", "finetune", "pretrain", "eval"),
    "swinv2.reconstruct": ("reconstruct",),
}


def _unavailable(sub, command: str, module: str) -> None:
    """A stand-in for a subcommand whose module needs ``module``, not installed: listed by --help,
    it takes any arguments and says which extra to install."""
    name, extra = OPTIONAL[module]
    p = sub.add_parser(command, help=f"(needs {name}: pip install 'swinv2[{extra}]')", add_help=False,
                       prefix_chars="\0")  # no options: every argument lands in 'rest'
    p.add_argument("rest", nargs="*")

    def run(args):
        raise missing_extra(command, module)

    p.set_defaults(func=run)


# Optional modules a command needs whatever its arguments, checked before it starts (commands
# whose needs depend on their arguments check them themselves, with ``require``).
_NEEDS = {"reconstruct": ("matplotlib",)}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as err:
        print(f"swinv2: error: {err}", file=sys.stderr)
        return 2
    try:
        require(args.command, *_NEEDS.get(args.command, ()))
        return args.func(args)
    except MissingExtraError as err:
        print(f"swinv2: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        missing = _missing_optional(err)
        if missing is None:
            raise
        print(f"swinv2: error: {missing_extra(args.command, missing)}", file=sys.stderr)
        return 2
    except (ValueError, DownloadError) as err:  # incl. checkpoint and config errors
        print(f"swinv2: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file that cannot be read or written (missing, read-only, disk full, ...)
        print(f"swinv2: error: {_describe_os_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
