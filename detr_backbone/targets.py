"""``_target_`` paths: resolving them with one-line errors, and the rule for targets read from files.

A config names the callable that builds each part (Hydra's ``_target_``). The user's own config
is trusted; a config read back from a checkpoint is not: unpickling is already off
(``weights_only=True``), and instantiating an arbitrary dotted path (``os.system``) would bring
code execution back. So a saved target is built only if it is one of this package's or the
caller allows it by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

PACKAGE = "detr_backbone"
# modules that moved, so targets saved under their earlier paths still resolve
MOVED_MODULES = {
    f"{PACKAGE}.{name}": f"{PACKAGE}.backbones.{name}"
    for name in ("backbone", "declared_backbone", "feature_pyramid", "freezing", "frozen_batch_norm", "layer_decay")
}


class TargetNotAllowedError(ValueError):
    """A ``_target_`` read from a file is neither this package's nor on the caller's allow-list."""


def is_own(target: str) -> bool:
    return target == PACKAGE or target.startswith(f"{PACKAGE}.")


def check_allowed(target: str, allowed: Iterable[str], where: str, source: str) -> None:
    """Refuse ``target`` (found at ``where`` in the config saved in ``source``) unless it is ours or allowed."""
    if is_own(target) or target in set(allowed):
        return
    raise TargetNotAllowedError(
        f"{source} names {where}={target!r}, which is not part of {PACKAGE}; a saved config is not "
        f"trusted to run code, so it is built only if you allow it: allowed_targets=[{target}] "
        f"(Python: allowed_targets=[{target!r}])"
    )


def resolve(target: str, where: str) -> Callable[..., Any]:
    """The callable a dotted path names, e.g. ``my_pkg.backbones.make_backbone``; one-line errors."""
    if not isinstance(target, str) or not target or any(not part.isidentifier() for part in target.split(".")):
        raise ValueError(
            f"{where}={target!r} is not a dotted path to a class or function, e.g. my_pkg.backbones.make_backbone"
        )
    module_path, _, name = target.rpartition(".")
    parts = f"{MOVED_MODULES.get(module_path, module_path)}.{name}".split(".")
    module, depth = None, len(parts)
    while depth > 0:
        try:
            module = importlib.import_module(".".join(parts[:depth]))
            break
        except ModuleNotFoundError as error:
            if error.name is None or not ".".join(parts[:depth]).startswith(error.name):
                raise ValueError(f"{where}={target!r} cannot be imported: {error}") from None
            depth -= 1
    if module is None:
        raise ValueError(
            f"{where}={target!r} cannot be imported: no module named {parts[0]!r} (is it installed and on sys.path?)"
        )
    found: Any = module
    for position, name in enumerate(parts[depth:], start=depth):
        if not hasattr(found, name):
            raise ValueError(
                f"{where}={target!r} cannot be imported: {'.'.join(parts[:position])} has no attribute {name!r}"
            )
        found = getattr(found, name)
    if not callable(found):
        raise ValueError(
            f"{where}={target!r} is a {type(found).__name__}, not a class or function that builds the part"
        )
    return found


def instantiate_target(target: str, arguments: Mapping[str, Any], where: str, **injected: Any) -> Any:
    """``hydra.utils.instantiate`` of ``target`` with ``arguments`` (plain containers) and ``injected``,
    the values the package supplies (e.g. ``num_pos_feats``); a failure is one line naming the target."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    built = resolve(target, f"{where}._target_")  # the import and callability errors, in one line each
    try:
        return instantiate({"_target_": built, **arguments}, _convert_="all", **injected)
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, ValueError) or is_own(target):  # the part's own error, already one line
            raise cause from cause.__cause__
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        given = ", ".join(sorted({*arguments, *injected})) or "no arguments"
        raise ValueError(f"{where}._target_={target!r} failed with {given}: {type(cause).__name__}: {reason}") from None
