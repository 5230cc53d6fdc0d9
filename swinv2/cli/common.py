"""What every subcommand shares: argument types, the optional extras, one-line errors."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os

from ..train.config import MAX_IMG_SIZE

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
    "torchmetrics": ("torchmetrics", "dense"),
    "pycocotools": ("pycocotools", "dense"),
    "faster_coco_eval": ("faster-coco-eval", "dense"),
    "skimage": ("scikit-image", "dense"),
    "av": ("PyAV", "video"),
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


def missing_optional(err: ModuleNotFoundError) -> str | None:
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


def size_overrides(img_size=None, window=None) -> dict:
    """The ``create_model`` keywords of the ``--img-size`` and ``--window`` flags given."""
    out = {}
    if img_size is not None:
        out["img_size"] = img_size
    if window is not None:
        out["window_size"] = window
    return out


# -- errors ------------------------------------------------------------------------------------


class UsageError(Exception):
    """A command line argparse refuses; main() prints it as one line."""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported as one line (exit code 2) instead of the usage text."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def describe_os_error(err: OSError) -> str:
    """One line: the path(s) and the system's reason, without the errno decoration."""
    if err.strerror and err.filename is not None:
        where = os.fsdecode(err.filename)
        if err.filename2 is not None:
            where += f" -> {os.fsdecode(err.filename2)}"
        return f"{where}: {err.strerror}"
    return str(err) or type(err).__name__
