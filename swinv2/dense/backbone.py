"""The network as a dense-prediction backbone: per-stage maps, each with its own LayerNorm.

Detection and segmentation heads read several stages of the same ``SwinTransformerV2`` that
classifies images; nothing of the network is copied. As in the Swin detection and segmentation
code (mmdet / mmseg), every output stage gets an affine LayerNorm of its own, and the final norm
of the classifier is no longer applied (its weights start the last output norm instead).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..model import SwinTransformerV2
from ..variants import create_model

_NORMS = "norms."


class SwinV2Backbone(nn.Module):
    """Stage maps of a :class:`SwinTransformerV2` for dense heads.

    ``model``: the network, held as ``self.body`` (the same object: its classifier is removed and
    its final norm replaced by an identity). ``out_indices``: the stages whose maps come out, in
    increasing order (negative indices count from the last stage). ``frozen_stages``: -1 trains
    everything; 0 freezes the patch embedding (and the absolute position embedding if any); k >= 1
    also freezes stages 0..k-1 (blocks, patch merging and output norm), as mmdet's Swin does.
    """

    def __init__(self, model: SwinTransformerV2, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1):
        super().__init__()
        if not isinstance(model, SwinTransformerV2):
            raise TypeError(f"SwinV2Backbone: model must be a SwinTransformerV2, got {type(model).__name__}")
        n = model.num_layers
        self.out_indices = _check_out_indices(out_indices, n)
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= n:
            raise ValueError(f"SwinV2Backbone: frozen_stages must be an int from -1 (none) to {n} (all stages), "
                             f"got {frozen_stages!r}")
        self.frozen_stages = frozen_stages
        model.reset_classifier(0)
        self.body = model
        final = model.norm
        eps = getattr(final, "eps", 1e-5)
        ref = next(model.parameters())
        self.norms = nn.ModuleList(
            nn.LayerNorm(model.feature_info[i]["num_chs"], eps=eps, device=ref.device, dtype=ref.dtype)
            for i in self.out_indices
        )
        # The classifier's final norm is the last stage's norm: a pretrained one is kept that way.
        last = self.norms[-1]
        if self.out_indices[-1] == n - 1 and getattr(final, "weight", None) is not None:
            with torch.no_grad():
                last.weight.copy_(final.weight)
                if getattr(final, "bias", None) is not None:
                    last.bias.copy_(final.bias)
        model.norm = nn.Identity()
        self.out_channels: list[int] = [model.feature_info[i]["num_chs"] for i in self.out_indices]
        self.strides: list[int] = [model.feature_info[i]["reduction"] for i in self.out_indices]
        self._freeze()

    @classmethod
    def from_variant(cls, name: str, *, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                     **model_kwargs) -> SwinV2Backbone:
        """Build the variant ``name`` with :func:`swinv2.create_model` (no classifier; keyword
        arguments go to it, e.g. ``pretrained``, ``window_size``, ``drop_path_rate``) and wrap it."""
        return cls(create_model(name, num_classes=0, **model_kwargs), out_indices=out_indices,
                   frozen_stages=frozen_stages)

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, C_in, H, W), sides multiples of the patch size -> ``{"0": map, "1": map, ...}``, one
        NCHW map per output stage (key: its position in ``out_indices``) at ``strides``."""
        maps = self.body.forward_intermediates(x, indices=self.out_indices, norm=False, stop_early=True,
                                               output_fmt="NHWC", intermediates_only=True)
        out = OrderedDict()
        for j, (norm, m) in enumerate(zip(self.norms, maps)):
            out[str(j)] = norm(m).permute(0, 3, 1, 2).contiguous()  # (B, h_i, w_i, C_i) -> (B, C_i, h_i, w_i)
        return out

    # -- freezing -----------------------------------------------------------------------------------

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        body = self.body
        frozen = [body.patch_embed, body.pos_drop]
        for i in range(self.frozen_stages):
            frozen.append(body.layers[i])
            if i in self.out_indices:
                frozen.append(self.norms[self.out_indices.index(i)])
        return frozen

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        if self.frozen_stages >= 0 and self.body.ape:
            self.body.absolute_pos_embed.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinV2Backbone:
        """As ``nn.Module.train``, but frozen parts stay in eval mode (no stochastic depth or
        dropout where nothing learns)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    # -- windows ------------------------------------------------------------------------------------

    def set_window(self, window_size: int | tuple[int, int]) -> None:
        """Use another attention window with the same weights: the paper's test-time window
        enlargement (Table 1: trained at window 16, tested at 32), which the log-spaced
        continuous position bias makes possible."""
        self.body.set_input_size(window_size=window_size)

    # -- layer-wise lr decay, weight decay -------------------------------------------------------

    @property
    def num_layer_ids(self) -> int:
        """The network's count (blocks + 2); the top id is left to the heads that follow."""
        return self.body.num_layer_ids

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter named relative to the backbone, for layer-wise LR decay.

        ``body.*`` gets the network's id (stem 0, block j of stage i ``sum(depths[:i]) + j + 1``).
        An output norm belongs to its stage, as in mmseg's layer-decay convention: it gets the id
        of that stage's last block (the same id as the stage's patch merging)."""
        if name.startswith("body."):
            return self.body.layer_id(name[len("body."):])
        if name.startswith(_NORMS):
            j = int(name[len(_NORMS):].split(".", 1)[0])
            return sum(self.body.depths[: self.out_indices[j] + 1])
        raise ValueError(f"SwinV2Backbone.layer_id: {name!r} is not a parameter of the backbone")

    def no_weight_decay(self) -> set[str]:
        """The network's exemptions, named relative to the backbone (``body.`` prefix)."""
        return {f"body.{n}" for n in self.body.no_weight_decay()}

    def no_weight_decay_keywords(self) -> set[str]:
        return self.body.no_weight_decay_keywords()


def _check_out_indices(out_indices: Sequence[int], num_stages: int) -> tuple[int, ...]:
    """Stage indices -> non-negative, strictly increasing, in range; one clear error otherwise."""
    try:
        raw = [int(i) for i in out_indices]
    except (TypeError, ValueError):
        raise TypeError(f"SwinV2Backbone: out_indices must be a sequence of stage indices, got {out_indices!r}") \
            from None
    bad = [i for i in raw if not -num_stages <= i < num_stages]
    if not raw or bad:
        raise ValueError(f"SwinV2Backbone: out_indices {tuple(raw)} must be non-empty stage indices of a network "
                         f"with {num_stages} stages")
    take = [i % num_stages for i in raw]
    if any(b <= a for a, b in zip(take, take[1:])):
        raise ValueError(f"SwinV2Backbone: out_indices {tuple(raw)} must be strictly increasing stages")
    return tuple(take)
