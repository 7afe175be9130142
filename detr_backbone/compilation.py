"""torch.compile of the Joiner or of the whole detector: in place, one static graph per batch shape."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# The multiple batches are padded to when compiling with data.size_divisibility unset: a ResNet's
# coarsest stride, so every feature map lines up with the image and padded sizes fall into few buckets.
COMPILE_SIZE_DIVISIBILITY = 32


def compile_in_place(module: nn.Module, backend: str | Callable = "inductor") -> None:
    """``module.compile`` with static shapes; the module tree and state-dict keys stay as they are.

    Each padded batch shape compiles its own graph the first time it is seen (up to torch._dynamo's
    recompile_limit, 8; further shapes run eagerly), so batches should come in few shapes
    (``size_divisibility``).

    Why not the default automatic dynamic shapes: the second image size makes height and width
    symbolic, yet on a CPU inductor still moves every convolution to channels_last (its layout
    optimization skips dynamic graphs on GPUs only). AOTAutograd then gives the backward graph the
    saved activations' strides of that one size, as numbers, so the compiled backward rejects the
    next size that passes the forward's guards ("expected size 8==8, stride 11529==11718 at
    dim=0"). Such graphs also specialize on the feature maps' areas, recompiling for most sizes anyway.
    """
    module.compile(backend=backend, dynamic=False)
