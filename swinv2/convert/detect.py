"""Which SwinV2 layout a state dict is in, from its key names alone."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ._table import DERIVED_BUFFERS, ConversionError, UnknownFormatError

_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.")
_OFFICIAL_ROOTS = ("patch_embed.proj.", "layers.", "norm.", "head.", "absolute_pos_embed")


def detect_format(state_dict) -> str:
    """The layout of ``state_dict`` (a mapping, or an iterable of key names):

    - ``"hf"``: keys under ``swinv2.`` (or a bare ``Swinv2Model``'s ``embeddings.patch_embeddings.``),
    - ``"mmpretrain"``: ``backbone.`` / ``stages.`` keys with the attention under ``attn.w_msa.``,
    - ``"torchvision"``: ``features.{n}.`` keys; ``"torchvision_video"`` with ``patch_embed.`` beside
      them (``swin3d_*``),
    - ``"simmim"``: official SimMIM pre-training, the encoder under ``encoder.`` (``decoder.0.*``,
      ``encoder.mask_token``),
    - ``"timm"``: official names but the merging one stage later (no ``layers.0.downsample``) or
      the classifier as ``head.fc``,
    - ``"official"``: official names with the persistent buffers (``relative_coords_table``,
      ``relative_position_index``, ``attn_mask``) or the old ``rpe_mlp`` name, as in official
      classification and SimMIM fine-tuning checkpoints,
    - ``"swinv2"``: official names without buffers (this library's own state dicts).

    Raises :class:`UnknownFormatError` (listing sample keys) for anything else, and
    :class:`ConversionError` for timm's ``SwinTransformerV2Cr``, a different network.
    """
    keys = list(state_dict.keys() if hasattr(state_dict, "keys") else state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        keys = [k[len("module.") :] for k in keys]

    def any_key(pred) -> bool:
        return any(pred(k) for k in keys)

    if any_key(lambda k: k.startswith("swinv2.") or k.startswith("embeddings.patch_embeddings.")):
        return "hf"
    if any_key(lambda k: ".attn.meta_mlp." in k or re.match(r"stages\.\d+\.blocks\.\d+\.attn\.qkv\.bias", k)):
        raise ConversionError(
            "this looks like timm's SwinTransformerV2Cr (meta_mlp position bias, full qkv bias), "
            "a different network from the official SwinV2; its weights cannot be converted"
        )
    if any_key(lambda k: ".attn.w_msa." in k or k.startswith(("backbone.patch_embed.projection.", "backbone.stages."))):
        return "mmpretrain"
    if any_key(lambda k: re.match(r"features\.\d+\.", k)):
        # the video network embeds outside ``features`` (the image one's stem is features.0)
        return "torchvision_video" if any_key(lambda k: k.startswith("patch_embed.proj.")) else "torchvision"
    if any_key(lambda k: k.startswith("encoder.layers.") or k == "encoder.mask_token" or k.startswith("decoder.0.")):
        return "simmim"
    if any_key(lambda k: k.startswith(_OFFICIAL_ROOTS)):
        merges = {int(m.group(1)) for k in keys if (m := _DOWNSAMPLE.match(k))}
        if "head.fc.weight" in keys or (merges and 0 not in merges):
            return "timm"
        if any_key(lambda k: k.rsplit(".", 1)[-1] in DERIVED_BUFFERS or ".rpe_mlp." in k):
            return "official"
        return "swinv2"
    raise UnknownFormatError(
        f"not a SwinV2 state dict in a known layout ({len(keys)} keys; e.g. {_samples(keys)}); "
        "known: official, simmim, swinv2, timm, hf, torchvision, torchvision_video, mmpretrain"
    )


def _samples(keys: Iterable[str], limit: int = 6) -> str:
    keys = list(keys)
    picked = keys if len(keys) <= limit else [keys[round(i * (len(keys) - 1) / (limit - 1))] for i in range(limit)]
    return ", ".join(repr(k) for k in picked) if picked else "no keys"
