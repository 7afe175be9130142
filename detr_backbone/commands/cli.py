"""What the commands share: their Hydra config composed from conf/, and user errors ended in one line."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..weights import CheckpointMismatchError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# what a user can cause and fix: a bad path, value or file; anything else keeps its traceback
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    FileNotFoundError,
    CheckpointMismatchError,
    HydraException,
    OmegaConfBaseException,
)

Schema = TypeVar("Schema")


def compose_command(name: str, schema: type[Schema], overrides: Sequence[str], doc: str = "") -> Schema:
    """conf/<name>.yaml with Hydra ``key=value`` overrides, checked against ``schema`` (registered as ``<name>_schema``).

    ``-h`` / ``--help`` prints ``doc`` and the config file's keys with their comments instead.
    """
    if any(argument in ("-h", "--help") for argument in overrides):
        print(f"{doc.strip()}\n\nkeys (conf/{name}.yaml):\n{(CONF_DIR / f'{name}.yaml').read_text()}")
        raise SystemExit(0)
    ConfigStore.instance().store(name=f"{name}_schema", node=schema)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name=name, overrides=list(overrides)))


def one_line(error: BaseException) -> str:
    """``error: <message>`` on one line (a checkpoint mismatch lists its keys on several)."""
    text = "error:"
    for line in filter(None, (line.strip() for line in str(error).splitlines())):
        text += (" " if text.endswith(":") else "; ") + line  # a line ending in ':' introduces the next
    return text


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextmanager
def reported(*errors: type[BaseException]) -> Iterator[None]:
    """Warnings as ``warning: ...`` lines, and a user error (or one of ``errors``) as ``error: ...`` with exit status 1."""
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            yield
        except (*USER_ERRORS, *errors) as error:
            raise SystemExit(one_line(error)) from None
