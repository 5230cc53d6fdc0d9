"""SimMIM self-supervised pre-training: ``swinv2 pretrain``.

The same loop as supervised training (AMP, accumulation, DDP or sharding, atomic checkpoints,
exact resume, logs and plots); the objective is SimMIM's masked-pixel L1 loss. Masks are drawn
per image from a generator seeded by (seed, update, micro-batch, rank), so resumed and
uninterrupted runs see the same masks. Validation is the loss on held-out images with masks
fixed once, which selects the best checkpoint; each epoch also writes a reconstruction picture.
"""

from __future__ import annotations

import torch

from ..data import loader as L
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, simmim_transform
from ..reconstruct import save_reconstruction_grid
from ..simmim import MaskGenerator, SimMIM
from ..train.config import TrainConfig
from ..train.distributed import Dist, all_reduce_sum, unwrap, wrap_model
from ..train.engine import Loop, autocast
from ..variants import create_model
from .common import in_process_group, model_overrides, prepare_run, run_loop, set_threads
from .supervised import eval_loader, load_datasets, make_optimizer, require_images

PICTURE_IMAGES = 8


def build_simmim(cfg: TrainConfig) -> SimMIM:
    overrides = model_overrides(cfg, num_classes=0)  # the encoder has no head (official: asserted)
    encoder = create_model(cfg.model, **overrides)
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return SimMIM(encoder, norm_target_window=cfg.norm_target_window)


def _masks(generator: MaskGenerator, n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([generator(generator=g) for _ in range(n)]).to(device)  # (n, H/p, W/p)


def _first_readable(dataset, count: int) -> torch.Tensor | None:
    """The first ``count`` images of an evaluation dataset that can be read, stacked (None if none):
    an unreadable file is passed over rather than put in the picture."""
    images = []
    for i in range(len(dataset)):
        item = dataset[(0, i)]
        if item is not None:
            images.append(item[0])
            if len(images) == count:
                break
    return torch.stack(images) if images else None


def main(cfg: TrainConfig) -> int:
    return in_process_group(_run, cfg)


def _run(cfg: TrainConfig, env: Dist) -> int:
    set_threads(cfg)
    cfg, state = prepare_run(cfg, env)
    torch.manual_seed(cfg.seed)  # the initial weights (and mask token, decoder) come from the seed
    train, val, _ = load_datasets(cfg)  # labels are not used
    model = build_simmim(cfg).to(env.device)
    encoder = model.encoder
    img = cfg.img_size or encoder.img_size[0]
    masker = MaskGenerator(img, mask_patch_size=cfg.mask_patch, model_patch_size=encoder.patch_size[0],
                           mask_ratio=cfg.mask_ratio)
    wrapped = wrap_model(model, env, cfg.sharding)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    optimizer = make_optimizer(wrapped, model, cfg)

    tf = simmim_transform(img)
    loader = L.build_loader(L.TransformedDataset(train, tf, seed=cfg.seed), batch_size=cfg.batch_size, train=True,
                            workers=cfg.workers, seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    # Validation: deterministic crops (the eval transform at crop 1.0) and masks fixed by index.
    val_loader = eval_loader(val, eval_transform(img, crop_pct=1.0, crop_mode="squash"), cfg, env)

    def objective(net, inputs, seed):
        images = inputs[0].to(env.device, non_blocking=True)
        mask = _masks(masker, images.shape[0], seed, env.device)
        return net(images, mask), images.shape[0]

    def evaluate(net) -> dict:
        net.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)
        with torch.no_grad():
            for b, (images, _, _) in enumerate(val_loader):
                if images.shape[0] == 0:
                    continue
                images = images.to(env.device)
                mask = _masks(masker, images.shape[0], 10_000 + b * env.world_size + env.rank, env.device)
                with autocast(cfg, env.device):
                    loss = net(images, mask).float()
                sums += torch.stack([loss * images.shape[0], torch.tensor(images.shape[0], device=env.device)])
        all_reduce_sum(sums)
        net.train()
        require_images(dict(images=int(sums[1])), val)
        return dict(loss=float(sums[0]) / float(sums[1]))

    def pictures(net, epoch: int) -> None:
        if not env.main:
            return
        images = _first_readable(val_loader.dataset, PICTURE_IMAGES)
        if images is None:
            return
        mask = _masks(masker, images.shape[0], 10_000, "cpu")
        core = unwrap(net)
        core.eval()
        with torch.no_grad():
            rec, _ = core.reconstruct(images.to(env.device), mask.to(env.device))
        core.train()
        save_reconstruction_grid(images, mask, rec.float().cpu(), f"{cfg.output}/reconstruction.png",
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                 norm_target_window=cfg.norm_target_window)

    def loader_for(epoch, start_batch):
        loader.batch_sampler.set_epoch(epoch, start_batch) if hasattr(loader.batch_sampler, "set_epoch") \
            else loader.sampler.set_epoch(epoch, start_batch)
        return iter(loader)

    loop = Loop(objective=objective, loader_for=loader_for, batches_per_epoch=len(loader), evaluate=evaluate,
                select=("loss", False), on_epoch_end=pictures)
    n = sum(p.numel() for p in encoder.parameters())
    intro = (f"SimMIM pre-training {cfg.model} ({n / 1e6:.2f}M encoder parameters) on {len(train)} images at "
             f"{img}px, mask {cfg.mask_ratio:.0%} of {cfg.mask_patch}px patches")
    return run_loop(cfg, env, wrapped, optimizer, loop, state, intro, summary=lambda final: dict(
        task="pretrain", model=cfg.model, updates=final.step, best_val_loss=final.best, best_epoch=final.best_epoch,
        skipped_images=final.skipped_images, output=cfg.output,
        finetune=f"swinv2 finetune --checkpoint {cfg.output}/checkpoint-last.pt --model {cfg.model}"))
