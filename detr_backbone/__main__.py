"""``python -m detr_backbone <command> [arguments]``: runs one of the package's commands."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "render": "the Joiner's positional encodings and feature maps for one image, as PNG files",
}


def main(argv: Sequence[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<8} {summary}" for name, summary in COMMANDS.items())
        usage = f"usage: python -m detr_backbone <command> [arguments]\n\ncommands:\n{listing}"
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"error: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}\n\n{usage}")
        print(usage)
        return
    importlib.import_module(f"detr_backbone.commands.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
