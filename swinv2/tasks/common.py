"""Pieces every task uses: run folder, model building, evaluation, saving models."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import fileio
from ..hub import save_pretrained
from ..loading import network_class
from ..train import checkpoint as ckpt
from ..train.config import TrainConfig, write_config
from ..train.distributed import Dist, all_reduce_sum, setup, teardown, unwrap
from ..train.engine import NonFiniteLossError, Trainer, autocast
from ..train.logging import RunLogger
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


# -- the run folder -----------------------------------------------------------------------------

LOCK = ".swinv2-run.lock"  # in the run folder; flock-ed by the run that writes there


class RunFolderBusyError(FileExistsError):
    """Another live run holds the run folder's lock."""


class RunFolder:
    """``--output`` as one run (on the main process) writes it: locked so that a second run
    into it is refused, and left as it was found when the run ends before its first checkpoint
    (a folder this run created is removed; in a folder that was there, what this run added).

    The lock is an ``flock`` on a file in the folder, held for the run's life. The system
    drops it when the process ends, however it ends, so a killed run can be resumed at once
    and there is no stale lock to clean. Under torchrun only the main process takes it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._owned = False  # this run has the folder (locked, or on a file system without locks)
        self._made: list[Path] = []  # folders this run created, outermost first
        self._found: set[str] = set()  # what the folder held before this run

    def start(self, cfg: TrainConfig, new_run: bool) -> None:
        """The run starts: create and lock the folder, then record the run's config in it."""
        if self.path.is_dir():
            self._found = set(os.listdir(self.path))
        else:
            missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise fileio.WriteError(f"--output {self.path}: cannot create it ({fileio.os_reason(err)})") from err
            self._made = missing[::-1]
        self._fd = _lock(self.path)
        self._owned = True
        if new_run and (self.path / ckpt.LAST).exists():  # a run that ended since prepare_run looked
            raise _holds_a_run(self.path)
        with fileio.atomic_path(self.path / "config.yaml") as tmp:
            write_config(cfg, tmp)

    def close(self, keep: bool) -> None:
        """The run ends: unless ``keep``, a run without a checkpoint leaves nothing behind.
        Then the lock is released."""
        try:
            if not keep and self._owned and not (self.path / ckpt.LAST).exists():
                self._discard()
        finally:
            if self._fd is not None:
                os.close(self._fd)  # releases the lock; the file stays (removing it would race)
                self._fd = None

    def _discard(self) -> None:
        if self._made:
            shutil.rmtree(self.path, ignore_errors=True)
            for folder in reversed(self._made[:-1]):  # parents made for it, unless something else is in them
                with contextlib.suppress(OSError):
                    folder.rmdir()
            return
        for name in set(os.listdir(self.path)) - self._found:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    target.unlink()


def _lock(folder: Path) -> int | None:
    """The run folder's lock, taken (a file descriptor to keep open); RunFolderBusyError if
    another run holds it. None, with a note, where the file system has no locks."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    path = folder / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise fileio.WriteError(f"--output {folder}: cannot write in it ({fileio.os_reason(err)})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _busy(folder) from None
            print(f"note: cannot lock {folder} ({fileio.os_reason(err)}); make sure no other run writes there")
            return None
        # A failed run's folder may have been removed between open and lock: then this lock
        # guards nothing, and the next try opens the file that is there now.
        if _same_file(fd, path):
            break
        os.close(fd)
    with contextlib.suppress(OSError):  # who holds it, for the message of a refused run
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def check_not_in_use(folder: Path) -> None:
    """RunFolderBusyError if a live run holds ``folder``'s lock. Only looks: the lock is taken
    when the run starts writing (RunFolder.start), so a start that fails leaves nothing."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no locks
        return
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return  # no lock file: no run has written here, or none can be locked
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(folder) from None
    finally:
        os.close(fd)  # also drops the shared lock


def _busy(folder: Path) -> RunFolderBusyError:
    holder = _read_quietly(folder / LOCK)
    return RunFolderBusyError(f"{folder} is in use by another swinv2 run{f' ({holder})' if holder else ''}: wait for "
                              "it to end, or choose another --output")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _read_quietly(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def prepare_run(cfg: TrainConfig, env: Dist) -> tuple[TrainConfig, dict | None]:
    """Check the run folder (writable, not in use by another run) and on ``--resume`` read its
    last checkpoint. Nothing is written yet: run_loop creates the folder and its config.yaml
    once data and model are ready, so a start that fails before that leaves no trace.

    Returns the config to run with and the checkpoint state to restore (None for a new run).
    A new run refuses a folder that already holds a checkpoint, so nothing is overwritten.
    """
    out = Path(cfg.output)
    if env.main:
        fileio.check_writable(out, "--output", folder=True)
        check_not_in_use(out)
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
        given = cfg.given_flags
        if given is None:
            defaults = TrainConfig()
            given = {k for k in runtime if getattr(cfg, k) != getattr(defaults, k)}
        ignored = sorted(k for k in given if k not in runtime and k not in ("resume", "output", "command", "config")
                         and getattr(cfg, k) != getattr(saved, k))
        if ignored and env.main:
            print(f"note: --resume continues the saved recipe; ignoring {ignored} (start a new run to change them)")
        # The run continues where its checkpoint is, should the folder have been moved.
        cfg = saved.replace(**{k: getattr(cfg, k) for k in runtime if k in given}, resume=True, output=cfg.output)
    elif last.is_file():
        raise _holds_a_run(out)
    return cfg, state


def _holds_a_run(out: Path) -> FileExistsError:
    return FileExistsError(
        f"{out} already holds a run ({out / ckpt.LAST}); continue it with --resume or choose another --output"
    )


# Config fields that are constructor keywords of the same name and change the architecture.
ARCH_SWITCHES = ("norm_placement", "attn_type", "position_bias", "extra_norm_period", "merge_norm")


def model_overrides(cfg: TrainConfig, **fixed) -> dict:
    """Constructor overrides a run config asks for (size, window, stochastic depth, memory, and
    the paper's ablation switches)."""
    out = dict(fixed)
    if cfg.img_size:
        out["img_size"] = cfg.img_size
    if cfg.window:
        out["window_size"] = cfg.window
    if cfg.drop_path is not None:
        out["drop_path_rate"] = cfg.drop_path
    if cfg.sequential_attention:
        out["sequential_attention"] = list(cfg.sequential_attention)
    out.update(architecture_switches(cfg))
    return out


def architecture_switches(cfg: TrainConfig) -> dict:
    """The paper's ablation switches the config sets (``norm_placement``, ``attn_type``,
    ``position_bias``, ``extra_norm_period``, ``merge_norm``), as constructor keywords; the
    ones left at None keep the variant's (or the checkpoint's) value."""
    return {name: getattr(cfg, name) for name in ARCH_SWITCHES if getattr(cfg, name) is not None}


def run_loop(cfg: TrainConfig, env: Dist, wrapped: nn.Module, optimizer, loop, state: dict | None,
             intro: str, summary, ema=None) -> int:
    """Run folder, logger, trainer, resume, the loop, the summary. ``summary(final_state) -> dict``.
    Returns the exit code: 0, or 3 when the loss became non-finite. A run that ends without
    a checkpoint (an error, an interrupt) leaves the folder as it found it; one that diverged
    (a non-finite loss) keeps what it logged."""
    folder = RunFolder(cfg.output) if env.main else None
    logger, done = None, False
    try:
        if folder is not None:
            folder.start(cfg, new_run=state is None)
        window = (state["run"].get("window") or {}) if state else {}
        logger = RunLogger(cfg.output, enabled=env.main, tensorboard=cfg.tensorboard,
                           resume_step=state["run"]["step"] if state else None,
                           train_resume_step=state["run"]["step"] - window.get("steps", 0) if state else None)
        trainer = Trainer(cfg, env, wrapped, optimizer, loop, logger, ema=ema)
        if state is not None:
            trainer.resume(state)
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
            done = True  # it trained, then diverged: its folder and metrics show where
            return 3
        if env.main:
            print(logger.summary(**summary(final)))
        done = True
        return 0
    except fileio.WriteError as err:
        last = Path(cfg.output) / ckpt.LAST
        if last.is_file():
            raise fileio.WriteError(f"{err}; {last} is intact: once that is fixed, continue with --resume") from err
        raise
    finally:
        if logger is not None:
            logger.close()
        if folder is not None:
            folder.close(keep=done)


def in_process_group(run, cfg: TrainConfig) -> int:
    """``run(cfg, env)`` inside the run's process group (one process, or torchrun's), which is
    torn down whatever happens."""
    env = setup(cfg.device)
    finished = False
    try:
        result = run(cfg, env)
        finished = True
        return result
    finally:
        teardown(sync=finished)  # after an error, no waiting for processes that may never arrive


def make_ema(model: nn.Module, decay: float):
    """The exponential moving average of ``model``'s weights (and buffers) that ``--ema`` keeps
    and evaluates alongside, or None when ``decay`` is 0."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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


def model_saver(cfg: TrainConfig, class_names: list[str] | None, extra: dict | None = None):
    """Writes ``model-*.safetensors`` files that ``create_model(pretrained=...)`` and
    ``swinv2 predict`` read alone: weights, architecture, class names and eval crop policy;
    ``extra``: more metadata entries (a video run's clip sampling), each stored as JSON."""

    def save(state: dict, path: str, info: dict) -> None:
        model = network_class(state["model_config"])(**state["model_config"])
        model.load_state_dict(state["model"])
        meta = {
            "class_names": json.dumps(class_names) if class_names else "",
            "preprocess": json.dumps(dict(img_size=cfg.img_size or model.img_size[0], crop_pct=cfg.crop_pct,
                                          crop_mode="center" if cfg.crop_pct < 1 else "squash",
                                          interpolation="bicubic")),
            "train_info": json.dumps(info),
            **{key: json.dumps(value) for key, value in (extra or {}).items()},
        }
        save_pretrained(model, path, metadata=meta)  # atomic; a failed write is a one-line WriteError

    return save


def device_model(model: nn.Module, env: Dist) -> nn.Module:
    return model.to(env.device)


def print_summary(text: str, env: Dist) -> None:
    if env.main:
        print(text, file=sys.stdout, flush=True)


__all__ = ["evaluate_classifier", "model_saver", "prepare_run", "recipe_path", "set_threads", "unwrap"]
