"""Commands run with ``python -m detr_backbone <command>`` (``train.py`` at the repository root trains)."""
