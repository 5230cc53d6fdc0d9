"""The machinery behind every format: key tables with index placeholders, and named transforms.

A format is described by a *table*: a sequence of entries, each relating an official name to the
format's (the "peer's") name.

``(official, peer)`` or ``(official, peer, why)``
    A prefix rename. Both sides are dotted names in which ``{}`` stands for an integer index
    (stage, block). A key matches when it equals the pattern or continues it after a dot; the
    continuation is carried over unchanged (``layers.{}.blocks.{}.mlp.fc1`` covers ``.weight`` and
    ``.bias``). A placeholder may be affine in the official index: ``{+1}`` is i + 1 (timm's
    merging, which sits at the start of the next stage) and ``{2*+1}`` is 2i + 1 (torchvision's
    ``features`` list); the official side always uses plain ``{}``. ``None`` on one side means
    the key has no counterpart there and is dropped when converting towards that side; ``why``
    says what such keys are, for the conversion notes.

:class:`Transform`
    Keys whose tensors change, not just their names: one or more official keys computed from
    one or more peer keys (and back) by a named pair of functions, e.g. HF's separate
    query/key/value weights <-> the official ``qkv.weight``.

When several entries match a key, the most specific one (the longest pattern) wins, so a table
can give a general prefix rule and override single leaves below it. Keys that no entry matches
are kept unchanged and listed in the notes: a strict load then names them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Buffers the official code stores in checkpoints; swinv2 derives them from the input size and
# window at forward time (``swinv2.loading`` drops them on load, checking the coordinates).
DERIVED_BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask")


class ConversionError(ValueError):
    """A state dict that cannot be converted: conflicting or incomplete keys, unsupported layout."""


class UnknownFormatError(ValueError):
    """A state dict whose layout matches none of the known SwinV2 formats."""


class Notes(list):
    """Conversion notes (strings), with ``dropped``: the source keys left out on purpose."""

    def __init__(self, items: Iterable[str] = (), dropped: Iterable[str] = ()):
        super().__init__(items)
        self.dropped = list(dropped)

    def __add__(self, other: Iterable[str]) -> Notes:
        return Notes([*self, *other], self.dropped + list(getattr(other, "dropped", [])))

    def __radd__(self, other: Iterable[str]) -> Notes:
        return Notes([*other, *self], list(getattr(other, "dropped", [])) + self.dropped)


_PLACEHOLDER = re.compile(r"\{(?:(\d+)\*)?([+-]\d+)?\}")


class Pattern:
    """A dotted key pattern with integer placeholders (see the module docstring)."""

    def __init__(self, text: str):
        self.text = text
        literals, affine, pos = [], [], 0
        for m in _PLACEHOLDER.finditer(text):
            literals.append(text[pos : m.start()])
            affine.append((int(m.group(1) or 1), int(m.group(2) or 0)))
            pos = m.end()
        literals.append(text[pos:])
        if not text or any("{" in lit or "}" in lit for lit in literals) or any(a < 1 for a, _ in affine):
            raise ValueError(f"bad key pattern {text!r}")
        self.literals = tuple(literals)
        self.affine = tuple(affine)
        regex = re.escape(literals[0])
        for i, lit in enumerate(literals[1:]):
            regex += rf"(?P<i{i}>\d+)" + re.escape(lit)
        self._regex = re.compile(regex + r"(?:\.(?P<rest>.+))?")
        self.specificity = sum(len(lit) for lit in literals)

    @property
    def arity(self) -> int:
        return len(self.affine)

    def match(self, key: str) -> tuple[tuple[int, ...], str | None] | None:
        """(official indices, continuation after the pattern or None), or None if no match."""
        m = self._regex.fullmatch(key)
        if m is None:
            return None
        indices = []
        for i, (a, b) in enumerate(self.affine):
            q, r = divmod(int(m.group(f"i{i}")) - b, a)
            if r or q < 0:
                return None
            indices.append(q)
        return tuple(indices), m.group("rest")

    def format(self, indices: Sequence[int], rest: str | None = None) -> str:
        out = self.literals[0]
        for (a, b), lit, i in zip(self.affine, self.literals[1:], indices):
            out += str(a * i + b) + lit
        return out if rest is None else f"{out}.{rest}"

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


@dataclass(frozen=True)
class Transform:
    """Official keys <-> peer keys whose tensors are recomputed by named functions.

    ``to_official(*peer_tensors) -> official_tensors`` and ``from_official(*official_tensors) ->
    peer_tensors`` take and return tensors in the order of the ``peer`` / ``official`` patterns.
    Patterns match whole keys (no continuation) and share their placeholders.
    """

    name: str
    official: tuple[str, ...]
    peer: tuple[str, ...]
    to_official: Callable[..., Sequence[torch.Tensor]] = field(compare=False)
    from_official: Callable[..., Sequence[torch.Tensor]] = field(compare=False)


@dataclass(frozen=True)
class _Rule:
    official: Pattern | None
    peer: Pattern | None
    why: str


class Table:
    """A compiled key table (see the module docstring)."""

    def __init__(self, name: str, entries: Iterable):
        self.name = name
        self.renames: list[_Rule] = []
        self.transforms: list[tuple[Transform, tuple[Pattern, ...], tuple[Pattern, ...]]] = []
        for entry in entries:
            if isinstance(entry, Transform):
                off = tuple(Pattern(p) for p in entry.official)
                peer = tuple(Pattern(p) for p in entry.peer)
                if len({p.arity for p in off + peer}) != 1:
                    raise ValueError(f"{name}: transform {entry.name!r} patterns differ in placeholders")
                self.transforms.append((entry, off, peer))
                continue
            official, peer, *why = entry
            rule = _Rule(Pattern(official) if official else None, Pattern(peer) if peer else None, "".join(why))
            if rule.official and rule.peer and rule.official.arity != rule.peer.arity:
                raise ValueError(f"{name}: {official!r} and {peer!r} differ in placeholders")
            if not (rule.official or rule.peer):
                raise ValueError(f"{name}: an entry needs at least one side")
            self.renames.append(rule)

    def _lookup(self, key: str, to_official: bool):
        """The most specific entry matching ``key`` on the source side."""
        best, best_score = None, -1
        for rule in self.renames:
            pattern = rule.peer if to_official else rule.official
            hit = pattern.match(key) if pattern else None
            if hit and pattern.specificity > best_score:
                best, best_score = (rule, None, *hit), pattern.specificity
        for transform, off, peer in self.transforms:
            for slot, pattern in enumerate(peer if to_official else off):
                hit = pattern.match(key)
                if hit and hit[1] is None and pattern.specificity > best_score:
                    best, best_score = (transform, slot, *hit), pattern.specificity
        return best

    def convert(self, state: Mapping[str, torch.Tensor], to_official: bool) -> tuple[dict, Notes]:
        """Rename and transform ``state`` towards (or from) the official layout; returns the new
        dict and notes on what was dropped, transformed or left unknown."""
        out: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        dropped: dict[str, list[str]] = defaultdict(list)
        unknown: list[str] = []
        groups: dict[tuple, dict[int, tuple[str, torch.Tensor]]] = {}

        def put(key: str, value: torch.Tensor, source: str) -> None:
            if key in out:
                raise ConversionError(f"{self.name}: both {origin[key]!r} and {source!r} map to {key!r}")
            out[key], origin[key] = value, source

        for key, value in state.items():
            hit = self._lookup(key, to_official)
            if hit is None:
                put(key, value, key)
                unknown.append(key)
                continue
            entry, slot, indices, rest = hit
            if isinstance(entry, Transform):
                groups.setdefault((entry, indices), {})[slot] = (key, value)
                continue
            target = entry.official if to_official else entry.peer
            if target is None:
                dropped[entry.why or "keys without a counterpart"].append(key)
            else:
                put(target.format(indices, rest), value, key)

        applied: dict[str, int] = defaultdict(int)
        compiled = {t: (off, peer) for t, off, peer in self.transforms}
        for (transform, indices), got in groups.items():
            off, peer = compiled[transform]
            sources, targets = (peer, off) if to_official else (off, peer)
            if len(got) != len(sources):
                have = [got[s][0] for s in sorted(got)]
                lack = [p.format(indices) for s, p in enumerate(sources) if s not in got]
                raise ConversionError(f"{self.name}: {transform.name}: found {have} but not {lack}")
            fn = transform.to_official if to_official else transform.from_official
            results = fn(*(got[s][1] for s in range(len(sources))))
            if len(results) != len(targets):
                raise ConversionError(f"{self.name}: {transform.name} returned {len(results)} tensors")
            source = ", ".join(got[s][0] for s in range(len(sources)))
            for pattern, tensor in zip(targets, results):
                put(pattern.format(indices), tensor, source)
            applied[transform.name] += 1

        notes = Notes([f"{self.name}: {name} ({count}x)" for name, count in applied.items()])
        notes.dropped = [k for keys in dropped.values() for k in keys]
        for why, keys in dropped.items():
            notes.append(f"{self.name}: dropped {len(keys)} {why}: {sample_keys(keys)}")
        if unknown:
            notes.append(f"{self.name}: {len(unknown)} keys not in its key table kept unchanged: "
                         f"{sample_keys(unknown)}")
        return out, notes


def sample_keys(keys: Sequence[str], limit: int = 4) -> str:
    """The first ``limit`` of ``keys`` and how many more, for a conversion note."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def add_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def stage_count(keys: Iterable[str], pattern: str) -> int:
    """1 + the largest stage index captured by regex ``pattern`` over ``keys`` (0 if none)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0
