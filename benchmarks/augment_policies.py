"""The augmentation policies on the shapes data: the default job's model trained with each policy for the same
number of steps, val mAP@0.5 after every epoch.

    python -m benchmarks.augment_policies                      # 4 runs, two at a time on one thread each
    python -m benchmarks.augment_policies --report             # only read the finished runs under --out
    python -m benchmarks.augment_policies data.multi_scale=[48,56,64,72,80]   # overrides for every run

Runs are ``train.py`` subprocesses (folders under ``--out``); the curves are read from each run's
csv/metrics.csv, printed, written to ``benchmarks/results/cpu_2core_augment_policies.json`` and drawn in
``docs/augment_policies.png`` (matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import json
import textwrap
from pathlib import Path

from .finetune import METRIC, ROOT, finished, train

RESULTS = ROOT / "benchmarks" / "results" / "cpu_2core_augment_policies.json"
FIGURE = ROOT / "docs" / "augment_policies.png"
POLICIES = ("none", "detr", "rtdetr", "deim")
# the default job shrunk to fit four runs in about 25 minutes on 2 cores: 75 steps an epoch, 8 epochs
SIZE = ["data.train_size=1200", "trainer.max_epochs=8", "test_after_fit=false", "callbacks.predictions.enabled=false"]


def epoch_curve(run_dir: Path) -> list[float]:
    """Val mAP@0.5 after each epoch, from the run's csv/metrics.csv."""
    with open(run_dir / "csv" / "metrics.csv") as stream:
        rows = [row for row in csv.DictReader(stream) if row.get(METRIC)]
    return [float(row[METRIC]) for row in sorted(rows, key=lambda row: int(row["epoch"]))]


def plot(curves: dict[str, list[float]], command: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, values in curves.items():
        axes.plot(range(1, len(values) + 1), values, marker="o", label=f"data.augment={name}")
    axes.set_xlabel("epoch (75 steps of 16 images)")
    axes.set_ylabel("val mAP@0.5")
    axes.set_title("\n".join(textwrap.wrap(command, 90)), fontsize=7)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/augment_policies", help="the folder of the runs")
    parser.add_argument("--report", action="store_true", help="only read the finished runs under --out")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every run")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [*SIZE, *args.overrides]
    if not args.report:
        for pair in (POLICIES[:2], POLICIES[2:]):
            processes = {name: train(out / name, *common, f"data.augment={name}", threads=1) for name in pair}
            for name, process in processes.items():
                finished(process, f"the {name} run")
    curves = {name: epoch_curve(out / name) for name in POLICIES}
    print("| val mAP@0.5 after epoch | " + " | ".join(str(e) for e in range(1, len(curves["none"]) + 1)) + " |")
    for name, values in curves.items():
        print(f"| {name} | " + " | ".join(f"{value:.3f}" for value in values) + " |")
    command = "python train.py " + " ".join(common) + " data.augment=<policy>"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": command, "curves": curves}, indent=1))
    plot(curves, command, FIGURE)


if __name__ == "__main__":
    main()
