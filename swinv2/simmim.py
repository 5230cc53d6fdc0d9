"""SimMIM: masked image modelling around a SwinV2 encoder (Xie et al. 2022; SwinV2 paper §3.6).

Random squares of the image are hidden: their tokens are replaced by a learned mask token after
the patch embedding and its norm, the encoder runs as usual, a linear decoder (1x1 convolution and
PixelShuffle) predicts every pixel, and the loss is the L1 error on the hidden pixels only,
optionally against a locally normalised target. The encoder is any :class:`SwinTransformerV2` and
is used through its own methods: SimMIM owns the mask token, the decoder and the loss.

>>> masks = MaskGenerator(192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6, seed=0)
>>> sim = SimMIM(swinv2.create_model("swinv2_base_window12_192", num_classes=0))
>>> loss = sim(images, masks.batch(images.shape[0]))           # images (B, 3, 192, 192)
>>> swinv2.load_pretrained(sim, "simmim_pretrain.pth")         # encoder, mask token and decoder
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .model import SwinTransformerV2

# Official: `(mask.sum() + 1e-5)` with an integer mask, so the sum is promoted to float32 and the
# 1e-5 only matters when (almost) nothing is hidden; it keeps an empty mask at loss 0.
_EMPTY_MASK_EPS = 1e-5
_VAR_EPS = 1e-6  # official norm_targets: (x - mean) / sqrt(var + 1e-6)


class MaskGenerator:
    """Random masks of ``mask_patch_size`` squares, returned at the model's patch resolution.

    ``ceil(cells * mask_ratio)`` of the ``(H/mask_patch) x (W/mask_patch)`` cells are hidden (the
    official rounding: 22 of 36 cells at 192 px), then each cell is repeated
    ``mask_patch_size / model_patch_size`` times along both axes: an int64 (H/p, W/p) mask, 1 =
    hidden. ``input_size``: an int or (H, W). Draws come from the ``generator`` given to the call,
    else from this generator's own stream when built with a ``seed``, else from torch's global RNG
    (the official code uses numpy's global RNG, which no seed of ours could reproduce anyway).
    """

    def __init__(self, input_size: int | tuple[int, int] = 192, mask_patch_size: int = 32,
                 model_patch_size: int = 4, mask_ratio: float = 0.6, *, seed: int | None = None):
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if min(h, w, mask_patch_size, model_patch_size) < 1:
            raise ValueError(f"sizes must be positive: input {h}x{w}, mask patch {mask_patch_size}, "
                             f"model patch {model_patch_size}")
        if h % mask_patch_size or w % mask_patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the mask patch size {mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(f"mask patch {mask_patch_size} is not a multiple of the model patch {model_patch_size}")
        if not 0 < mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        self.input_size = (h, w)
        self.mask_ratio = mask_ratio
        self.cells = (h // mask_patch_size, w // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.count = math.ceil(self.cells[0] * self.cells[1] * mask_ratio)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def grid(self) -> tuple[int, int]:
        """The mask's shape: the model's token grid (H/p, W/p)."""
        return (self.cells[0] * self.scale, self.cells[1] * self.scale)

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        n = self.cells[0] * self.cells[1]
        mask = torch.zeros(n, dtype=torch.long)
        mask[torch.randperm(n, generator=generator if generator is not None else self.generator)[: self.count]] = 1
        mask = mask.view(*self.cells)  # (H/mask_patch, W/mask_patch)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)  # (H/p, W/p)

    def batch(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` independent masks, (n, H/p, W/p)."""
        return torch.stack([self(generator) for _ in range(n)])

    def __repr__(self) -> str:
        return (f"MaskGenerator(input_size={self.input_size}, cells={self.cells}, hidden={self.count}, "
                f"scale={self.scale})")


def local_stats(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel and channel: the mean and ``sqrt(unbiased var + 1e-6)`` of the ``window`` x
    ``window`` neighbourhood, cut at the border (only pixels inside the image count), as the
    official ``norm_targets``. (B, C, H, W) -> two (B, C, H, W)."""
    if window < 3 or window % 2 != 1:
        raise ValueError(f"the target normalisation window must be odd and at least 3, got {window}")
    pad = window // 2
    mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, window, stride=1, padding=pad, count_include_pad=False)
    # pixels inside each window, computed as the official code does (an average of ones times k^2)
    ones = torch.ones_like(x[:1, :1])  # (1, 1, H, W)
    count = F.avg_pool2d(ones, window, stride=1, padding=pad, count_include_pad=True) * window**2
    var = ((mean_sq - mean * mean) * (count / (count - 1))).clamp(min=0)  # unbiased; clamp float noise
    return mean, (var + _VAR_EPS).sqrt()


def local_normalize(x: torch.Tensor, window: int) -> torch.Tensor:
    """The SwinV2 SimMIM target: each pixel and channel standardised by its neighbourhood's
    statistics (:func:`local_stats`). Applied to the already mean/std-normalised image."""
    mean, std = local_stats(x, window)
    return (x - mean) / std


class SimMIM(nn.Module):
    """``SimMIM(encoder)(x, mask) -> loss``.

    ``x``: (B, C, H, W), any size the encoder accepts; ``mask``: (B, H/p, W/p), bool or integer,
    1 where the token is hidden (:class:`MaskGenerator`). ``norm_target_window``: predict the
    locally normalised image (official SwinV2 setting: 47); None predicts the pixels as given.
    ``in_chans``: the channels predicted; must equal the encoder's (the input is the target).

    The decoder is a 1x1 convolution to ``stride**2 * in_chans`` channels then PixelShuffle(stride),
    ``stride`` being the encoder's total downsampling (patch * 2^(stages-1): 32 for the standard
    family). An encoder with a classifier head is refused rather than silently changed: build it
    with ``num_classes=0`` or call ``encoder.reset_classifier(0)``.
    """

    def __init__(self, encoder: SwinTransformerV2, *, norm_target_window: int | None = 47,
                 in_chans: int | None = None):
        super().__init__()
        if encoder.num_classes != 0:
            raise ValueError(
                f"SimMIM needs an encoder without a classifier head (it has {encoder.num_classes} classes): "
                "build it with num_classes=0, or call encoder.reset_classifier(0)"
            )
        if in_chans is not None and in_chans != encoder.in_chans:
            raise ValueError(f"in_chans={in_chans}, but the encoder reads {encoder.in_chans} channels: SimMIM "
                             "predicts the input, so they must agree")
        ph, pw = encoder.patch_size
        if ph != pw:
            raise ValueError(f"SimMIM's PixelShuffle decoder needs a square patch, got {ph}x{pw}")
        if norm_target_window is not None:
            local_stats(torch.zeros(1, 1, 1, 1), norm_target_window)  # validates the window
        self.encoder = encoder
        self.norm_target_window = norm_target_window
        self.in_chans = encoder.in_chans
        self.patch_size = ph
        self.stride = ph * 2 ** (encoder.num_layers - 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))  # the official shape
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # No special init for the decoder: the official one keeps PyTorch's default Conv2d init.
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    # -- forward ------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, H/p, W/p) -> the encoder's final normed map (B, C_final, H/s, W/s)."""
        enc = self.encoder
        enc.check_input(x)
        tokens = enc.patch_embed(x)  # (B, H/p, W/p, C), after the patch norm
        _check_mask(mask, tokens.shape[:3], x.shape)
        w = mask.unsqueeze(-1).to(tokens.dtype)  # (B, H/p, W/p, 1)
        token = self.mask_token.view(1, 1, 1, -1).to(tokens.dtype)  # (1, 1, 1, C)
        # Hidden tokens replaced before the absolute position embedding, as the official encoder.
        tokens = tokens * (1 - w) + token * w
        feats = enc.forward_tokens(enc.add_pos_embed(tokens))  # (B, H/s, W/s, C_final)
        return feats.permute(0, 3, 1, 2)  # (B, C_final, H/s, W/s)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the decoder's prediction (B, C, H, W), the pixel mask (B, 1, H, W), 1 = hidden).

        With ``norm_target_window`` the prediction is of the locally normalised image. Inputs
        whose token grid is not a multiple of 2^(stages-1) give a padded last map (the merging
        pads bottom/right); its prediction is cropped back to H x W."""
        H, W = x.shape[-2:]
        rec = self.decoder(self.encode(x, mask))  # (B, C, ceil(H/s)*s, ceil(W/s)*s)
        rec = rec[..., :H, :W]  # (B, C, H, W)
        p = self.patch_size
        pixels = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)  # (B, 1, H, W)
        return rec, pixels.to(rec.dtype)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder is trained to output for the input ``x``."""
        return x if self.norm_target_window is None else local_normalize(x, self.norm_target_window)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rec, pixels = self.reconstruct(x, mask)
        error = (self.target(x) - rec).abs()  # (B, C, H, W)
        hidden = mask.sum() * self.patch_size**2 + _EMPTY_MASK_EPS  # integer count -> float32, as official
        # Mean over the hidden pixels and the channels: visible pixels do not count.
        return (error * pixels).sum() / hidden / self.in_chans

    # -- training helpers ---------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """``mask_token`` and the encoder's exemptions under their names here (``encoder.``...).

        The official pre-training meant the same but, by prefixing its keywords with ``encoder.``,
        matched none of them, so there ``cpb_mlp`` weights and ``logit_scale`` were decayed; that
        slip is not reproduced."""
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def no_weight_decay_keywords(self) -> set[str]:
        return self.encoder.no_weight_decay_keywords()


def _check_mask(mask: torch.Tensor, grid: torch.Size, x_shape: torch.Size) -> None:
    if tuple(mask.shape) != tuple(grid):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the token grid {tuple(grid)} "
                         f"(batch, H/patch, W/patch) of an input of shape {tuple(x_shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"the mask must be bool or integer (1 = hidden), got {mask.dtype}")
