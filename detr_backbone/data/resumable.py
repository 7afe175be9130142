"""A DataLoader that resumes mid-epoch: the batches already trained on are not drawn again.

Lightning checkpoints every train loader that has ``state_dict`` / ``load_state_dict`` and hands
the state back when it resumes an unfinished epoch (it calls ``load_state_dict`` before the
epoch's first ``iter``). Without it a resumed epoch starts its sampler from the top, so the run
would train again on the epoch's first batches and never see its last ones.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sized
from itertools import islice
from typing import Any

from torch.utils.data import DataLoader


class _SkipFirstBatches:
    """The loader's batch sampler, minus the batches of the current pass that were already trained on.

    The skip happens on indices, so the skipped samples are never loaded. Skipping whole batches of
    the per-process batch sampler keeps the order right under DistributedSampler too.
    """

    def __init__(self, batches: Sized, loader: ResumableDataLoader):
        self.batches = batches
        # weak: the loader's persistent-worker iterator holds this sampler, and a strong reference back would
        # make loader and iterator a cycle that only the garbage collector frees, each worker shutdown then
        # waiting out its timeout; a loader whose last reference goes shuts its workers down at once
        self.loader = weakref.ref(loader)

    def __iter__(self) -> Iterator[Any]:
        # A generator, so only the iteration that is actually read takes the skip: a DataLoader
        # iterator with workers calls ``iter`` twice before it reads any index.
        yield from islice(self.batches, self.take_skip(), None)

    def take_skip(self) -> int:
        """The batches this pass skips, once (no reference to the loader stays in the generator's frame)."""
        loader = self.loader()
        if loader is None:
            return 0
        skip, loader._batches_to_skip = loader._batches_to_skip, 0
        return skip

    def __len__(self) -> int:
        return len(self.batches)  # the full pass: Lightning counts the skipped batches as done


class ResumableDataLoader(DataLoader):
    """``DataLoader`` whose state is the number of batches it handed out in the current pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_handed_out = 0
        self._batches_to_skip = 0

    @property
    def _index_sampler(self):
        indices = super()._index_sampler
        return _SkipFirstBatches(indices, self) if self._auto_collation else indices

    def __iter__(self) -> Iterator[Any]:
        # A generator: the sampler is only asked for its order at the first ``next``, after
        # Lightning has called ``set_epoch`` (it calls ``iter`` earlier when it resumes).
        self._batches_handed_out = self._batches_to_skip
        for batch in super().__iter__():
            self._batches_handed_out += 1
            yield batch

    @property
    def _replicas(self) -> int:
        return getattr(self.sampler, "num_replicas", 1)  # processes sharing the order under DDP

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._batches_handed_out, "batch_size": self.batch_size, "replicas": self._replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        batches = int(state["batches"])
        batch_size, replicas = state.get("batch_size", self.batch_size), state.get("replicas", self._replicas)
        if (batch_size, replicas) != (self.batch_size, self._replicas):
            # resumed with another batch size or process count: skip the whole new batches that the samples
            # already trained on fill. Lightning still counts the epoch's batches done in the old size, so
            # that epoch ends a little early or late; the next ones are whole.
            batches = batches * batch_size * replicas // (self.batch_size * self._replicas)
        if not 0 <= batches <= len(self):
            raise ValueError(f"checkpointed loader position {batches} is outside this loader's {len(self)} batches")
        self._batches_to_skip = batches % len(self)  # a finished pass resumes at the next one's start
