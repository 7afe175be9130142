"""Published backbones' state dicts renamed to our bodies' keys, one table of rules a source."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

# Module paths (without the leaf: weight, bias, running_mean, ...) -> ours.
# A rule is (pattern, function of the match giving the timm module path).
Rule = tuple[str, Callable[[re.Match], str]]


def rename_state(
    state: Mapping[str, Tensor], prefix_in: str, prefix_out: str, rules: Sequence[Rule], source: str
) -> dict[str, Tensor]:
    """The tensors of ``state`` under ``prefix_in``, renamed by ``rules`` and put under ``prefix_out``.

    Keys outside ``prefix_in`` are not returned (the caller maps the rest of a detector); a key
    under it that no rule knows is an error. ``num_batches_tracked`` is dropped: a frozen BatchNorm
    has no such buffer and a live one fills it in when a state dict lacks it.
    """
    compiled = [(re.compile(pattern), rename) for pattern, rename in rules]
    renamed = {}
    for key, tensor in state.items():
        if not key.startswith(prefix_in):
            continue
        module, _, leaf = key[len(prefix_in) :].rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        for pattern, rename in compiled:
            if match := pattern.fullmatch(module):
                renamed[f"{prefix_out}{rename(match)}.{leaf}"] = tensor
                break
        else:
            raise ValueError(f"{key!r} is not a tensor of {source} (under prefix {prefix_in!r})")
    return renamed
