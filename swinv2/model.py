"""Swin Transformer V2 (Liu et al., CVPR 2022): block, stage and network.

The network keeps the official module names, so its state dict reads like an official one
(without the buffers, which are derived from the input size here), and it accepts the
official constructor's keyword arguments with the same meaning. Unlike the official code it
runs on any input whose sides are multiples of the patch size: each stage derives its window,
shift and mask from the actual feature map at forward time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import (
    CONSTANT_CACHE_BYTES,
    NORM_PLACEMENTS,
    BoundedCache,
    DropPath,
    Mlp,
    PatchEmbed,
    PatchMerging,
    Size2,
    WindowAttention,
    attention_mask,
    effective_window,
    gather_tokens,
    resize_bias_table,
    shifted_window_order,
    to_2tuple,
    unhooked,
    window_partition,
    window_reverse,
)

# Default of ``batch_chunk_mb``: glibc's largest dynamic mmap threshold (see set_batch_chunking).
DEFAULT_BATCH_CHUNK_MB = 32.0

# Weight-decay exemptions of the official optimizer, matched as substrings of parameter names.
NO_WEIGHT_DECAY_KEYWORDS = ("cpb_mlp", "logit_scale", "relative_position_bias_table")


class SwinTransformerV2Block(nn.Module):
    """(Shifted) window attention and MLP, each a residual branch.

    ``norm_placement``: ``res_post`` (V2, paper §3.2): ``x + LN(f(x))`` with the LayerNorm
    zero-initialised so each branch starts at 0; ``pre`` (V1): ``x + f(LN(x))``; ``post``:
    ``LN(x + f(x))``; ``sandwich``: ``x + LN(f(LN(x)))``. With ``extra_norm`` a LayerNorm is
    applied to the main branch after the block (paper §3.2, for the H and G sizes).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer=nn.LayerNorm,
        pretrained_window_size: Size2 = (0, 0),
        norm_placement: str = "res_post",
        attn_type: str = "cosine",
        position_bias: str = "log_cpb",
        table_window: Size2 = (7, 7),
        cpb_hidden_dim: int = 512,
        extra_norm: bool = False,
    ):
        super().__init__()
        if norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement must be one of {NORM_PLACEMENTS}, got {norm_placement!r}")
        self.norm_placement = norm_placement
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(
            dim, num_heads, qkv_bias, attn_drop, drop, pretrained_window_size,
            attn_type, position_bias, table_window, cpb_hidden_dim,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        if norm_placement == "sandwich":
            self.norm1_post = norm_layer(dim)
            self.norm2_post = norm_layer(dim)
        self.norm3 = norm_layer(dim) if extra_norm else None
        # shifted-window token orders, by map size, window, shift and device
        self._order_cache = BoundedCache(entries=4, max_bytes=CONSTANT_CACHE_BYTES)

    def init_res_post_norm(self) -> None:
        """Zero the branch norms so every residual branch starts as 0 (official init)."""
        if self.norm_placement == "res_post":
            for norm in (self.norm1, self.norm2):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)

    def _window_attention(self, x, window: Size2, shift: Size2, mask) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): pad to whole windows, shift, attend, undo."""
        B, H, W, C = x.shape
        wh, ww = window
        pad_h, pad_w = (-H) % wh, (-W) % ww
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
        Hp, Wp = H + pad_h, W + pad_w
        if shift[0] or shift[1]:
            # roll + partition (and reverse + roll back) as one gather each, same values
            order, inverse = self._shifted_order((Hp, Wp), window, shift, x.device)
            windows = gather_tokens(x.reshape(B, Hp * Wp, C), order, inverse).view(-1, wh * ww, C)
            windows = self.attn(windows, window, mask)  # (B*nW, N, C)
            x = gather_tokens(windows.reshape(B, Hp * Wp, C), inverse, order).view(B, Hp, Wp, C)
        else:
            windows = window_partition(x, window)  # (B*nW, N, C)
            windows = self.attn(windows, window, mask)  # (B*nW, N, C)
            x = window_reverse(windows, window, Hp, Wp)  # (B, Hp, Wp, C)
        return x[:, :H, :W, :] if (pad_h or pad_w) else x

    def _shifted_order(self, resolution: Size2, window: Size2, shift: Size2, device):
        return self._order_cache.get(
            (resolution, window, shift, device),
            lambda: tuple(t.to(device) for t in shifted_window_order(resolution, window, shift)))

    def _add_branch(self, x: torch.Tensor, branch: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``x + branch`` for a res-post-norm branch (``norm``'s output, or that output scaled
        by stochastic depth). Without gradients, and when ``norm`` is a plain LayerNorm that no
        hook watches, the sum goes into the branch's own buffer, which nothing else holds: the
        same values (addition commutes), one large allocation less per branch."""
        if (not torch.is_grad_enabled() and type(norm) is nn.LayerNorm and unhooked(norm, self.drop_path)
                and branch.shape == x.shape and branch.dtype == x.dtype):
            return branch.add_(x)
        return x + branch

    def forward(self, x: torch.Tensor, window: Size2, shift: Size2, mask=None, keep=None) -> torch.Tensor:
        """x: (B, H, W, C); window/shift: this block's; mask: (nW, N, N) or None; keep: None,
        or the stochastic-depth masks of the attention and MLP branches for these B images
        (rows of :meth:`DropPath.draw`), in place of fresh draws."""
        attend = lambda t: self._window_attention(t, window, shift, mask)  # noqa: E731
        k1, k2 = (None, None) if keep is None else keep
        drop = lambda t, k: self.drop_path(t) if k is None else self.drop_path(t, k)  # noqa: E731
        p = self.norm_placement
        if p == "res_post":
            x = self._add_branch(x, drop(self.norm1(attend(x)), k1), self.norm1)
            x = self._add_branch(x, drop(self.norm2(self.mlp(x)), k2), self.norm2)
        elif p == "pre":
            x = x + drop(attend(self.norm1(x)), k1)
            x = x + drop(self.mlp(self.norm2(x)), k2)
        elif p == "post":
            x = self.norm1(x + drop(attend(x), k1))
            x = self.norm2(x + drop(self.mlp(x), k2))
        else:  # sandwich
            x = x + drop(self.norm1_post(attend(self.norm1(x))), k1)
            x = x + drop(self.norm2_post(self.mlp(self.norm2(x))), k2)
        if self.norm3 is not None:
            x = self.norm3(x)
        return x


class SwinTransformerV2Stage(nn.Module):
    """A run of blocks at one resolution, alternating unshifted and shifted windows, then
    (except in the last stage) patch merging. (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Size2,
        downsample: bool,
        drop_path: Sequence[float],
        norm_layer=nn.LayerNorm,
        extra_norm_period: int = 0,
        window_rule: str = "per_axis",
        **block_kwargs,
    ):
        super().__init__()
        self.dim = dim
        self.window_size = tuple(window_size)
        self.window_rule = window_rule
        self.grad_checkpointing = False
        self.batch_chunk_mb: float | None = None  # set by the model (see batch_chunks)
        # attention masks by map size, window, shift and device; one at 800x1333 with window 16
        # is ~70 MB, so large ones are built per call instead of kept
        self._mask_cache = BoundedCache(entries=4, max_bytes=4 * CONSTANT_CACHE_BYTES)
        self.blocks = nn.ModuleList(
            SwinTransformerV2Block(
                dim, num_heads, drop_path=drop_path[i], norm_layer=norm_layer,
                extra_norm=bool(extra_norm_period) and (i + 1) % extra_norm_period == 0,
                **block_kwargs,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, norm_layer) if downsample else None

    def window_and_shift(self, resolution: Size2) -> tuple[Size2, Size2]:
        return effective_window(resolution, self.window_size, self.window_rule)

    def _mask(self, resolution: Size2, window: Size2, shift: Size2, device):
        return self._mask_cache.get((resolution, window, shift, device),
                                    lambda: attention_mask(resolution, window, shift, device))

    def _masks(self, x: torch.Tensor) -> dict:
        """{shift: mask} of the unshifted and shifted blocks for the map ``x`` (B, H, W, C),
        each built (or taken from the cache) once per stage call, shared by its blocks."""
        resolution = (x.shape[1], x.shape[2])
        window, shift = self.window_and_shift(resolution)
        return {s: self._mask(resolution, window, s, x.device) for s in {(0, 0), shift}}

    def _blocks(self, x: torch.Tensor, keeps=None, masks: dict | None = None) -> torch.Tensor:
        resolution = (x.shape[1], x.shape[2])
        window, shift = self.window_and_shift(resolution)
        masks = self._masks(x) if masks is None else masks
        for i, block in enumerate(self.blocks):
            s = shift if i % 2 else (0, 0)
            mask = masks[s]
            keep = None if keeps is None else keeps[i]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, window, s, mask, keep, use_reentrant=False)
            else:
                x = block(x, window, s, mask, keep)
        return x

    def batch_chunks(self, x: torch.Tensor) -> int:
        """In how many chunks of images this stage runs the batch ``x`` (B, H, W, C): 1 for
        the whole batch at once; more on a CPU when ``batch_chunk_mb`` is set and the
        largest per-block tensor of the whole batch (MLP hidden, qkv or attention scores, at
        the dtype they are computed in) would exceed it. Not while compiling, tracing or
        exporting (the graph keeps the batch whole), nor while dropout is active (its draws
        would follow the chunks; stochastic depth is drawn for the whole batch instead), nor
        while a hook watches a module inside the stage (it would see each chunk)."""
        return self.chunk_count(x.shape, x.device, x.dtype)

    def chunk_count(self, shape, device, dtype: torch.dtype) -> int:
        """:meth:`batch_chunks` for an input of this shape (B, H, W, C), device and dtype."""
        B, H, W, _ = shape
        device = torch.device(device)
        if not self.batch_chunk_mb or B < 2 or not len(self.blocks) or device.type != "cpu":
            return 1
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.onnx.is_in_onnx_export()):
            return 1
        (wh, ww), _ = self.window_and_shift((H, W))
        windows, N = math.ceil(H / wh) * math.ceil(W / ww), wh * ww
        block = self.blocks[0]
        elements = max(H * W * block.mlp.fc1.out_features, H * W * 3 * self.dim,
                       windows * block.attn.num_heads * N * N)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else dtype
        per_chunk = max(1, int(self.batch_chunk_mb * 2**20 // (elements * torch.finfo(dtype).bits // 8)))
        if per_chunk >= B:
            return 1
        # only now walk the submodules (most stages of most batches end above)
        inner = [m for m in self.modules() if m is not self]
        if not unhooked(*inner) or any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in inner):
            return 1
        return math.ceil(B / per_chunk)

    def _drop_path_plan(self, batch: int, device):
        """Per block, the stochastic-depth masks of the whole batch, drawn in the order the
        unchunked forward draws them (None for blocks that draw none), or None."""
        if not any(isinstance(b.drop_path, DropPath) and b.drop_path.active for b in self.blocks):
            return None
        return [
            tuple(b.drop_path.draw(batch, 4, device) for _ in range(2))  # branches are (B, H, W, C)
            if isinstance(b.drop_path, DropPath) and b.drop_path.active else None
            for b in self.blocks
        ]

    def _run(self, x: torch.Tensor, downsample: bool, prologue=None, chunks: int | None = None) -> torch.Tensor:
        """The blocks (and the downsampling if asked), on the whole batch or chunk by chunk.
        ``prologue``: applied to ``x`` (or each chunk of it, ``chunks`` of them) first; the
        model's patch embedding, so that the whole-batch embedded map is never built.

        Each image's result is the same either way (up to float rounding: with chunks the
        weight gradients are summed over chunks). Chunks keep every tensor small: on a CPU a
        tensor over glibc's mmap threshold (at most 32 MiB) is mapped fresh and page-faulted
        in on every allocation and unmapped on release, which on a 2-core VM took a third
        of a step, while smaller blocks are reused from the heap; they also stay in cache.
        """
        down = self.downsample if downsample else None
        n = self.batch_chunks(x) if chunks is None else chunks
        if n == 1:
            x = self._blocks(x if prologue is None else prologue(x))
            return down(x) if down is not None else x
        plan = self._drop_path_plan(x.shape[0], x.device)
        outs, start, masks = [], 0, None
        for part in x.tensor_split(n):
            stop = start + part.shape[0]
            keeps = None if plan is None else [
                None if k is None else tuple(m[start:stop] for m in k) for k in plan
            ]
            part = part if prologue is None else prologue(part)
            masks = self._masks(part) if masks is None else masks  # every chunk has the same map size
            part = self._blocks(part, keeps, masks)
            outs.append(down(part) if down is not None else part)
            start = stop
        return torch.cat(outs)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), without the downsampling."""
        return self._run(x, downsample=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, downsample=True)


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2.

    The first group of arguments is the official constructor's, with the same meaning and
    defaults; ``norm_layer`` must build a LayerNorm-like module from a width.
    The keyword-only arguments are switches for the paper's ablations and extensions:

    - ``norm_placement``: ``res_post`` (V2), ``pre`` (V1), ``post`` or ``sandwich`` (Table 7).
    - ``attn_type``: ``cosine`` (V2 scaled cosine) or ``dot`` (V1 scaled dot product).
    - ``position_bias``: ``log_cpb`` (V2), ``linear_cpb``, ``table`` (V1) or ``none`` (Table 1).
    - ``extra_norm_period``: a LayerNorm on the main branch after every N-th block of a stage
      (6 for the H and G sizes, paper §3.2); 0 for none.
    - ``window_rule``: ``per_axis`` shrinks each axis of the window to a smaller map on its
      own; ``official`` reproduces the official min(H, W) rule on non-square maps.
    - ``cpb_hidden_dim``: width of the position-bias MLP (512 in the paper).
    - ``global_pool``: ``avg``, or ``""`` to keep the map in :meth:`forward_head`.
    - ``grad_checkpointing``: recompute blocks in backward (paper §3.5): False, True (every
      stage) or a list of stage indices; see :meth:`set_grad_checkpointing`.
    - ``sequential_attention``: attend windows in chunks, one chunk after the other (paper
      §3.5): False, True (every stage), a list of stage indices, or a dict {stage: windows
      per chunk, or None to size chunks from ``sequential_attention_budget_mb``}; see
      :meth:`set_sequential_attention`.
    - ``batch_chunk_mb``: on a CPU, run each stage over the batch in chunks of images so
      that no per-block tensor exceeds this many MiB (None or 0: never); see
      :meth:`set_batch_chunking`.

    ``fused_window_process`` is accepted and ignored, as in the official code.
    """

    def __init__(
        self,
        img_size: int | Size2 = 224,
        patch_size: int | Size2 = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Size2 = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer=nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        pretrained_window_sizes: Sequence[int | Size2] = (0, 0, 0, 0),
        *,
        norm_placement: str = "res_post",
        attn_type: str = "cosine",
        position_bias: str = "log_cpb",
        extra_norm_period: int = 0,
        window_rule: str = "per_axis",
        cpb_hidden_dim: int = 512,
        global_pool: str = "avg",
        grad_checkpointing: bool | Sequence[int] = False,
        sequential_attention: bool | Sequence[int] | Mapping[int, int | None] = False,
        sequential_attention_budget_mb: float | None = None,
        batch_chunk_mb: float | None = DEFAULT_BATCH_CHUNK_MB,
        fused_window_process: bool = False,
    ):
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        if len(pretrained_window_sizes) != len(depths):
            raise ValueError(
                f"pretrained_window_sizes {tuple(pretrained_window_sizes)} needs one entry per stage ({len(depths)})"
            )
        if in_chans < 1 or embed_dim < 1 or any(d < 0 for d in depths):
            raise ValueError("in_chans, embed_dim and depths must be positive")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.ape = ape
        self.global_pool = global_pool
        self.window_rule = window_rule
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.pretrained_window_sizes = tuple(to_2tuple(p, "pretrained_window_sizes") for p in pretrained_window_sizes)
        self.img_size = to_2tuple(img_size, "img_size")
        self.window_size = self._check_window(window_size)
        self._check_img_size(self.img_size)
        if any(min(p) < 0 for p in self.pretrained_window_sizes):
            raise ValueError(f"pretrained_window_sizes must be >= 0, got {tuple(pretrained_window_sizes)}")
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads), window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, ape=ape, patch_norm=patch_norm,
            pretrained_window_sizes=[list(p) for p in self.pretrained_window_sizes],
            norm_placement=norm_placement, attn_type=attn_type, position_bias=position_bias,
            extra_norm_period=extra_norm_period, window_rule=window_rule,
            cpb_hidden_dim=cpb_hidden_dim, global_pool=global_pool,
        )

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim, patch_norm, norm_layer)
        grid = self.patch_grid
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(
                SwinTransformerV2Stage(
                    dim=int(embed_dim * 2**i),
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=self.window_size,
                    downsample=i < self.num_layers - 1,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    norm_layer=norm_layer,
                    extra_norm_period=extra_norm_period,
                    window_rule=window_rule,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    pretrained_window_size=self.pretrained_window_sizes[i],
                    norm_placement=norm_placement,
                    attn_type=attn_type,
                    position_bias=position_bias,
                    table_window=self.stage_windows()[i][0],
                    cpb_hidden_dim=cpb_hidden_dim,
                )
            )
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=int(embed_dim * 2**i), reduction=self.patch_size[0] * 2**i, module=f"layers.{i}")
            for i in range(self.num_layers)
        ]

        self.apply(_init_weights)
        for stage in self.layers:
            for block in stage.blocks:
                block.init_res_post_norm()
        # Memory options (paper §3.5); the setters record them in ``config``.
        self.config.update(grad_checkpointing=False, sequential_attention=False,
                           sequential_attention_budget_mb=None)
        checkpointed = _stage_spec(True if use_checkpoint else grad_checkpointing, self.num_layers,
                                   "grad_checkpointing")
        if checkpointed:
            self.set_grad_checkpointing(True, stages=checkpointed)
        self._apply_sequential_attention(
            _stage_spec(sequential_attention, self.num_layers, "sequential_attention"), sequential_attention_budget_mb
        )
        self.set_batch_chunking(batch_chunk_mb)

    # -- sizes and windows ------------------------------------------------------------

    def _check_window(self, window_size) -> Size2:
        window = to_2tuple(window_size, "window_size")
        if min(window) < 1:
            raise ValueError(f"window_size must be at least 1, got {window_size!r}")
        return window

    def _check_img_size(self, img_size: Size2) -> None:
        ph, pw = self.patch_size
        if img_size[0] % ph or img_size[1] % pw or min(img_size) < 1:
            raise ValueError(
                f"image size {img_size} must be a positive multiple of the patch size {self.patch_size}"
            )

    @property
    def patch_grid(self) -> Size2:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    def stage_resolutions(self, img_size: int | Size2 | None = None) -> list[Size2]:
        """Feature-map size of each stage for an input of ``img_size`` (default: the model's)."""
        size = self.img_size if img_size is None else to_2tuple(img_size, "img_size")
        self._check_img_size(size)
        h, w = size[0] // self.patch_size[0], size[1] // self.patch_size[1]
        resolutions = []
        for _ in range(self.num_layers):
            resolutions.append((h, w))
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return resolutions

    def stage_windows(self, img_size=None) -> list[tuple[Size2, Size2]]:
        """(window, shift) of each stage for an input of ``img_size`` (default: the model's)."""
        return [
            effective_window(res, self.window_size, self.window_rule)
            for res in self.stage_resolutions(img_size)
        ]

    @torch.no_grad()
    def set_input_size(
        self,
        img_size: int | Size2 | None = None,
        window_size: int | Size2 | None = None,
        window_rule: str | None = None,
    ) -> None:
        """Change the nominal input size and/or the window, keeping the weights.

        Forward already accepts any size; this changes the window the stages use, the size
        the absolute position embedding and V1 bias tables are stored at (both are resampled
        bicubically), and the default size for :meth:`flops`.
        """
        if img_size is not None:
            new_size = to_2tuple(img_size, "img_size")
            self._check_img_size(new_size)
            old_grid = self.patch_grid
            self.img_size = new_size
            if self.ape and self.patch_grid != old_grid:
                pos = _resize_pos_embed(self.absolute_pos_embed.data, old_grid, self.patch_grid)
                self.absolute_pos_embed = nn.Parameter(pos)
        if window_size is not None:
            self.window_size = self._check_window(window_size)
        if window_rule is not None:
            effective_window((1, 1), (1, 1), window_rule)  # validates the name
            self.window_rule = window_rule
        for stage, (window, _) in zip(self.layers, self.stage_windows()):
            stage.window_size, stage.window_rule = self.window_size, self.window_rule
            stage._mask_cache.clear()
            for block in stage.blocks:
                attn = block.attn
                if attn.position_bias == "table" and attn.table_window != window:
                    table = resize_bias_table(attn.relative_position_bias_table.data, attn.table_window, window)
                    attn.relative_position_bias_table = nn.Parameter(table)
                    attn.table_window = window
        self.config.update(
            img_size=list(self.img_size), window_size=list(self.window_size), window_rule=self.window_rule
        )

    # -- forward ----------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected an image tensor of shape (B, C, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image tensor, got {str(x.dtype).removeprefix('torch.')} "
                            "(convert it, e.g. x.float() / 255 for 8-bit images, then normalise)")
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if H % ph or W % pw or H == 0 or W == 0:
            hint = (max(ph, H // ph * ph), max(pw, W // pw * pw))
            raise ValueError(
                f"input size {H}x{W} is not a multiple of the patch size {ph}x{pw}; "
                f"resize or crop it, e.g. to {hint[0]}x{hint[1]}"
            )

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.patch_embed(x)  # (B, H/p, W/p, C)
        return self._add_pos_embed(x)

    def _add_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.ape:
            grid = (x.shape[1], x.shape[2])
            pos = self.absolute_pos_embed
            if grid != self.patch_grid:
                pos = _resize_pos_embed(pos, self.patch_grid, grid)
            x = x + pos.view(1, grid[0], grid[1], -1)
        return self.pos_drop(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Stages and final norm on embedded tokens (B, H/p, W/p, C) -> (B, H/32, W/32, C_final)."""
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> the unpooled, normed final map (B, H/32, W/32, C_final), NHWC."""
        self._check_input(x)  # errors name the caller's batch, not a chunk
        n = self._embed_chunks(x)
        if n == 1:
            return self.forward_tokens(self._embed(x))
        # the first stage runs in chunks: embed each chunk there, not the whole batch first
        x = self.layers[0]._run(x, downsample=True, prologue=self._embed, chunks=n)
        for stage in self.layers[1:]:
            x = stage(x)
        return self.norm(x)

    def _embed_chunks(self, x: torch.Tensor) -> int:
        """The first stage's :meth:`~SwinTransformerV2Stage.batch_chunks` for the embedding of
        ``x``, or 1 where the embedding must see the whole batch (a hook on it, or active
        dropout after it) or the input is not an image batch (the embedding raises)."""
        if not self.num_layers or x.ndim != 4 or x.shape[1] != self.in_chans:
            return 1
        ph, pw = self.patch_size
        shape = (x.shape[0], x.shape[2] // ph, x.shape[3] // pw, self.embed_dim)
        n = self.layers[0].chunk_count(shape, x.device, x.dtype)
        embedding = list(self.patch_embed.modules()) + [self.pos_drop]
        if n > 1 and (not unhooked(*embedding) or (self.pos_drop.p > 0 and self.pos_drop.training)):
            return 1
        return n

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final map (B, h, w, C) -> logits (B, classes), or the pooled (B, C) if pre_logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Per-stage feature maps for dense tasks.

        Each map is a stage's output before its patch merging, at stride patch*2^i.
        ``indices``: stage indices to return, or an int n for the last n stages (default all).
        ``norm``: LayerNorm each returned map; the last stage uses the model's final norm
        (so its map equals ``forward_features``), earlier ones a LayerNorm without affine
        parameters. ``output_fmt``: ``NCHW`` or ``NHWC``. ``stop_early``: skip the
        stages after the last one requested. Returns the list of maps if ``intermediates_only``,
        else ``(final, maps)``: ``final`` is the NHWC output of the last stage run, normed when
        that is the network's last stage (then it equals ``forward_features``).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = _stage_indices(self.num_layers, indices)
        x = self._embed(x)
        last = max(take) if stop_early else self.num_layers - 1
        maps = []
        for i, stage in enumerate(self.layers[: last + 1]):
            x = stage.forward_blocks(x)
            if i in take:
                out = x
                if norm:
                    out = self.norm(x) if i == self.num_layers - 1 else F.layer_norm(x, x.shape[-1:])
                maps.append(out.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else out)
            if stage.downsample is not None and i < last:
                x = stage.downsample(x)
        if intermediates_only:
            return maps
        return self.norm(x) if last == self.num_layers - 1 else x, maps

    # -- training helpers --------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True, stages: Iterable[int] | None = None) -> None:
        """Recompute each block's activations in backward (same outputs and gradients).

        ``stages`` limits it to those stage indices; the others are switched off.
        """
        chosen = set(range(self.num_layers) if stages is None else _stage_spec(list(stages), self.num_layers,
                                                                               "stages"))
        for i, stage in enumerate(self.layers):
            stage.grad_checkpointing = bool(enable) and i in chosen
        on = [i for i, stage in enumerate(self.layers) if stage.grad_checkpointing]
        self.config["grad_checkpointing"] = on if on else False

    def set_sequential_attention(
        self,
        stages: bool | Iterable[int] | None = None,
        chunk_windows: int | None = None,
        memory_budget_mb: float | None = None,
    ) -> None:
        """Attend windows in chunks, one chunk after the other (paper §3.5: used in the first
        two stages at 1536x1536 with 32x32 windows), so that the attention scores alive at
        once are bounded; outputs and gradients equal the batched computation.

        ``stages``: stage indices (None or True: all; False or []: switch off everywhere).
        ``chunk_windows``: windows per chunk; otherwise each attention call derives it from
        ``memory_budget_mb`` (default 256) for its score-sized tensors:
        ``chunk = budget / (SCORE_TENSORS * nH * N^2 * bytes per element)``, at the dtype
        and window it actually runs with. With gradients each chunk is recomputed in backward,
        which costs one extra attention forward (not the qkv and output projections).
        """
        if chunk_windows is not None and chunk_windows < 1:
            raise ValueError(f"chunk_windows must be at least 1, got {chunk_windows}")
        if memory_budget_mb is not None and memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
        chosen = _stage_spec(True if stages is None else stages, self.num_layers, "stages")
        self._apply_sequential_attention(dict.fromkeys(chosen, chunk_windows), memory_budget_mb)

    def _apply_sequential_attention(self, spec: dict[int, int | None], budget_mb: float | None) -> None:
        """Set every stage from ``{stage: windows per chunk or None}``; stages not in it are off."""
        for i, stage in enumerate(self.layers):
            for block in stage.blocks:
                block.attn.sequential = i in spec
                block.attn.chunk_windows = spec.get(i)
                block.attn.memory_budget_mb = budget_mb if i in spec else None
        self.config["sequential_attention"] = dict(spec) if spec else False
        self.config["sequential_attention_budget_mb"] = budget_mb if spec else None

    def set_batch_chunking(self, budget_mb: float | None = DEFAULT_BATCH_CHUNK_MB) -> None:
        """On a CPU, run each stage over the batch in chunks of whole images, so that no
        per-block tensor (MLP hidden, qkv, attention scores) of a chunk exceeds ``budget_mb``
        MiB (default 32, glibc's largest mmap threshold); None, 0 or False switch it off.

        The outputs, losses and gradients are those of the whole batch at once (up to float
        rounding; stochastic depth draws the whole batch's masks, so a seeded run drops the
        same branches). What changes is speed and memory: below the threshold the allocator
        reuses freed memory instead of mapping and page-faulting it in again on every
        allocation (SwinV2-T, batch 32, 2-core CPU, timed interleaved on and off: fp32
        inference 1.3-1.6x, the fp32 training step 1.56x faster; inference's peak memory
        434 -> 81 MiB), and a chunk's tensors stay in cache. Stages whose tensors fit
        already, GPUs, compiled or traced forwards, and blocks with active dropout run the
        batch whole (see :meth:`SwinTransformerV2Stage.batch_chunks`).
        """
        if budget_mb is True:
            budget_mb = DEFAULT_BATCH_CHUNK_MB
        if budget_mb is not None and budget_mb is not False and (
                not isinstance(budget_mb, (int, float)) or not math.isfinite(budget_mb) or budget_mb < 0):
            raise ValueError(f"batch_chunk_mb must be a positive number of MiB, 0 or None, got {budget_mb!r}")
        budget = float(budget_mb) if budget_mb else None
        for stage in self.layers:
            stage.batch_chunk_mb = budget
        self.config["batch_chunk_mb"] = budget

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw every parameter again from the constructor's initial distributions (official
        init, res-post-norm zeros, PyTorch's default for the patch convolution).

        For a model built on the meta device and materialised with ``to_empty``, e.g. after
        FSDP's ``fully_shard``, where each process then initialises only its own shards and
        no process ever holds the whole model. The values are fresh draws, not those of a
        model constructed with the same seed. Under FSDP on a CPU each process draws its
        shards from its own generator: seed the processes differently (e.g. seed + rank),
        or every shard repeats the first.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
            elif isinstance(module, WindowAttention):
                module.reset_parameters()
            _init_weights(module)  # Linear and LayerNorm
        if self.ape:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        for stage in self.layers:
            for block in stage.blocks:
                block.init_res_post_norm()

    def set_fused_attn(self, enable: bool = True) -> None:
        """Use one fused ``scaled_dot_product_attention`` call per window batch (default), or
        the explicit step-by-step computation of the official code (the reference path)."""
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.fused_attn = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters trained without weight decay by the official recipe
        (besides every bias and norm weight, which the optimizer exempts by shape)."""
        return {
            name for name, _ in self.named_parameters()
            if name == "absolute_pos_embed" or any(k in name for k in NO_WEIGHT_DECAY_KEYWORDS)
        }

    def no_weight_decay_keywords(self) -> set[str]:
        return set(NO_WEIGHT_DECAY_KEYWORDS)

    @property
    def num_layer_ids(self) -> int:
        """Number of distinct layer ids for layer-wise LR decay: blocks + 2."""
        return sum(self.depths) + 2

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter for layer-wise LR decay, as in the official SimMIM fine-tune:
        stem 0, block j of stage i ``sum(depths[:i]) + j + 1``, a stage's merging shares its
        last block's id, everything after the stages ``num_layer_ids - 1``."""
        if name.startswith(("patch_embed", "mask_token")):
            return 0
        if name.startswith("layers."):
            parts = name.split(".")
            i = int(parts[1])
            if parts[2] == "blocks":
                return sum(self.depths[:i]) + int(parts[3]) + 1
            return sum(self.depths[: i + 1])
        return self.num_layer_ids - 1

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0: none)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = self.config["global_pool"] = global_pool
        self.num_classes = self.config["num_classes"] = num_classes
        ref = self.norm.weight
        self.head = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0 else nn.Identity()
        )
        if num_classes > 0:
            _init_weights(self.head)

    # -- cost -------------------------------------------------------------------------

    def flops(self, img_size: int | Size2 | None = None) -> int:
        """Multiply-accumulates of one forward pass, counted as the official ``flops()``
        does (linear and attention matmuls, norms, patch embedding, head); the position-bias
        MLP is not counted. Uses each stage's effective window and padding."""
        size = self.img_size if img_size is None else to_2tuple(img_size, "img_size")
        self._check_img_size(size)
        ph, pw = self.patch_size
        gh, gw = size[0] // ph, size[1] // pw
        C = self.embed_dim
        total = gh * gw * C * self.in_chans * ph * pw
        if self.patch_embed.norm is not None:
            total += gh * gw * C
        for stage, (h, w), (window, _) in zip(
            self.layers, self.stage_resolutions(size), self.stage_windows(size)
        ):
            dim = stage.dim
            N = window[0] * window[1]
            n_windows = math.ceil(h / window[0]) * math.ceil(w / window[1])
            for block in stage.blocks:
                hidden = block.mlp.fc1.out_features
                attn = N * dim * 3 * dim + 2 * N * N * dim + N * dim * dim  # qkv, qk^T, av, proj
                total += 2 * h * w * dim + n_windows * attn + 2 * h * w * dim * hidden
            if stage.downsample is not None:
                total += math.ceil(h / 2) * math.ceil(w / 2) * 4 * dim * 2 * dim + h * w * dim // 2
        fh, fw = self.stage_resolutions(size)[-1]
        total += self.num_features * fh * fw
        if self.num_classes > 0:
            total += self.num_features * self.num_classes
        return int(total)


def _stage_spec(spec, num_stages: int, name: str) -> dict[int, int | None]:
    """False / True / [stages] / {stage: value} -> {stage: value or None}, indices checked.
    JSON-saved configs turn dict keys into strings, so those are accepted too."""
    if spec is None or spec is False:
        return {}
    if spec is True:
        return dict.fromkeys(range(num_stages))
    if isinstance(spec, Mapping):
        out = {int(k): (None if v is None else int(v)) for k, v in spec.items()}
    elif isinstance(spec, Iterable) and not isinstance(spec, str):
        out = dict.fromkeys(int(i) for i in spec)
    else:
        raise TypeError(f"{name} must be a bool, a list of stage indices or a dict, got {spec!r}")
    bad = [i for i in out if not 0 <= i < num_stages]
    if bad:
        raise ValueError(f"{name}: stage indices {bad} out of range for {num_stages} stages")
    return out


def _stage_indices(num_stages: int, indices) -> list[int]:
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices}: the model has {num_stages} stages")
        return list(range(num_stages - indices, num_stages))
    take = [i % num_stages if -num_stages <= i < num_stages else None for i in indices]
    if None in take:
        raise ValueError(f"indices {list(indices)} out of range for {num_stages} stages")
    return sorted(set(take))


def _resize_pos_embed(pos: torch.Tensor, old: Size2, new: Size2) -> torch.Tensor:
    """Bicubic resize of an absolute position embedding (1, oh*ow, C) -> (1, nh*nw, C)."""
    C = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], C)


def _init_weights(module: nn.Module) -> None:
    """Official init: linear weights ~ N(0, 0.02) truncated at +-2 (absolute, so in effect
    untruncated), zero biases; LayerNorm weight 1, bias 0. Convolutions keep PyTorch's."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
