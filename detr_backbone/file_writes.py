"""Files a run writes whole or not at all, and a full disk reported as one line.

Each file goes to a temporary file in the target's own folder, is flushed to disk, and replaces the
target in one atomic ``os.replace``: readers see the old content or the new one, never a part. A
write that fails removes its temporary file; one that is killed leaves it behind, and
``remove_stale_temporaries`` clears those at the run's next start.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMPORARY = ".tmp"  # in the names of temporary files: .<stem>.<random>.tmp<suffix>

Writer = Callable[[BinaryIO], None]


class DiskFullError(OSError):
    """A write failed for lack of space (ENOSPC); the message names the folder and the space needed."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file in ``path``'s folder to write; it replaces ``path`` when the block ends, and is
    removed if the block raises, so ``path`` holds its old content or the whole new one, never a part.

    The temporary name keeps ``path``'s suffix, for writers that choose a format by it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{target.stem}.", suffix=f"{TEMPORARY}{target.suffix}", dir=target.parent
    )
    os.close(descriptor)
    os.chmod(temporary, new_file_mode())  # mkstemp's 0600 would hide the file from the user's group
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as stream:  # on disk before the rename makes it visible
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:  # KeyboardInterrupt included: never leave the partial file behind
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)  # make the rename itself survive a power cut


def new_file_mode() -> int:
    """The permissions ``open`` gives a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Writer) -> Path:
    """Fills ``path`` with what ``write(stream)`` writes, atomically (``atomic_file``). A full disk raises a
    ``DiskFullError`` that names the folder and the size of the file."""
    try:
        with atomic_file(path) as temporary, temporary.open("wb") as stream:
            write(stream)
    except OSError as error:
        if error.errno != errno.ENOSPC or isinstance(error, DiskFullError):
            raise
        raise DiskFullError(no_space_message(Path(path), written_size(write))) from error
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files that writes killed halfway left in ``folder``; returns them.

    Call it only where no write into ``folder`` can be under way: at the start of the run that owns it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [path for path in folder.glob(f".*{TEMPORARY}*") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class _ByteCounter(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)


def written_size(write: Writer) -> int:
    """How many bytes ``write`` produces, counted without storing them."""
    counter = _ByteCounter()
    write(counter)
    return counter.size


def human_size(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def free_space(folder: Path) -> str:
    try:
        return f"{human_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        return "free space unknown"


def no_space_message(target: Path, needed: int | None) -> str:
    """One line: the folder, the file that could not be written, the space it needs, and that its old content is kept."""
    kept = f"; the previous {target.name} is intact" if target.exists() else ""
    return f"no space left on device in {target.parent}: writing {target.name} needs {human_size(needed)} there, {free_space(target.parent)}{kept}"


def disk_full_error(error: BaseException, folder: Path, next_checkpoint: int | None = None) -> DiskFullError | None:
    """The DiskFullError among ``error`` and the errors it was raised while handling (a logger that
    writes once more as the run ends may fail again), or one made from an ENOSPC among them: a write
    outside ``atomic_write``, such as a logger's, named by its file if the error has one, else by
    ``folder``, with the space the run's ``next_checkpoint`` needs. None when no error is a full disk."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    full = [e for e in chain if isinstance(e, OSError) and e.errno == errno.ENOSPC]
    known = [e for e in full if isinstance(e, DiskFullError)]
    if known or not full:
        return known[0] if known else None
    filename = full[0].filename
    where, what = (
        (Path(os.fsdecode(filename)).parent, Path(os.fsdecode(filename)).name) if filename else (folder, "the logs")
    )
    needs = "" if next_checkpoint is None else f"; the run's next checkpoint needs {human_size(next_checkpoint)} there"
    return DiskFullError(f"no space left on device in {where}: writing {what} failed, {free_space(where)}{needs}")


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
