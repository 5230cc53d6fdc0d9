"""The DeepSpeed config a run hands to ``deepspeed.initialize`` (no DeepSpeed needed): the
file's ZeRO section, the run's own batch, accumulation and clipping, and clear refusals. The
2-process DeepSpeed run itself is tested in test_train.py."""

import json
from pathlib import Path

import pytest

import swinv2
from swinv2.train.config import TrainConfig
from swinv2.train.deepspeed_backend import deepspeed_config

BUNDLED = Path(swinv2.__file__).parent / "recipes" / "deepspeed_zero1.json"


def _cfg(tmp_path, content=None, **kw) -> TrainConfig:
    path = None
    if content is not None:
        path = tmp_path / "ds.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return TrainConfig(
        sharding="deepspeed",
        deepspeed_config=str(path) if path else None,
        batch_size=4,
        accum_steps=2,
        clip_grad=5.0,
        **kw,
    )


def test_the_runs_flags_fill_the_config(tmp_path):
    default = deepspeed_config(_cfg(tmp_path), world_size=2)
    assert default["zero_optimization"] == {"stage": 1}
    assert (
        default["train_micro_batch_size_per_gpu"],
        default["gradient_accumulation_steps"],
        default["train_batch_size"],
        default["gradient_clipping"],
    ) == (4, 2, 16, 5.0)
    assert default["zero_allow_untested_optimizer"]  # the run's own torch AdamW
    bundled = deepspeed_config(TrainConfig(sharding="deepspeed", deepspeed_config=str(BUNDLED)), world_size=8)
    assert bundled["zero_optimization"]["stage"] == 1
    no_clip = deepspeed_config(
        _cfg(tmp_path, {"zero_optimization": {"stage": 2}}, amp="none").replace(clip_grad=None), world_size=2
    )
    assert no_clip["gradient_clipping"] == 0.0 and no_clip["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    "content, match",
    [
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
        ({"bf16": {"enabled": True}}, "remove the 'bf16' section"),
        ({"gradient_accumulation_steps": 4}, "--accum-steps makes it 2"),
        ({"train_micro_batch_size_per_gpu": 8}, "--batch-size makes it 4"),
        ({"zero_optimization": {"stage": 3}}, "stage 3 is not supported"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_file_that_contradicts_the_run_is_refused(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        deepspeed_config(_cfg(tmp_path, content), world_size=2)


def test_config_checks(tmp_path):
    assert deepspeed_config(_cfg(tmp_path, {"bf16": {"enabled": False}}), world_size=2)  # off is fine
    with pytest.raises(FileNotFoundError):
        deepspeed_config(TrainConfig(sharding="deepspeed", deepspeed_config=str(tmp_path / "nope.json")), 2)
    with pytest.raises(ValueError, match="bf16 or none"):
        TrainConfig(sharding="deepspeed", amp="fp16")
