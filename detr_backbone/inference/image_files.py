"""The image files an ``input=`` names: one file, the images of a folder, or the matches of a glob."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from ..data.images import image_suffixes


def find_images(spec: str | os.PathLike) -> list[Path]:
    """A file as given; a folder's files (not its subfolders) and a glob's matches with an image suffix, sorted."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = [child for child in path.iterdir() if child.is_file()]
    elif glob.has_magic(os.fspath(spec)):
        candidates = [Path(match) for match in glob.glob(os.fspath(spec), recursive=True) if os.path.isfile(match)]
    else:
        raise FileNotFoundError(f"input={os.fspath(spec)!r} is no file, folder or glob pattern that exists")
    suffixes = image_suffixes()
    found = sorted(candidate for candidate in candidates if candidate.suffix.lower() in suffixes)
    if not found:
        what = "folder" if path.is_dir() else "glob"
        raise ValueError(f"input={os.fspath(spec)!r}: the {what} holds no image files ({len(candidates)} other files)")
    return found


def common_root(files: list[Path]) -> Path:
    """The deepest folder holding every file: drawn images keep their paths below it."""
    return Path(os.path.commonpath([file.resolve().parent for file in files]))
