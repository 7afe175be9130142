"""A shuffling sampler whose order is a function of (seed, epoch), so a resumed run sees the same data."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Random order per epoch, drawn from ``seed + epoch``; Lightning calls ``set_epoch`` each epoch.

    A generator that carries state from epoch to epoch would restart from its seed after a resume
    and replay the first epoch's order; deriving the order from the epoch number does not.
    """

    def __init__(self, data_source: Sized, seed: int = 0):
        self.data_source = data_source
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.data_source)
