"""Swin Transformer V2 (Liu et al., CVPR 2022): the network.

The network keeps the official module names, so its state dict reads like an official one
(without the buffers, which are derived from the input size here), and it accepts the official
constructor's keyword arguments with the same meaning. Unlike the official code it runs on any
input whose sides are multiples of the patch size: each stage derives its window, shift and mask
from the actual feature map at forward time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import SwinTransformerV2Block, SwinTransformerV2Stage
from .layers import PatchEmbed, WindowAttention, to_2tuple
from .windows import Size2, effective_window, resize_bias_table

# Weight-decay exemptions of the official optimizer, matched as substrings of parameter names.
NO_WEIGHT_DECAY_KEYWORDS = ("cpb_mlp", "logit_scale", "relative_position_bias_table")
MERGE_NORMS = ("post", "pre")


class SwinTransformerV2Stages(nn.Module):
    """What the image and the video network share: the stages, the head, the memory switches
    (§3.5) and the optimizer's helpers. Subclasses build ``patch_embed``, ``layers`` (a list of
    :class:`SwinTransformerV2Stage`), ``norm`` and ``head`` and define :meth:`embed`."""

    OUTPUT_FORMATS = ("NCHW", "NHWC")  # channels first, channels last

    def build_stages(self, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], drop_path_rate: float,
                     norm_layer, stage_kwargs) -> None:
        """``self.layers``: one stage per depth, width doubling, stochastic depth rising
        linearly over all blocks; ``stage_kwargs(i)`` gives stage i's remaining arguments."""
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth
        self.layers = nn.ModuleList(
            SwinTransformerV2Stage(
                dim=int(embed_dim * 2**i), depth=depths[i], num_heads=num_heads[i],
                downsample=i < len(depths) - 1, drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                norm_layer=norm_layer, **stage_kwargs(i),
            )
            for i in range(len(depths))
        )

    def finish_init(self, use_checkpoint, grad_checkpointing, sequential_attention, budget_mb) -> None:
        """Official initial values, then the memory switches the constructor was given."""
        self.apply(_init_weights)
        for block in self.iter_blocks():
            block.init_res_post_norm()
        self.set_grad_checkpointing(True, stages=stage_spec(True if use_checkpoint else grad_checkpointing,
                                                             self.num_layers, "grad_checkpointing"))
        self._sequential_budget_mb = None
        self._apply_sequential_attention(stage_spec(sequential_attention, self.num_layers, "sequential_attention"),
                                         budget_mb)

    def runtime_config(self) -> dict:
        """The constructor arguments set after construction: head, checkpointing, sequential
        attention (part of ``config``)."""
        sequential = {i: b.attn.chunk_windows for i, s in enumerate(self.layers) for b in s.blocks if b.attn.sequential}
        return dict(
            num_classes=self.num_classes, global_pool=self.global_pool,
            grad_checkpointing=[i for i, s in enumerate(self.layers) if s.grad_checkpointing] or False,
            sequential_attention=sequential or False,
            sequential_attention_budget_mb=self._sequential_budget_mb if sequential else None,
        )

    @torch.no_grad()
    def apply_windows(self, windows: Sequence) -> None:
        """Give every stage the model's window (and rule), forget cached masks, and resample V1
        bias tables to ``windows`` (each stage's effective window at the nominal input size)."""
        for stage, window in zip(self.layers, windows):
            stage.window_size, stage.window_rule = self.window_size, self.window_rule
            stage.clear_masks()
            for block in stage.blocks:
                attn = block.attn
                if attn.relative_position_bias_table is not None and attn.table_window != tuple(window):
                    table = resize_bias_table(attn.relative_position_bias_table.data, attn.table_window, window)
                    attn.relative_position_bias_table, attn.table_window = nn.Parameter(table), tuple(window)

    def iter_blocks(self) -> Iterable[SwinTransformerV2Block]:
        """Every block of every stage, in order."""
        return (block for stage in self.layers for block in stage.blocks)

    # -- forward --------------------------------------------------------------------------------

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Stages and final norm on embedded tokens (B, *grid, C) -> (B, *grid/8, C_final)."""
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final map (B, h, w, C) or (B, t, h, w, C) -> logits (B, classes), or the pooled (B, C)
        if pre_logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=tuple(range(1, x.ndim - 1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> the unpooled, normed final map, channel-last."""
        return self.forward_tokens(self.embed(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str | None = None,
                              intermediates_only: bool = False):
        """Per-stage feature maps for dense tasks: each a stage's output before its patch merging,
        at stride patch*2^i. ``indices``: stage indices, or an int n for the last n (default all).
        ``norm``: LayerNorm each map (the last stage with the model's final norm, so it equals
        ``forward_features``; earlier ones without affine parameters). ``output_fmt``: ``NCHW`` (default) or
        ``NHWC`` (videos: ``NCTHW`` (default) or ``NTHWC``). ``stop_early``: skip the stages after the last one
        asked for. Returns the maps if ``intermediates_only``, else ``(final, maps)``, ``final`` the
        channel-last output of the last stage run (normed when it is the network's last)."""
        channels_first, channels_last = self.OUTPUT_FORMATS
        output_fmt = channels_first if output_fmt is None else output_fmt
        if output_fmt not in self.OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be '{channels_first}' or '{channels_last}', got {output_fmt!r}")
        take = _stage_indices(self.num_layers, indices)
        last = max(take) if stop_early else self.num_layers - 1
        x, maps = self.embed(x), []
        for i, stage in enumerate(self.layers[: last + 1]):
            x = stage.forward_blocks(x)
            if i in take:
                out = x if not norm else self.norm(x) if i == self.num_layers - 1 else F.layer_norm(x, x.shape[-1:])
                maps.append(out.movedim(-1, 1).contiguous() if output_fmt == channels_first else out)
            if stage.downsample is not None and i < last:
                x = stage.downsample(x)
        if intermediates_only:
            return maps
        return self.norm(x) if last == self.num_layers - 1 else x, maps

    # -- memory (§3.5) ---------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True, stages: Iterable[int] | None = None) -> None:
        """Recompute each block's activations in backward (same outputs and gradients). ``stages``
        limits it to those stage indices; the others are switched off."""
        chosen = set(range(self.num_layers) if stages is None else stage_spec(list(stages), self.num_layers,
                                                                               "stages"))
        for i, stage in enumerate(self.layers):
            stage.grad_checkpointing = bool(enable) and i in chosen

    def set_sequential_attention(self, stages: bool | Iterable[int] | None = None, chunk_windows: int | None = None,
                                 memory_budget_mb: float | None = None) -> None:
        """Attend windows in chunks, one chunk after the other (§3.5: the first two stages at
        1536x1536 with 32x32 windows), bounding the attention scores alive at once; outputs and
        gradients equal the batched computation. ``stages``: indices (None or True: all; False or
        []: off). ``chunk_windows``: windows per chunk; otherwise sized from ``memory_budget_mb``
        (default 256) for the score-sized tensors, at the dtype and window each call runs with.
        With gradients each chunk is recomputed in backward (one extra attention forward)."""
        if chunk_windows is not None and chunk_windows < 1:
            raise ValueError(f"chunk_windows must be at least 1, got {chunk_windows}")
        if memory_budget_mb is not None and memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
        chosen = stage_spec(True if stages is None else stages, self.num_layers, "stages")
        self._apply_sequential_attention(dict.fromkeys(chosen, chunk_windows), memory_budget_mb)

    def _apply_sequential_attention(self, spec: dict[int, int | None], budget_mb: float | None) -> None:
        """Set every stage from ``{stage: windows per chunk or None}``; stages not in it are off."""
        self._sequential_budget_mb = budget_mb if spec else None
        for i, stage in enumerate(self.layers):
            for block in stage.blocks:
                block.attn.sequential, block.attn.chunk_windows = i in spec, spec.get(i)
                block.attn.memory_budget_mb = budget_mb if i in spec else None

    def set_fused_attn(self, enable: bool = True) -> None:
        """One ``scaled_dot_product_attention`` call per window batch (default), or the explicit
        computation of the official code."""
        for block in self.iter_blocks():
            block.attn.fused_attn = bool(enable)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw every parameter again from the constructor's initial distributions (for a model
        built on the meta device and materialised with ``to_empty``, e.g. after FSDP's
        ``fully_shard``, where each process initialises only its own shards). Fresh draws, not a
        same-seed constructor's values; under FSDP on a CPU seed each process differently."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, WindowAttention)):
                module.reset_parameters()
            _init_weights(module)
        if getattr(self, "ape", False):
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        for block in self.iter_blocks():
            block.init_res_post_norm()

    def no_weight_decay(self) -> set[str]:
        """Parameters the official recipe trains without weight decay (besides every bias and
        norm weight, which the optimizer exempts by shape)."""
        return {n for n, _ in self.named_parameters()
                if n == "absolute_pos_embed" or any(k in n for k in NO_WEIGHT_DECAY_KEYWORDS)}

    def no_weight_decay_keywords(self) -> set[str]:
        return set(NO_WEIGHT_DECAY_KEYWORDS)

    @property
    def num_layer_ids(self) -> int:
        """Number of distinct layer ids for layer-wise LR decay: blocks + 2."""
        return sum(self.depths) + 2

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter for layer-wise LR decay, as in the official SimMIM fine-tune:
        stem 0, block j of stage i ``sum(depths[:i]) + j + 1``, a stage's merging its last block's
        id, everything after the stages ``num_layer_ids - 1``."""
        if name.startswith(("patch_embed", "mask_token")):
            return 0
        if name.startswith("layers."):
            parts = name.split(".")
            i = int(parts[1])
            return sum(self.depths[:i]) + int(parts[3]) + 1 if parts[2] == "blocks" else sum(self.depths[: i + 1])
        return self.num_layer_ids - 1

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0: none)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes, ref = num_classes, self.norm.weight
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        if num_classes > 0:
            _init_weights(self.head)


class SwinTransformerV2(SwinTransformerV2Stages):
    """Swin Transformer V2.

    The positional arguments are the official constructor's, with the same meaning and
    defaults; ``norm_layer`` must build a LayerNorm-like module from a width;
    ``fused_window_process`` is accepted and ignored, as in the official code. The keyword-only
    arguments are the paper's ablations, then memory options (§3.5):

    - ``norm_placement``: ``res_post`` (V2), ``pre`` (V1), ``post`` or ``sandwich`` (Table 7).
    - ``attn_type``: ``cosine`` (V2 scaled cosine) or ``dot`` (V1 scaled dot product).
    - ``position_bias``: ``log_cpb`` (V2), ``linear_cpb``, ``table`` (V1) or ``none`` (Table 1).
    - ``extra_norm_period``: a LayerNorm on the main branch after every N-th block of a stage
      (6 for the H and G sizes, §3.2); 0 for none.
    - ``merge_norm``: patch merging's LayerNorm ``post`` (V2, after the reduction) or ``pre``
      (V1, over the 4C before it). With every V1 switch the network is Swin V1.
    - ``window_rule``: ``per_axis`` shrinks each axis of the window to a smaller map on its own;
      ``official`` reproduces the official min(H, W) rule on non-square maps.
    - ``cpb_hidden_dim``: width of the position-bias MLP (512). ``global_pool``: ``avg`` or ``""``.
    - ``grad_checkpointing`` / ``sequential_attention`` (+ ``_budget_mb``): see
      :meth:`set_grad_checkpointing` and :meth:`set_sequential_attention`.
    """

    def __init__(self, img_size: int | Size2 = 224, patch_size: int | Size2 = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int | Size2 = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, pretrained_window_sizes: Sequence[int | Size2] = (0, 0, 0, 0), *,
                 norm_placement: str = "res_post", attn_type: str = "cosine", position_bias: str = "log_cpb",
                 extra_norm_period: int = 0, merge_norm: str = "post", window_rule: str = "per_axis",
                 cpb_hidden_dim: int = 512, global_pool: str = "avg",
                 grad_checkpointing: bool | Sequence[int] = False,
                 sequential_attention: bool | Sequence[int] | Mapping[int, int | None] = False,
                 sequential_attention_budget_mb: float | None = None, fused_window_process: bool = False):
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        if len(pretrained_window_sizes) != len(depths):
            raise ValueError(f"pretrained_window_sizes {tuple(pretrained_window_sizes)} needs one entry per stage "
                             f"({len(depths)})")
        if in_chans < 1 or embed_dim < 1 or any(d < 0 for d in depths):
            raise ValueError("in_chans, embed_dim and depths must be positive")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if merge_norm not in MERGE_NORMS:
            raise ValueError(f"merge_norm must be one of {MERGE_NORMS}, got {merge_norm!r}")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size!r}")
        self.num_classes, self.in_chans, self.embed_dim = num_classes, in_chans, embed_dim
        self.num_layers, self.depths, self.num_heads = len(depths), depths, num_heads
        self.ape, self.global_pool, self.window_rule = ape, global_pool, window_rule
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.pretrained_window_sizes = tuple(to_2tuple(p, "pretrained_window_sizes") for p in pretrained_window_sizes)
        if any(min(p) < 0 for p in self.pretrained_window_sizes):
            raise ValueError(f"pretrained_window_sizes must be >= 0, got {tuple(pretrained_window_sizes)}")
        self.img_size = to_2tuple(img_size, "img_size")
        self.window_size = self._check_window(window_size)
        self._check_img_size(self.img_size)
        # what the constructor was given that the model does not change later (see ``config``)
        self._arch = dict(
            patch_size=list(self.patch_size), in_chans=in_chans, embed_dim=embed_dim, depths=list(depths),
            num_heads=list(num_heads), mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, ape=ape, patch_norm=patch_norm,
            pretrained_window_sizes=[list(p) for p in self.pretrained_window_sizes], norm_placement=norm_placement,
            attn_type=attn_type, position_bias=position_bias, extra_norm_period=extra_norm_period,
            merge_norm=merge_norm, cpb_hidden_dim=cpb_hidden_dim,
        )

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim, patch_norm, norm_layer)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_grid[0] * self.patch_grid[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.build_stages(embed_dim, depths, num_heads, drop_path_rate, norm_layer, lambda i: dict(
            window_size=self.window_size, extra_norm_period=extra_norm_period, window_rule=window_rule,
            merge_norm=merge_norm, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
            pretrained_window_size=self.pretrained_window_sizes[i], norm_placement=norm_placement,
            attn_type=attn_type, position_bias=position_bias, table_window=self.stage_windows()[i][0],
            cpb_hidden_dim=cpb_hidden_dim,
        ))
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=int(embed_dim * 2**i), reduction=self.patch_size[0] * 2**i,
                                  module=f"layers.{i}") for i in range(self.num_layers)]
        self.finish_init(use_checkpoint, grad_checkpointing, sequential_attention, sequential_attention_budget_mb)

    @property
    def config(self) -> dict:
        """The constructor arguments that rebuild this model as it is now (input size, window,
        head and memory options included): ``SwinTransformerV2(**model.config)``."""
        return dict(self._arch, img_size=list(self.img_size), window_size=list(self.window_size),
                    window_rule=self.window_rule, **self.runtime_config())

    # -- sizes and windows ----------------------------------------------------------------------

    def _check_window(self, window_size) -> Size2:
        window = to_2tuple(window_size, "window_size")
        if min(window) < 1:
            raise ValueError(f"window_size must be at least 1, got {window_size!r}")
        return window

    def _check_img_size(self, img_size: Size2) -> None:
        ph, pw = self.patch_size
        if img_size[0] % ph or img_size[1] % pw or min(img_size) < 1:
            raise ValueError(f"image size {img_size} must be a positive multiple of the patch size {self.patch_size}")

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
        return [effective_window(r, self.window_size, self.window_rule) for r in self.stage_resolutions(img_size)]

    @torch.no_grad()
    def set_input_size(self, img_size: int | Size2 | None = None, window_size: int | Size2 | None = None,
                       window_rule: str | None = None) -> None:
        """Change the nominal input size and/or the window, keeping the weights. Forward accepts
        any size already; this changes the window the stages use, the size the absolute position
        embedding and V1 bias tables are stored at (both resampled bicubically), and the default
        size of :meth:`flops`."""
        if img_size is not None:
            new_size = to_2tuple(img_size, "img_size")
            self._check_img_size(new_size)
            old_grid, self.img_size = self.patch_grid, new_size
            if self.ape and self.patch_grid != old_grid:
                self.absolute_pos_embed = nn.Parameter(
                    _resize_pos_embed(self.absolute_pos_embed.data, old_grid, self.patch_grid))
        if window_size is not None:
            self.window_size = self._check_window(window_size)
        if window_rule is not None:
            effective_window((1, 1), (1, 1), window_rule)  # validates the name
            self.window_rule = window_rule
        self.apply_windows([window for window, _ in self.stage_windows()])

    # -- forward --------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """One clear error for anything that is not a floating (B, in_chans, H, W) batch whose
        sides are multiples of the patch size."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected an image tensor of shape (B, C, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image tensor, got {str(x.dtype).removeprefix('torch.')} "
                            "(convert it, e.g. x.float() / 255 for 8-bit images, then normalise)")
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape "
                             f"{tuple(x.shape)})")
        (H, W), (ph, pw) = x.shape[-2:], self.patch_size
        if H % ph or W % pw or H == 0 or W == 0:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {ph}x{pw}; resize or crop "
                             f"it, e.g. to {max(ph, H // ph * ph)}x{max(pw, W // pw * pw)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> the unpooled, normed final map (B, H/32, W/32, C_final), NHWC."""
        return self.forward_tokens(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> patch tokens (B, H/p, W/p, C), position embedding added."""
        self.check_input(x)
        return self.add_pos_embed(self.patch_embed(x))

    def add_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.ape:
            grid, pos = (x.shape[1], x.shape[2]), self.absolute_pos_embed
            if grid != self.patch_grid:
                pos = _resize_pos_embed(pos, self.patch_grid, grid)
            x = x + pos.view(1, grid[0], grid[1], -1)
        return self.pos_drop(x)

    # -- training helpers -----------------------------------------------------------------------

    def flops(self, img_size: int | Size2 | None = None) -> int:
        """Multiply-accumulates of one forward pass, counted as the official ``flops()`` does
        (linear and attention matmuls, norms, patch embedding, head; not the position-bias MLP),
        with each stage's effective window and padding."""
        size = self.img_size if img_size is None else to_2tuple(img_size, "img_size")
        (ph, pw), C = self.patch_size, self.embed_dim
        resolutions = self.stage_resolutions(size)
        embed_norm = self.patch_embed.norm is not None
        total = resolutions[0][0] * resolutions[0][1] * C * (self.in_chans * ph * pw + embed_norm)
        for stage, (h, w), (window, _) in zip(self.layers, resolutions, self.stage_windows(size)):
            dim, N = stage.dim, window[0] * window[1]
            windows = math.ceil(h / window[0]) * math.ceil(w / window[1])
            for block in stage.blocks:
                attn = N * dim * 3 * dim + 2 * N * N * dim + N * dim * dim  # qkv, qk^T, av, proj
                total += 2 * h * w * dim + windows * attn + 2 * h * w * dim * block.mlp.fc1.out_features
            if stage.downsample is not None:
                total += math.ceil(h / 2) * math.ceil(w / 2) * 4 * dim * 2 * dim + h * w * dim // 2
        total += self.num_features * resolutions[-1][0] * resolutions[-1][1]
        return int(total + (self.num_features * self.num_classes if self.num_classes > 0 else 0))


def stage_spec(spec, num_stages: int, name: str) -> dict[int, int | None]:
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
