"""SimMIM: masked image modelling around a SwinV2 encoder (paper §3.6 pre-training; Xie et al. 2022).

Random square patches of the image are hidden: their tokens are replaced by a learned mask token
after the patch embedding, the encoder runs as usual, a linear decoder predicts every pixel, and
the loss is the L1 error on the hidden pixels only. The encoder is any :class:`SwinTransformerV2`
and is not modified: SimMIM owns the mask token, the decoder and the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .model import SwinTransformerV2


class MaskGenerator:
    """Random masks of ``mask_patch_size`` squares, returned at the model's patch resolution.

    ``ceil(cells * mask_ratio)`` of the ``(H/mask_patch) x (W/mask_patch)`` cells are masked
    (the official rounding: 22 of 36 cells at 192 px), then each cell is repeated
    ``mask_patch / model_patch`` times along both axes. Draws come from a torch.Generator, so a
    mask is a function of the generator's seed.
    """

    def __init__(self, input_size: int | tuple[int, int] = 192, mask_patch_size: int = 32,
                 model_patch_size: int = 4, mask_ratio: float = 0.6):
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if h % mask_patch_size or w % mask_patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the mask patch size {mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(f"mask patch {mask_patch_size} is not a multiple of the model patch {model_patch_size}")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.cells = (h // mask_patch_size, w // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.count = math.ceil(self.cells[0] * self.cells[1] * mask_ratio)

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        n = self.cells[0] * self.cells[1]
        mask = torch.zeros(n, dtype=torch.long)
        mask[torch.randperm(n, generator=generator)[: self.count]] = 1
        mask = mask.view(*self.cells)  # (H/mask_patch, W/mask_patch)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)  # (H/p, W/p)

    def batch(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.stack([self(generator) for _ in range(n)])  # (n, H/p, W/p)


def local_normalize(x: torch.Tensor, window: int) -> torch.Tensor:
    """Each pixel and channel normalised by the mean and unbiased std of the ``window``-sized
    neighbourhood around it (windows cut at the border count only the pixels inside)."""
    if window % 2 != 1:
        raise ValueError(f"norm_target_window must be odd, got {window}")
    pad = window // 2
    mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, window, stride=1, padding=pad, count_include_pad=False)
    ones = torch.ones_like(x[:1, :1])
    count = F.avg_pool2d(ones, window, stride=1, padding=pad, count_include_pad=True) * window**2
    var = ((mean_sq - mean * mean) * (count / (count - 1))).clamp(min=0)
    return (x - mean) / (var + 1e-6).sqrt()


class SimMIM(nn.Module):
    """``SimMIM(encoder)(x, mask) -> loss``.

    ``mask``: (B, H/p, W/p) with 1 where the token is hidden (from :class:`MaskGenerator`).
    ``norm_target_window``: predict locally normalised pixels (official SwinV2 setting 47);
    None predicts the input pixels as given. The decoder is a 1x1 convolution to
    ``stride**2 * in_chans`` channels then PixelShuffle(stride), with ``stride`` the encoder's
    total downsampling (32 for the standard family).
    """

    def __init__(self, encoder: SwinTransformerV2, *, norm_target_window: int | None = 47):
        super().__init__()
        if encoder.num_classes != 0:
            raise ValueError(
                f"SimMIM needs an encoder without a classifier head (it has {encoder.num_classes} classes): "
                "build it with num_classes=0, or call encoder.reset_classifier(0)"
            )
        if norm_target_window is not None and norm_target_window % 2 != 1:
            raise ValueError(f"norm_target_window must be odd, got {norm_target_window}")
        self.encoder = encoder
        self.norm_target_window = norm_target_window
        self.in_chans = encoder.in_chans
        self.patch_size = encoder.patch_size[0]
        self.stride = self.patch_size * 2 ** (encoder.num_layers - 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))  # the official shape
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )
        # Official checkpoints keep the mask token inside the encoder ("encoder.mask_token").
        self._register_load_state_dict_pre_hook(_official_mask_token_name)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, H/p, W/p) -> the encoder's final map (B, C_final, H/s, W/s)."""
        enc = self.encoder
        enc._check_input(x)
        tokens = enc.patch_embed(x)  # (B, H/p, W/p, C), after the patch norm
        if mask.shape != tokens.shape[:3]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the token grid "
                             f"{tuple(tokens.shape[:3])} of a {x.shape[-2]}x{x.shape[-1]} input")
        w = mask.unsqueeze(-1).to(tokens.dtype)  # (B, H/p, W/p, 1)
        token = self.mask_token.view(1, 1, 1, -1).to(tokens.dtype)
        tokens = tokens * (1 - w) + token * w  # hidden tokens replaced
        feats = enc.forward_tokens(enc._add_pos_embed(tokens))  # (B, h, w, C_final)
        return feats.permute(0, 3, 1, 2)  # (B, C_final, h, w)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the decoder's prediction (B, C, H, W), the pixel mask (B, 1, H, W))."""
        rec = self.decoder(self.encode(x, mask))  # (B, C, H, W)
        pixels = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)
        return rec, pixels.unsqueeze(1).to(rec.dtype)  # (B, 1, H, W)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm_target_window is None else local_normalize(x, self.norm_target_window)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rec, pixels = self.reconstruct(x, mask)
        error = (self.target(x).to(rec.dtype) - rec).abs()  # (B, C, H, W)
        # Mean over hidden pixels and channels only (visible pixels do not count). The official
        # outputs we test against are matched by a plain mean (no +1e-5 in the denominator, a
        # 2e-9 relative difference); the clamp only guards a mask that hides nothing.
        return (error * pixels).sum() / pixels.sum().clamp(min=1) / self.in_chans

    def load_pretrained(self, source) -> list[str]:
        """Load a SimMIM checkpoint (official ``encoder.*``/``decoder.0.*`` names or this
        module's own; a path or a state dict) strictly; returns notes on what was adapted.

        Derived buffers of official files are dropped and the old ``rpe_mlp`` name renamed;
        any other missing, unexpected or mis-shaped key raises StateDictMismatchError naming it.
        """
        from .convert.official import rename_rpe_mlp
        from .loading import DERIVED_BUFFERS, StateDictMismatchError, read_state_dict, unwrap_state_dict

        state = unwrap_state_dict(source) if isinstance(source, dict) else read_state_dict(source)
        state, notes = rename_rpe_mlp(state)
        derived = [k for k in state if k.rsplit(".", 1)[-1] in DERIVED_BUFFERS]
        for k in derived:
            del state[k]
        if "encoder.mask_token" in state:
            state["mask_token"] = state.pop("encoder.mask_token")
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                        if k in state and state[k].shape != v.shape)
        if missing or unexpected or shapes:
            raise StateDictMismatchError(
                f"SimMIM checkpoint does not fit: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                f"mis-shaped {shapes[:8]}"
            )
        self.load_state_dict(state)
        return list(notes) + ([f"dropped {len(derived)} derived buffers"] if derived else [])

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def no_weight_decay_keywords(self) -> set[str]:
        return self.encoder.no_weight_decay_keywords()


def _official_mask_token_name(state, prefix, *args) -> None:
    official = prefix + "encoder.mask_token"
    if official in state:
        state[prefix + "mask_token"] = state.pop(official)
