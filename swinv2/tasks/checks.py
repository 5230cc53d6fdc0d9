"""What a run's config alone cannot tell, checked before the run folder or any data is touched."""

from __future__ import annotations

import torch

from .. import fileio
from ..data.transforms import train_transform
from ..train.config import ConfigError, TrainConfig, blame
from ..train.distributed import check_device
from ..train.precision import resolve_amp


def check_run(cfg: TrainConfig) -> None:
    """What the config alone cannot tell, checked before the run folder or any data is touched:
    the device, the precision on it, the augmentation spec and whether the run folder can be
    written."""
    device = check_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    if amp == "fp16" and device.type != "cuda":
        raise blame(cfg, ConfigError("amp", f"must be bf16 or none on {device} (fp16 needs a CUDA GPU for its loss "
                                            "scaling)", cfg.amp))
    if amp == "bf16" and device.type == "cuda" and not _cuda_bf16(device):
        raise blame(cfg, ConfigError("amp", f"must be fp16 or none on {device} (it has no bf16)", cfg.amp))
    if cfg.command != "pretrain" and cfg.task == "classification":
        try:
            check_auto_augment(cfg.auto_augment)
        except ConfigError as err:
            raise blame(cfg, err) from None
    fileio.check_writable(cfg.output, "--output", folder=True)


def _cuda_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported()


def check_auto_augment(spec: str | None) -> None:
    """Build the training transform with ``spec`` as timm parses it, so that a misspelt policy is
    refused at start (timm asserts) and not in the first data-loader worker. timm skips a
    ``rand``/``augmix`` section that carries no number (``rand-m9-mstd``), so such a section is
    refused here: it would silently leave a setting at its default."""
    if spec is None or spec == "none":
        return
    name, *sections = spec.split("-")
    if name in ("rand", "augmix"):
        # rand's 't' section names a transform set, no number
        bad = [s for s in sections if not any(c.isdigit() for c in s) and not (name == "rand" and s[:1] == "t")]
        if bad:
            raise ConfigError("auto_augment", f"must give every section a value, e.g. rand-m9-mstd0.5-inc1 "
                                              f"(timm would ignore {bad[0]!r})", spec)
    try:
        train_transform(32, auto_augment=spec)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("auto_augment", f"must be a policy timm knows ({reason}), e.g. rand-m9-mstd0.5-inc1, "
                                          "augmix-m5, original or none", spec) from None
