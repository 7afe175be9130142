"""A bounded cache of tensors computed from a padding mask (the sine encoding depends on nothing else)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor


class MaskKeyedCache:
    """Least-recently-used cache keyed by a mask's shape, device, dtype and content.

    Callers always get a fresh copy: a caller that writes into its result in place cannot change
    what later calls receive. ``max_entries=0`` disables it; it steps aside while torch.compile
    traces, so the compiled graph computes the value itself instead of breaking on the lookup.
    """

    def __init__(self, max_entries: int):
        if max_entries < 0:
            raise ValueError(f"cache size must be >= 0 (0 disables the cache), got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get_or_compute(self, mask: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        if self.max_entries == 0 or torch.compiler.is_compiling():
            return compute(mask)
        key = (tuple(mask.shape), mask.device, mask.dtype, mask.detach().cpu().numpy().tobytes())
        value = self._entries.get(key)
        if value is None:
            value = compute(mask).detach()
            self._entries[key] = value
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return value.clone()
