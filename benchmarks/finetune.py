"""Fine-tuning against training from scratch: the default job's checkpoint onto the shapes data with a new
class (``star``), and the same job from scratch, validated every ``--every`` steps.

    python -m benchmarks.finetune                      # trains the default job first (its checkpoint: the source)
    python -m benchmarks.finetune --source outputs/<run>/checkpoints/last.ckpt
    python -m benchmarks.finetune experiment=shapes_detr   # overrides for every run: DETR's head

The two runs go side by side with one thread each (``train.py`` subprocesses, their folders under
``--out``); the val mAP@0.5 curves, and the steps each run needs to reach the scratch run's final
value, are printed and written to ``benchmarks/results/cpu_2core_finetune.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cpu_2core_finetune.json"
CLASSES = "data.classes=[rectangle,ellipse,triangle,star]"
METRIC = "val/map_50"


def train(run_dir: Path, *overrides: str, threads: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def finished(process: subprocess.Popen, what: str) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{what} failed (exit {process.returncode}); see {process.args[-1].partition('=')[2]}.log")


def curve(run_dir: Path) -> dict[int, float]:
    """Val mAP@0.5 by optimizer steps taken, from the run's csv/metrics.csv (which logs the step index)."""
    with open(run_dir / "csv" / "metrics.csv") as stream:
        rows = [row for row in csv.DictReader(stream) if row.get(METRIC)]
    return {int(row["step"]) + 1: float(row[METRIC]) for row in rows}


def steps_to_reach(values: dict[int, float], target: float) -> int | None:
    return next((step for step, value in sorted(values.items()) if value >= target), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="the checkpoint to fine-tune from (default: train the default job first)")
    parser.add_argument("--out", default="outputs/finetune", help="the folder of the runs")
    parser.add_argument("--every", type=int, default=125, help="validate every this many steps")
    parser.add_argument("--report", action="store_true", help="only read the finished runs under --out")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every run (e.g. experiment=shapes_detr)")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = args.source or str(out / "source" / "checkpoints" / "last.ckpt")
    if args.source is None and not args.report:
        finished(train(out / "source", *args.overrides), "the default job")
    common = [*args.overrides, CLASSES, f"trainer.val_check_interval={args.every}", "test_after_fit=false"]
    runs = {"scratch": [], "init_from": [f"init_from={Path(source).resolve()}"]}
    if not args.report:
        processes = {name: train(out / name, *common, *extra, threads=1) for name, extra in runs.items()}
        for name, process in processes.items():
            finished(process, f"the {name} run")
    curves = {name: curve(out / name) for name in runs}
    target = curves["scratch"][max(curves["scratch"])]
    reached = {name: steps_to_reach(values, target) for name, values in curves.items()}
    steps = sorted(curves["scratch"])
    print(f"val mAP@0.5 by step (source: {source})")
    print("| steps | " + " | ".join(map(str, steps)) + " |")
    for name, values in curves.items():
        print(f"| {name} | " + " | ".join(f"{values.get(step, float('nan')):.3f}" for step in steps) + " |")
    print(f"steps to reach the scratch run's final {target:.3f}: " + ", ".join(f"{k} {v}" for k, v in reached.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    saved = {"source": os.path.relpath(source, ROOT), "curves": curves, "target": target, "reached": reached}
    RESULTS.write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
