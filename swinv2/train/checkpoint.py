"""Training checkpoints: written atomically, read without unpickling code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (so
``torch.load(weights_only=True)`` reads it): model, optimizer, grad scaler and EMA state, the
update step and epoch, the RNG states and the resolved config. It is written to a temporary
file in the same folder, flushed to disk, then renamed over the target, so a run killed at any
moment leaves either the previous checkpoint or the new one, never a partial file.

Every file of a run folder is written through :mod:`swinv2.fileio`: a write that fails (disk
full, quota, read-only folder) removes its temporary file, leaves the previous version in place
and raises :class:`~swinv2.fileio.WriteError`, one line naming the file and the reason.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_file, write_error
from ..files import CheckpointError, read_checkpoint

LAST = "checkpoint-last.pt"
BEST = "checkpoint-best.pt"
KIND = "swinv2-train-checkpoint"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _tupled_to_lists(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_lists_to_tupled(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tupled_to_lists(value):
    return [_tupled_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _lists_to_tupled(value):
    return tuple(_lists_to_tupled(v) for v in value) if isinstance(value, list) else value


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` atomically (temporary file, fsync, rename); WriteError if it cannot be."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, path) from err
    with atomic_file(path, "wb") as f:
        torch.save({"kind": KIND, **state}, f)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (weights_only: nothing but tensors and plain containers)."""
    path = Path(path)
    state = read_checkpoint(path)  # one-line errors for missing, damaged or code-carrying files
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a swinv2 training checkpoint (no '{KIND}' marker)")
    return state


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    try:
        load_checkpoint(path)
    except (CheckpointError, FileNotFoundError):
        return False
    return True
