"""Building blocks of Swin Transformer V2 (Liu et al., CVPR 2022).

Everything works on channel-last maps: ``(B, H, W, C)`` for images, ``(B, T, H, W, C)`` for
videos, and ``(B*nW, N, C)`` for windows of ``N`` tokens (the product of the window's sides).
Window sizes are tuples with one entry per axis: ``(wh, ww)`` or ``(wt, wh, ww)``. This is the
plain computation of the paper; :mod:`swinv2.fast` swaps faster versions of some modules in.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import CONSTANT_CACHE_BYTES, BoundedCache
from .windows import Size, Size2, mask_rows, relative_coords_table, relative_position_index, resize_bias_table

# Logit-scale ceiling of scaled cosine attention (§3.3: tau > 0.01, so scale <= 100). The official
# code builds it as a float32 tensor; in float64 its ln(100) differs by 6e-8, visible in outputs.
LOGIT_SCALE_MAX = float(torch.log(torch.tensor(100.0, dtype=torch.float32)))
NORM_EPS = 1e-12  # F.normalize's floor on the norms of q and k
# Sequential attention (§3.5) sizes its chunks from a budget for score-sized tensors (chunk, nH,
# N, N): at most this many are alive at once (bias and mask, logits, probabilities and gradients).
SCORE_TENSORS = 4
DEFAULT_ATTENTION_BUDGET_MB = 256.0

NORM_PLACEMENTS = ("res_post", "pre", "post", "sandwich")
ATTN_TYPES = ("cosine", "dot")
POSITION_BIASES = ("log_cpb", "linear_cpb", "table", "none")


def to_2tuple(value, name: str = "value") -> Size2:
    """(v, v) for an int, the pair itself for a pair of ints; anything else is an error (a string
    is no pair: "64" would read as (6, 4); int() would read 64.7 as 64)."""
    def whole(v) -> int:
        if isinstance(v, (bool, str, bytes)):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        try:
            return operator.index(v)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None

    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if not hasattr(value, "__iter__") or (isinstance(value, torch.Tensor) and value.ndim == 0):
        return (whole(value), whole(value))
    items = list(value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (whole(items[0]), whole(items[1]))


class ContinuousPositionBias(nn.Sequential):
    """Log-spaced continuous position bias (§3.4): a 2-layer MLP (k -> hidden -> nH, ReLU, no
    output bias) maps each relative offset of a window to one bias per head, so any window works
    and a model transfers to windows it never saw. The MLP takes one coordinate per axis of
    ``pretrained_window``: 2 for images (dy, dx), 3 for videos (dt, dy, dx). Its layers keep the
    official ``cpb_mlp`` names (``0``, ``2``). ``spacing="linear"`` is the paper's linear-spaced
    ablation."""

    def __init__(self, num_heads: int, hidden_dim: int = 512, pretrained_window: Size = (0, 0),
                 spacing: str = "log"):
        # The ReLU is not in place (the official one is): a full backward hook on the first
        # Linear would fail on it, and the hidden layer is small.
        super().__init__(nn.Linear(len(pretrained_window), hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, num_heads, bias=False))
        self.num_heads, self.pretrained_window, self.spacing = num_heads, tuple(pretrained_window), spacing
        self._coords = BoundedCache(entries=8, max_bytes=CONSTANT_CACHE_BYTES)

    def table(self, window: Size) -> torch.Tensor:
        """The bias of every relative offset of ``window``, ``(prod(2w-1), nH)``, bounded
        to (0, 16) by 16*sigmoid (applied to the table's rows, before any gather)."""
        weight = self[0].weight
        coords = self._coords.get((window, weight.device, weight.dtype), lambda: relative_coords_table(
            window, self.pretrained_window, self.spacing).to(weight.device, weight.dtype))
        return 16 * torch.sigmoid(self(coords).view(-1, self.num_heads))


# -- attention -----------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a relative position bias.

    ``attn_type="cosine"`` (V2, §3.3): cos(q, k) times a learned per-head scale
    ``exp(min(logit_scale, ln 100))``; ``"dot"``: V1's ``q.k / sqrt(d)``. Queries and values
    have biases, keys do not (as in the official code). ``position_bias``: ``log_cpb`` /
    ``linear_cpb`` (V2, :class:`ContinuousPositionBias`), ``table`` (V1: a learned table of
    ``prod(2w-1) x nH`` built for ``table_window`` and resized to other windows), or ``none``.
    Windows have as many axes as ``pretrained_window_size`` (and ``table_window``): 2 or 3.

    ``fused_attn``: one ``scaled_dot_product_attention`` call (default), or the explicit
    step-by-step computation of the official code. ``sequential`` (§3.5): windows attended in
    chunks, one after the other (see :meth:`windows_per_chunk`).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, pretrained_window_size: Size = (0, 0), attn_type: str = "cosine",
                 position_bias: str = "log_cpb", table_window: Size = (7, 7), cpb_hidden_dim: int = 512):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
        if position_bias not in POSITION_BIASES:
            raise ValueError(f"position_bias must be one of {POSITION_BIASES}, got {position_bias!r}")
        self.dim, self.num_heads, self.attn_type, self.position_bias = dim, num_heads, attn_type, position_bias
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.logit_scale = nn.Parameter(torch.empty(num_heads, 1, 1)) if attn_type == "cosine" else None
        self.cpb_mlp = self.relative_position_bias_table = None
        if position_bias in ("log_cpb", "linear_cpb"):
            spacing = "log" if position_bias == "log_cpb" else "linear"
            self.cpb_mlp = ContinuousPositionBias(num_heads, cpb_hidden_dim, self.pretrained_window_size, spacing)
        elif position_bias == "table":
            self.table_window = tuple(table_window)
            rows = math.prod(2 * w - 1 for w in self.table_window)
            self.relative_position_bias_table = nn.Parameter(torch.empty(rows, num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.empty(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.empty(dim)) if qkv_bias else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True
        self.sequential, self.chunk_windows, self.memory_budget_mb = False, None, None  # set by the model
        self._index = BoundedCache(entries=8, max_bytes=CONSTANT_CACHE_BYTES)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initial values of this module's own parameters: logit scale ln 10, zero
        q/v biases, a truncated-normal V1 table (the Linear layers are the model's to init)."""
        if self.logit_scale is not None:
            self.logit_scale.fill_(math.log(10.0))
        if self.q_bias is not None:
            self.q_bias.zero_()
            self.v_bias.zero_()
        if self.relative_position_bias_table is not None:
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    # -- position bias --------------------------------------------------------------------------

    def bias_table(self, window: Size) -> torch.Tensor | None:
        """The bias of every relative offset of ``window``, ``(prod(2w-1), nH)``, or None."""
        if self.cpb_mlp is not None:
            return self.cpb_mlp.table(window)
        if self.relative_position_bias_table is not None:
            table = self.relative_position_bias_table
            return table if window == self.table_window else resize_bias_table(table, self.table_window, window)
        return None

    def relative_bias(self, window: Size) -> torch.Tensor | None:
        """The additive bias ``(nH, N, N)`` for ``window``, or None without position bias."""
        window = tuple(window)
        table = self.bias_table(window)
        if table is None:
            return None
        N = math.prod(window)
        index = self._index.get((window, table.device), lambda: relative_position_index(window).to(table.device))
        return table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # (nH, N, N)

    # -- attention ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, window: Size, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B*nW, N, C) windows of size ``window``; mask: (nW, N, N) additive, or None."""
        B_, N, C = x.shape
        qkv = self.qkv(x)  # (B_, N, 3C)
        if self.q_bias is not None:
            # in qkv's dtype: under autocast the official F.linear(x, w, bias) stays in it too
            qkv = qkv + torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias)).to(qkv.dtype)
        q, k, v = qkv.view(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_bias(window)  # (nH, N, N) or None
        chunk = self.windows_per_chunk(B_, N, q.dtype)
        if chunk < B_:
            x = self._sequential(q, k, v, bias, mask, chunk)
        else:
            x = self.attend(q, k, v, bias, mask)  # (B_, nH, N, d)
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))

    def logit_scale_value(self) -> torch.Tensor:
        """The per-head factor of the cosine similarities: exp(logit_scale) clamped at 100."""
        return torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()

    def attend(self, q, k, v, bias, mask) -> torch.Tensor:
        """softmax(logits + bias + mask) v; q, k, v (B_, nH, N, d), bias (nH, N, N), mask (nW, N, N)."""
        if self.fused_attn:
            return self._fused(q, k, v, bias, mask)
        return self._explicit(q, k, v, bias, mask)

    def _explicit(self, q, k, v, bias, mask) -> torch.Tensor:
        """Step by step, as the official code computes it."""
        B_, nH, N, d = q.shape
        if self.attn_type == "cosine":  # cos(q, k) / tau (§3.3)
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.logit_scale_value()
        else:
            attn = (q * d**-0.5) @ k.transpose(-2, -1)  # (B_, nH, N, N)
        if bias is not None:
            attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = (attn.view(B_ // nW, nW, nH, N, N) + mask[None, :, None].to(attn.dtype)).view(B_, nH, N, N)
        return self.attn_drop(attn.softmax(dim=-1)) @ v

    def _fused(self, q, k, v, bias, mask) -> torch.Tensor:
        """The same in one scaled_dot_product_attention call: the cosine normalisation and its
        scale (or 1/sqrt(d)) folded into q and k, bias and mask one additive term."""
        B_, nH, N, d = q.shape
        if self.attn_type == "cosine":
            q, k = F.normalize(q, dim=-1) * self.logit_scale_value(), F.normalize(k, dim=-1)
        else:
            q = q * d**-0.5
        term = None if bias is None else bias.unsqueeze(0).to(q.dtype)  # (1, nH, N, N)
        if mask is not None:
            m = mask[:, None].to(q.dtype)  # (nW, 1, N, N)
            term = m if term is None else term + m
            # the kernel takes one additive term per (window, head): expanded over the images
            term = term.expand(B_ // term.shape[0], *term.shape).reshape(B_, -1, N, N)
        drop = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=term, dropout_p=drop, scale=1.0)

    def windows_per_chunk(self, num_windows: int, N: int, dtype: torch.dtype) -> int:
        """How many of ``num_windows`` windows of ``N`` tokens one attention call takes: all of
        them, or with sequential attention ``chunk_windows`` or as many as ``memory_budget_mb``
        (default 256) allows for ``SCORE_TENSORS`` score-sized tensors."""
        if not self.sequential:
            return num_windows
        if self.chunk_windows:
            return max(1, int(self.chunk_windows))
        budget = DEFAULT_ATTENTION_BUDGET_MB if self.memory_budget_mb is None else self.memory_budget_mb
        per_window = SCORE_TENSORS * self.num_heads * N * N * torch.finfo(dtype).bits // 8
        return max(1, int(budget * 2**20 // per_window))

    def _sequential(self, q, k, v, bias, mask, chunk: int) -> torch.Tensor:
        """:meth:`attend`, ``chunk`` windows at a time (§3.5). Chunking alone bounds the scores
        alive in inference only: with gradients each chunk is checkpointed, keeping only its
        inputs (views of q, k, v) and recomputing its scores in backward, one chunk at a time."""
        outs = []
        for start in range(0, q.shape[0], chunk):
            end = min(start + chunk, q.shape[0])
            m = None if mask is None else mask_rows(mask, start, end - start)  # (nW | end-start, N, N)
            args = (q[start:end], k[start:end], v[start:end], bias, m)
            outs.append(checkpoint(self.attend, *args, use_reentrant=False) if torch.is_grad_enabled()
                        else self.attend(*args))
        return torch.cat(outs)  # (B_, nH, N, d)


# -- MLP, stochastic depth, embedding, merging ---------------------------------------------------


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep.div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches: conv with stride = kernel = patch, then LayerNorm. A 2-axis
    ``patch_size`` embeds images, (B, C_in, H, W) -> (B, H/p, W/p, C); a 3-axis one videos,
    (B, C_in, T, H, W) -> (B, T/pt, H/p, W/p, C)."""

    def __init__(self, patch_size: Size, in_chans: int, embed_dim: int, norm: bool = True, norm_layer=nn.LayerNorm):
        super().__init__()
        self.patch_size, self.in_chans = tuple(patch_size), in_chans
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(self.patch_size)]
        self.proj = conv(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).movedim(1, -1)  # (B, H/p, W/p, C) or (B, T/pt, H/p, W/p, C)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation and a bias-free 4C -> 2C linear, with LayerNorm after it
    (V2 order, ``norm_first=False``) or before it over the 4C (V1 order).

    Concatenation order follows the official code: (even row, even col), (odd, even), (even, odd),
    (odd, odd). An odd-sized map is zero-padded at the bottom/right first.
    (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); a video's frames merge on their own (spatial
    only), (B, T, H, W, C) -> (B, T, ceil(H/2), ceil(W/2), 2C).
    """

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, norm_first: bool = False):
        super().__init__()
        self.dim, self.norm_first = dim, norm_first
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim if norm_first else 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, H, W, C = x.shape
        if len(lead) > 1:  # frames of a video: (B, T, H, W, C) -> (B*T, H, W, C) and back
            out = self.forward(x.reshape(-1, H, W, C))  # (B*T, H/2, W/2, 2C)
            return out.view(*lead, *out.shape[1:])
        B = lead[0]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # (B, H/2, 2[row], W/2, 2[col], C) -> (B, H/2, W/2, 2[col], 2[row], C): the flattened 4C
        # reads x0 (0,0), x1 (1,0), x2 (0,1), x3 (1,1)
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        if self.norm_first:
            return self.reduction(self.norm(x))
        return self.norm(self.reduction(x))
