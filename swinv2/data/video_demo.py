"""A small action set built from real images that ship with the libraries: no download.

Each clip is a handwritten digit scan from scikit-learn (8x8, enlarged) sliding over a crop of a
real scikit-image photograph or texture (grass, gravel, brick, the cameraman, coffee, a cat);
the label is the direction of motion: ``down``, ``left``, ``right`` or ``up`` (class indices
0..3, the sorted folder names). One frame cannot tell the label, only the change between frames
can: the direction is drawn independently of the digit, the background, the speed and the start
position, and the start position is drawn from one range for every direction (wide enough
margins on all four sides for the longest move), so a single-frame model stays at chance while a
model that sees time can learn the set.

The clips are written as H.264 mp4 files (MPEG-4 Part 2 where the FFmpeg build has no libx264),
yuv420p, in the folder layout ``train/<class>/*.mp4`` and ``val/<class>/*.mp4``, so the demo
goes through the same decoding path as users' videos. Validation clips use other digit scans
than training ones. A set is a pure function of its parameters and is kept in the cache folder
under a key of them; it is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from .dense_demo import build_cached
from .video import require_av

FORMAT_VERSION = 4  # raise when the clips change: older cached sets are then rebuilt
CLASSES = ("down", "left", "right", "up")
_STEP = {"down": (1, 0), "left": (0, -1), "right": (0, 1), "up": (-1, 0)}  # (rows, cols) per unit of travel
_TEXTURES = ("grass", "gravel", "brick", "camera", "coffee", "chelsea")
_SPLITS = ("train", "val")
_MIN_CONTRAST = 96  # luminance difference (0..255) between the digit and the mean background
_FPS = 8
_EXTRAS = {"skimage": ("scikit-image", "dense"), "sklearn": ("scikit-learn", "train")}


class DemoClip(NamedTuple):
    """One rendered clip: ``frames`` uint8 (T, H, W, 3), ``label`` (index into CLASSES) and
    ``corners`` float (T, 2), the digit box's (top, left) in every frame."""

    frames: np.ndarray
    label: int
    corners: np.ndarray


def prepare_video_demo(root: str | os.PathLike | None = None, *, train_clips: int = 300, val_clips: int = 100,
                       frames: int = 16, size: int = 64, seed: int = 0) -> Path:
    """The demo set's folder (``train/`` and ``val/``, one subfolder per class of CLASSES): at
    ``root`` (built there unless it already holds this very set), else in the cache folder."""
    require_av()
    _require_images()
    params = _check(train_clips, val_clips, frames, size, seed)
    return build_cached("moving-digits", root, params, _write_set, FORMAT_VERSION)


def render_demo_clip(split: str, index: int, *, frames: int = 16, size: int = 64, seed: int = 0) -> DemoClip:
    """Clip ``index`` of ``split`` exactly as :func:`prepare_video_demo` renders it before encoding."""
    _require_images()
    _check(len(CLASSES), len(CLASSES), frames, size, seed)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLITS.index(split), index])
    label = index % len(CLASSES)  # balanced; every other draw below is independent of it
    background = _background(rng, size)  # (size, size, 3) float
    scans = _scans(split)
    side = int(rng.integers(size // 4, size // 3 + 1))
    alpha = _digit_alpha(scans[int(rng.integers(len(scans)))], side)  # (side, side) 0..1
    colour = _contrasting_colour(rng, background)
    # The middle of the path is drawn the same way for every direction and the path runs half
    # the travel either side of it: the middle frame (a one-frame test view), and the frames of a
    # clip taken together (one-frame training), place the digit alike whichever way it moves.
    travel = float(rng.uniform(0.6, 1.0)) * (size - side - 2)  # across most of the frame: 2-3 px a frame at 64 px
    middle = rng.uniform(travel / 2, size - side - travel / 2, size=2)  # (top, left)
    step = np.array(_STEP[CLASSES[label]], dtype=np.float64)
    corners = middle + step * travel * (np.linspace(0.0, 1.0, frames)[:, None] - 0.5)  # (T, 2)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t, (top, left) in enumerate(corners):
        a = _placed(alpha, top, left, size)[..., None]  # (size, size, 1)
        out[t] = np.clip(np.round(background * (1 - a) + colour * a), 0, 255).astype(np.uint8)
    return DemoClip(out, label, corners)


def _check(train_clips: int, val_clips: int, frames: int, size: int, seed: int) -> dict:
    if int(size) < 32 or int(size) % 2:
        raise ValueError(f"size must be an even number of at least 32 pixels (yuv420p halves it), got {size}")
    if int(frames) < 2:
        raise ValueError(f"frames must be at least 2 (motion needs two), got {frames}")
    if int(train_clips) < len(CLASSES) or int(val_clips) < len(CLASSES):
        raise ValueError(f"train_clips and val_clips must be at least {len(CLASSES)} (one per class), got "
                         f"{train_clips} and {val_clips}")
    return {"train_clips": int(train_clips), "val_clips": int(val_clips), "frames": int(frames), "size": int(size),
            "seed": int(seed)}


def _write_set(folder: Path, params: dict) -> None:
    codec = _codec()
    for split in _SPLITS:
        for name in CLASSES:
            (folder / split / name).mkdir(parents=True)
        for i in range(params[f"{split}_clips"]):
            clip = render_demo_clip(split, i, frames=params["frames"], size=params["size"], seed=params["seed"])
            _write_mp4(folder / split / CLASSES[clip.label] / f"{i:05d}.mp4", clip.frames, codec)


def _codec() -> str:
    av = require_av()
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _write_mp4(path: Path, frames: np.ndarray, codec: str) -> None:
    """uint8 frames (T, H, W, 3) as an mp4 of yuv420p ``codec``, lossless where the codec allows."""
    av = require_av()
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=_FPS)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        # lossless (qp 0) on the yuv420p frames: what a clip decodes to is then a function of its
        # rendering alone, whatever the encoder does with its choices on this machine
        stream.options = {"qp": "0", "threads": "1"} if codec == "libx264" else {"qscale": "1"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())  # flush the frames the encoder holds back


def _require_images() -> None:
    for module, (package, extra) in _EXTRAS.items():
        try:
            __import__(module)
        except ModuleNotFoundError:
            raise ModuleNotFoundError(f"the video demo is drawn from images that ship with {package}: pip install "
                                      f"'swinv2[{extra}]'", name=module) from None


@functools.cache
def _textures() -> tuple[tuple[np.ndarray, bool], ...]:
    """(RGB uint8 (H, W, 3), was grey) for every texture name."""
    from skimage import data

    out = []
    for name in _TEXTURES:
        image = getattr(data, name)()
        grey = image.ndim == 2
        out.append((np.stack([image] * 3, -1) if grey else image[..., :3], grey))
    return tuple(out)


@functools.cache
def _scans(split: str) -> np.ndarray:
    """The split's digit scans, float 0..1 (N, 8, 8): every fifth for validation, the rest for training."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    held = np.arange(len(images)) % 5 == 0
    return (images[held if split == "val" else ~held] / 16.0).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a random texture, resized to float (size, size, 3); grey ones tinted."""
    textures = _textures()
    texture, grey = textures[int(rng.integers(len(textures)))]
    smallest = min(texture.shape[:2])
    side = int(rng.integers(min(size, smallest), smallest + 1))
    top, left = int(rng.integers(0, texture.shape[0] - side + 1)), int(rng.integers(0, texture.shape[1] - side + 1))
    crop = Image.fromarray(texture[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(crop, dtype=np.float64)  # (size, size, 3)
    return pixels * rng.uniform(0.55, 1.0, size=3) if grey else pixels


def _digit_alpha(scan: np.ndarray, side: int) -> np.ndarray:
    """A scan enlarged bilinearly to (side, side) and steepened into an opacity: solid strokes, soft edges."""
    enlarged = np.asarray(Image.fromarray(scan).resize((side, side), Image.BILINEAR), dtype=np.float64)
    return np.clip((enlarged - 0.25) * 4.0, 0.0, 1.0)


def _placed(alpha: np.ndarray, top: float, left: float, size: int) -> np.ndarray:
    """``alpha`` with its corner at a fractional (top, left) of a (size, size) frame, bilinear:
    sub-pixel steps make slow motion smooth instead of jumping a pixel every few frames."""
    image = Image.fromarray(alpha.astype(np.float32))  # mode F
    moved = image.transform((size, size), Image.AFFINE, (1, 0, -left, 0, 1, -top), resample=Image.BILINEAR)
    return np.clip(np.asarray(moved, dtype=np.float64), 0.0, 1.0)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour whose luminance differs from the background's mean by enough to read."""
    mean = float(background.reshape(-1, 3).mean(0) @ np.array([0.299, 0.587, 0.114]))
    for _ in range(30):
        colour = rng.integers(0, 256, size=3).astype(np.float64)
        if abs(float(colour @ np.array([0.299, 0.587, 0.114])) - mean) >= _MIN_CONTRAST:
            return colour
    return np.full(3, 0.0 if mean > 127 else 255.0)


__all__ = ["CLASSES", "FORMAT_VERSION", "DemoClip", "prepare_video_demo", "render_demo_clip"]
