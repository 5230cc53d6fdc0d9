"""Pictures of SimMIM at work: input, masked input, prediction (``swinv2 reconstruct``).

:func:`load_simmim` reads a SimMIM checkpoint, :func:`reconstruct` hides part of each image with
seeded masks and predicts it, and :func:`save_reconstruction_grid` draws the result. Checkpoints:

- written by ``swinv2 pretrain`` (or any ``torch.save``'d dict of that form):
  ``{"model": simmim.state_dict(), "model_config": simmim.encoder.config, "config": {...}}``,
  where the optional ``config`` entries ``img_size``, ``mask_patch``, ``mask_ratio`` and
  ``norm_target_window`` give the pre-training settings (defaults for the flags below);
- official SimMIM pre-training files (``encoder.*``, ``decoder.0.*``), bare or under ``model``,
  ``.pth`` or ``.safetensors``: they do not say their architecture, so ``--model`` names it; the
  window is read from their coordinate buffers when they carry them (else ``--window-size`` or the
  variant's); the target normalisation is taken to be the SwinV2 one (47) unless
  ``--norm-target-window`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

from .data.images import open_rgb
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from .fileio import atomic_path
from .files import CheckpointError
from .loading import load_pretrained
from .model import SwinTransformerV2
from .reading import read_weights
from .simmim import MaskGenerator, SimMIM, local_stats
from .variants import create_model

OFFICIAL_NORM_TARGET_WINDOW = 47  # every official SwinV2 SimMIM config enables it with 47
_COORDS_KEY = "layers.0.blocks.0.attn.relative_coords_table"


def _to_display(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Mean/std-normalised (B, C, H, W) -> (B, H, W, C) in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1).permute(0, 2, 3, 1)


def save_reconstruction_grid(images, masks, recs, path, mean=IMAGENET_MEAN, std=IMAGENET_STD, *,
                             norm_target_window: int | None = None, dpi: int = 100) -> str:
    """Write a PNG with one row per image: the input, the masked input (hidden area grey), the
    prediction pasted into the hidden area of the input, and the full prediction.

    ``images``: (B, C, H, W) normalised with ``mean``/``std`` (C = 1 or 3); ``masks``: token masks
    (B, H/p, W/p) or pixel masks (B, 1, H, W), 1 = hidden; ``recs``: the decoder's outputs
    (:meth:`SimMIM.reconstruct`). When the model predicted the locally normalised target
    (``norm_target_window``), its output is mapped back to pixels with the local mean and std of
    the *input* image: the statistics the target was normalised with. Inside the hidden area those
    statistics still see the true pixels, so this shows how well the model predicts local structure
    relative to its neighbourhood, not an unaided guess of the local brightness. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    images, recs = images.detach().double().cpu(), recs.detach().double().cpu()
    if images.ndim != 4 or recs.shape != images.shape:
        raise ValueError(f"images {tuple(images.shape)} and reconstructions {tuple(recs.shape)} must both be "
                         "(B, C, H, W) of one shape")
    B, C, H, W = images.shape
    if C not in (1, 3) or len(mean) != C or len(std) != C:
        raise ValueError(f"can draw 1- or 3-channel images with one mean/std per channel; got {C} channels, "
                         f"mean {tuple(mean)}, std {tuple(std)}")
    masks = masks.detach().cpu()
    masks = masks[:, 0] if masks.ndim == 4 else masks  # (B, h, w)
    if masks.ndim != 3 or masks.shape[0] != B or H % masks.shape[1] or W % masks.shape[2]:
        raise ValueError(f"masks {tuple(masks.shape)} do not fit images {tuple(images.shape)}")
    pixels = masks.repeat_interleave(H // masks.shape[1], 1).repeat_interleave(W // masks.shape[2], 2)
    pixels = pixels.unsqueeze(-1).double()  # (B, H, W, 1), like the displayed images
    if norm_target_window is not None:
        local_mean, local_std = local_stats(images, norm_target_window)
        recs = recs * local_std + local_mean  # (B, C, H, W), back in the input's space
    shown_in, shown_rec = _to_display(images, mean, std), _to_display(recs, mean, std)  # (B, H, W, C)
    columns = {
        "input": shown_in,
        "masked": shown_in * (1 - pixels) + 0.5 * pixels,
        "prediction in hidden area": shown_in * (1 - pixels) + shown_rec * pixels,
        "prediction": shown_rec,
    }
    fig, axes = plt.subplots(B, len(columns), figsize=(2 * len(columns), 2 * B * H / W), squeeze=False)
    for j, (title, picture) in enumerate(columns.items()):
        for i in range(B):
            ax = axes[i][j]
            img = picture[i].numpy()
            ax.imshow(img[..., 0] if C == 1 else img, cmap="gray" if C == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(title, fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=os.path.splitext(os.fspath(path))[1][1:] or "png")
    finally:
        plt.close(fig)
    return os.fspath(path)


# -- reading checkpoints --------------------------------------------------------------------


def load_simmim(path: str | os.PathLike, *, model: str | None = None, img_size: int | None = None,
                window_size: int | None = None, norm_target_window: int | None | str = "auto"):
    """(a :class:`SimMIM` with the checkpoint's weights, in eval mode, the pre-training settings
    dict: ``img_size``, ``mask_patch``, ``mask_ratio``, ``norm_target_window``, ``model``).

    See the module docstring for the formats. ``norm_target_window``: ``"auto"`` (the checkpoint's
    setting, 47 for official files), an odd int, or None (off).
    """
    path = os.fspath(path)
    weights = read_weights(path)  # never runs code from the file; checks a stored config
    stripped = {k.removeprefix("module."): v for k, v in weights.state.items()}
    if not any(k.startswith("decoder.") for k in stripped):
        raise CheckpointError(f"{path} holds no SimMIM decoder (decoder.0.*): not a SimMIM pre-training checkpoint")
    run = weights.run_config or {}
    # img_size only sizes the input: the encoder runs at any size (an absolute position embedding
    # is resampled), and building it at another size would change that embedding's shape.
    overrides = dict(num_classes=0)
    if window_size:
        overrides["window_size"] = window_size
    if weights.config is not None:
        encoder = SwinTransformerV2(**{**weights.config, **overrides})
        name, official = run.get("model") or "SimMIM", False
    elif model:
        coords = stripped.get("encoder." + _COORDS_KEY)
        if coords is not None and "window_size" not in overrides:  # (1, 2w-1, 2w-1, 2)
            overrides["window_size"] = ((coords.shape[1] + 1) // 2, (coords.shape[2] + 1) // 2)
        encoder = create_model(model, **overrides)
        name, official = model, True
    else:
        raise CheckpointError(
            f"{path} does not say which architecture it holds (an official SimMIM file?): name it with --model "
            "(see `swinv2 list`), e.g. --model swinv2_base_window12_192"
        )
    if norm_target_window == "auto":
        norm_target_window = run.get("norm_target_window", OFFICIAL_NORM_TARGET_WINDOW) if not official \
            else OFFICIAL_NORM_TARGET_WINDOW
    sim = SimMIM(encoder, norm_target_window=norm_target_window)
    load_pretrained(sim, dataclasses.replace(weights, state=stripped))
    settings = dict(
        img_size=img_size or run.get("img_size") or encoder.img_size[0],
        mask_patch=run.get("mask_patch") or 32,
        mask_ratio=run.get("mask_ratio") or 0.6,
        norm_target_window=norm_target_window,
        model=name,
    )
    return sim.eval(), settings


# -- predicting hidden areas ---------------------------------------------------------------


def read_images(paths: Sequence[str | os.PathLike], size: int) -> torch.Tensor:
    """The whole images resized to ``size`` x ``size`` and normalised: (B, 3, size, size). An
    image that cannot be read (a FIFO, a truncated file) is a one-line ValueError naming it."""
    tf = eval_transform(size, crop_pct=1.0, crop_mode="squash")
    images = []
    for path in paths:
        try:
            images.append(tf(open_rgb(path)))  # a FIFO is refused, not opened
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    return torch.stack(images)


@dataclasses.dataclass
class Reconstruction:
    """What :func:`reconstruct` predicted, on the CPU."""

    masks: torch.Tensor  # (B, H/p, W/p) token masks, 1 = hidden
    predictions: torch.Tensor  # (B, C, H, W): the decoder's outputs
    loss: float  # SimMIM's masked L1 loss
    hidden: int  # mask cells hidden per image
    cells: int  # mask cells per image


def reconstruct(sim: SimMIM, images: torch.Tensor, *, mask_patch: int, mask_ratio: float, seed: int = 0,
                device="cpu") -> Reconstruction:
    """Hide ``mask_ratio`` of each image's ``mask_patch``-pixel squares (masks seeded by
    ``seed``) and predict them. ``images``: (B, C, H, W) as :func:`read_images` gives them."""
    masker = MaskGenerator(tuple(images.shape[-2:]), mask_patch, sim.patch_size, mask_ratio, seed=seed)
    masks = masker.batch(len(images))  # (B, H/p, W/p)
    sim = sim.to(device)
    x, m = images.to(device), masks.to(device)
    with torch.no_grad():
        predictions, _ = sim.reconstruct(x, m)
        loss = sim(x, m)
    return Reconstruction(masks, predictions.cpu(), loss.item(), masker.count, masker.cells[0] * masker.cells[1])
