"""``swinv2 predict``, ``swinv2 export`` and ``swinv2 reconstruct``: trained weights put to use."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .. import export, fileio, predict, reconstruct
from ..data.video import VIDEO_EXTENSIONS
from ..tasks import video_infer
from ..tasks.dense import dense_task_of
from ..tasks.dense_infer import predict_dense
from ..train.distributed import check_device
from ..weights import PRETRAINED
from .common import check_model_size, fraction, parse_side, parse_size, positive_int, require, window_arg

# The description of ``swinv2 reconstruct --help``, before the checkpoint formats of swinv2.reconstruct.
RECONSTRUCT = ("Reads a SimMIM checkpoint, hides part of each image with seeded masks and writes a PNG\n"
               "grid of what the model predicts there. Checkpoints:\n\n")


def add_parsers(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of images or folders of images")
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="images, or folders searched recursively")
    p.add_argument("--model", default=None, metavar="TAG_OR_NAME",
                   help="registered weights (arch.tag, see 'swinv2 pretrained'), or an architecture: with "
                        "--checkpoint, the architecture of the file; alone, random weights (for testing only)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a swinv2 .safetensors file, a training checkpoint, or any checkpoint (with --model)")
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--img-size", type=parse_size, default=None,
                   help="N or HxW: evaluate at this size instead of the weights' own (same crop policy)")
    p.add_argument("--labels", default=None, metavar="FILE", help="class names, one per line, in index order")
    p.add_argument("--format", choices=predict.FORMATS, default="table")
    p.add_argument("--output", default=None, metavar="FILE_OR_DIR",
                   help="write the results here instead of stdout; detection and segmentation checkpoints: the "
                        "folder for the pictures (PNG) and predictions.json")
    p.add_argument("--window", type=window_arg, default=None,
                   help="window at test time, e.g. larger than in training (Table 1: position biases are "
                        "extrapolated, V1 tables resized bicubically; default: the weights')")
    p.add_argument("--score-threshold", type=fraction, default=0.5,
                   help="detection: draw and list objects scoring at least this (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export to ONNX, TorchScript or torch.export, verified against eager")
    p.add_argument("--model", default=None, metavar="NAME_OR_TAG",
                   help="an architecture (random weights) or registered weights arch.tag; with --checkpoint, "
                        "the architecture of a file that does not say it")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights: a swinv2 .safetensors file or any checkpoint")
    p.add_argument("--format", required=True, choices=export.FORMATS)
    p.add_argument("--output", required=True, metavar="FILE")
    p.add_argument("--img-size", type=parse_size, default=None, help="N or HxW to export at (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="batch of the traced example")
    p.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="accept any batch size (default: yes)")
    p.add_argument("--dynamic-size", action="store_true",
                   help="try to accept any image size; reported as not supported when the format cannot")
    p.add_argument("--opset", type=positive_int, default=None, help=f"ONNX opset (default {export.DEFAULT_OPSET})")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reconstruct", help="picture of a SimMIM checkpoint's predictions of hidden image areas",
                       description=RECONSTRUCT + reconstruct.__doc__.split("Checkpoints:\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="SimMIM checkpoint: from `swinv2 pretrain`, or an official pre-training file")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--output", default="reconstruction.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--img-size", type=parse_side, default=None, help="default: the pre-training size")
    p.add_argument("--mask-ratio", type=fraction, default=None, help="default: the pre-training ratio (official 0.6)")
    p.add_argument("--mask-patch", type=positive_int, default=None,
                   help="mask square in pixels; default: pre-training's (32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks (default: %(default)s)")
    p.add_argument("--model", default=None, help="architecture of an official checkpoint (see `swinv2 list`)")
    p.add_argument("--window-size", type=window_arg, default=None, help="default: the checkpoint's")
    p.add_argument("--norm-target-window", type=_norm_window, default="auto",
                   help="odd window of the local target normalisation, or 'none'; default: the checkpoint's "
                        "(official files: 47)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_reconstruct)


def random_weights_warning(name: str) -> str:
    tags = [n for n in PRETRAINED if n.split(".", 1)[0] == name]
    hint = f"--model {tags[0]}" if tags else "--model ARCH.TAG (see 'swinv2 pretrained')"
    return (f"WARNING: {name} is an architecture name without weights: the model is RANDOMLY INITIALISED and "
            f"its predictions are MEANINGLESS. Use {hint} or --checkpoint FILE.")


def cmd_predict(args) -> int:
    if args.model is None and args.checkpoint is None:
        raise ValueError("predict needs --model TAG_OR_NAME or --checkpoint PATH")
    device = check_device(args.device or "auto")
    task = dense_task_of(args.checkpoint) if args.checkpoint else None
    if task:
        return _predict_dense(args, task, device)
    if video_infer.is_video_checkpoint(args.checkpoint):
        return _predict_video(args, device)
    if args.output:
        fileio.check_writable(args.output, "--output")  # before the model is built and the images read
    files = predict.find_images(args.paths)  # bad paths fail before the model is built or downloaded
    loaded = predict.load_for_inference(args.model, args.checkpoint)
    if args.img_size:
        check_model_size(loaded.model, args.img_size)
        loaded.preprocess.img_size = args.img_size
    if args.window:
        loaded.model.set_input_size(window_size=args.window)  # keeps the weights; resizes V1 bias tables
    if loaded.random_weights:
        print(random_weights_warning(args.model), file=sys.stderr)
    net, pre = loaded.model.to(device), loaded.preprocess
    names = predict.class_names_for(net.num_classes, loaded.class_names, args.labels)
    print(f"{loaded.source}: {net.num_classes} classes; {pre.describe()}; window {net.window_size[0]}; {len(files)} "
          "images", file=sys.stderr)
    rows = predict.predict(net, files, transform=pre.transform(), class_names=names, topk=args.topk,
                           batch_size=args.batch_size, progress=not args.quiet)
    text = predict.format_rows(rows, args.format)
    if args.output:
        fileio.write_bytes(args.output, text.encode("utf-8"))  # a failed write leaves an earlier file as it was
    else:
        sys.stdout.write(text)
    failed = sum(not r["ok"] for r in rows)
    if failed:
        print(f"swinv2: {failed} of {len(rows)} images could not be read", file=sys.stderr)
    return 1 if failed == len(rows) else 0


def _predict_video(args, device) -> int:
    """Top classes of clips (files, or folders searched for clips), every view averaged."""
    require("predict", "av")
    clips = []
    for path in args.paths:
        p = Path(path)
        if p.is_dir():
            clips += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file())
        elif p.exists():
            clips.append(path)
        else:
            raise FileNotFoundError(f"no such clip or folder: {path}")
    if not clips:
        raise ValueError(f"no clips ({', '.join(VIDEO_EXTENSIONS)}) in {', '.join(args.paths)}")
    if args.output:
        fileio.check_writable(args.output, "--output")
    rows = video_infer.predict_clips(args.checkpoint, clips, topk=args.topk, window=args.window, device=str(device))
    if args.format == "json":
        text = json.dumps(rows, indent=1) + "\n"
    else:
        text = "".join(f"{r['clip']}: could not be read: {r['error']}\n" if "error" in r else
                       f"{r['clip']}: " + ", ".join(f"{t['name']} {t['prob']:.3f}" for t in r["top"]) + "\n"
                       for r in rows)
    if args.output:
        fileio.write_bytes(args.output, text.encode("utf-8"))
    else:
        sys.stdout.write(text)
    failed = sum("error" in r for r in rows)
    if failed:
        print(f"swinv2: {failed} of {len(rows)} clips could not be read", file=sys.stderr)
    return 1 if failed == len(rows) else 0


def _predict_dense(args, task: str, device) -> int:
    if not args.output:
        raise ValueError(f"predict with a {task} checkpoint writes pictures: give --output DIR")
    if args.img_size and args.img_size[0] != args.img_size[1]:
        raise ValueError(f"--img-size for {task} is one side (the short side images are resized to), got "
                         f"{args.img_size[0]}x{args.img_size[1]}")
    records = predict_dense(args.checkpoint, args.paths, args.output, task=task,
                            img_size=args.img_size[0] if args.img_size else None, window=args.window,
                            score_threshold=args.score_threshold, device=str(device))
    for r in records:
        if "error" in r:
            print(f"{r['image']}: could not be read: {r['error']}", file=sys.stderr)
        elif task == "detection":
            found = ", ".join(f"{o['class']} {o['score']:.2f}" for o in r["objects"]) or "nothing"
            print(f"{r['image']}: {found}")
        else:
            top = sorted(r["classes"], key=lambda c: -c["fraction"])[:3]
            print(f"{r['image']}: " + ", ".join(f"{c['class']} {c['fraction'] * 100:.0f}%" for c in top))
    print(f"pictures and predictions.json in {args.output}", file=sys.stderr)
    failed = sum("error" in r for r in records)
    return 1 if failed == len(records) else 0


def cmd_export(args) -> int:
    if args.model is None and args.checkpoint is None:
        raise ValueError("export needs --model NAME_OR_TAG or --checkpoint PATH")
    if args.format == "onnx":
        require("export --format onnx", *export.ONNX_MODULES)
    fileio.check_writable(args.output, "--output")  # before the model is loaded and exported
    suffix = export.SUFFIXES[args.format]
    if os.path.splitext(args.output)[1].lower() != suffix:
        print(f"note: {args.format} files are usually named *{suffix}", file=sys.stderr)
    loaded = predict.load_for_inference(args.model, args.checkpoint)
    model = loaded.model.float().cpu()
    if loaded.random_weights:
        print(f"note: {args.model} has random weights (fine for checking the export; for a useful file give "
              "registered weights arch.tag or --checkpoint)", file=sys.stderr)
    size = args.img_size or model.img_size
    check_model_size(model, size)
    example = torch.randn(args.batch_size, model.in_chans, *size, generator=torch.Generator().manual_seed(0))
    report = export.export(model, args.output, args.format, example=example, dynamic_batch=args.dynamic_batch,
                           dynamic_size=args.dynamic_size, opset=args.opset, strict=False)
    print("\n".join(report.lines()))
    if not report.ok:
        report.path.unlink(missing_ok=True)
        print(f"swinv2: error: the exported file does not reproduce the model (rel err {report.max_rel:.2e} > "
              f"{report.tolerance:.0e}, or a check failed to run); {report.path} was deleted", file=sys.stderr)
        return 1
    return 0


def _norm_window(text: str) -> int | None | str:
    """``--norm-target-window``: an odd window, ``none``/``off``, or ``auto`` (the checkpoint's)."""
    if text.lower() in ("auto", "none", "off"):
        return None if text.lower() != "auto" else "auto"
    return int(text)


def cmd_reconstruct(args) -> int:
    sim, settings = reconstruct.load_simmim(args.checkpoint, model=args.model, img_size=args.img_size,
                                            window_size=args.window_size, norm_target_window=args.norm_target_window)
    size = settings["img_size"]
    images = reconstruct.read_images(args.images, size)  # (B, 3, size, size)
    result = reconstruct.reconstruct(sim, images, mask_patch=args.mask_patch or settings["mask_patch"],
                                     mask_ratio=args.mask_ratio or settings["mask_ratio"], seed=args.seed,
                                     device=args.device)
    reconstruct.save_reconstruction_grid(images, result.masks, result.predictions, args.output,
                                         norm_target_window=sim.norm_target_window)
    target = f"locally normalised target (window {sim.norm_target_window})" if sim.norm_target_window else "pixels"
    print(f"{settings['model']}: masked L1 loss {result.loss:.4f} on {len(images)} image(s) at {size}px, "
          f"{result.hidden} of {result.cells} cells hidden, {target}; picture: {args.output}")
    return 0
