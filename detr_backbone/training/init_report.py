"""What ``init_from`` did to a run's detector, as printed at start and kept in ``<run>/init_from.txt``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..detection.published import PublishedArchitecture
from ..weights import first_keys


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


@dataclass
class CarriedClass:
    """A dataset class whose class row comes from the checkpoint."""

    name: str  # the dataset's
    row: int  # the checkpoint's row
    checkpoint_name: str
    synonym: bool = False  # matched through ``class_synonyms``, not by its own name

    def __str__(self) -> str:
        if self.synonym:
            return f"{self.name} <- row {self.row} (synonym {self.checkpoint_name})"
        same = self.name == self.checkpoint_name
        return f"{self.name} <- row {self.row}" + ("" if same else f" ({self.checkpoint_name})")


@dataclass
class InitReport:
    path: str
    source: str
    architecture: PublishedArchitecture
    class_rows: int  # the checkpoint's, "no object" excluded
    loaded: int  # tensors copied as they are
    class_heads: list[str]  # the class heads whose rows were adapted (one per decoder layer in Deformable DETR)
    queries: tuple[int, int] | None  # (kept, in the checkpoint); None: the head has no learned queries (two-stage)
    query_key: str = "query_embed.weight"
    class_tables: dict[str, int] = field(default_factory=dict)  # tables with a row per class and these extra rows
    carried: list[CarriedClass] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # keys of the file that are not the detector's
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        no_object = self.architecture.NO_OBJECT_ROWS
        classes = f"{self.class_rows} classes" + (" + no-object" if no_object else "")
        carried = f"{len(self.carried)} class rows" + (" and the no-object row" if no_object else "")
        synonyms = sum(carry.synonym for carry in self.carried)
        carried_count = f"{len(self.carried)}" + (f", {synonyms} through a synonym" if synonyms else "")
        heads = f"{self.class_heads[0]}." if len(self.class_heads) == 1 else f"{first_keys(self.class_heads)} ."
        adapted = [f"{heads}weight and .bias ({carried} carried over)"]
        for table, extra in self.class_tables.items():
            adapted.append(
                f"{table} ({len(self.carried)} class rows carried over, its {plural(extra, 'extra row')} kept)"
            )
        if self.queries is not None:
            kept, available = self.queries
            adapted.append(
                f"{self.query_key} ({f'all {kept}' if kept == available else f'the first {kept} of {available}'} queries)"
            )
        lines = [
            f"init_from: {self.path}",
            f"source: {self.source} ({self.architecture}, {classes})",
            f"loaded: {self.loaded} tensors as they are",
            f"adapted: {'; '.join(adapted)}",
            f"re-initialised: {plural(len(self.new_classes), 'class row')} of new classes, as in a fresh head",
            f"skipped: {first_keys(self.skipped) if self.skipped else 'nothing'}",
            f"classes carried over ({carried_count}): {', '.join(map(str, self.carried)) or 'none'}",
            f"new classes ({len(self.new_classes)}): {', '.join(self.new_classes) or 'none'}",
            *(f"note: {note}" for note in self.notes),
        ]
        return "\n".join(lines)
