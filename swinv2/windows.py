"""Window geometry of Swin Transformer V2: partition into windows, the window and shift a map
uses, the shifted-window masks, and the relative coordinates of the position bias (§3.4).

Maps are channel-last ``(B, H, W, C)``, windows ``(B*nW, N, C)`` with ``N = wh*ww``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Size2 = tuple[int, int]

# Added to the logits of token pairs that a shifted window joins across the image border. The
# official code uses -100 rather than -inf; with logit scales near 100 that is visible.
SHIFT_MASK_VALUE = -100.0
# Added to the logits of padded keys. Padding is always narrower than the window, so every row
# keeps a real key and -inf never gives an all-masked row.
PAD_MASK_VALUE = float("-inf")


# -- windows -------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: Size2) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, wh*ww, C); windows ordered batch, window row, window column."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C)  # (B, nWh, wh, nWw, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)  # (B*nW, N, C)


def window_reverse(windows: torch.Tensor, window: Size2, H: int, W: int) -> torch.Tensor:
    """(B*nW, wh*ww, C) -> (B, H, W, C): the inverse of :func:`window_partition`."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)  # (B, nWh, nWw, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)  # (B, H, W, C)


def effective_window(resolution: Size2, window: Size2, rule: str = "per_axis") -> tuple[Size2, Size2]:
    """The window and shift a stage uses on a map of ``resolution``.

    Where a map is not larger than the window, the stage uses one window over that axis and does
    not shift it (``<=``: equal sizes do not shift either). ``rule="per_axis"`` decides each axis
    on its own; ``rule="official"`` reproduces the official code, which compares ``min(H, W)``
    with the window and uses that square window on both axes (the two agree on square maps).
    """
    (H, W), (wh, ww) = resolution, window
    if rule == "official":
        if min(H, W) <= min(wh, ww):
            return (min(H, W), min(H, W)), (0, 0)
        return (wh, ww), (wh // 2, ww // 2)
    if rule != "per_axis":
        raise ValueError(f"window rule must be 'per_axis' or 'official', got {rule!r}")
    win_h, shift_h = (H, 0) if H <= wh else (wh, wh // 2)
    win_w, shift_w = (W, 0) if W <= ww else (ww, ww // 2)
    return (win_h, win_w), (shift_h, shift_w)


def attention_mask(resolution: Size2, window: Size2, shift: Size2, device=None) -> torch.Tensor | None:
    """Additive mask ``(nW, N, N)`` for a map of ``resolution`` padded to whole windows (at the
    bottom and right) and then cyclically shifted by ``shift``; None when it needs none.

    Token pairs from different shift regions get -100 (the official value); padded keys get -inf.
    The per-token labels are built on the CPU (a map's worth); the N times larger mask where it is
    used, never copied there.
    """
    (H, W), (wh, ww), (sh, sw) = resolution, window, shift
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    padded = (Hp, Wp) != (H, W)
    if not padded and sh == 0 and sw == 0:
        return None
    N = wh * ww
    mask = torch.zeros((Hp * Wp // N, N, N), dtype=torch.float32, device=device)
    if sh or sw:
        labels = torch.zeros((1, Hp, Wp, 1), dtype=torch.int64)  # the (up to) 3x3 regions the shift joins
        h_cuts = [0, Hp - wh, Hp - sh, Hp] if sh else [0, Hp]
        w_cuts = [0, Wp - ww, Wp - sw, Wp] if sw else [0, Wp]
        for r, (h0, h1) in enumerate(zip(h_cuts[:-1], h_cuts[1:])):
            for c, (w0, w1) in enumerate(zip(w_cuts[:-1], w_cuts[1:])):
                labels[:, h0:h1, w0:w1, :] = 3 * r + c
        lab = window_partition(labels, window).squeeze(-1).to(device)  # (nW, N)
        mask.masked_fill_(lab[:, None, :] != lab[:, :, None], SHIFT_MASK_VALUE)
    if padded:
        is_pad = torch.zeros((1, Hp, Wp, 1), dtype=torch.bool)
        is_pad[:, H:], is_pad[:, :, W:] = True, True
        is_pad = torch.roll(is_pad, shifts=(-sh, -sw), dims=(1, 2))
        pad_keys = window_partition(is_pad, window).squeeze(-1).to(device)  # (nW, N)
        mask.masked_fill_(pad_keys[:, None, :], PAD_MASK_VALUE)
    return mask


# -- relative positions ------------------------------------------------------------------------


def relative_position_index(window: Size2) -> torch.Tensor:
    """(N, N) int64: row-major index into the (2wh-1, 2ww-1) table of relative offsets."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def relative_coords_table(window: Size2, pretrained_window: Size2 = (0, 0), spacing: str = "log") -> torch.Tensor:
    """(1, 2wh-1, 2ww-1, 2) float32 inputs of the continuous position bias MLP (§3.4).

    Offsets are divided by ``pretrained_window - 1`` (else ``window - 1``), so the pre-training
    window spans [-1, 1] whatever window is used now. ``spacing="log"`` then scales to [-8, 8]
    and applies sign(t)*log2(1+|t|)/log2(8) (Eq. 4), as the official code does; ``"linear"``
    keeps [-1, 1] (the paper's ablation). An axis of size 1 has only the offset 0 and is left
    undivided instead of becoming NaN.
    """
    (wh, ww), (ph, pw) = window, pretrained_window
    dh = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    dw = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(dh, dw, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    div_h, div_w = (ph - 1, pw - 1) if ph > 0 else (wh - 1, ww - 1)
    if div_h > 0:
        table[..., 0] /= div_h
    if div_w > 0:
        table[..., 1] /= div_w
    if spacing == "log":
        table *= 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
    elif spacing != "linear":
        raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}")
    return table


def resize_bias_table(table: torch.Tensor, old: Size2, new: Size2) -> torch.Tensor:
    """Bicubic resize of a V1 bias table ``((2oh-1)(2ow-1), nH)`` to window ``new``."""
    nH = table.shape[1]
    grid = table.T.reshape(1, nH, 2 * old[0] - 1, 2 * old[1] - 1)
    grid = F.interpolate(grid, size=(2 * new[0] - 1, 2 * new[1] - 1), mode="bicubic")
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
