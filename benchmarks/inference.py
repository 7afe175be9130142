"""Inference speed: our Predictor against Hugging Face's DETR, and exported files against eager PyTorch.

    python -m benchmarks.inference                      # DETR-R50 at 800 x 1066, batch 1 (minutes on 2 cores)
    python -m benchmarks.inference --quick              # tiny sizes and one round: proves the script works
    python -m benchmarks.inference --repeats 3 --no-compile --output /tmp/inference.json

Both sides of every comparison run in this process, in interleaved rounds (each variant once per
round), and the medians are compared; ratios are "times faster than the reference", so a shared
machine's load hits both alike. The models are randomly initialised (no weights are downloaded):
Hugging Face's ``DetrForObjectDetection(DetrConfig(use_timm_backbone=True,
use_pretrained_backbone=False))`` and our ``model=detr backbone=resnet50 hidden_dim=256`` detector,
91 classes each.

- ``hf``: the whole call of our API (uint8 images in; DETR's evaluation resize, normalisation,
  padding, forward, post-processing, threshold) against Hugging Face's forward plus
  ``post_process_object_detection`` on the same images already normalised (its image processor
  left out, to its advantage), both float32. Our call is the Predictor's default: on a CPU its
  ResNet runs as oneDNN-fused convolutions (``fuse``; the same numbers). Beside it our call with
  ``fuse=False`` (the plain modules), in bfloat16 (fused) and compiled (where the CPU supports them),
  Hugging Face with its image processor, and the two bare forwards.
- ``exported``: the same detector as an ONNX file in ONNX Runtime and as a torch.export program,
  against eager PyTorch on the same normalised batch, with the largest output differences.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path

import torch

from detr_backbone.inference import ExportableDetector, LoadedDetector, Predictor, load_exported
from detr_backbone.inference.export import RAW_OUTPUTS, traced_detector, write_exported
from detr_backbone.inference.preprocess import EvalTransform
from detr_backbone.nested_tensor import NestedTensor
from detr_backbone.training.job import build_module

from .loop import job_config
from .machine import cpu_model_name, theoretical_cpu_peak
from .timing import interleaved_medians

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest_inference.json"
OUR_DETR = ["model=detr", "backbone=resnet50", "hidden_dim=256"]
QUICK_DETR = [
    "model=detr",
    "backbone=resnet18",
    "hidden_dim=64",
    "model.enc_layers=1",
    "model.dec_layers=1",
    "model.num_queries=10",
]
NUM_CLASSES = 91  # Hugging Face's DetrConfig default: COCO's ids 0..90 and a no-object row


def our_detector(quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_module(job_config(QUICK_DETR if quick else OUR_DETR), NUM_CLASSES).detector.eval()


def hugging_face(quick: bool):
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

    torch.manual_seed(0)
    small = dict(backbone="resnet18", d_model=64, encoder_layers=1, decoder_layers=1, num_queries=10) if quick else {}
    config = DetrConfig(use_timm_backbone=True, use_pretrained_backbone=False, **small)
    # the processor's resize is DETR's (shorter side 800, longer at most 1333), the same as ours
    return DetrForObjectDetection(config).eval(), DetrImageProcessor()


def bf16_supported() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def ratios(times: dict, reference: str) -> dict:
    return {name: times[reference]["median_s"] / value["median_s"] for name, value in times.items()}


def versus_hugging_face(images: list[torch.Tensor], args: argparse.Namespace) -> dict:
    """Seconds per call (medians) of each variant, and how many times faster than Hugging Face's call each is."""
    model, processor = hugging_face(args.quick)
    size = None if args.quick else 800
    names = [f"class {i}" for i in range(NUM_CLASSES)]
    options = dict(size=size, threshold=0.0, batch_size=len(images))
    ours = Predictor(our_detector(args.quick), names, **options)
    unfused = Predictor(our_detector(args.quick), names, fuse=False, **options)
    sizes = [tuple(image.shape[-2:]) for image in images]
    prepared = processor(images=images, return_tensors="pt", do_resize=not args.quick)
    pixel_values, pixel_mask = prepared["pixel_values"], prepared["pixel_mask"]
    batch = NestedTensor(pixel_values, pixel_mask == 0)

    def hf_call():
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)

    def hf_with_processor():
        inputs = processor(images=images, return_tensors="pt", do_resize=not args.quick)
        outputs = model(**inputs)
        return processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)

    calls = {
        "hf_forward_postprocess": hf_call,
        "ours_predictor": lambda: ours(images),
        "ours_predictor_unfused": lambda: unfused(images),
        "hf_with_image_processor": hf_with_processor,
        "hf_bare_forward": lambda: model(pixel_values=pixel_values, pixel_mask=pixel_mask),
        "ours_bare_forward": lambda: ours.detector(batch),
    }
    if bf16_supported():
        half = Predictor(our_detector(args.quick), names, dtype="bfloat16", **options)
        calls["ours_predictor_bf16"] = lambda: half(images)
    if args.compile:
        compiled = Predictor(our_detector(args.quick), names, compile=True, **options)  # padded to multiples of 32
        calls["ours_predictor_compiled"] = lambda: compiled(images)  # the warm-up round pays the compilation
    with torch.inference_mode():
        times = interleaved_medians(calls, args.repeats, args.warmup, torch.device("cpu"))
    return {
        "seconds": times,
        "times_faster_than_hf_call": ratios(times, "hf_forward_postprocess"),
        "bare_forward_ratio": times["hf_bare_forward"]["median_s"] / times["ours_bare_forward"]["median_s"],
        "fusion_gain": times["ours_predictor_unfused"]["median_s"] / times["ours_predictor"]["median_s"],
        "fused_blocks": ours.fused_blocks,
        "bf16_supported": bf16_supported(),
    }


def versus_eager(images: list[torch.Tensor], args: argparse.Namespace, folder: Path) -> dict:
    """ONNX Runtime and the torch.export program against eager PyTorch, the same detector and batch."""
    detector = our_detector(args.quick)
    loaded = LoadedDetector(
        detector, [f"class {i}" for i in range(NUM_CLASSES)], list(range(NUM_CLASSES)), "benchmark", "-", 800
    )
    eager = ExportableDetector(detector).eval()
    traced = traced_detector(loaded, trace_size=(96, 128) if args.quick else (384, 512))
    check = (64, 96) if args.quick else (352, 448)
    reports = {
        format: write_exported(traced, format, folder / f"detr{suffix}", check)
        for format, suffix in (("onnx", ".onnx"), ("torch_export", ".pt2"))
    }
    runners = {format: load_exported(report.path, format) for format, report in reports.items()}
    batch = EvalTransform(None if args.quick else 800)(images[0])[0][None]
    mask = torch.zeros(batch.shape[0], *batch.shape[-2:], dtype=torch.bool)
    with torch.inference_mode():
        expected = eager(batch, mask)
        differences = {
            format: {
                name: float((got - want).abs().max())
                for name, got, want in zip(RAW_OUTPUTS, run(batch, mask), expected)
            }
            for format, run in runners.items()
        }
        times = interleaved_medians(
            {
                "eager": lambda: eager(batch, mask),
                **{format: partial(run, batch, mask) for format, run in runners.items()},
            },
            args.repeats,
            args.warmup,
            torch.device("cpu"),
        )
    return {
        "seconds": times,
        "times_faster_than_eager": ratios(times, "eager"),
        "max_abs_diff_vs_eager": differences,
        "export_seconds": {format: report.seconds for format, report in reports.items()},
        "input": list(batch.shape),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny models and images, one round: an end-to-end check")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first (the compiled variant compiles in them)"
    )
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="leave out the torch.compile variant"
    )
    parser.add_argument("--sections", default="hf,exported", help="comma-separated: hf, exported")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.compile = 1, 1, False
    if min(args.batch, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch and --repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    height, width = (96, 128) if args.quick else (800, 1066)
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator) for _ in range(args.batch)
    ]
    peak = theoretical_cpu_peak()
    results: dict = {
        "machine": {
            "cpu": cpu_model_name(),
            "lscpu_model_name": peak["model"] if peak else None,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": {
            "images": [args.batch, 3, height, width],
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "compile": args.compile,
        },
    }
    sections = args.sections.split(",")
    if "hf" in sections:
        results["hf"] = versus_hugging_face(images, args)
        print(f"\nvs Hugging Face DETR ({args.batch}x3x{height}x{width}, float32 unless named)")
        print("(x: times faster than Hugging Face's forward + post-processing)")
        for name, value in results["hf"]["seconds"].items():
            print(f"  {name:<26}{value['median_s']:8.2f} s   x{results['hf']['times_faster_than_hf_call'][name]:.2f}")
        print(f"  bare forward ratio (HF / ours): {results['hf']['bare_forward_ratio']:.2f}")
        print(
            f"  fused ResNet blocks: {results['hf']['fused_blocks']}, unfused / fused: {results['hf']['fusion_gain']:.2f}",
            flush=True,
        )
    if "exported" in sections:
        with tempfile.TemporaryDirectory() as folder:
            results["exported"] = versus_eager(images, args, Path(folder))
        print("\nexported vs eager PyTorch (x: times faster than eager)")
        for name, value in results["exported"]["seconds"].items():
            print(
                f"  {name:<26}{value['median_s']:8.2f} s   x{results['exported']['times_faster_than_eager'][name]:.2f}"
            )
        print(f"  max |diff| vs eager: {results['exported']['max_abs_diff_vs_eager']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
