"""Which kernel torch's scaled_dot_product_attention runs: torch's own choice, or a named backend first.

torch picks the first backend in its priority list that can serve a call. On Hopper with a recent cuDNN, recent
torch builds put cuDNN attention first; cuDNN builds and caches an execution graph per problem shape (batch,
sequence lengths, …), so batches whose shapes keep changing pay that build again and again. BERT's padding mask
rules out the flash kernel, so "efficient" (the memory-efficient kernel, no per-shape build) is the alternative
there. `model.sdpa_backend` moves one backend to the front; torch still falls back, in the order below, for a
call the preferred backend cannot serve. "math" is the unfused reference implementation, alone.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import typing
from collections.abc import Iterator

from squad_ds.config import SdpaBackend

_log = logging.getLogger(__name__)

SDPA_BACKENDS = typing.get_args(SdpaBackend)  # the recipe type owns the list

# Preferred first; cuDNN last in the orders that are chosen to avoid it.
_ORDERS = {
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION"),
    "efficient": ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH", "CUDNN_ATTENTION"),
    "math": ("MATH",),
}


def backend_order(name: str) -> list:
    """The SDPBackend priority list for `name` ([] for "auto": torch's own order)."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {name!r}; choose from {', '.join(SDPA_BACKENDS)}")
    if name == "auto":
        return []
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, b) for b in _ORDERS[name]]


def _supports_priority() -> bool:
    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters


@contextlib.contextmanager
def sdpa_preference(name: str) -> Iterator[None]:
    """Inside, SDPA calls try `name`'s backend first (see the module docstring); "auto" changes nothing.

    torch versions without sdpa_kernel's `set_priority` get the preferred backend with math as the only
    fallback, which is the same choice wherever the preferred kernel can serve the call."""
    order = backend_order(name)
    if not order:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if _supports_priority():
        ctx = sdpa_kernel(order, set_priority=True)
    else:
        _log.info("this torch's sdpa_kernel has no set_priority: SDPA restricted to %s with math as fallback", name)
        ctx = sdpa_kernel(list(dict.fromkeys([order[0], SDPBackend.MATH])))
    with ctx:
        yield


def current_order() -> list[str]:
    """The enabled SDPA backends in priority order, as torch will try them now (for logs and tests)."""
    import torch
    from torch.nn.attention import SDPBackend

    enabled = {
        "FLASH_ATTENTION": torch.backends.cuda.flash_sdp_enabled(),
        "EFFICIENT_ATTENTION": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "MATH": torch.backends.cuda.math_sdp_enabled(),
        "CUDNN_ATTENTION": torch.backends.cuda.cudnn_sdp_enabled(),
    }
    try:
        ranked = [SDPBackend(i).name for i in torch._C._get_sdp_priority_order()]
    except (AttributeError, ValueError):  # older torch: no priority API; report the enabled ones
        ranked = list(enabled)
    return [b for b in ranked if enabled.get(b, False)]
