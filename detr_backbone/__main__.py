"""``python -m detr_backbone <command> [arguments]``: runs one of the package's commands."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "predict": "detect objects in images: drawn images and detections.json (COCO results)",
    "evaluate": "COCO box metrics of a checkpoint on a data config's validation set, equal to pycocotools'",
    "export": "a checkpoint's detector as ONNX or a torch.export program, checked against eager PyTorch",
    "render": "the Joiner's positional encodings and feature maps for one image, as PNG files",
    "verify": "every problem of a COCO folder (missing or damaged images, wrong sizes, bad boxes and ids)",
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
