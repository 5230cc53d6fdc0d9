"""Video Swin Transformer V2: the image network with a time axis.

The blocks, stages, attention and position bias are the image model's (:mod:`swinv2.blocks`,
:mod:`swinv2.layers`, :mod:`swinv2.windows` work on any number of axes); what changes is:

- a 3D patch embedding, ``(B, C, T, H, W) -> (B, T/pt, H/ph, W/pw, C)`` (default patch 2x4x4);
- 3D shifted windows ``(wt, wh, ww)``: each axis shrinks to the map where the map is smaller,
  the shifted blocks move by half a window along every axis, and a map that is not a multiple
  of the window is padded with keys the attention masks out;
- the log-spaced continuous position bias (§3.4) over ``(dt, dy, dx)``: its MLP takes three
  coordinates, and ``pretrained_window_sizes`` are 3D;
- patch merging is spatial only, as in Video Swin: time keeps its resolution.

With every V1 switch (``norm_placement="pre"``, ``attn_type="dot"``, ``position_bias="table"``,
``merge_norm="pre"``) the network is Video Swin (Liu et al., CVPR 2022), as torchvision's
``swin3d_*``. An image checkpoint inflates into it through :func:`swinv2.load_pretrained`
(:func:`inflate_image_state`): on a clip of identical frames the inflated model gives the image
model's output.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PatchEmbed, to_2tuple
from .model import MERGE_NORMS, SwinTransformerV2Stages
from .windows import Size, effective_window, resize_bias_table

Size3 = tuple[int, int, int]


def to_3tuple(value, name: str = "value") -> Size3:
    """(v, v, v) for an int, the triple itself for three ints; anything else is an error."""
    def whole(v) -> int:
        if isinstance(v, (bool, str, bytes)):
            raise TypeError(f"{name} must be an int or three ints (time, height, width), got {value!r}")
        try:
            return operator.index(v)
        except TypeError:
            raise TypeError(f"{name} must be an int or three ints (time, height, width), got {value!r}") from None

    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return (whole(value),) * 3
    items = list(value)
    if len(items) != 3:
        raise ValueError(f"{name} must be an int or three ints (time, height, width), got {value!r}")
    return tuple(whole(v) for v in items)


def _spatial_pair(value, name: str) -> tuple[int, int]:
    return to_2tuple(value, name)


class VideoSwinTransformerV2(SwinTransformerV2Stages):
    """Swin Transformer V2 for clips ``(B, C, T, H, W)``.

    The keywords are the image model's (:class:`swinv2.SwinTransformerV2`), with these changes:
    ``num_frames`` (the nominal clip length, used by :meth:`flops` and the default window),
    ``patch_size`` and ``window_size`` as an int or (time, height, width), and
    ``pretrained_window_sizes`` per stage (default: none) as 0 (none), an int (a spatial pre-training window, as
    an image checkpoint has: time then uses the current window) or a triple. No absolute position
    embedding (Video Swin has none). Inputs whose sides are not multiples of the patch are
    zero-padded at the end, as Video Swin and torchvision do.
    """

    OUTPUT_FORMATS = ("NCTHW", "NTHWC")

    def __init__(self, img_size: int | Sequence[int] = 224, num_frames: int = 8,
                 patch_size: int | Sequence[int] = (2, 4, 4), in_chans: int = 3, num_classes: int = 400,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int | Sequence[int] = (8, 7, 7), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 norm_layer=nn.LayerNorm, patch_norm: bool = True,
                 pretrained_window_sizes: Sequence[int | Sequence[int]] | None = None, *,
                 norm_placement: str = "res_post", attn_type: str = "cosine", position_bias: str = "log_cpb",
                 extra_norm_period: int = 0, merge_norm: str = "post", cpb_hidden_dim: int = 512,
                 global_pool: str = "avg", grad_checkpointing: bool | Sequence[int] = False,
                 sequential_attention: bool | Sequence[int] | Mapping[int, int | None] = False,
                 sequential_attention_budget_mb: float | None = None):
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        if pretrained_window_sizes is None:
            pretrained_window_sizes = (0,) * len(depths)
        if len(pretrained_window_sizes) != len(depths):
            raise ValueError(f"pretrained_window_sizes {tuple(pretrained_window_sizes)} needs one entry per stage "
                             f"({len(depths)})")
        if in_chans < 1 or embed_dim < 1 or any(d < 0 for d in depths) or num_frames < 1:
            raise ValueError("in_chans, embed_dim, num_frames and depths must be positive")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if merge_norm not in MERGE_NORMS:
            raise ValueError(f"merge_norm must be one of {MERGE_NORMS}, got {merge_norm!r}")
        self.patch_size = to_3tuple(patch_size, "patch_size")
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size!r}")
        self.num_classes, self.in_chans, self.embed_dim = num_classes, in_chans, embed_dim
        self.num_layers, self.depths, self.num_heads = len(depths), depths, num_heads
        self.global_pool, self.window_rule = global_pool, "per_axis"
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.img_size, self.num_frames = _spatial_pair(img_size, "img_size"), int(num_frames)
        self.window_size = self._check_window(window_size)
        self.pretrained_window_sizes = tuple(
            (0, *_spatial_pair(p, "pretrained_window_sizes")) if not hasattr(p, "__iter__") or len(p) == 2
            else to_3tuple(p, "pretrained_window_sizes") for p in pretrained_window_sizes)
        if any(min(p) < 0 for p in self.pretrained_window_sizes):
            raise ValueError(f"pretrained_window_sizes must be >= 0, got {tuple(pretrained_window_sizes)}")
        self._arch = dict(
            patch_size=list(self.patch_size), in_chans=in_chans, embed_dim=embed_dim, depths=list(depths),
            num_heads=list(num_heads), mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, patch_norm=patch_norm,
            pretrained_window_sizes=[list(p) for p in self.pretrained_window_sizes], norm_placement=norm_placement,
            attn_type=attn_type, position_bias=position_bias, extra_norm_period=extra_norm_period,
            merge_norm=merge_norm, cpb_hidden_dim=cpb_hidden_dim,
        )

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim, patch_norm, norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        windows = self.stage_windows()
        self.build_stages(embed_dim, depths, num_heads, drop_path_rate, norm_layer, lambda i: dict(
            window_size=self.window_size, extra_norm_period=extra_norm_period, merge_norm=merge_norm,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
            pretrained_window_size=self.pretrained_window_sizes[i], norm_placement=norm_placement,
            attn_type=attn_type, position_bias=position_bias, table_window=windows[i][0],
            cpb_hidden_dim=cpb_hidden_dim,
        ))
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=int(embed_dim * 2**i), reduction=self.patch_size[1] * 2**i,
                                  module=f"layers.{i}") for i in range(self.num_layers)]
        self.finish_init(False, grad_checkpointing, sequential_attention, sequential_attention_budget_mb)

    @property
    def config(self) -> dict:
        """The constructor arguments that rebuild this model as it is now:
        ``VideoSwinTransformerV2(**model.config)``."""
        return dict(self._arch, img_size=list(self.img_size), num_frames=self.num_frames,
                    window_size=list(self.window_size), **self.runtime_config())

    # -- sizes and windows ----------------------------------------------------------------------

    def _check_window(self, window_size) -> Size3:
        window = to_3tuple(window_size, "window_size")
        if min(window) < 1:
            raise ValueError(f"window_size must be at least 1, got {window_size!r}")
        return window

    def token_grid(self, num_frames: int | None = None, img_size=None) -> Size3:
        """Token map (T', H', W') after the patch embedding of a clip (padded to whole patches)."""
        T = self.num_frames if num_frames is None else int(num_frames)
        H, W = self.img_size if img_size is None else _spatial_pair(img_size, "img_size")
        return tuple(math.ceil(s / p) for s, p in zip((T, H, W), self.patch_size))

    def stage_resolutions(self, num_frames: int | None = None, img_size=None) -> list[Size3]:
        """Token map of each stage for a clip of ``num_frames`` x ``img_size`` (default: the model's)."""
        t, h, w = self.token_grid(num_frames, img_size)
        out = []
        for _ in range(self.num_layers):
            out.append((t, h, w))
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return out

    def stage_windows(self, num_frames: int | None = None, img_size=None) -> list[tuple[Size, Size]]:
        """(window, shift) of each stage for a clip of that size (default: the model's)."""
        return [effective_window(r, self.window_size) for r in self.stage_resolutions(num_frames, img_size)]

    @torch.no_grad()
    def set_input_size(self, img_size=None, num_frames: int | None = None, window_size=None) -> None:
        """Change the nominal clip size and/or the window, keeping the weights (forward takes any
        size already): the stages use the new window, and V1 bias tables are resampled to it."""
        if img_size is not None:
            self.img_size = _spatial_pair(img_size, "img_size")
        if num_frames is not None:
            if num_frames < 1:
                raise ValueError(f"num_frames must be positive, got {num_frames}")
            self.num_frames = int(num_frames)
        if window_size is not None:
            self.window_size = self._check_window(window_size)
        self.apply_windows([window for window, _ in self.stage_windows()])

    # -- forward --------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """One clear error for anything that is not a floating (B, in_chans, T, H, W) batch."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a clip tensor of shape (B, C, T, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point clip tensor, got {str(x.dtype).removeprefix('torch.')} "
                            "(convert it, e.g. x.float() / 255 for 8-bit frames, then normalise)")
        if x.ndim != 5:
            hint = " (an image batch: add a time axis, x.unsqueeze(2))" if x.ndim == 4 else ""
            raise ValueError(f"expected a clip batch of shape (B, C, T, H, W), got shape {tuple(x.shape)}{hint}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape "
                             f"{tuple(x.shape)}; clips are (B, C, T, H, W), channels before time)")
        if min(x.shape[2:]) == 0:
            raise ValueError(f"empty clip: shape {tuple(x.shape)}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, H, W) -> patch tokens (B, T/pt, H/ph, W/pw, C)."""
        self.check_input(x)
        pads = [(-s) % p for s, p in zip(x.shape[2:], self.patch_size)]
        if any(pads):  # to whole patches, at the end of each axis (F.pad lists the last axis first)
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        return self.pos_drop(self.patch_embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, H, W) -> the unpooled, normed final map (B, T/pt, H/32, W/32, C_final)."""
        return self.forward_tokens(self.embed(x))

    # -- cost -----------------------------------------------------------------------------------

    def flops(self, num_frames: int | None = None, img_size=None) -> int:
        """Multiply-accumulates of one forward pass, counted as the image model's :meth:`flops`."""
        C = self.embed_dim
        resolutions = self.stage_resolutions(num_frames, img_size)
        embed_norm = self.patch_embed.norm is not None
        total = math.prod(resolutions[0]) * C * (self.in_chans * math.prod(self.patch_size) + embed_norm)
        for stage, res, (window, _) in zip(self.layers, resolutions, self.stage_windows(num_frames, img_size)):
            dim, N, L = stage.dim, math.prod(window), math.prod(res)
            windows = math.prod(math.ceil(s / w) for s, w in zip(res, window))
            for block in stage.blocks:
                attn = N * dim * 3 * dim + 2 * N * N * dim + N * dim * dim  # qkv, qk^T, av, proj
                total += 2 * L * dim + windows * attn + 2 * L * dim * block.mlp.fc1.out_features
            if stage.downsample is not None:
                t, h, w = res
                total += t * math.ceil(h / 2) * math.ceil(w / 2) * 4 * dim * 2 * dim + L * dim // 2
        total += self.num_features * math.prod(resolutions[-1])
        return int(total + (self.num_features * self.num_classes if self.num_classes > 0 else 0))


# -- inflation from image weights ----------------------------------------------------------------


def inflate_image_state(state: dict[str, torch.Tensor], model: VideoSwinTransformerV2) -> list[str]:
    """Turn an image checkpoint (official layout, in ``state``, changed in place) into video
    weights for ``model``; returns what was inflated, for the load report.

    - the patch embedding is repeated over the temporal patch and divided by its length, so a
      clip of identical frames embeds as the image does;
    - the position-bias MLP's first layer gets a zero column for ``dt``, so the 3D bias equals
      the 2D bias at every time offset;
    - a V1 bias table is resized to the spatial window (bicubic) and repeated over the
      ``2wt - 1`` time offsets, as Video Swin inflates its image weights.

    Everything else is the same in both models and is left as it is.
    """
    notes = []
    key = "patch_embed.proj.weight"
    w = state.get(key)
    pt = model.patch_size[0]
    if w is not None and w.ndim == 4:
        state[key] = w.unsqueeze(2).repeat(1, 1, pt, 1, 1) / pt  # (C, in, ph, pw) -> (C, in, pt, ph, pw)
        notes.append(f"inflated the patch embedding over {pt} frames (repeated, divided by {pt})")
    own = model.state_dict()
    cpb = [k for k in state if k.endswith("cpb_mlp.0.weight") and state[k].ndim == 2 and state[k].shape[1] == 2
           and k in own and own[k].shape[1] == 3]
    for k in cpb:
        state[k] = torch.cat([torch.zeros_like(state[k][:, :1]), state[k]], dim=1)  # (hidden, 3): [dt, dy, dx]
    if cpb:
        notes.append(f"gave {len(cpb)} position-bias MLPs a zero time column (the 3D bias equals the 2D one "
                     "at every time offset)")
    tables = 0
    for k in [k for k in state if k.endswith("relative_position_bias_table") and k in own]:
        table, attn = state[k], model.get_submodule(k.rsplit(".", 1)[0])
        wt, wh, ww = attn.table_window
        side = (math.isqrt(table.shape[0]) + 1) // 2
        if table.ndim != 2 or (2 * side - 1) ** 2 != table.shape[0] or own[k].shape == table.shape:
            continue
        if (side, side) != (wh, ww):
            table = resize_bias_table(table.float(), (side, side), (wh, ww)).to(table.dtype)
        state[k] = table.repeat(2 * wt - 1, 1)  # time offset is the slowest index of the 3D table
        tables += 1
    if tables:
        notes.append(f"repeated {tables} V1 bias tables over the time offsets")
    return notes
