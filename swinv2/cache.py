"""A small least-recently-used store for constants a model derives from its input size.

Any input size is allowed, so the keys are unbounded (a detector sees a new padded size almost
every batch): without a bound such a cache would grow for the life of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

# Largest tensor (or group of tensors) a model keeps per cache of derived constants, and so the
# largest kept per entry: bigger ones (windows of 32 and more at many heads) are recomputed.
CONSTANT_CACHE_BYTES = 16 * 2**20

_MISSING = object()


class BoundedCache:
    """At most ``entries`` values and ``max_bytes`` of tensor data, the least recently used
    dropped first; a value larger than ``max_bytes`` is built and returned without being kept.
    While a graph is captured (torch.compile, torch.export, tracing) the cache is left alone:
    values built there are the tracer's placeholders, not tensors, and the graph computes its own."""

    def __init__(self, entries: int = 8, max_bytes: int = 64 * 2**20):
        self.entries, self.max_bytes = entries, max_bytes
        # a plain dict in use order (re-inserted on every hit): torch.compile traces its
        # operations on every supported release, where OrderedDict.move_to_end is not
        self._items: dict = {}
        self._sizes: dict = {}

    def get(self, key: Hashable, build: Callable[[], object]):
        """The value kept for ``key``, or ``build()``'s, kept if it fits."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return build()
        value = self.lookup(key, _MISSING)
        if value is _MISSING:
            # usable later by training, whoever fills it (inference_mode(False) alone would turn
            # gradients on)
            with torch.inference_mode(False), torch.no_grad():
                value = build()
            self.put(key, value)
        return value

    def lookup(self, key: Hashable, default=None):
        """The value kept for ``key`` (now the most recently used), or ``default``."""
        if key not in self._items:
            return default
        value = self._items.pop(key)
        self._items[key] = value
        return value

    def put(self, key: Hashable, value) -> None:
        """Keep ``value`` for ``key`` unless it is larger than the whole budget; drop the
        least recently used values until the bounds hold."""
        self._items.pop(key, None)
        self._sizes.pop(key, None)
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        self._items[key], self._sizes[key] = value, size
        while len(self._items) > self.entries or self.nbytes > self.max_bytes:
            old = next(iter(self._items))
            del self._items[old], self._sizes[old]

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0
