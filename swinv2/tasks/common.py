"""Pieces every task uses: run folder, model building, evaluation, saving models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..hub import save_pretrained
from ..train import checkpoint as ckpt
from ..train.config import TrainConfig, write_config
from ..train.distributed import Dist, all_reduce_sum, unwrap
from ..train.engine import autocast
from ..train.precision import describe_amp

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(name_or_path: str) -> str:
    """A recipe file path, or the name of a bundled recipe (``swinv2/recipes/NAME.yaml``)."""
    if os.path.exists(name_or_path):
        return name_or_path
    bundled = RECIPES / f"{name_or_path}.yaml"
    if bundled.is_file():
        return str(bundled)
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    raise FileNotFoundError(f"no recipe file {name_or_path!r}, and no bundled recipe of that name (bundled: {names})")


def prepare_run(cfg: TrainConfig, env: Dist) -> tuple[TrainConfig, dict | None]:
    """Create the run folder, or on ``--resume`` read its last checkpoint.

    Returns the config to run with and the checkpoint state to restore (None for a new run).
    A new run refuses a folder that already holds a checkpoint, so nothing is overwritten.
    """
    out = Path(cfg.output)
    last = out / ckpt.LAST
    state = None
    if cfg.resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {last} to resume from (start a new run without --resume)")
        state = ckpt.load_checkpoint(last)
        saved = TrainConfig.from_dict(state["config"])
        # The saved recipe defines the run; only how it is executed may change on resume.
        runtime = ("device", "threads", "workers", "progress", "tensorboard", "log_every", "max_steps",
                   "save_every_steps", "compile", "epochs", "deepspeed_config")
        # Flags typed on the command line (recorded by config_from_args); for a config built in
        # Python, the fields that differ from the defaults.
        given = getattr(cfg, "_given", None)
        if given is None:
            defaults = TrainConfig()
            given = {k for k in runtime if getattr(cfg, k) != getattr(defaults, k)}
        ignored = sorted(k for k in given if k not in runtime and k not in ("resume", "output", "task", "config")
                         and getattr(cfg, k) != getattr(saved, k))
        if ignored and env.main:
            print(f"note: --resume continues the saved recipe; ignoring {ignored} (start a new run to change them)")
        cfg = saved.replace(**{k: getattr(cfg, k) for k in runtime if k in given}, resume=True)
    elif last.is_file():
        raise FileExistsError(
            f"{out} already holds a run ({last}); continue it with --resume or choose another --output"
        )
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
    return cfg, state


def model_overrides(cfg: TrainConfig, **fixed) -> dict:
    """Constructor overrides a run config asks for (size, window, stochastic depth, memory)."""
    out = dict(fixed)
    if cfg.img_size:
        out["img_size"] = cfg.img_size
    if cfg.window:
        out["window_size"] = cfg.window
    if cfg.drop_path is not None:
        out["drop_path_rate"] = cfg.drop_path
    if cfg.sequential_attention:
        out["sequential_attention"] = list(cfg.sequential_attention)
    return out


def run_loop(cfg: TrainConfig, env: Dist, wrapped: nn.Module, optimizer, loop, state: dict | None,
             intro: str, summary, ema=None) -> int:
    """Logger, trainer, resume, the loop, the summary. ``summary(final_state) -> dict``.
    Returns the exit code: 0, or 3 when the loss became non-finite."""
    from ..train.engine import NonFiniteLossError, Trainer
    from ..train.logging import RunLogger

    logger = RunLogger(cfg.output, enabled=env.main, tensorboard=cfg.tensorboard,
                       resume_step=state["run"]["step"] if state else None)
    trainer = Trainer(cfg, env, wrapped, optimizer, loop, logger, ema=ema)
    if state is not None:
        trainer.load_state_dict(state)
        if env.main:
            print(f"resumed {cfg.output} at update {trainer.state.step} (epoch {trainer.state.epoch + 1})")
    elif env.main:
        batch = cfg.batch_size * cfg.accum_steps * env.world_size
        print(f"{intro}; {trainer.total_steps} updates of {batch} images; device {env.device}, "
              f"{env.world_size} process(es), {describe_amp(cfg.amp, env.device)}; run folder {cfg.output}")
    try:
        final = trainer.fit()
    except NonFiniteLossError as err:
        if env.main:
            print(f"swinv2: error: {err}")
        logger.close()
        return 3
    if env.main:
        print(logger.summary(**summary(final)))
    logger.close()
    return 0


def set_threads(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def evaluate_classifier(model: nn.Module, loader, env: Dist, cfg: TrainConfig, num_classes: int) -> dict:
    """Top-1, top-5 (fractions) and cross-entropy over a loader; summed across processes,
    so each process may see a different, unpadded share of the images."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # correct1, correct5, loss, count
    k = min(5, num_classes)
    with torch.no_grad():
        for images, targets, _ in loader:
            if images.shape[0] == 0:
                continue
            images, targets = images.to(env.device), targets.to(env.device)
            with autocast(cfg, env.device):
                logits = model(images)
            logits = logits.float()
            top = logits.topk(k, dim=1).indices
            hit = top == targets[:, None]
            sums += torch.stack([
                hit[:, 0].sum(), hit.any(dim=1).sum(),
                nn.functional.cross_entropy(logits, targets, reduction="sum"),
                torch.tensor(targets.shape[0], device=env.device),
            ]).to(sums)
    all_reduce_sum(sums)
    model.train(was_training)
    n = max(float(sums[3]), 1.0)
    return dict(top1=float(sums[0]) / n, top5=float(sums[1]) / n, loss=float(sums[2]) / n, images=int(sums[3]))


def model_saver(cfg: TrainConfig, class_names: list[str] | None):
    """Writes ``model-*.safetensors`` files that ``create_model(pretrained=...)`` and
    ``swinv2 predict`` read alone: weights, architecture, class names and eval crop policy."""

    def save(state: dict, path: str, info: dict) -> None:
        from ..model import SwinTransformerV2

        model = SwinTransformerV2(**state["model_config"])
        model.load_state_dict(state["model"])
        meta = {
            "class_names": json.dumps(class_names) if class_names else "",
            "preprocess": json.dumps(dict(img_size=cfg.img_size or model.img_size[0], crop_pct=cfg.crop_pct,
                                          crop_mode="center" if cfg.crop_pct < 1 else "squash",
                                          interpolation="bicubic")),
            "train_info": json.dumps(info),
        }
        save_pretrained(model, path, metadata=meta)

    return save


def device_model(model: nn.Module, env: Dist) -> nn.Module:
    return model.to(env.device)


def print_summary(text: str, env: Dist) -> None:
    if env.main:
        print(text, file=sys.stdout, flush=True)


__all__ = ["evaluate_classifier", "model_saver", "prepare_run", "recipe_path", "set_threads", "unwrap"]
