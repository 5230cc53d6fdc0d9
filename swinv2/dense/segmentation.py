"""UPerNet on the Swin V2 backbone, with the auxiliary FCN head, and sliding / multi-scale inference.

The paper's ADE20K setup is mmseg's UPerNet with a Swin backbone: a pyramid pooling module on the
last stage, an FPN that fuses every stage at stride 4, 512 channels, BatchNorm, dropout 0.1; an
auxiliary FCN head on the third stage (256 channels, loss weight 0.4); cross-entropy ignoring
label 255; sliding-window testing with 512 crops every 341 pixels. Module and parameter names
follow mmseg's (``decode_head.psp_modules.0.1.conv``, ``.bn``, ``conv_seg``), so its checkpoints'
heads map one to one; :func:`state_dict_from_transformers` maps transformers' UperNet heads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model import SwinTransformerV2
from .backbone import SwinV2Backbone

Size = int | tuple[int, int]


class _ConvModule(nn.Module):
    """Conv (no bias: the BatchNorm's shift is the bias), BatchNorm, ReLU: mmseg's ``ConvModule``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmseg's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)  # small logits at the start, as mmseg's heads
    nn.init.zeros_(conv.bias)
    return conv


def _check_classes(num_classes, where: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{where}: num_classes must be a positive int, got {num_classes!r}")


class UPerHead(nn.Module):
    """UPerNet's decoder (Xiao et al., 2018): pyramid pooling on the last map, a top-down FPN over
    all maps, every level upsampled to the first and fused by a 3x3 conv, then dropout and a
    1x1 classifier. ``forward(maps)``: one NCHW map per ``in_channels`` entry, finest first ->
    logits (B, num_classes, h_0, w_0), i.e. at the first map's stride (4 for Swin)."""

    def __init__(self, in_channels: Sequence[int], channels: int = 512, *, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, align_corners: bool = False):
        super().__init__()
        _check_classes(num_classes, "UPerHead")
        self.in_channels, self.channels = list(in_channels), channels
        if not self.in_channels:
            raise ValueError("UPerHead: in_channels must name at least one map")
        self.align_corners = align_corners
        top = self.in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _ConvModule(top, channels, 1)) for s in pool_scales
        )
        self.bottleneck = _ConvModule(top + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(_ConvModule(c, channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_ConvModule(channels, channels, 3, padding=1) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = _ConvModule(len(self.in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def _resize(self, x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def _pyramid_pool(self, x: torch.Tensor) -> torch.Tensor:
        """Last map (B, C, h, w) -> (B, channels, h, w): itself and its pooled summaries, fused."""
        pooled = [self._resize(ppm(x), x.shape[2:]) for ppm in self.psp_modules]  # each (B, channels, h, w)
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.in_channels):
            raise ValueError(f"UPerHead: expected {len(self.in_channels)} maps, got {len(maps)}")
        levels = [conv(m) for conv, m in zip(self.lateral_convs, maps)] + [self._pyramid_pool(maps[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down: each coarser level added into the next finer
            levels[i - 1] = levels[i - 1] + self._resize(levels[i], levels[i - 1].shape[2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels)] + [levels[-1]]
        size = outs[0].shape[2:]
        fused = torch.cat([outs[0]] + [self._resize(o, size) for o in outs[1:]], dim=1)  # (B, L*channels, h_0, w_0)
        return self.conv_seg(self.dropout(self.fpn_bottleneck(fused)))


class FCNHead(nn.Module):
    """The auxiliary head (Long et al., 2015, as in mmseg): ``num_convs`` conv-BN-ReLU layers, the
    input optionally concatenated back and fused, dropout, a 1x1 classifier. ``forward(x)``:
    (B, in_channels, h, w) -> logits (B, num_classes, h, w)."""

    def __init__(self, in_channels: int, channels: int = 256, *, num_classes: int, num_convs: int = 1,
                 concat_input: bool = False, dropout: float = 0.1, kernel_size: int = 3):
        super().__init__()
        _check_classes(num_classes, "FCNHead")
        if num_convs < 0 or (num_convs == 0 and channels != in_channels):
            raise ValueError(f"FCNHead: num_convs must be >= 0, and 0 only when channels == in_channels; got "
                             f"num_convs={num_convs}, channels={channels}, in_channels={in_channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"FCNHead: kernel_size must be odd and positive (same-size output), got {kernel_size}")
        self.in_channels, self.channels, self.concat_input = in_channels, channels, concat_input
        pad = kernel_size // 2
        widths = [in_channels] + [channels] * (num_convs - 1)
        layers = [_ConvModule(w, channels, kernel_size, pad) for w in widths[:num_convs]]
        self.convs = nn.Sequential(*layers) if layers else nn.Identity()
        self.conv_cat = _ConvModule(in_channels + channels, channels, kernel_size, pad) if concat_input else None
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))


class Segmenter(nn.Module):
    """UPerNet on a :class:`SwinV2Backbone`, with the auxiliary FCN head on map ``aux_index`` (a
    position in the backbone's ``out_indices``; ``aux_weight`` 0: no auxiliary head).

    Inputs are normalised (B, 3, H, W) images (the data pipeline applies ImageNet mean/std). Sides
    that are not multiples of the patch size are zero-padded at the bottom and right for the
    backbone, and the padding is cut from the logits.
    """

    def __init__(self, backbone: SwinV2Backbone, num_classes: int, *, channels: int = 512,
                 aux_channels: int = 256, aux_index: int = 2, aux_weight: float = 0.4, ignore_index: int = 255,
                 align_corners: bool = False):
        super().__init__()
        if not isinstance(backbone, SwinV2Backbone):
            raise TypeError(f"Segmenter: backbone must be a SwinV2Backbone, got {type(backbone).__name__}")
        _check_classes(num_classes, "Segmenter")
        if aux_weight < 0:
            raise ValueError(f"Segmenter: aux_weight must be >= 0, got {aux_weight}")
        if aux_weight > 0 and not 0 <= aux_index < len(backbone.out_channels):
            raise ValueError(f"Segmenter: aux_index {aux_index} is not a map of the backbone (it has "
                             f"{len(backbone.out_channels)}: out_indices {backbone.out_indices})")
        self.num_classes, self.ignore_index, self.align_corners = num_classes, ignore_index, align_corners
        self.aux_index, self.aux_weight = aux_index, float(aux_weight)
        self.backbone = backbone
        self.decode_head = UPerHead(backbone.out_channels, channels, num_classes=num_classes,
                                    align_corners=align_corners)
        self.auxiliary_head = (FCNHead(backbone.out_channels[aux_index], aux_channels, num_classes=num_classes)
                               if aux_weight > 0 else None)

    def _heads(self, images: torch.Tensor, aux: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, 3, H, W) -> logits of both heads at the input size (aux None unless asked)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"Segmenter: images must be a (B, 3, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        H, W = images.shape[-2:]
        ph, pw = self.encoder.patch_size
        pad_h, pad_w = (-H) % ph, (-W) % pw
        x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images  # (B, 3, Hp, Wp)
        maps = list(self.backbone(x).values())
        main = self._to_input(self.decode_head(maps), x.shape[-2:], (H, W))
        extra = None
        if aux and self.auxiliary_head is not None:
            extra = self._to_input(self.auxiliary_head(maps[self.aux_index]), x.shape[-2:], (H, W))
        return main, extra

    def _to_input(self, logits: torch.Tensor, padded, size) -> torch.Tensor:
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=self.align_corners)
        return logits[..., : size[0], : size[1]]

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None):
        """(B, 3, H, W) normalised -> logits (B, num_classes, H, W), upsampled bilinearly; with
        ``masks``, the loss dict of :meth:`loss` instead (training goes through ``forward`` so
        that wrappers such as DDP see the call)."""
        if masks is not None:
            return self.loss(images, masks)
        return self._heads(images, aux=False)[0]

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of both heads' logits, each upsampled to the masks' size (which must be
        the images'): ``loss = loss_main + aux_weight * loss_aux`` (``loss_aux`` only with an
        auxiliary head). ``masks``: (B, H, W) integer labels in 0..num_classes-1, or
        ``ignore_index``. Each loss is the mean over the labelled pixels (0 if there are none)."""
        if not isinstance(masks, torch.Tensor) or masks.is_floating_point() or masks.is_complex():
            raise TypeError("Segmenter.loss: masks must be an integer tensor of labels (B, H, W)")
        if masks.ndim != 3 or masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"Segmenter.loss: masks of shape {tuple(masks.shape)} do not match images "
                             f"{tuple(images.shape)}: expected (B, H, W) = {(images.shape[0], *images.shape[-2:])}")
        masks = masks.long()
        wrong = (masks != self.ignore_index) & ((masks < 0) | (masks >= self.num_classes))
        if wrong.any():
            raise ValueError(f"Segmenter.loss: masks hold label {int(masks[wrong][0])}, outside 0.."
                             f"{self.num_classes - 1} and not the ignore index {self.ignore_index}")
        main, extra = self._heads(images, aux=True)
        out = {"loss_main": self._cross_entropy(main, masks)}
        total = out["loss_main"]
        if extra is not None:
            out["loss_aux"] = self._cross_entropy(extra, masks)
            total = total + self.aux_weight * out["loss_aux"]
        return {"loss": total, **out}

    def _cross_entropy(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        # the sum over labelled pixels divided by their count: an image with no labelled pixel
        # contributes 0 instead of the 0/0 of a plain mean
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # a sum over many pixels needs more than half precision
        total = F.cross_entropy(logits, masks, ignore_index=self.ignore_index, reduction="sum")
        return total / (masks != self.ignore_index).sum().clamp(min=1)

    @property
    def encoder(self) -> SwinTransformerV2:
        """The network inside, e.g. to load ImageNet weights into it."""
        return self.backbone.body

    def set_window(self, window_size: int | tuple[int, int]) -> None:
        """Test-time window enlargement, same weights (see :meth:`SwinV2Backbone.set_window`)."""
        self.backbone.set_window(window_size)

    @property
    def num_layer_ids(self) -> int:
        return self.backbone.num_layer_ids

    def layer_id(self, name: str) -> int:
        """Backbone parameters: the backbone's id; both heads: the top id (no decay)."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return self.num_layer_ids - 1

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def no_weight_decay_keywords(self) -> set[str]:
        return self.backbone.no_weight_decay_keywords()


def state_dict_from_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of transformers' ``UperNetHead`` / ``UperNetFCNHead`` (alone, or under
    ``decode_head.`` / ``auxiliary_head.`` in ``UperNetForSemanticSegmentation``) to these heads':
    ``batch_norm`` -> ``bn`` and ``classifier`` -> ``conv_seg``; the rest of the names are shared.
    Backbone keys are passed through unrenamed (a strict load reports them)."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"(^|\.)batch_norm\.", r"\1bn.", key)
        renamed[re.sub(r"(^|\.)classifier\.", r"\1conv_seg.", key)] = value
    return renamed


# -- inference -------------------------------------------------------------------------------------


def _pair(value: Size, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of them, got {value!r}")
    return pair


@torch.no_grad()
def slide_inference(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    crop: Size = (512, 512), stride: Size = (341, 341)) -> torch.Tensor:
    """mmseg's "slide" testing: ``model`` (a :class:`Segmenter` in eval mode, or any map from
    (B, 3, h, w) to same-size logits) on ``crop`` windows every ``stride`` pixels, the last window
    of each axis aligned with the border; logits of overlapping windows are averaged. An image
    smaller than the crop is zero-padded for the forward and the padding cut away.
    (B, 3, H, W) -> logits (B, K, H, W)."""
    (ch, cw), (sh, sw) = _pair(crop, "crop"), _pair(stride, "stride")
    if sh > ch or sw > cw:
        raise ValueError(f"stride {(sh, sw)} must not exceed crop {(ch, cw)}: pixels between windows would be "
                         "left out")
    B, _, H, W = images.shape
    rows, cols = max(H - ch + sh - 1, 0) // sh + 1, max(W - cw + sw - 1, 0) // sw + 1
    logits, count = None, images.new_zeros((1, 1, H, W))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, H), min(c * sw + cw, W)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            window = images[:, :, y1:y2, x1:x2]
            h, w = window.shape[-2:]
            if (h, w) != (ch, cw):
                window = F.pad(window, (0, cw - w, 0, ch - h))  # (B, 3, ch, cw)
            out = model(window)[:, :, :h, :w]  # (B, K, h, w)
            if logits is None:
                logits = out.new_zeros((B, out.shape[1], H, W))
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def _scaled_size(size: tuple[int, int], scale: float, base_size: int | None) -> tuple[int, int]:
    """(H, W) at ``scale``: of the image, or a short side of ``base_size * scale``; halves round up."""
    if base_size is not None:
        scale = int(base_size * scale + 0.5) / min(size)
    return max(1, int(size[0] * scale + 0.5)), max(1, int(size[1] * scale + 0.5))


@torch.no_grad()
def multiscale_inference(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                         scales: Sequence[float] = (1.0,), flip: bool = False, *, base_size: int | None = None,
                         crop: Size | None = None, stride: Size | None = None) -> torch.Tensor:
    """Class probabilities averaged over scales and horizontal flips (mmseg's aug test).

    For each scale the image is resized bilinearly so that its short side is
    ``base_size * scale`` (or the image itself is scaled when ``base_size`` is None); ``model``
    runs on the whole image, or by :func:`slide_inference` when ``crop`` is given (``stride``
    default: two thirds of the crop). A flipped input's logits are flipped back. As in mmseg,
    the logits are resized back to (H, W) before the softmax. (B, 3, H, W) -> (B, K, H, W).
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {tuple(scales)}")
    if base_size is not None and (not isinstance(base_size, int) or base_size < 1):
        raise ValueError(f"base_size must be a positive int or None, got {base_size!r}")
    if crop is not None and stride is None:
        stride = tuple(max(1, 2 * c // 3) for c in _pair(crop, "crop"))
    align_corners = bool(getattr(model, "align_corners", False))
    H, W = image.shape[-2:]
    total, n = None, 0
    for scale in scales:
        size = _scaled_size((H, W), scale, base_size)
        x = image if size == (H, W) else F.interpolate(image, size=size, mode="bilinear", align_corners=align_corners)
        for flipped in (False, True) if flip else (False,):
            inp = x.flip(-1) if flipped else x
            logits = model(inp) if crop is None else slide_inference(model, inp, crop, stride)
            logits = logits.flip(-1) if flipped else logits
            if logits.shape[-2:] != (H, W):
                logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=align_corners)
            probs = logits.softmax(dim=1)
            total, n = (probs if total is None else total + probs), n + 1
    return total / n
