"""Swin Transformer V2 block and stage: (shifted) window attention and an MLP as residual
branches with res-post-norm (§3.2), and a run of blocks at one resolution before patch merging.
Both work on images ``(B, H, W, C)`` and videos ``(B, T, H, W, C)``: the window has one side per
axis of the map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import CONSTANT_CACHE_BYTES, BoundedCache
from .layers import NORM_PLACEMENTS, DropPath, Mlp, PatchMerging, WindowAttention
from .windows import Size, attention_mask, effective_window, window_partition, window_reverse


# Where the LayerNorms of a residual branch ``f`` sit (§3.2, Table 7). ``post_norm`` is the
# sandwich's second norm.
def _res_post(x, f, norm, post_norm, drop_path):  # V2: x + LN(f(x)), the LN zero-initialised
    return x + drop_path(norm(f(x)))


def _pre(x, f, norm, post_norm, drop_path):  # V1: x + f(LN(x))
    return x + drop_path(f(norm(x)))


def _post(x, f, norm, post_norm, drop_path):  # the original Transformer: LN(x + f(x))
    return norm(x + drop_path(f(x)))


def _sandwich(x, f, norm, post_norm, drop_path):  # x + LN(f(LN(x)))
    return x + drop_path(post_norm(f(norm(x))))


RESIDUALS = {"res_post": _res_post, "pre": _pre, "post": _post, "sandwich": _sandwich}


class SwinTransformerV2Block(nn.Module):
    """(Shifted) window attention and an MLP, each a residual branch placed by ``norm_placement``
    (see ``RESIDUALS``). With ``extra_norm`` a LayerNorm is applied to the main branch after the
    block (§3.2, for the H and G sizes)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm,
                 pretrained_window_size: Size = (0, 0), norm_placement: str = "res_post", attn_type: str = "cosine",
                 position_bias: str = "log_cpb", table_window: Size = (7, 7), cpb_hidden_dim: int = 512,
                 extra_norm: bool = False):
        super().__init__()
        if norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement must be one of {NORM_PLACEMENTS}, got {norm_placement!r}")
        self.norm_placement = norm_placement
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, qkv_bias, attn_drop, drop, pretrained_window_size, attn_type,
                                    position_bias, table_window, cpb_hidden_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm1_post = norm_layer(dim) if norm_placement == "sandwich" else None
        self.norm2_post = norm_layer(dim) if norm_placement == "sandwich" else None
        self.norm3 = norm_layer(dim) if extra_norm else None

    def init_res_post_norm(self) -> None:
        """Zero the branch norms so every residual branch starts as 0 (official init)."""
        if self.norm_placement == "res_post":
            for norm in (self.norm1, self.norm2):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)

    def window_attention(self, x: torch.Tensor, window: Size, shift: Size, mask) -> torch.Tensor:
        """(B, *S, C) -> (B, *S, C): pad to whole windows, shift, attend, undo."""
        size = x.shape[1:-1]  # (H, W) or (T, H, W)
        pads = [(-s) % w for s, w in zip(size, window)]
        axes = tuple(range(1, len(size) + 1))
        if any(pads):
            # F.pad lists (start, end) pairs from the last axis: channels first, then W, H (, T)
            x = F.pad(x, (0, 0, *(p for pad in reversed(pads) for p in (0, pad))))  # (B, *padded, C)
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=axes)
        windows = self.attn(window_partition(x, window), window, mask)  # (B*nW, N, C)
        x = window_reverse(windows, window, *x.shape[1:-1])  # (B, *padded, C)
        if any(shift):
            x = torch.roll(x, shifts=tuple(shift), dims=axes)
        if any(pads):
            x = x[(slice(None), *(slice(0, s) for s in size))]  # (B, *S, C)
        return x

    def forward(self, x: torch.Tensor, window: Size, shift: Size, mask=None) -> torch.Tensor:
        """x: (B, *S, C); window and shift: this block's; mask: (nW, N, N) or None."""
        residual = RESIDUALS[self.norm_placement]
        x = residual(x, lambda t: self.window_attention(t, window, shift, mask), self.norm1, self.norm1_post,
                     self.drop_path)
        x = residual(x, self.mlp, self.norm2, self.norm2_post, self.drop_path)
        return self.norm3(x) if self.norm3 is not None else x


class SwinTransformerV2Stage(nn.Module):
    """A run of blocks at one resolution, alternating unshifted and shifted windows, then (except
    in the last stage) patch merging. (B, H, W, C) -> (B, H/2, W/2, 2C), or for videos
    (B, T, H, W, C) -> (B, T, H/2, W/2, 2C) (merging is spatial only)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: Size, downsample: bool,
                 drop_path: Sequence[float], norm_layer=nn.LayerNorm, extra_norm_period: int = 0,
                 window_rule: str = "per_axis", merge_norm: str = "post", **block_kwargs):
        super().__init__()
        self.dim, self.window_size, self.window_rule = dim, tuple(window_size), window_rule
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            SwinTransformerV2Block(dim, num_heads, drop_path=drop_path[i], norm_layer=norm_layer,
                                   extra_norm=bool(extra_norm_period) and (i + 1) % extra_norm_period == 0,
                                   **block_kwargs)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, norm_layer, norm_first=merge_norm == "pre") if downsample else None
        # masks by map size, window, shift and device; one at 800x1333 with window 16 is ~70 MB,
        # so large ones are built per call instead of kept
        self._mask_cache = BoundedCache(entries=4, max_bytes=4 * CONSTANT_CACHE_BYTES)

    def window_and_shift(self, resolution: Size) -> tuple[Size, Size]:
        return effective_window(resolution, self.window_size, self.window_rule)

    def masks(self, resolution: Size, device) -> dict[Size, torch.Tensor | None]:
        """{shift: mask} for the unshifted and the shifted blocks on a map of ``resolution``."""
        window, shift = self.window_and_shift(resolution)
        return {s: self._mask_cache.get((resolution, window, s, device),
                                        lambda s=s: attention_mask(resolution, window, s, device))
                for s in {(0,) * len(shift), shift}}

    def clear_masks(self) -> None:
        """Forget the masks kept for earlier inputs (after the window changes)."""
        self._mask_cache.clear()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *S, C) -> (B, *S, C), without the downsampling."""
        resolution = tuple(x.shape[1:-1])
        window, shift = self.window_and_shift(resolution)
        masks = self.masks(resolution, x.device)
        for i, block in enumerate(self.blocks):
            s = shift if i % 2 else (0,) * len(shift)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, window, s, masks[s], use_reentrant=False)
            else:
                x = block(x, window, s, masks[s])
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x
