"""What ``init_from`` did to a run's detector, as printed at start and kept in ``<run>/init_from.txt``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..detection.detr.weights import Architecture
from ..weights import first_keys


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


@dataclass
class CarriedClass:
    """A dataset class whose class row comes from the checkpoint."""

    name: str  # the dataset's
    row: int  # the checkpoint's row
    checkpoint_name: str

    def __str__(self) -> str:
        same = self.name == self.checkpoint_name
        return f"{self.name} <- row {self.row}" + ("" if same else f" ({self.checkpoint_name})")


@dataclass
class InitReport:
    path: str
    source: str
    architecture: Architecture
    class_rows: int  # the checkpoint's, "no object" excluded
    loaded: int  # tensors copied as they are
    queries: tuple[int, int]  # (kept, in the checkpoint)
    carried: list[CarriedClass] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # keys of the file that are not the detector's
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        kept, available = self.queries
        queries = f"all {kept}" if kept == available else f"the first {kept} of {available}"
        lines = [
            f"init_from: {self.path}",
            f"source: {self.source} ({self.architecture}, {self.class_rows} classes + no-object)",
            f"loaded: {self.loaded} tensors as they are",
            (
                f"adapted: class_embed.weight and .bias ({len(self.carried)} class rows and the no-object row "
                f"carried over); query_embed.weight ({queries} queries)"
            ),
            f"re-initialised: {plural(len(self.new_classes), 'class row')} of new classes, as in a fresh head",
            f"skipped: {first_keys(self.skipped) if self.skipped else 'nothing'}",
            f"classes carried over ({len(self.carried)}): {', '.join(map(str, self.carried)) or 'none'}",
            f"new classes ({len(self.new_classes)}): {', '.join(self.new_classes) or 'none'}",
            *(f"note: {note}" for note in self.notes),
        ]
        return "\n".join(lines)
