"""Reading image files, the one place every reader goes through (datasets, ``predict``,
``reconstruct``): which directory entries can be read, and how each pixel format becomes 8-bit RGB.

* Only regular files are opened. Opening a FIFO named ``x.png`` blocks until something writes
  to it, and a device, socket or broken link is no image either: folder scans skip such entries
  and count them, and a reader refuses them before ``open`` could block.
* ``Image.convert("RGB")`` clips 16-bit grey pixels to 255 (a mid-grey 16-bit PNG turns white),
  so :func:`to_rgb` keeps their high byte instead, as Pillow itself does when it decodes 16-bit
  colour PNGs and TIFFs to 8-bit RGB: a 16-bit image reads the same in grey and in colour.
"""

from __future__ import annotations

import os
import stat

import numpy as np
from PIL import Image, UnidentifiedImageError


class NotAFileError(ValueError):
    """A path that exists but is no regular file (a FIFO, socket, device or directory)."""


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file or a link to one; False for FIFOs, sockets, devices,
    directories, broken links and missing paths. Only ``stat``: nothing is opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: str | os.PathLike):
    """A binary file object for ``path``, or NotAFileError when it is no regular file.

    ``stat`` first, so that a device is never opened; then the open is non-blocking and
    checked again with ``fstat``, so that a FIFO put in the file's place meanwhile cannot block."""
    mode = os.stat(path).st_mode  # FileNotFoundError for a missing path or a broken link
    if not stat.S_ISREG(mode):
        raise NotAFileError(f"{_kind(mode)}, not an image file")
    f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0)))
    try:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFileError(f"{_kind(mode)}, not an image file")
        return f
    except BaseException:
        f.close()
        raise


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` decoded now and converted with :func:`to_rgb`.

    Raises for anything that cannot be read: NotAFileError (a ValueError) for a FIFO,
    socket, device or directory, OSError for a missing or undecodable file, and whatever else
    Pillow raises for a corrupt one (SyntaxError, struct.error...)."""
    with _open_regular(path) as f:
        try:
            img = Image.open(f)
        except UnidentifiedImageError:
            # Pillow would name the file object; every caller names the path.
            raise UnidentifiedImageError("cannot identify image file") from None
        with img:
            img.load()  # decode now: a truncated file fails here, not later inside a transform
            rgb = to_rgb(img)
            return rgb.copy() if rgb is img else rgb  # independent of the file, which closes here


_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned, any byte order


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode (the image itself when it is RGB already).

    16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) keeps the high byte of each pixel.
    32-bit integer ``I`` holds 16-bit data when a PGM file has more than 8 bits (Pillow spreads
    it over 0..65535) or when a pixel exceeds 255: it is read as 16-bit then; values in 0..255
    from other files stay as they are, and values outside 0..65535 have no known scale and are
    refused (ValueError). Every other mode (``L``, ``1``, ``P``, ``LA``, ``RGBA``, ``CMYK``,
    ``YCbCr``, ``F``...) goes through Pillow's own conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_GREY or mode == "I":
        return _grey_to_rgb(_sixteen_to_eight(img))
    return img.convert("RGB")


def _sixteen_to_eight(img: Image.Image) -> np.ndarray:
    pixels = np.asarray(img)
    if img.mode == "I":
        lo, hi = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"32-bit integer pixels from {lo} to {hi} have no known 8-bit scale: save the image with 8 or 16 "
                "bits per channel"
            )
        if hi <= 255 and img.format != "PPM":
            return pixels.astype(np.uint8)
    return (pixels.astype(np.uint32) >> 8).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")  # uint8 (H, W): mode L


__all__ = ["NotAFileError", "is_regular_file", "open_rgb", "to_rgb"]
