"""Pictures of SimMIM at work: input, masked input, prediction; and ``swinv2 reconstruct``."""

from __future__ import annotations

import torch

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _to_display(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> (B, H, W, 3) in [0, 1]."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0, 1).permute(0, 2, 3, 1)


def _denormalise_local(rec: torch.Tensor, images: torch.Tensor, window: int) -> torch.Tensor:
    """A prediction of locally normalised pixels, mapped back with the input's own local mean
    and std (what the model was asked to predict relative to)."""
    import torch.nn.functional as F

    pad = window // 2
    mean = F.avg_pool2d(images, window, stride=1, padding=pad, count_include_pad=False)
    var = (F.avg_pool2d(images * images, window, stride=1, padding=pad, count_include_pad=False) - mean**2).clamp(0)
    return rec * (var + 1e-6).sqrt() + mean


def save_reconstruction_grid(images, masks, recs, path, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             norm_target_window: int | None = None, patch_size: int = 4) -> None:
    """A PNG with one row per image: input, masked input, prediction pasted into the hidden
    area, full prediction. ``masks``: (B, H/p, W/p) token masks; ``recs``: decoder outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, recs = images.float().cpu(), recs.float().cpu()
    if norm_target_window is not None:
        recs = _denormalise_local(recs, images, norm_target_window)
    pixels = masks.cpu().repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, None].float()
    shown = [images, images * (1 - pixels), images * (1 - pixels) + recs * pixels, recs]
    shown = [_to_display(t, mean, std) for t in shown]
    titles = ["input", "masked", "prediction in hidden area", "prediction"]
    n = images.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n), squeeze=False)
    for i in range(n):
        for j in range(4):
            ax = axes[i][j]
            ax.imshow(shown[j][i].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_reconstruct(args) -> int:
    from PIL import Image

    from .data.transforms import eval_transform
    from .model import SwinTransformerV2
    from .simmim import MaskGenerator, SimMIM
    from .train.checkpoint import load_checkpoint
    from .train.config import TrainConfig

    state = load_checkpoint(args.checkpoint)
    if not state.get("model_config") or not any(k.startswith("decoder.") for k in state["model"]):
        raise ValueError(f"{args.checkpoint} is not a SimMIM pre-training checkpoint (`swinv2 pretrain` writes them)")
    cfg = TrainConfig.from_dict(state["config"])
    sim = SimMIM(SwinTransformerV2(**state["model_config"]), norm_target_window=cfg.norm_target_window)
    sim.load_pretrained(state["model"])
    sim.eval()
    size = args.img_size or sim.encoder.img_size[0]
    tf = eval_transform(size, crop_pct=1.0, crop_mode="squash")
    images = []
    for path in args.images:
        try:
            with Image.open(path) as img:
                images.append(tf(img))
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    x = torch.stack(images)
    gen = MaskGenerator(size, cfg.mask_patch, sim.patch_size, args.mask_ratio or cfg.mask_ratio)
    masks = gen.batch(len(images), torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        rec, _ = sim.reconstruct(x, masks)
        loss = sim(x, masks)
    save_reconstruction_grid(x, masks, rec, args.output, norm_target_window=cfg.norm_target_window,
                             patch_size=sim.patch_size)
    print(f"masked L1 loss {loss.item():.4f} on {len(images)} image(s); picture: {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("reconstruct", help="picture of a SimMIM checkpoint's reconstructions of images")
    p.add_argument("checkpoint", help="a checkpoint-*.pt written by `swinv2 pretrain`")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--output", default="reconstruction.png")
    p.add_argument("--img-size", type=int, default=None, help="default: the pre-training size")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the pre-training ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.set_defaults(func=cmd_reconstruct)
