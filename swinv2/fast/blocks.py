"""Blocks, stages and the network with less data movement: the same computation as
:mod:`swinv2.blocks` and :mod:`swinv2.model`, the same values up to float rounding.

- Shifted windows: one gather of the tokens (:func:`shifted_window_order`) replaces the roll and
  the partition, two full copies of the map (and back again after the attention).
- Residual sums in inference go into the branch's own buffer where nothing else holds it.
- Batch chunks (CPU): each stage runs the batch in chunks of whole images, so that no per-block
  tensor of a chunk exceeds ``batch_chunk_mb``. Below glibc's mmap threshold (at most 32 MiB) the
  allocator reuses freed memory instead of mapping and page-faulting it in again on every
  allocation, and a chunk's tensors stay in cache. Outputs, losses and gradients are those of the
  whole batch (stochastic depth draws the whole batch's masks first, so a seeded run drops the
  same branches). Stages whose tensors fit, GPUs, captured graphs, active dropout and watched
  (hooked) modules run the batch whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..blocks import RESIDUALS, SwinTransformerV2Block, SwinTransformerV2Stage
from ..cache import CONSTANT_CACHE_BYTES, BoundedCache
from ..layers import DropPath
from ..model import SwinTransformerV2
from ..windows import Size2, window_partition
from .capture import recording
from .hooks import unhooked

DEFAULT_BATCH_CHUNK_MB = 32.0  # glibc's largest dynamic mmap threshold


def shifted_window_order(resolution: Size2, window: Size2, shift: Size2) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order of the cyclically shifted windows of a ``(Hp, Wp)`` map, as two int64
    permutations of ``Hp*Wp``: ``order[i]`` is the row-major position in the map of token ``i`` of
    ``window_partition(roll(x, -shift), window)``, and ``inverse`` undoes it."""
    Hp, Wp = resolution
    pos = torch.roll(torch.arange(Hp * Wp).view(1, Hp, Wp, 1), shifts=(-shift[0], -shift[1]), dims=(1, 2))
    order = window_partition(pos, window).reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order, inverse


class _GatherTokens(torch.autograd.Function):
    """``x.index_select(1, order)`` whose backward is the inverse gather (a permutation's
    gradient is the inverse permutation), instead of index_select's scatter-add."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def gather_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L, C) with tokens in ``order``; ``inverse`` is its inverse permutation."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():  # tracing records no Function
        return _GatherTokens.apply(x, order, inverse)
    return x.index_select(1, order)


class ChunkedDropPath(DropPath):
    """Stochastic depth that can apply masks drawn for a whole batch to a chunk of it."""

    @property
    def active(self) -> bool:
        return self.p > 0.0 and self.training

    def draw(self, batch: int, ndim: int, device) -> torch.Tensor:
        """The 0/1 keep mask one call on a ``batch``-sized, ``ndim``-D input would draw; it
        consumes the generator exactly as that call does (the draws do not depend on the dtype)."""
        return torch.empty((batch,) + (1,) * (ndim - 1), device=device).bernoulli_(1.0 - self.p)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None or self.p == 0.0 or not self.training:
            return super().forward(x)
        return x * keep.to(dtype=x.dtype, copy=True).div_(1.0 - self.p)


class FastBlock(SwinTransformerV2Block):
    def window_attention(self, x: torch.Tensor, window: Size2, shift: Size2, mask) -> torch.Tensor:
        if not (shift[0] or shift[1]) or recording() == "export":
            return super().window_attention(x, window, shift, mask)
        B, H, W, C = x.shape
        (wh, ww) = window
        pad_h, pad_w = (-H) % wh, (-W) % ww
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
        Hp, Wp = H + pad_h, W + pad_w
        cache = self.__dict__.setdefault("_order_cache", BoundedCache(entries=4, max_bytes=CONSTANT_CACHE_BYTES))
        order, inverse = cache.get((Hp, Wp, window, shift, x.device), lambda: tuple(
            t.to(x.device) for t in shifted_window_order((Hp, Wp), window, shift)))
        windows = gather_tokens(x.reshape(B, Hp * Wp, C), order, inverse).view(-1, wh * ww, C)  # roll + partition
        windows = self.attn(windows, window, mask)  # (B*nW, N, C)
        x = gather_tokens(windows.reshape(B, Hp * Wp, C), inverse, order).view(B, Hp, Wp, C)  # reverse + roll back
        return x[:, :H, :W, :] if (pad_h or pad_w) else x

    def forward(self, x: torch.Tensor, window: Size2, shift: Size2, mask=None, keep=None) -> torch.Tensor:
        """As the plain block's; ``keep``: None, or the stochastic-depth masks of the two
        branches for these images (rows of :meth:`ChunkedDropPath.draw`) in place of fresh draws."""
        k1, k2 = (None, None) if keep is None else keep
        drop1 = self.drop_path if k1 is None else (lambda t: self.drop_path(t, k1))
        drop2 = self.drop_path if k2 is None else (lambda t: self.drop_path(t, k2))
        attend = lambda t: self.window_attention(t, window, shift, mask)  # noqa: E731
        if self.norm_placement == "res_post":
            x = self._add(x, drop1(self.norm1(attend(x))), self.norm1)
            x = self._add(x, drop2(self.norm2(self.mlp(x))), self.norm2)
        else:
            residual = RESIDUALS[self.norm_placement]
            x = residual(x, attend, self.norm1, self.norm1_post, drop1)
            x = residual(x, self.mlp, self.norm2, self.norm2_post, drop2)
        return self.norm3(x) if self.norm3 is not None else x

    def _add(self, x: torch.Tensor, branch: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``x + branch``; without gradients, where ``norm`` is a plain LayerNorm nothing
        watches, into the branch's own buffer, which nothing else holds (addition commutes)."""
        if (not torch.is_grad_enabled() and type(norm) is nn.LayerNorm and unhooked(norm, self.drop_path)
                and branch.shape == x.shape and branch.dtype == x.dtype):
            return branch.add_(x)
        return x + branch


class ChunkedStage(SwinTransformerV2Stage):
    """A stage that runs the batch in chunks of whole images on a CPU (``batch_chunk_mb``)."""

    batch_chunk_mb: float | None = DEFAULT_BATCH_CHUNK_MB

    def chunk_count(self, shape, device, dtype: torch.dtype) -> int:
        """In how many chunks of images this stage runs an input of ``shape`` (B, H, W, C): 1, or
        on a CPU as many as keep the largest per-block tensor (MLP hidden, qkv or scores, at the
        dtype they are computed in) within ``batch_chunk_mb``."""
        B, H, W, _ = shape
        if not self.batch_chunk_mb or B < 2 or not len(self.blocks) or torch.device(device).type != "cpu":
            return 1
        if recording() is not None:  # a captured graph keeps the batch whole
            return 1
        (wh, ww), _ = self.window_and_shift((H, W))
        windows, N = math.ceil(H / wh) * math.ceil(W / ww), wh * ww
        block = self.blocks[0]
        elements = max(H * W * block.mlp.fc1.out_features, H * W * 3 * self.dim, windows * block.attn.num_heads * N * N)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else dtype
        per_chunk = max(1, int(self.batch_chunk_mb * 2**20 // (elements * torch.finfo(dtype).bits // 8)))
        if per_chunk >= B:
            return 1
        inner = [m for m in self.modules() if m is not self]  # only now (most stages end above)
        if not unhooked(*inner) or any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in inner):
            return 1
        return math.ceil(B / per_chunk)

    def run(self, x: torch.Tensor, downsample: bool, prologue=None, chunks: int | None = None) -> torch.Tensor:
        """The blocks (and the downsampling if asked), on the whole batch or chunk by chunk.
        ``prologue``: applied to ``x`` (or to each chunk, ``chunks`` of them) first; the model's
        patch embedding, so that the whole-batch embedded map is never built."""
        down = self.downsample if downsample else None
        n = self.chunk_count(x.shape, x.device, x.dtype) if chunks is None else chunks
        if n == 1:
            x = super().forward_blocks(x if prologue is None else prologue(x))
            return down(x) if down is not None else x
        plan = self._drop_path_plan(x.shape[0], x.device)
        outs, start, masks = [], 0, None
        for part in x.tensor_split(n):
            stop = start + part.shape[0]
            part = part if prologue is None else prologue(part)
            resolution = (part.shape[1], part.shape[2])
            window, shift = self.window_and_shift(resolution)
            masks = self.masks(resolution, part.device) if masks is None else masks  # one map size for all chunks
            for i, block in enumerate(self.blocks):
                keep = None if plan is None or plan[i] is None else tuple(m[start:stop] for m in plan[i])
                s = shift if i % 2 else (0, 0)
                if self.grad_checkpointing and torch.is_grad_enabled():
                    part = checkpoint(block, part, window, s, masks[s], keep, use_reentrant=False)
                else:
                    part = block(part, window, s, masks[s], keep)
            outs.append(down(part) if down is not None else part)
            start = stop
        return torch.cat(outs)

    def _drop_path_plan(self, batch: int, device):
        """Per block, the stochastic-depth masks of the whole batch drawn in the order the
        unchunked forward draws them (None for blocks that draw none), or None."""
        plan = [tuple(b.drop_path.draw(batch, 4, device) for _ in range(2))  # branches are (B, H, W, C)
                if isinstance(b.drop_path, ChunkedDropPath) and b.drop_path.active else None
                for b in self.blocks]
        return None if all(p is None for p in plan) else plan

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, downsample=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, downsample=True)


class ChunkedSwinTransformerV2(SwinTransformerV2):
    """The network whose first stage embeds each chunk of the batch itself, so that the
    whole-batch embedded map is never built."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)  # errors name the caller's batch, not a chunk
        first = self.layers[0] if self.num_layers else None
        if not isinstance(first, ChunkedStage):
            return super().forward_features(x)
        ph, pw = self.patch_size
        n = first.chunk_count((x.shape[0], x.shape[2] // ph, x.shape[3] // pw, self.embed_dim), x.device, x.dtype)
        embedding = [*self.patch_embed.modules(), self.pos_drop]
        if n == 1 or not unhooked(*embedding) or (self.pos_drop.p > 0 and self.pos_drop.training):
            return super().forward_features(x)
        x = first.run(x, downsample=True, prologue=self.embed, chunks=n)
        for stage in self.layers[1:]:
            x = stage(x)
        return self.norm(x)

    def set_batch_chunking(self, budget_mb: float | None = DEFAULT_BATCH_CHUNK_MB) -> None:
        """Run each stage over the batch in chunks of images on a CPU so that no per-block tensor
        of a chunk exceeds ``budget_mb`` MiB (True: the default 32); None, 0 or False: off."""
        if budget_mb is True:
            budget_mb = DEFAULT_BATCH_CHUNK_MB
        if budget_mb is not None and budget_mb is not False and (
                not isinstance(budget_mb, (int, float)) or not math.isfinite(budget_mb) or budget_mb < 0):
            raise ValueError(f"batch_chunk_mb must be a positive number of MiB, 0 or None, got {budget_mb!r}")
        for stage in self.layers:
            if isinstance(stage, ChunkedStage):
                stage.batch_chunk_mb = float(budget_mb) if budget_mb else None
