"""Window geometry of Swin Transformer V2: partition into windows, the window and shift a map
uses, the shifted-window masks, and the relative coordinates of the position bias (§3.4).

Every function works on any number of axes: images have two (H, W), videos three (T, H, W).
Maps are channel-last ``(B, *S, C)`` (``(B, H, W, C)`` for images), windows ``(B*nW, N, C)``
with ``N`` the product of the window's sides.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

Size2 = tuple[int, int]
Size = tuple[int, ...]  # one entry per axis: (H, W) or (T, H, W)

# Added to the logits of token pairs that a shifted window joins across the image border. The
# official code uses -100 rather than -inf; with logit scales near 100 that is visible.
SHIFT_MASK_VALUE = -100.0
# Added to the logits of padded keys. Padding is always narrower than the window, so every row
# keeps a real key and -inf never gives an all-masked row.
PAD_MASK_VALUE = float("-inf")


# -- windows -------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: Size) -> torch.Tensor:
    """(B, *S, C) -> (B*nW, N, C); windows ordered batch, then window index along each axis in
    turn (row-major), tokens row-major inside a window."""
    B, *S, C = x.shape
    k = len(window)
    # (B, S0/w0, w0, S1/w1, w1, ..., C) -> (B, S0/w0, S1/w1, ..., w0, w1, ..., C)
    x = x.view(B, *itertools.chain.from_iterable((s // w, w) for s, w in zip(S, window)), C)
    order = (0, *range(1, 2 * k, 2), *range(2, 2 * k + 1, 2), 2 * k + 1)
    return x.permute(order).reshape(-1, math.prod(window), C)  # (B*nW, N, C)


def window_reverse(windows: torch.Tensor, window: Size, *size: int) -> torch.Tensor:
    """(B*nW, N, C) -> (B, *size, C): the inverse of :func:`window_partition`."""
    k, C = len(window), windows.shape[-1]
    x = windows.view(-1, *(s // w for s, w in zip(size, window)), *window, C)  # (B, nW0, nW1, .., w0, w1, .., C)
    order = (0, *itertools.chain.from_iterable((1 + i, 1 + k + i) for i in range(k)), 2 * k + 1)
    return x.permute(order).reshape(-1, *size, C)  # (B, *size, C)


def effective_window(resolution: Size, window: Size, rule: str = "per_axis") -> tuple[Size, Size]:
    """The window and shift a stage uses on a map of ``resolution``.

    Where a map is not larger than the window, the stage uses one window over that axis and does
    not shift it (``<=``: equal sizes do not shift either). ``rule="per_axis"`` decides each axis
    on its own; ``rule="official"`` (images only) reproduces the official code, which compares
    ``min(H, W)`` with the window and uses that square window on both axes (the two agree on
    square maps).
    """
    if rule == "official":
        (H, W), (wh, ww) = resolution, window
        if min(H, W) <= min(wh, ww):
            return (min(H, W), min(H, W)), (0, 0)
        return (wh, ww), (wh // 2, ww // 2)
    if rule != "per_axis":
        raise ValueError(f"window rule must be 'per_axis' or 'official', got {rule!r}")
    pairs = [(s, 0) if s <= w else (w, w // 2) for s, w in zip(resolution, window)]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def _region_labels(padded: Size, window: Size, shift: Size) -> torch.Tensor:
    """(1, *padded, 1) int64: which of the (up to) 3 x 3 (x 3) regions a cyclic shift joins each
    token belongs to, numbered in mixed radix over the axes."""
    labels = torch.zeros((1, *padded, 1), dtype=torch.int64)
    for axis, (p, w, s) in enumerate(zip(padded, window, shift)):
        cuts = [0, p - w, p - s, p] if s else [0, p]
        part = torch.zeros(p, dtype=torch.int64)
        for r, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            part[a:b] = r
        shape = [1] * (len(padded) + 2)
        shape[axis + 1] = p
        labels = labels * 3 + part.view(shape)
    return labels


def attention_mask(resolution: Size, window: Size, shift: Size, device=None) -> torch.Tensor | None:
    """Additive mask ``(nW, N, N)`` for a map of ``resolution`` padded to whole windows (at the
    end of each axis) and then cyclically shifted by ``shift``; None when it needs none.

    Token pairs from different shift regions get -100 (the official value); padded keys get -inf.
    The per-token labels are built on the CPU (a map's worth); the N times larger mask where it is
    used, never copied there.
    """
    padded = tuple(math.ceil(s / w) * w for s, w in zip(resolution, window))
    is_padded = padded != tuple(resolution)
    if not is_padded and not any(shift):
        return None
    N = math.prod(window)
    mask = torch.zeros((math.prod(padded) // N, N, N), dtype=torch.float32, device=device)
    if any(shift):
        lab = window_partition(_region_labels(padded, window, shift), window).squeeze(-1).to(device)  # (nW, N)
        mask.masked_fill_(lab[:, None, :] != lab[:, :, None], SHIFT_MASK_VALUE)
    if is_padded:
        is_pad = torch.zeros((1, *padded, 1), dtype=torch.bool)
        for axis, s in enumerate(resolution):
            is_pad[(slice(None),) * (axis + 1) + (slice(s, None),)] = True
        is_pad = torch.roll(is_pad, shifts=tuple(-s for s in shift), dims=tuple(range(1, len(padded) + 1)))
        pad_keys = window_partition(is_pad, window).squeeze(-1).to(device)  # (nW, N)
        mask.masked_fill_(pad_keys[:, None, :], PAD_MASK_VALUE)
    return mask


# -- relative positions ------------------------------------------------------------------------


def relative_position_index(window: Size) -> torch.Tensor:
    """(N, N) int64: row-major index into the (2w0-1, 2w1-1, ...) table of relative offsets."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)  # (k, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (k, N, N)
    index = torch.zeros_like(rel[0])
    for r, w in zip(rel, window):
        index = index * (2 * w - 1) + (r + w - 1)
    return index


def relative_coords_table(window: Size, pretrained_window: Size | None = None, spacing: str = "log") -> torch.Tensor:
    """(1, 2w0-1, 2w1-1, ..., k) float32 inputs of the continuous position bias MLP (§3.4), one
    coordinate per axis (k = 2 for images: (dy, dx); 3 for videos: (dt, dy, dx)).

    Offsets are divided by ``pretrained_window - 1`` (else ``window - 1``), so the pre-training
    window spans [-1, 1] whatever window is used now. ``spacing="log"`` then scales to [-8, 8]
    and applies sign(t)*log2(1+|t|)/log2(8) (Eq. 4), as the official code does; ``"linear"``
    keeps [-1, 1] (the paper's ablation). An axis of size 1 has only the offset 0 and is left
    undivided instead of becoming NaN. A ``pretrained_window`` side of 0 (or None for all) means
    none: that axis is divided by its current window (a video inflated from an image model has a
    pre-training window in space but not in time).
    """
    k = len(window)
    pretrained = tuple(pretrained_window) if pretrained_window is not None else (0,) * k
    if len(pretrained) != k:
        raise ValueError(f"pretrained window {pretrained} and window {tuple(window)} differ in their number of axes")
    axes = [torch.arange(-(w - 1), w, dtype=torch.float32) for w in window]
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(0)  # (1, 2w0-1, .., k)
    divisors = [(p if p > 0 else w) - 1 for p, w in zip(pretrained, window)]
    for axis, d in enumerate(divisors):
        if d > 0:
            table[..., axis] /= d
    if spacing == "log":
        table *= 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
    elif spacing != "linear":
        raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}")
    return table


def resize_bias_table(table: torch.Tensor, old: Size, new: Size) -> torch.Tensor:
    """Resize of a V1 bias table ``(prod(2*old-1), nH)`` to window ``new``: bicubic for images
    (as the official code), trilinear for videos (interpolate has no tricubic mode)."""
    nH = table.shape[1]
    grid = table.T.reshape(1, nH, *(2 * o - 1 for o in old))
    mode = "bicubic" if len(old) == 2 else "trilinear"
    grid = F.interpolate(grid, size=tuple(2 * n - 1 for n in new), mode=mode)
    return grid.reshape(nH, -1).T


def mask_rows(mask: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """The mask rows of windows ``start .. start+count`` of a batch: (nW, N, N) -> (nW | count, N, N).
    Windows are ordered image by image, so window ``i`` uses row ``i % nW``: a chunk of whole
    images keeps the mask as it is; otherwise its rows are gathered."""
    nW = mask.shape[0]
    if start % nW == 0 and count % nW == 0:
        return mask
    first = start % nW
    if first + count <= nW:
        return mask[first : first + count]
    return mask[torch.arange(start, start + count, device=mask.device) % nW]
