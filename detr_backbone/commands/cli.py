"""What the commands share: their Hydra config composed from the package's configs (``conf/`` of the
repository, ``detr_backbone.conf`` once installed) and a user's own folder, and user errors ended in one line."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Optional, TypeVar

from hydra import compose
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..weights import CheckpointMismatchError

CONF_PACKAGE = "detr_backbone.conf"  # conf/ of the repository: pyproject.toml maps it into the package
CONF_PATH = f"pkg://{CONF_PACKAGE}"
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")  # Hydra's own flag for a folder of the user's configs
# what a user can cause and fix: a bad path, value or file; anything else keeps its traceback
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    FileNotFoundError,
    CheckpointMismatchError,
    HydraException,
    OmegaConfBaseException,
)

Schema = TypeVar("Schema")


def conf_text(name: str) -> str:
    """The text of the package's config file ``<name>.yaml``."""
    return (resources.files(CONF_PACKAGE) / f"{name}.yaml").read_text()


def split_config_dir(arguments: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """Hydra's ``--config-dir DIR`` (also ``-cd DIR`` and ``--config-dir=DIR``) taken out of ``arguments``."""
    config_dir, rest, arguments = None, [], list(arguments)
    while arguments:
        argument = arguments.pop(0)
        flag, equals, value = argument.partition("=")
        if flag in CONFIG_DIR_FLAGS:
            if not equals:
                if not arguments:
                    raise ValueError(f"{flag} needs a folder: {flag} <folder of your own configs>")
                value = arguments.pop(0)
            config_dir = value
        else:
            rest.append(argument)
    return config_dir, rest


def override_key(argument: str) -> str:
    """The dotted key a ``key=value`` override sets, without Hydra's ``+``, ``++`` or ``~``."""
    return argument.lstrip("+~").split("=", 1)[0]


def user_config_dir(config_dir: str) -> Path:
    folder = Path(config_dir).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--config-dir {config_dir}: no such folder ({folder}); give a folder that holds your own config "
            "groups, e.g. experiment/, data/, backbone/"
        )
    return folder


@contextmanager
def configs(config_dir: Optional[str] = None, job_name: str = "command") -> Iterator[None]:
    """Hydra initialised on the package's configs, with ``config_dir`` searched first: what train.py's
    ``--config-dir`` does, so a user's ``experiment/`` or ``data/`` files are found by every command."""
    search_path = create_config_search_path(CONF_PATH)
    if config_dir is not None:
        folder = user_config_dir(config_dir)
        search_path.prepend("command-line", f"file://{folder}", anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name=job_name, config_search_path=search_path)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


def compose_command(name: str, schema: type[Schema], arguments: Sequence[str], doc: str = "") -> Schema:
    """<name>.yaml of the package's configs with Hydra ``key=value`` overrides (and ``--config-dir``), checked
    against ``schema`` (registered as ``<name>_schema``).

    ``-h`` / ``--help`` prints ``doc`` and the config file's keys with their comments instead.
    """
    if any(argument in ("-h", "--help") for argument in arguments):
        print(f"{doc.strip()}\n\nkeys ({name}.yaml):\n{conf_text(name)}")
        raise SystemExit(0)
    config_dir, overrides = split_config_dir(arguments)
    ConfigStore.instance().store(name=f"{name}_schema", node=schema)
    with configs(config_dir, name):
        return OmegaConf.to_object(compose(config_name=name, overrides=overrides))


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
