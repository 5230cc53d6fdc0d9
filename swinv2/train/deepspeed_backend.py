"""DeepSpeed ZeRO (the paper's engine, §3.5) as a sharding backend: ``--sharding deepspeed``.

The training loop stays the project's own: the learning rate is set every update, the loss is
divided by ``accum_steps`` before backward, and the non-finite check runs before the update.
DeepSpeed does what only it can: the gradient reduction, clipping over the sharded gradients,
and the sharded AdamW update (the project's AdamW and parameter groups, as a client optimizer,
so no compiled DeepSpeed op is needed).

The DeepSpeed config file (``--deepspeed-config``, JSON) supplies the ``zero_optimization``
section: stage 1 (optimizer states sharded, the paper's choice; the default without a file) or
2 (gradients too), bucket sizes, overlap. Batch size, accumulation and clipping come from the
run's flags; sections that would change the run's numerics behind its config (optimizer,
scheduler, fp16/bf16) are refused, and stage 3 is left to ``--sharding fsdp``.

Checkpoints hold full state dicts in the single-process format (per-parameter AdamW states,
gathered with DeepSpeed's tensor-fragment API), so a run resumes under any sharding or none.
In one process ``--sharding deepspeed`` trains without DeepSpeed, as ``zero1`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DEFAULT_CONFIG = {"zero_optimization": {"stage": 1}}
_FROM_FLAGS = {
    "train_micro_batch_size_per_gpu": "--batch-size",
    "gradient_accumulation_steps": "--accum-steps",
    "train_batch_size": "--batch-size x --accum-steps x processes",
    "gradient_clipping": "--clip-grad",
}
_REFUSED = {
    "optimizer": "the optimizer is the run's AdamW (--lr, --weight-decay, --betas, --eps)",
    "scheduler": "the learning rate follows the run's schedule (--scheduler, --warmup-epochs)",
    "fp16": "precision is the run's --amp",
    "bf16": "precision is the run's --amp",
    "torch_autocast": "precision is the run's --amp",
}


def is_engine(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def deepspeed_config(cfg, world_size: int) -> dict:
    """The config given to ``deepspeed.initialize``: the file's (or the default) with the values
    that the run's flags decide. Raises ValueError on a file that contradicts the flags."""
    source = cfg.deepspeed_config or "the default DeepSpeed config"
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path}")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
        if not isinstance(user, dict):
            raise ValueError(f"DeepSpeed config {path} must be a JSON object")
    else:
        user = json.loads(json.dumps(DEFAULT_CONFIG))
    for key, why in _REFUSED.items():
        section = user.get(key)
        if section is not None and not (isinstance(section, dict) and section.get("enabled") is False):
            raise ValueError(f"{source}: remove the '{key}' section: {why}")
    ours = dict(
        train_micro_batch_size_per_gpu=cfg.batch_size,
        gradient_accumulation_steps=cfg.accum_steps,
        train_batch_size=cfg.batch_size * cfg.accum_steps * world_size,
        gradient_clipping=float(cfg.clip_grad or 0.0),
    )
    for key, value in ours.items():
        if key in user and user[key] != value:
            raise ValueError(
                f"{source}: {key} is {user[key]}, but {_FROM_FLAGS[key]} makes it {value}; leave it out of the file"
            )
    stage = (user.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(
            f"{source}: ZeRO stage {stage} is not supported here (stages 1 and 2 are; for "
            "parameters sharded too use --sharding fsdp)"
        )
    # The client optimizer is torch's AdamW, which DeepSpeed calls untested; the run logs itself.
    return {"steps_per_print": 2**31 - 1, **user, **ours, "zero_allow_untested_optimizer": True}


def initialize(model: nn.Module, optimizer, cfg, world_size: int):
    """(engine, its optimizer) around the model and the run's AdamW; the process group exists."""
    import deepspeed

    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size), dist_init_required=False
    )
    return engine, ds_optimizer


def _zero(engine):
    """The ZeRO stage 1/2 optimizer, or None (stage 0: a plain optimizer)."""
    opt = engine.optimizer
    return opt if hasattr(opt, "single_partition_of_fp32_groups") else None


def full_optimizer_state(engine) -> dict:
    """The state dict a single-process AdamW over the same groups would have (collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = _zero(engine)
    if zero is None:
        return engine.optimizer.state_dict()
    inner = zero.optimizer
    if inner.state:
        _link_states(zero)
    state, groups, index = {}, [], 0
    for i, group in enumerate(inner.param_groups):
        flat = inner.state.get(zero.single_partition_of_fp32_groups[i], {})
        ids = []
        for p in zero.bit16_groups[i]:
            if flat:  # after the first update
                state[index] = {
                    key: value.clone() if key == "step" else safe_get_full_optimizer_state(p, key).cpu()
                    for key, value in flat.items()
                    if key == "step" or (torch.is_tensor(value) and value.dim() > 0)
                }
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(engine, full: dict) -> None:
    """Load a full (single-process format) AdamW state; the model's weights are loaded first."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = _zero(engine)
    if zero is None:
        engine.optimizer.load_state_dict(full)
        return
    zero.refresh_fp32_params()  # the sharded fp32 master weights from the module's, just loaded
    inner = zero.optimizer
    if len(full["param_groups"]) != len(inner.param_groups):
        raise ValueError("the checkpoint's optimizer has other parameter groups than this run's")
    for i, (group, saved) in enumerate(zip(inner.param_groups, full["param_groups"])):
        if len(saved["params"]) != len(zero.bit16_groups[i]):
            raise ValueError(
                f"optimizer group {i}: the checkpoint has {len(saved['params'])} parameters, "
                f"this run {len(zero.bit16_groups[i])}"
            )
        group.update({k: v for k, v in saved.items() if k != "params"})
        first = full["state"].get(saved["params"][0]) if saved["params"] else None
        if first is not None:  # states exist: create the flat ones for DeepSpeed to link into
            flat = zero.single_partition_of_fp32_groups[i]
            inner.state[flat] = {k: v.clone() if k == "step" else torch.zeros_like(flat) for k, v in first.items()}
    if not full["state"]:
        return
    _link_states(zero)
    for i, saved in enumerate(full["param_groups"]):
        for index, p in zip(saved["params"], zero.bit16_groups[i]):
            for key, value in full["state"].get(index, {}).items():
                if key != "step":
                    safe_set_full_optimizer_state(p, value.to(p.device), key)


def _link_states(zero) -> None:
    """Point every parameter's fragment at the current flat optimizer states. DeepSpeed links
    them once, right after the first group's first update, so with several parameter groups
    (decay and no-decay) the later groups' parameters would never see their states."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
