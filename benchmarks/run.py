"""Run the benchmarks, print the tables and write them as JSON.

python -m benchmarks.run                       # the full CPU run (a few minutes on 2 cores)
python -m benchmarks.run --quick               # tiny sizes, seconds: proves the script works
python -m benchmarks.run --models resnet50 --repeats 5 --compile --output /tmp/r50.json
python -m benchmarks.run --sections compile    # where torch.compile pays (about 10 minutes on 2 cores: it compiles)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from . import compiled, joiner, loop
from .machine import cpu_model_name, measured_peak_gflops, theoretical_cpu_peak

DEFAULT_MODELS = ("resnet50", "resnet101", "resnet50_dc5", "resnet50_gn", "convnext_tiny")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"
SECTIONS = ("joiner", "loop", "default_job", "data", "compile")
DEFAULT_SECTIONS = SECTIONS[:-1]  # compile is opt-in (--compile or --sections): it spends minutes compiling
# the default job shrunk to seconds, for --quick
# The shapes job with DETR's head (experiment=shapes_detr), whose figures docs/performance.md reports
SHAPES_DETR = ["experiment=shapes_detr"]
QUICK_JOB = [
    *SHAPES_DETR,
    "hidden_dim=32",
    "model.enc_layers=1",
    "model.dec_layers=1",
    "model.dim_feedforward=64",
    "model.num_queries=5",
    "data.train_size=16",
    "data.val_size=4",
    "data.batch_size=4",
    "data.min_size=48",
    "data.max_size=64",
]


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, e.g. 512x640, got {text!r}") from None
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32 (one stride-32 cell), got {text!r}")
    return height, width


def parse_models(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in joiner.MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r}; valid: {', '.join(joiner.MODELS)}")
    return names


def parse_sections(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown or text!r}; valid: {', '.join(SECTIONS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write (default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and one repeat: an end-to-end check in seconds"
    )
    parser.add_argument(
        "--models", type=parse_models, default=list(DEFAULT_MODELS), help="comma-separated: " + ", ".join(joiner.MODELS)
    )
    parser.add_argument(
        "--all-variants", type=parse_models, default=["resnet50"], help="models also timed with each fast path alone"
    )
    parser.add_argument(
        "--size", type=parse_size, default=None, help="image HEIGHTxWIDTH (default 512x640 on CPU, 800x1066 on GPU)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--compile", action="store_true", help="also time the joiners under torch.compile, and run the compile section"
    )
    parser.add_argument("--loop-steps", type=int, default=30, help="training steps per Lightning / plain loop run")
    parser.add_argument("--loop-repeats", type=int, default=3, help="alternating Lightning / plain runs")
    parser.add_argument(
        "--job-repeats", type=int, default=15, help="timed steps per variant of the default job's detector"
    )
    parser.add_argument(
        "--sections",
        type=parse_sections,
        default=list(DEFAULT_SECTIONS),
        help="comma-separated: " + ", ".join(SECTIONS),
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: torch's, one per core); 1 on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if min(args.repeats, args.loop_repeats, args.job_repeats) < 1 or args.warmup < 0:
        parser.error(
            f"--repeats, --loop-repeats, --job-repeats must be >= 1 and --warmup >= 0, "
            f"got {args.repeats}, {args.loop_repeats}, {args.job_repeats}, {args.warmup}"
        )
    if args.loop_steps < 3:
        parser.error(f"--loop-steps must be >= 3 (warm-up steps are excluded), got {args.loop_steps}")
    if args.quick:
        args.models, args.all_variants, args.size = ["resnet18"], ["resnet18"], args.size or (64, 96)
        args.repeats, args.warmup, args.loop_steps, args.loop_repeats, args.job_repeats = 1, 1, 4, 1, 1
    if args.compile and "compile" not in args.sections:
        args.sections.append("compile")
    args.device = torch.device(args.device)
    if args.size is None:
        args.size = (800, 1066) if args.device.type == "cuda" else (512, 640)
    return args


def machine_info(device: torch.device, matmul_size: int) -> dict:
    peak = measured_peak_gflops(device, size=matmul_size)
    info = {
        "device": str(device),
        "cpu": cpu_model_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "measured_peak_gflops": peak,
        "measured_peak_how": f"best of 10 fp32 {matmul_size}x{matmul_size} matmuls in this process",
        "theoretical_peak": theoretical_cpu_peak() if device.type == "cpu" else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_joiner_header() -> None:
    print(
        f"\n{'model':<14}{'mode':<10}{'variant':<15}{'img/s':>8}{'x ref':>7}{'GFLOP/s':>9}{'% peak':>8}{'% theor':>8}{'mem MB':>8}"
    )
    print("(% peak: of a fp32 matmul timed in the same rounds; % theor: of cores x GHz x FLOP/cycle)")


def print_joiner(rows: list[dict]) -> None:
    for row in rows:
        for name, v in row["variants"].items():
            theoretical = "-" if v["pct_of_theoretical_peak"] is None else f"{v['pct_of_theoretical_peak']:.0f}"
            print(
                f"{row['model']:<14}{row['mode']:<10}{name:<15}{v['images_per_s']:>8.2f}{v['ratio_to_reference']:>7.2f}"
                f"{v['gflops']:>9.1f}{v['pct_of_measured_peak']:>8.0f}{theoretical:>8}{v['peak_memory_mb']:>8.0f}",
                flush=True,
            )


def print_compile_header() -> None:
    print(
        "\ntorch.compile against eager (compile: the first step's seconds beyond a compiled step; break-even: compile / saving per step)"
    )
    print(f"  {'case':<22}{'compile s':>16}{'eager ms':>10}{'comp. ms':>10}{'x':>7}{'break-even':>22}")
    print(f"  {'':<22}{'cold':>8}{'warm':>8}{'':>27}{'cold':>11}{'warm':>11}", flush=True)


def print_compile_row(name: str, r: dict, eager: str) -> None:
    steady, versus = r["steady"], r[f"vs_{eager}"]
    even = {
        key: "never" if versus[key] is None else f"{versus[key]:,.0f}"
        for key in ("break_even_steps_cold", "break_even_steps_warm")
    }
    print(
        f"  {name:<22}{r['compile_s']['cold_cache']:>8.1f}{r['compile_s']['warm_cache']:>8.1f}"
        f"{steady[eager]['median_s'] * 1e3:>10.1f}{steady['compiled']['median_s'] * 1e3:>10.1f}"
        f"{versus['speedup']:>7.2f}{even['break_even_steps_cold']:>11}{even['break_even_steps_warm']:>11}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    matmul_size = 512 if args.quick else 2048
    results: dict = {
        "machine": machine_info(args.device, matmul_size),
        "settings": {
            "size": list(args.size),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "models": args.models,
            "all_variants": args.all_variants,
            "compile": args.compile,
            "sections": args.sections,
        },
    }
    machine = results["machine"]
    print(f"peak fp32: measured {machine['measured_peak_gflops']:.1f} GFLOP/s ({machine['measured_peak_how']})")
    if machine["theoretical_peak"]:
        print(
            f"           theoretical {machine['theoretical_peak']['gflops']:.1f} GFLOP/s = {machine['theoretical_peak']['derivation']}"
        )
    if "joiner" in args.sections:
        theoretical = machine["theoretical_peak"]["gflops"] if machine["theoretical_peak"] else None
        results["joiner"] = []
        print_joiner_header()
        for name in args.models:
            rows = joiner.benchmark_model(
                joiner.MODELS[name],
                args.size,
                args.device,
                args.repeats,
                args.warmup,
                name in args.all_variants,
                args.compile,
                matmul_size,
                theoretical,
            )
            print_joiner(rows)
            results["joiner"] += rows
    cfg = loop.job_config(QUICK_JOB if args.quick else SHAPES_DETR)
    if "loop" in args.sections:
        warmup = max(1, args.loop_steps // 6)
        results["loop"] = loop.lightning_overhead(cfg, args.loop_steps, warmup, args.loop_repeats, args.device)
        r = results["loop"]
        print(
            f"\nLightning loop {r['lightning_s_per_step'] * 1e3:.1f} ms/step, plain loop {r['plain_s_per_step'] * 1e3:.1f} ms/step: overhead {r['overhead_pct']:+.1f}%"
        )
    if "default_job" in args.sections:
        results["default_job"] = loop.default_job_fast_paths(
            cfg, args.loop_steps, args.job_repeats, max(1, args.warmup), args.device
        )
        print("\ndefault job training step (plain loop):")
        for name, v in results["default_job"]["variants"].items():
            print(f"  {name:<14}{v['median_s'] * 1e3:8.1f} ms   x{v['speedup_vs_plain']:.2f} vs plain")
    if "data" in args.sections:
        results["data"] = loop.data_loading(cfg, 2 if args.quick else 40, (0, 1) if args.quick else (0, 1, 2))
        data = results["data"]
        print(
            "\ndata loading (batches/s by workers):",
            {k: round(v, 1) for k, v in data["batches_per_s_by_workers"].items()},
            f"cached, in-process: {data['batches_per_s_cached_in_process']:.1f}",
        )
    if "compile" in args.sections:
        print_compile_header()
        job = compiled.default_job(
            QUICK_JOB if args.quick else SHAPES_DETR,
            args.loop_steps,
            args.job_repeats,
            max(1, args.warmup),
            args.device,
        )
        print_compile_row("job, eager unpadded", job, "eager_unpadded")
        print_compile_row("job, eager padded", job, "eager_padded")
        detr = compiled.detr_sized(
            "resnet18" if args.quick else "resnet50", args.size, args.repeats, max(1, args.warmup), args.device
        )
        print_compile_row("DETR train", detr["train"], "eager")
        print_compile_row("DETR inference", detr["inference"], "eager")
        results["compile"] = {"default_job": job, "detr": detr}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
