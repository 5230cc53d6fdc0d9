"""Whether anything watches a module's calls: a faster computation of the same values may skip
``module.__call__`` or run the batch in parts only where nothing would notice."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def unhooked(*modules: nn.Module) -> bool:
    """No forward, forward-pre, backward or backward-pre hook on these modules nor a global one,
    and no ``forward`` patched onto an instance (as offloading and profiling wrappers do).
    Otherwise every hook must fire once, with the whole batch, as on the plain model."""
    if any(getattr(_module, name, None) for name in _GLOBAL_HOOKS):
        return False
    return not any(getattr(m, name, None) for m in modules for name in _MODULE_HOOKS) and not any(
        "forward" in m.__dict__ for m in modules)
