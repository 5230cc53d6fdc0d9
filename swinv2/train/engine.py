"""The training loop shared by supervised training, fine-tuning and SimMIM pre-training.

One optimizer update ("step") is ``accum_steps`` forward/backward passes of ``batch_size``
images on each process. Everything random is a function of the seed and the position in the
run: sample order and augmentation of (seed, epoch, index) in the data pipeline, mixup and
stochastic depth of (seed, step, micro-batch, rank) here. The learning rate is a function of
the step. So a run resumed from any checkpoint continues with exactly the losses of a run that
was never interrupted; the logged train loss, a mean over the updates since the last logged
step, is saved with its window in checkpoints, so the resumed log matches too.

The loss, image counts and non-finite checks stay on the device between logged steps: the host
waits for the device once per logged step (and before each checkpoint), not per micro-batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import fileio
from ..data.loader import derive_seed
from . import checkpoint as ckpt
from .config import TrainConfig
from .deepspeed_backend import full_optimizer_state, initialize, is_engine, load_full_optimizer_state
from .distributed import Dist, all_reduce_sum, unwrap
from .optim import Schedule, set_lr
from .precision import resolve_amp

# In the run folder: the update whose epoch-end files (checkpoint-best.pt, model-*.safetensors)
# are all written. Written after them, so its absence or an older update means "redo them".
EPOCH_FILES_MARK = ".epoch-files"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint.

    Found at the next logged step, epoch end or checkpoint after the update (whichever comes
    first), so nothing non-finite is ever saved."""


def autocast(cfg: TrainConfig, device: torch.device):
    amp = resolve_amp(cfg.amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(cfg: TrainConfig, device: torch.device):
    """fp16 needs loss scaling (small gradients underflow); bf16 has fp32's range and does not."""
    if resolve_amp(cfg.amp, device) != "fp16":
        return None
    if device.type != "cuda":
        raise ValueError("--amp fp16 needs a GPU; on a CPU use --amp bf16")
    return torch.amp.GradScaler("cuda")


@dataclass
class RunState:
    """Where a run is: restored from a checkpoint on resume."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # current epoch (the one that ``step`` falls in)
    best: float | None = None  # best value of the selection metric so far
    best_epoch: int | None = None
    best_step: int | None = None  # the update checkpoint-best.pt holds
    skipped_images: int = 0  # unreadable images skipped so far
    history: list = field(default_factory=list)  # per-epoch validation metrics
    # The train-loss window being averaged when the checkpoint was taken: loss (sum of update
    # losses), images, steps (updates), seconds (training time).
    window: dict | None = None


@dataclass
class Loop:
    """What a task gives the loop.

    ``objective(model, batch, seed) -> (loss, n_images)``: the mean loss of one micro-batch
    (``seed`` drives its randomness, e.g. mixup). ``loader_for(epoch, start_batch)``: an
    iterator over this process's micro-batches of an epoch, from ``start_batch`` on; each batch
    is ``(inputs..., n_skipped)`` as produced by the data collate. ``evaluate(model)``: a dict
    of validation metrics (computed on all processes, reduced). ``select``: the metric that
    picks the best checkpoint and whether larger is better.
    """

    objective: Callable
    loader_for: Callable[[int, int], Iterator]
    batches_per_epoch: int
    evaluate: Callable[[nn.Module], dict] | None
    select: tuple[str, bool] = ("top1", True)
    extra_state: Callable[[], dict] = dict  # stored in checkpoints (e.g. class names)
    on_epoch_end: Callable[[nn.Module, int], None] | None = None  # e.g. reconstruction pictures
    save_model: Callable[[dict, str, dict], None] | None = None  # (checkpoint state, path, info): model-*.safetensors


class Trainer:
    def __init__(self, cfg: TrainConfig, env: Dist, model: nn.Module, optimizer, loop: Loop, logger, ema=None):
        if cfg.sharding == "deepspeed" and env.enabled:
            model, optimizer = initialize(model, optimizer, cfg, env.world_size)
        self.cfg, self.env, self.model, self.optimizer, self.loop = cfg, env, model, optimizer, loop
        self.deepspeed = is_engine(model)
        self.logger, self.ema = logger, ema
        self.scaler = make_scaler(cfg, env.device)
        self.steps_per_epoch = loop.batches_per_epoch // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch has {loop.batches_per_epoch} batches of {cfg.batch_size} per process, fewer than "
                f"accum_steps={cfg.accum_steps}: lower --batch-size or --accum-steps, or add data"
            )
        global_batch = cfg.batch_size * cfg.accum_steps * env.world_size
        self.schedule = Schedule.from_config(cfg, self.steps_per_epoch, global_batch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.state = RunState()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Device-side counters, read by the host only in _read_counters. float64 keeps the
        # summed losses exact enough to match a resumed run bit for bit (MPS has no float64).
        self._dtype = torch.float32 if env.device.type == "mps" else torch.float64
        zero = torch.zeros((), dtype=self._dtype, device=env.device)
        self._window_loss, self._window_images = zero.clone(), zero.clone()  # since the last logged step
        self._skipped, self._bad = zero.clone(), zero.clone()  # since the last read
        self._first_bad = torch.full_like(zero, -1.0)  # the first update with a non-finite loss
        self._window_steps, self._window_seconds, self._segment_t0 = 0, 0.0, None

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        model = unwrap(self.model)
        return dict(
            model=_full_model_state(self.model),
            optimizer=_full_optimizer_state(self.model, self.optimizer),
            scaler=self.scaler.state_dict() if self.scaler else None,
            ema=self.ema.state_dict() if self.ema is not None else None,
            run=dict(step=self.state.step, epoch=self.state.epoch, best=self.state.best,
                     best_epoch=self.state.best_epoch, best_step=self.state.best_step,
                     skipped_images=self.state.skipped_images, history=self.state.history,
                     window=self.state.window),
            rng=ckpt.rng_state(),
            config=self.cfg.to_dict(),
            model_config=dict(getattr(model, "config", {}) or getattr(getattr(model, "encoder", None), "config", {})),
            **self.loop.extra_state(),
        )

    def load_state_dict(self, state: dict) -> None:
        _load_full_model_state(self.model, state["model"])
        _load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("the checkpoint has no EMA weights but --ema is set; resume with the same --ema")
            self.ema.load_state_dict(state["ema"])
        self.state = RunState(**state["run"])
        ckpt.set_rng_state(state["rng"])
        window = self.state.window or {}
        self._window_loss.fill_(window.get("loss", 0.0))
        self._window_images.fill_(window.get("images", 0))
        self._window_steps, self._window_seconds = window.get("steps", 0), window.get("seconds", 0.0)

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint. One taken at an epoch end whose derived files were not
        all written (the run was killed among them, see write_epoch_files) writes them now."""
        self.load_state_dict(state)
        if state.get("epoch_end") and self.env.main and _read_step(self._epoch_files_mark) != state["run"]["step"]:
            self.write_epoch_files(state)

    @property
    def _epoch_files_mark(self) -> Path:
        return Path(self.cfg.output) / EPOCH_FILES_MARK

    def save(self, name: str, epoch_end: bool = False) -> dict:
        """Checkpoint the run as ``name`` (with the logging window; ``epoch_end`` marks the
        checkpoint an epoch end's files derive from) and return the state written."""
        loss, images = self._read_counters()  # also stops here on a non-finite loss: never saved
        self.state.window = dict(loss=loss, images=images, steps=self._window_steps, seconds=self._elapsed())
        state = self.state_dict()  # collective under sharding: every process takes part
        state["epoch_end"] = epoch_end
        if self.env.main:
            ckpt.save_checkpoint(state, f"{self.cfg.output}/{name}")
        return state

    def write_epoch_files(self, state: dict) -> None:
        """What an epoch end derives from checkpoint-last.pt: checkpoint-best.pt (when this epoch
        is the best so far) and model-last/-best.safetensors. They are written after
        checkpoint-last.pt, which records the best update, and written again on resume from it,
        so checkpoint-best.pt and the summary agree whatever the moment a kill came."""
        if not self.env.main:
            return
        run, out = state["run"], self.cfg.output
        best = run.get("best_step") is not None and run["best_step"] == run["step"]
        if best:
            fileio.copy_file(f"{out}/{ckpt.LAST}", f"{out}/{ckpt.BEST}")
        if self.loop.save_model is not None:
            # From the gathered full state: under FSDP the live model holds only shards.
            info = next((h for h in run["history"] if h.get("step") == run["step"]), None)
            info = dict(info or dict(epoch=run["epoch"] + 1, step=run["step"]))
            self.loop.save_model(state, f"{out}/model-last.safetensors", info)
            if best:
                self.loop.save_model(state, f"{out}/model-best.safetensors", info)
        fileio.write_text(self._epoch_files_mark, f"{run['step']}\n")  # all written: nothing to redo on resume

    # -- device-side counters -------------------------------------------------------------

    def _read_counters(self) -> tuple[float, float]:
        """The host's one wait for the device: (loss sum, images) of the current window. Adds
        the skipped images to the run state and raises NonFiniteLossError if an update since
        the last read had a non-finite loss."""
        loss, images, skipped, bad, first = torch.stack(
            [self._window_loss, self._window_images, self._skipped, self._bad, self._first_bad]).tolist()
        self._skipped.zero_()
        self.state.skipped_images += int(skipped)
        if bad:
            update = int(first)
            raise NonFiniteLossError(
                f"the loss is not finite at update {update} (epoch {update // self.steps_per_epoch + 1}); the run "
                f"stopped, and {self.cfg.output}/{ckpt.LAST} (if any) holds the last good state. Lower --lr, "
                "use --amp bf16 or none, or check the data"
            )
        return loss, images

    def _elapsed(self) -> float:
        """Training seconds in the current window (evaluation and epoch ends left out)."""
        running = 0.0 if self._segment_t0 is None else time.perf_counter() - self._segment_t0
        return self._window_seconds + running

    def _log_train(self, lr: float, reset: bool) -> dict:
        """Log the mean loss over the window's updates. The window closes on the log_every grid;
        a run's last step off the grid is logged without closing it, so a resumed run logs the
        whole window at the next grid step, as an uninterrupted run does."""
        st = self.state
        loss, images = self._read_counters()
        seconds = self._elapsed()
        metrics = dict(loss=loss / self._window_steps, lr=lr, epoch=st.step / self.steps_per_epoch,
                       images_per_s=images / max(seconds, 1e-9), skipped_images=st.skipped_images)
        self.logger.log("train", st.step, **metrics)
        if reset:
            self._window_loss.zero_()
            self._window_images.zero_()
            self._window_steps, self._window_seconds = 0, 0.0
            self._segment_t0 = time.perf_counter()
        return metrics

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> RunState:
        cfg, st = self.cfg, self.state
        self.model.train()
        while st.step < self.total_steps:
            epoch = st.step // self.steps_per_epoch
            st.epoch = epoch
            start_update = st.step - epoch * self.steps_per_epoch
            batches = self.loop.loader_for(epoch, start_update * cfg.accum_steps)
            self._train_epoch(epoch, start_update, batches)
            epoch_done = st.step == (epoch + 1) * self.steps_per_epoch
            if epoch_done or st.step == self.total_steps:
                self._end_of_epoch(epoch, last=st.step == self.total_steps)
        return st

    def _train_epoch(self, epoch: int, start_update: int, batches: Iterator) -> None:
        cfg, st, env = self.cfg, self.state, self.env
        end_update = min(self.steps_per_epoch, start_update + self.total_steps - st.step)
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        bar = _progress(cfg.progress and env.main, start_update, self.steps_per_epoch, desc)
        self._segment_t0 = time.perf_counter()
        for _ in range(start_update, end_update):
            lr = self.schedule(st.step)
            set_lr(self.optimizer, lr)
            self._update(batches)
            st.step += 1
            self._window_steps += 1
            if self.ema is not None:
                self.ema.update_parameters(unwrap(self.model))
            on_grid = st.step % cfg.log_every == 0
            if on_grid or st.step == self.total_steps:
                metrics = self._log_train(lr, reset=on_grid)
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{metrics['images_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            # Not at an epoch's last update: the epoch-end checkpoint follows, after evaluation,
            # and a resume must not find that update saved without its evaluation.
            if (cfg.save_every_steps and st.step % cfg.save_every_steps == 0 and st.step < self.total_steps
                    and st.step % self.steps_per_epoch != 0):
                self.save(ckpt.LAST)
        self._window_seconds, self._segment_t0 = self._elapsed(), None
        if bar is not None:
            bar.close()

    def _update(self, batches: Iterator) -> None:
        """One optimizer update over ``accum_steps`` micro-batches. Its loss, images, skipped
        images and non-finite flag are added to the device-side counters without waiting."""
        cfg, env, model, ds = self.cfg, self.env, self.model, self.deepspeed
        accum = cfg.accum_steps
        loss_total = torch.zeros((), dtype=self._dtype, device=env.device)
        nonfinite = torch.zeros((), dtype=self._dtype, device=env.device)
        images, skipped = 0, 0
        for micro in range(accum):
            *inputs, n_skipped = next(batches)
            skipped += int(n_skipped)
            seed = derive_seed("update", cfg.seed, self.state.step, micro, env.rank)
            torch.manual_seed(seed)  # stochastic depth and dropout of this micro-batch
            # The gradient is synchronised across processes only on the last micro-batch
            # (DeepSpeed's engine counts micro-batches itself).
            sync = micro == accum - 1 or ds or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                if _batch_size(inputs) == 0:
                    # Every image of this batch was unreadable: contribute a zero gradient so
                    # all processes still run the same collective operations.
                    loss = sum(p.sum() for p in self.params) * 0.0
                    n = 0
                else:
                    with autocast(cfg, env.device):
                        loss, n = self.loop.objective(model, inputs, seed)
                    loss = loss.float()
                value = loss.detach()
                nonfinite += (~torch.isfinite(value)).to(self._dtype)
                # The mean over the update is the mean of micro-batch means: divide by accum
                # once here, and unscale/clip once below (the official scripts do both per
                # micro-batch, which breaks with GradScaler).
                scaled = loss / accum
                if ds:
                    model.backward(scaled, scale_wrt_gas=False)
                    if micro < accum - 1:
                        model.step()  # counts the micro-batch; the update comes at the last one
                else:
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_total += value.to(self._dtype) / accum
            images += n
        self._count(loss_total, nonfinite, images, skipped)
        if ds:
            model.step()  # reduces the gradients, clips them (gradient_clipping), updates, zeroes
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _count(self, loss: torch.Tensor, nonfinite: torch.Tensor, images: int, skipped: int) -> None:
        """Add one update to the counters. One small collective per update sums loss, images,
        skipped images and non-finite flags over all processes (the logged loss is then the
        global batch's, as in one process); on a GPU it is queued, not waited for."""
        counts = torch.tensor([images, skipped], dtype=self._dtype).to(self.env.device, non_blocking=True)
        update = all_reduce_sum(torch.cat([torch.stack([loss, nonfinite]), counts]))
        self._window_loss += update[0] / self.env.world_size
        self._window_images += update[2]
        self._skipped += update[3]
        first = (self._bad == 0) & (update[1] > 0)
        self._first_bad.copy_(torch.where(first, float(self.state.step), self._first_bad))
        self._bad += update[1]

    def _end_of_epoch(self, epoch: int, last: bool) -> None:
        cfg, st = self.cfg, self.state
        self._read_counters()  # a non-finite loss stops the run here, before evaluation
        metrics = {}
        if self.loop.evaluate is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            metrics = self.loop.evaluate(self.model)
            if self.ema is not None:
                metrics.update({f"ema_{k}": v for k, v in self.loop.evaluate(self.ema.module).items()})
            self.logger.log("val", st.step, epoch=epoch + 1, **metrics)
            st.history.append(dict(epoch=epoch + 1, step=st.step, **metrics))
            if self.env.main:
                print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if self.loop.on_epoch_end is not None:
            self.loop.on_epoch_end(self.model, epoch)
        name, larger = self.loop.select
        improved = False
        if name in metrics and math.isfinite(metrics[name]):
            value = metrics[name]
            improved = st.best is None or (value > st.best if larger else value < st.best)
            if improved:
                st.best, st.best_epoch, st.best_step = value, epoch + 1, st.step
        state = self.save(ckpt.LAST, epoch_end=True)
        self.write_epoch_files(state)
        self.logger.plot()


def _read_step(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _batch_size(inputs) -> int:
    """Images in a micro-batch: a stacked tensor's first dimension, or the length of a list of
    images (detection batches keep each image at its own size)."""
    if not inputs:
        return 0
    first = inputs[0]
    if isinstance(first, (list, tuple)):
        return len(first)
    return int(first.shape[0]) if hasattr(first, "shape") else 0


def _progress(enabled: bool, start: int, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, leave=False)


# -- full state dicts under every kind of sharding -----------------------------------------


def _is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in unwrap(model).modules())


def _full_model_state(model: nn.Module) -> dict:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def _load_full_model_state(model: nn.Module, state: dict) -> None:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(unwrap(model), state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state)


def _full_optimizer_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if is_engine(model):
        return full_optimizer_state(model)  # collective

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)  # collective: gathers the shards on rank 0
        import torch.distributed as dist

        return optimizer.state_dict() if dist.get_rank() == 0 else {}
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            unwrap(model), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def _load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    if is_engine(model):
        load_full_optimizer_state(model, state)
        return
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)  # ZeroRedundancyOptimizer takes the consolidated dict too
