"""``detr-backbone <command> [arguments]`` (or ``python -m detr_backbone ...``): runs one of the package's commands.

Every command takes Hydra's ``key=value`` overrides of its config, ``--config-dir <folder>`` for configs
of your own, and ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "train": "train a detector (Hydra's command line on config.yaml: overrides, -m sweeps, resume by ckpt_path)",
    "predict": "detect objects in images: drawn images and detections.json (COCO results)",
    "evaluate": "COCO box metrics of a checkpoint on its own data's validation set, equal to pycocotools'",
    "export": "a checkpoint's detector as ONNX or a torch.export program, checked against eager PyTorch",
    "render": "the Joiner's positional encodings and feature maps for one image, as PNG files",
    "verify": "every problem of a COCO folder (missing or damaged images, wrong sizes, bad boxes and ids)",
}
USAGE = "usage: detr-backbone <command> [key=value ...] [--config-dir <folder>] [--help]"


def main(argv: Sequence[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<8} {summary}" for name, summary in COMMANDS.items())
        usage = f"{USAGE}\n\ncommands:\n{listing}"
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"error: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}\n\n{usage}")
        print(usage)
        return
    importlib.import_module(f"detr_backbone.commands.{argv[0]}").main(argv[1:])


def run() -> None:
    """The ``detr-backbone`` console script."""
    main(sys.argv[1:])


if __name__ == "__main__":
    run()
