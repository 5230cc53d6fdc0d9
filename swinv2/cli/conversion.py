"""``swinv2 convert``: a checkpoint from any known layout (or a Hugging Face folder) to another."""

from __future__ import annotations

import io
import json
import os
import warnings

import torch
from safetensors.torch import save as safetensors_bytes

from .. import convert, fileio, hub
from ..hf_folder import class_names, read_hf_config, save_hf_folder
from ..loading import (
    DERIVED_BUFFERS,
    NonFiniteWeightsWarning,
    load_hf_folder,
    load_model,
    load_pretrained,
    warn_nonfinite,
)
from ..reading import read_state_dict
from ..variants import create_model
from .common import parse_size, size_overrides, window_arg

TARGETS = ("swinv2", "official", "timm", "hf", "torchvision", "mmpretrain")


def add_parsers(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between layouts (official, timm, hf, ...)")
    p.add_argument("input", help="checkpoint in any known layout (detected), or a Hugging Face model folder")
    p.add_argument("output", help=".safetensors or .pth; with --to hf, a folder (a path without an extension, "
                   "or an existing folder) gets config.json + model.safetensors for from_pretrained")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--from", dest="from_format", default=None, choices=list(convert.FORMATS),
                   help="input layout (default: detected; when given, it must match what is detected)")
    p.add_argument("--force", action="store_true", help="replace an existing output file or folder")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="architecture, needed for --to swinv2 and an hf folder unless the input says it")
    p.add_argument("--img-size", type=parse_size, default=None, help="with --model: the model's image size")
    p.add_argument("--window", type=window_arg, default=None, help="with --model: the model's window")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    if not os.path.exists(args.input):
        raise FileNotFoundError(f"no such checkpoint file or folder: {args.input}")
    hf_folder = args.to == "hf" and (os.path.isdir(args.output) or not os.path.splitext(args.output)[1])
    _check_output(args.output, hf_folder, args.force)
    state, model, names, fmt = _read_input(args.input, args.from_format)
    print(f"read {args.input}: {fmt} layout, {len(state)} tensors")
    if args.to == "swinv2" or hf_folder:
        model = model or _build_model(args, state, hf_folder)
        if hf_folder:
            save_hf_folder(model, args.output, class_names=names)  # written beside it, then renamed into place
            print(f"wrote {args.output}: Hugging Face folder (config.json, model.safetensors)")
            return 0
        hub.save_pretrained(model, args.output, metadata={"class_names": json.dumps(names)} if names else None)
    else:
        _write_layout(convert.from_official(state, args.to), args.output, args.to)
    print(f"wrote {args.output}: {args.to} layout")
    return 0


def _check_output(output: str, folder: bool, force: bool) -> None:
    """Before any reading: an existing output is replaced only with ``--force`` (an empty folder
    for a Hugging Face folder is fine), and the place must be writable."""
    fileio.check_writable(output, "output", folder=folder)
    if not os.path.lexists(output) or force:
        return
    if folder and os.path.isdir(output) and not any(os.scandir(output)):
        return
    raise FileExistsError(f"{output} exists: add --force to replace it (or choose another output)")


def _read_input(path: str, from_format: str | None):
    """(official-layout state dict, the model when the input builds one, class names, layout read)."""
    if os.path.isdir(path):
        _check_from(from_format, path, "hf", "a Hugging Face folder")
        model = load_hf_folder(path)
        return model.state_dict(), model, class_names(read_hf_config(path)), "hf folder"
    if hub.is_swinv2_file(path):
        _check_from(from_format, path, "swinv2", "a swinv2 file")
        model = load_model(path)
        meta = hub.read_metadata(path)
        return model.state_dict(), model, json.loads(meta["class_names"]) if meta.get("class_names") else None, "swinv2"
    state = read_state_dict(path)
    warn_nonfinite(state, path)  # copied as they are, but said
    fmt = _input_layout(state, path, from_format)
    state, notes = convert.to_official(state, fmt)
    for note in notes:
        print(f"note: {note}")
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}, None, None, fmt


# Layouts that name the weights alike: official checkpoints carry derived buffers that swinv2's own
# state dicts leave out, so a buffer-less official file reads as 'swinv2'.
_SAME_LAYOUT = ({"official", "swinv2"},)


def _same_layout(a: str, b: str) -> bool:
    return a == b or any(a in group and b in group for group in _SAME_LAYOUT)


def _check_from(from_format: str | None, path: str, detected: str, what: str) -> None:
    if from_format and not _same_layout(from_format, detected):
        raise ValueError(f"--from {from_format} does not match {path}: it is {what} ({detected} layout)")


def _input_layout(state: dict, path: str, from_format: str | None) -> str:
    """The layout of a state dict: detected, and checked against ``--from`` when given; ``--from``
    alone decides only when detection finds no known layout."""
    try:
        detected = convert.detect_format(state)
    except convert.UnknownFormatError:
        if from_format is None:
            raise
        return from_format
    if from_format is None:
        return detected
    if not _same_layout(from_format, detected):
        raise ValueError(f"--from {from_format} does not match {path}: its keys are in the {detected} "
                         "layout (leave out --from to use it)")
    return from_format


def _build_model(args, state: dict, hf_folder: bool) -> torch.nn.Module:
    """The ``--model`` architecture with the weights of ``state`` (official layout)."""
    if not args.model:
        raise ValueError(f"--to {args.to} {'(a folder) ' if hf_folder else ''}needs --model NAME "
                         "(the architecture the weights belong to)")
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    model = create_model(args.model, num_classes=num_classes, **size_overrides(args.img_size, args.window))
    with warnings.catch_warnings():  # NaN or inf in the weights: said once, when the file was read
        warnings.simplefilter("ignore", NonFiniteWeightsWarning)
        load_pretrained(model, state)
    return model


def _write_layout(state: dict, path: str, layout: str) -> None:
    """Serialised in memory and written with plain file writes, so that a full disk is an
    OSError naming the file (torch's own writer reports it as an 'unexpected pos'); atomic."""
    if path.endswith(".safetensors"):
        data = safetensors_bytes({k: v.contiguous() for k, v in state.items()})
    else:
        buffer = io.BytesIO()
        torch.save({"model": state} if layout == "official" else state, buffer)
        data = buffer.getbuffer()
    fileio.write_bytes(path, data)
