"""Bounds on the model configs that files carry, checked before any model is built from them.

A swinv2 safetensors file (its ``swinv2.config`` metadata), a Hugging Face ``config.json`` and a
training checkpoint's ``model_config`` each say which :class:`~swinv2.model.SwinTransformerV2` to
build. A damaged or hostile file could ask for a million blocks or a 1e7-wide embedding, and
building that would allocate until the process dies. :func:`check_model_config` checks every
field's type and range, and the parameter count the config implies, so that such a file gets
one line naming it and the field instead. :func:`check_weights_fit` then refuses a config that
describes more parameters than the file holds values (a small file cannot rebuild a big model).

The bounds leave generous room above every released and published size (SwinV2-G: embed_dim
512, 42 blocks in a stage, 3.0e9 parameters; ImageNet-22k: 21841 classes) and refuse only what
no real model uses.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch

from .files import CheckpointError
from .layers import ATTN_TYPES, NORM_PLACEMENTS, POSITION_BIASES, to_2tuple
from .model import MERGE_NORMS, SwinTransformerV2
from .video import VideoSwinTransformerV2, to_3tuple
from .windows import effective_window

MAX_STAGES = 8
MAX_DEPTH = 64  # blocks per stage
MAX_EMBED_DIM = 4096
MAX_IMG_SIDE = 8192  # pixels
MAX_MLP_RATIO = 16.0
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 64
MAX_CPB_HIDDEN = 8192
MAX_PARAMETERS = 10_000_000_000
MAX_FRAMES = 4096
WINDOW_RULES = ("per_axis", "official")
GLOBAL_POOLS = ("avg", "")
# Settings earlier versions saved with the model config that are no model arguments any more:
# read and dropped (batch chunks are a speedup of swinv2.fast now).
RUNTIME_ONLY = ("batch_chunk_mb",)

__all__ = ["ConfigError", "check_model_config", "check_weights_fit", "count_params_analytic", "stage_windows"]


class ConfigError(CheckpointError):
    """A model config (from a file) with a field of the wrong type or out of range."""


def _defaults(network=SwinTransformerV2) -> dict:
    params = inspect.signature(network.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "norm_layer")}


class _Checker:
    """Field checks that raise :class:`ConfigError` naming the source and the field."""

    def __init__(self, config: Mapping, source: str, names: Mapping[str, str]):
        self.config, self.source, self.names = config, source, names

    def fail(self, key: str, problem: str, index: int | None = None) -> None:
        field = self.names.get(key, key) + (f"[{index}]" if index is not None else "")
        raise ConfigError(f"{self.source}: {field} {problem}")

    def value(self, key: str):
        return self.config[key]

    def integer(self, key: str, value, lo: int, hi: int, index: int | None = None, what: str = "") -> int:
        if not _is_int(value):
            self.fail(key, f"must be an integer, got {value!r}", index)
        if not lo <= value <= hi:
            self.fail(key, f"= {value} is out of range ({lo}..{hi}{what})", index)
        return value

    def number(self, key: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
        value = self.value(key)
        if not _is_number(value) or not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value!r}")
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            self.fail(key, f"= {value} is out of range ({'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'})")
        return value

    def boolean(self, key: str) -> None:
        if not isinstance(self.value(key), bool):
            self.fail(key, f"must be true or false, got {self.value(key)!r}")

    def choice(self, key: str, allowed: Sequence[str]) -> None:
        if self.value(key) not in allowed or not isinstance(self.value(key), str):
            self.fail(key, f"must be one of {', '.join(map(repr, allowed))}, got {self.value(key)!r}")

    def pair(self, key: str, value, lo: int, hi: int, index: int | None = None) -> tuple[int, int]:
        if _is_int(value):
            value = (value, value)
        elif not isinstance(value, (list, tuple)) or len(value) != 2:
            self.fail(key, f"must be an integer or a pair of integers, got {value!r}", index)
        return tuple(self.integer(key, v, lo, hi, index) for v in value)  # type: ignore[return-value]

    def sides(self, key: str, value, lo: int, hi: int, index: int | None = None, axes=(2,)) -> tuple[int, ...]:
        """An int or a list of ``axes`` ints, each in [lo, hi]."""
        if _is_int(value):
            value = (value,) * axes[-1]
        elif not isinstance(value, (list, tuple)) or len(value) not in axes:
            self.fail(key, f"must be an integer or {' or '.join(map(str, axes))} integers, got {value!r}", index)
        return tuple(self.integer(key, v, lo, hi, index) for v in value)

    def int_list(self, key: str, lo_len: int, hi_len: int) -> list:
        value = self.value(key)
        if not isinstance(value, (list, tuple)):
            self.fail(key, f"must be a list, got {value!r}")
        if not lo_len <= len(value) <= hi_len:
            self.fail(key, f"has {len(value)} entries; {lo_len}..{hi_len} expected (one per stage)")
        return list(value)

    def stages(self, key: str, num_stages: int, values: bool = False) -> None:
        """False / True / a list of stage indices / (``values``) a dict stage -> None or int >= 1."""
        spec = self.value(key)
        if isinstance(spec, bool) or spec is None:
            return
        if values and isinstance(spec, Mapping):
            for stage, chunk in spec.items():
                index = int(stage) if isinstance(stage, str) and stage.isdigit() else stage
                self.integer(key, index, 0, num_stages - 1, what=" stage indices")
                if chunk is not None:
                    self.integer(key, chunk, 1, 2**31 - 1, what=" windows per chunk")
            return
        if not isinstance(spec, (list, tuple)):
            self.fail(key, f"must be true, false or a list of stage indices, got {spec!r}")
        for stage in spec:
            self.integer(key, stage, 0, num_stages - 1, what=" stage indices")

    def optional_budget(self, key: str, allow_zero: bool) -> None:
        value = self.value(key)
        if value is None or (allow_zero and isinstance(value, bool)):
            return
        if not _is_number(value) or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            self.fail(key, f"must be {'' if allow_zero else 'a positive '}number of MiB or null, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_model_config(config: Mapping, source: str, names: Mapping[str, str] | None = None) -> dict:
    """Check a model config read from ``source`` (constructor arguments of
    :class:`~swinv2.model.SwinTransformerV2`; missing ones take their defaults) and return it
    completed with the defaults. ``names``: how the file calls a field where that differs
    (e.g. ``{"img_size": "image_size"}`` for a Hugging Face ``config.json``), for the messages.

    Raises :class:`ConfigError` (a :class:`~swinv2.loading.CheckpointError`, a ValueError), one
    line naming ``source`` and the field, for an unknown field, a wrong type, a value out of
    range, or a config whose parameter count exceeds ``MAX_PARAMETERS``. Nothing is built.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: the model config is a {type(config).__name__}, not a mapping of settings")
    video = "num_frames" in config
    network = VideoSwinTransformerV2 if video else SwinTransformerV2
    defaults = _defaults(network)
    config = {k: v for k, v in config.items() if k not in RUNTIME_ONLY}
    unknown = sorted(str(k) for k in config if k not in defaults)
    if unknown:
        raise ConfigError(
            f"{source}: unknown model setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown[:5]))} "
            f"(not a {network.__name__} argument; written by another version of swinv2?)"
        )
    full = {**defaults, **config}
    c = _Checker(full, source, names or {})

    depths = c.int_list("depths", 1, MAX_STAGES)
    for i, d in enumerate(depths):
        c.integer("depths", d, 0, MAX_DEPTH, i, " blocks per stage")
    stages = len(depths)
    embed_dim = c.integer("embed_dim", full["embed_dim"], 1, MAX_EMBED_DIM)
    heads = c.int_list("num_heads", stages, stages)
    for i, h in enumerate(heads):
        dim = embed_dim * 2**i
        c.integer("num_heads", h, 1, dim, i)
        if dim % h:
            c.fail("num_heads", f"= {h} does not divide stage {i}'s width {dim}", i)
    img = c.pair("img_size", full["img_size"], 1, MAX_IMG_SIDE)
    if video:  # clips are padded to whole patches; sides are (time, height, width)
        frames = c.integer("num_frames", full["num_frames"], 1, MAX_FRAMES)
        c.sides("patch_size", full["patch_size"], 1, min(img), axes=(3,))
        c.sides("window_size", full["window_size"], 1, max(max(img), frames), axes=(3,))
        if full["pretrained_window_sizes"] is None:
            full["pretrained_window_sizes"] = [0] * stages
    else:
        patch = c.pair("patch_size", full["patch_size"], 1, min(img))
        if img[0] % patch[0] or img[1] % patch[1]:
            c.fail("img_size", f"{list(img)} is not a multiple of the patch size {list(patch)}")
        c.pair("window_size", full["window_size"], 1, max(img))
    pretrained = c.int_list("pretrained_window_sizes", stages, stages)
    for i, p in enumerate(pretrained):
        c.sides("pretrained_window_sizes", p, 0, MAX_IMG_SIDE, i, axes=(2, 3) if video else (2,))
    c.number("mlp_ratio", 0.0, MAX_MLP_RATIO, lo_open=True)
    c.integer("num_classes", full["num_classes"], 0, MAX_CLASSES)
    c.integer("in_chans", full["in_chans"], 1, MAX_CHANNELS)
    c.integer("extra_norm_period", full["extra_norm_period"], 0, MAX_DEPTH)
    c.integer("cpb_hidden_dim", full["cpb_hidden_dim"], 1, MAX_CPB_HIDDEN)
    for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        c.number(key, 0.0, 1.0, hi_open=True)
    for key in ("qkv_bias", "ape", "patch_norm", "use_checkpoint", "fused_window_process"):
        if key in full:
            c.boolean(key)
    for key, allowed in (("norm_placement", NORM_PLACEMENTS), ("attn_type", ATTN_TYPES),
                         ("position_bias", POSITION_BIASES), ("window_rule", () if video else WINDOW_RULES),
                         ("global_pool", GLOBAL_POOLS), ("merge_norm", MERGE_NORMS)):
        if allowed:
            c.choice(key, allowed)
    c.stages("grad_checkpointing", stages)
    c.stages("sequential_attention", stages, values=True)
    c.optional_budget("sequential_attention_budget_mb", allow_zero=False)

    count = parameter_count(full)
    if count > MAX_PARAMETERS:
        raise ConfigError(
            f"{source}: the model config describes {count:.3g} parameters, more than the {MAX_PARAMETERS:.0e} "
            "this library builds from a file (SwinV2-G has 3.0e9)"
        )
    return full


def parameter_count(config: Mapping) -> int:
    """The parameter count of ``SwinTransformerV2(**config)`` (or of the video network, for a
    config with ``num_frames``), from the numbers alone."""
    return count_params_analytic(dict(config))


def count_params_analytic(config: dict) -> int:
    """Parameter count of ``SwinTransformerV2(**config)`` from the architecture numbers
    (default switches: res-post-norm, cosine attention, log-CPB; V1 tables and the others
    are handled too); of ``VideoSwinTransformerV2(**config)`` for a config with ``num_frames``
    (a 3D patch, 3 position-bias inputs, 3D tables). The one formula: the memory estimate
    (:mod:`swinv2.memory`) uses it too."""
    C, depths, heads = config["embed_dim"], config["depths"], config["num_heads"]
    video = "num_frames" in config
    patch = to_3tuple(config.get("patch_size", (2, 4, 4))) if video else to_2tuple(config.get("patch_size", 4))
    in_chans = config.get("in_chans", 3)
    total = C * in_chans * math.prod(patch) + C + (2 * C if config.get("patch_norm", True) else 0)
    ph, pw = patch[-2:]
    if config.get("ape"):
        ih, iw = to_2tuple(config["img_size"])
        total += (ih // ph) * (iw // pw) * C
    hidden_cpb = config.get("cpb_hidden_dim", 512)
    bias = config.get("position_bias", "log_cpb")
    period = config.get("extra_norm_period", 0)
    windows = stage_windows(config)
    for i, (depth, nH) in enumerate(zip(depths, heads)):
        c = C * 2**i
        hid = int(c * config.get("mlp_ratio", 4.0))
        block = 2 * c + 2 * c  # norm1, norm2
        block += 3 * c * c + (2 * c if config.get("qkv_bias", True) else 0) + c * c + c  # qkv, q/v bias, proj
        block += c * hid + hid + hid * c + c  # mlp
        if config.get("attn_type", "cosine") == "cosine":
            block += nH
        if bias in ("log_cpb", "linear_cpb"):
            block += len(patch) * hidden_cpb + hidden_cpb + hidden_cpb * nH
        elif bias == "table":
            block += math.prod(2 * w - 1 for w in windows[i]) * nH
        if config.get("norm_placement", "res_post") == "sandwich":
            block += 4 * c
        total += depth * block
        if period:
            total += (depth // period) * 2 * c
        if i < len(depths) - 1:  # patch merging: reduction, norm (over 4C before it in the V1 order)
            total += 4 * c * 2 * c + 2 * (4 * c if config.get("merge_norm", "post") == "pre" else 2 * c)
    F = C * 2 ** (len(depths) - 1)
    total += 2 * F
    classes = config.get("num_classes", 1000)
    if classes > 0:
        total += F * classes + classes
    return total


def stage_windows(config: Mapping) -> list[tuple[int, ...]]:
    """The window each stage uses at the config's image size (its rule applied to each map);
    for a video config at its clip size, (time, height, width)."""
    if "num_frames" in config:
        with torch.device("meta"):  # allocates nothing; the network derives its own windows
            return [w for w, _ in VideoSwinTransformerV2(**config).stage_windows()]
    ph, pw = to_2tuple(config.get("patch_size", 4))
    ih, iw = to_2tuple(config["img_size"])
    h, w = ih // ph, iw // pw
    out = []
    for _ in config["depths"]:
        out.append(effective_window((h, w), to_2tuple(config["window_size"]), config.get("window_rule", "per_axis"))[0])
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return out


def check_weights_fit(config: Mapping, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a (checked) ``config`` that describes more parameters than ``state`` holds values:
    building it would allocate a model the file's weights cannot fill. Extra tensors (a SimMIM
    decoder, derived buffers) are fine; their shapes are checked when the weights are loaded."""
    count = parameter_count(config)
    values = sum(t.numel() for t in state.values())
    if count > values:
        raise ConfigError(
            f"{source}: its model config describes {count:,} parameters but the file holds only {values:,} values, "
            "so the config does not describe these weights"
        )
