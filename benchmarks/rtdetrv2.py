"""RT-DETRv2-R18: our head against Hugging Face's ``RTDetrV2ForObjectDetection`` with the same weights.

    python -m benchmarks.rtdetrv2                  # forward 1x3x640x640, training step 2x3x480x480 (minutes on 2 cores)
    python -m benchmarks.rtdetrv2 --quick          # 320x320 and 256x256, one round: proves the script works
    python -m benchmarks.rtdetrv2 --repeats 10 --train-batch 2 --train-size 640x640 --output /tmp/rtdetrv2.json

Hugging Face's model is built with RT-DETRv2-R18's sizes (lyuwenyu/RT-DETR's rtdetrv2_r18vd_120e_coco.yml,
published as ``PekingU/rtdetr_v2_r18vd``: ResNet-18-vd, encoder input channels 128/256/512, hidden 256, fusion
expansion 0.5, 3 decoder layers, 300 queries, 100 denoising queries, 80 classes) and random weights (none are
downloaded), saved with ``save_pretrained`` into a temporary folder, and ours is loaded from that folder
(``load_detector``), so both hold the same tensors. Before timing, one forward of each checks that they give
the same queries (logits and box within 1e-4, matched one to one): the encoder's class head is drawn with
std 1 first, so that its top-k proposals are not decided by rounding.

Both sides run in this process, in interleaved rounds (ours, theirs, ours, ...) after untimed warm-up
rounds, and the medians are compared; the ratio is Hugging Face's median over ours (above 1: ours is faster).

- ``forward``: eval mode under ``torch.inference_mode()``, one image, float32, no post-processing;
- ``train``: train mode, the same images and targets (5 random boxes an image); forward, the whole loss
  (every decoder layer, the proposals, the denoising queries; ours through our criterion, theirs through
  ``labels=``) and backward; the optimizer step is left out on both sides. Both train every parameter they
  hold, the whole backbone included (RT-DETRv2-R18's ``freeze_at: -1``); the backbone's BatchNorms are frozen
  on both, as Hugging Face's ``freeze_backbone_batch_norms`` does.

The JSON (``--output``) holds ``machine``, ``settings``, ``check`` (``max_abs_difference``, ``queries``),
``forward`` and ``train`` (each ``seconds``: ``ours`` and ``hugging_face`` medians with their spread, and
``hf_over_ours``), and ``train``'s ``trained_parameters`` of each side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from detr_backbone.detection.criterion import identity
from detr_backbone.detection.registry import build_criterion, published_folder
from detr_backbone.inference import load_detector
from detr_backbone.inference.checkpoint import published_detector
from detr_backbone.nested_tensor import NestedTensor

from .compiled import random_targets
from .run import machine_info, parse_size
from .timing import interleaved_medians

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "rtdetrv2_latest.json"
COCO_LABELS = 80  # RT-DETR's classes: COCO's 80, no "no object" row
BOXES_PER_IMAGE = 5
TOLERANCE = 1e-4
# RT-DETRv2-R18 in Hugging Face's terms; the rest are RTDetrV2Config's defaults, which are RT-DETRv2's
R18 = dict(
    encoder_in_channels=[128, 256, 512],
    hidden_expansion=0.5,
    decoder_layers=3,
    num_queries=300,
    num_labels=COCO_LABELS,
)
R18_BACKBONE = dict(
    layer_type="basic",
    depths=[2, 2, 2, 2],
    hidden_sizes=[64, 128, 256, 512],
    out_features=["stage2", "stage3", "stage4"],
)


def hugging_face_r18(seed: int):
    from transformers import RTDetrResNetConfig, RTDetrV2Config, RTDetrV2ForObjectDetection

    torch.manual_seed(seed)
    config = RTDetrV2Config(backbone_config=RTDetrResNetConfig(**R18_BACKBONE), **R18)
    model = RTDetrV2ForObjectDetection(config).eval()
    return model


def max_query_difference(ours: dict, logits: torch.Tensor, boxes: torch.Tensor) -> float:
    """The largest difference between each of our queries (logits and box) and its nearest Hugging Face query;
    an error unless every image's queries pair off one to one within ``TOLERANCE``."""
    our_queries = torch.cat([ours["pred_logits"], ours["pred_boxes"]], -1)
    their_queries = torch.cat([logits, boxes], -1)
    largest = 0.0
    for image, (mine, theirs) in enumerate(zip(our_queries, their_queries)):
        nearest = torch.cdist(mine, theirs, p=float("inf")).min(1)
        largest = max(largest, nearest.values.max().item())
        if largest > TOLERANCE or len(set(nearest.indices.tolist())) != len(theirs):
            raise RuntimeError(
                f"our RT-DETRv2 does not give Hugging Face's queries on image {image}: largest difference "
                f"{largest:.2e} (tolerance {TOLERANCE:g}), {len(set(nearest.indices.tolist()))} of "
                f"{len(theirs)} queries matched"
            )
    return largest


def with_ratio(times: dict) -> dict:
    return {"seconds": times, "hf_over_ours": times["hugging_face"]["median_s"] / times["ours"]["median_s"]}


def one_image(args, generator: torch.Generator) -> tuple[torch.Tensor, NestedTensor]:
    images = torch.rand(1, 3, *args.size, generator=generator).to(args.device)
    return images, NestedTensor(images, torch.zeros(1, *args.size, dtype=torch.bool, device=args.device))


CHECK_SIDE = 160  # the check's image: 20x20 + 10x10 + 5x5 = 525 positions, every one a query


def same_outputs(ours, theirs, generator: torch.Generator, device: str) -> dict:
    """One forward of each in eval mode with every encoder position a query (random weights score proposals
    within rounding of each other, so which 300 are the best is not a fair test): the largest difference of
    their queries (an error beyond the tolerance)."""
    images = torch.rand(1, 3, CHECK_SIDE, CHECK_SIDE, generator=generator).to(device)
    positions = sum((CHECK_SIDE // stride) ** 2 for stride in (8, 16, 32))
    kept = ours.decoder.num_queries
    ours.decoder.num_queries = theirs.config.num_queries = positions
    try:
        with torch.inference_mode():
            reference = theirs(pixel_values=images)
            difference = max_query_difference(ours(list(images)), reference.logits, reference.pred_boxes)
    finally:
        ours.decoder.num_queries = theirs.config.num_queries = kept
    return {"max_abs_difference": difference, "queries": positions, "tolerance": TOLERANCE}


def forward_section(ours, theirs, images: torch.Tensor, batch: NestedTensor, args) -> dict:
    with torch.inference_mode():
        times = interleaved_medians(
            {"ours": lambda: ours(batch), "hugging_face": lambda: theirs(pixel_values=images)},
            args.repeats,
            args.warmup,
            args.device,
        )
    return with_ratio(times)


def train_section(folder: Path, theirs, args, generator: torch.Generator) -> dict:
    """Forward + loss + backward of each side on the same batch and targets, gradients cleared before each."""
    height, width = args.train_size
    images = torch.rand(args.train_batch, 3, height, width, generator=generator).to(args.device)
    batch = NestedTensor(images, torch.zeros(args.train_batch, height, width, dtype=torch.bool, device=args.device))
    targets = random_targets(args.train_batch, BOXES_PER_IMAGE, args.device, num_classes=COCO_LABELS)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    # the detector as the folder describes it, before inference strips it (aux outputs off, no gradients)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, config = published_detector(published_folder(folder), None)
    # RT-DETRv2-R18 trains its whole backbone (freeze_at -1), as Hugging Face's model does; the reader keeps
    # DETR's rule (stem and layer1 frozen), so every parameter is opened here to time the same work
    ours = ours.to(args.device).train().requires_grad_(True)
    criterion = build_criterion(config, identity)  # one process: the box count needs no reduction
    theirs.train()

    def our_step() -> None:
        ours.zero_grad(set_to_none=True)
        criterion.weighted_total(criterion(ours(batch, targets), targets)).backward()

    def their_step() -> None:
        theirs.zero_grad(set_to_none=True)
        theirs(pixel_values=images, labels=labels).loss.backward()

    times = interleaved_medians({"ours": our_step, "hugging_face": their_step}, args.repeats, args.warmup, args.device)
    trained = {
        name: sum(p.numel() for p in model.parameters() if p.requires_grad)
        for name, model in (("ours", ours), ("hugging_face", theirs))
    }
    return {**with_ratio(times), "trained_parameters": trained}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rtdetrv2", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="320x320 forward, 256x256 training step, one round")
    parser.add_argument(
        "--size", type=parse_size, default=(640, 640), help="forward image HEIGHTxWIDTH (default 640x640)"
    )
    parser.add_argument(
        "--train-size", type=parse_size, default=(480, 480), help="training images HEIGHTxWIDTH (default 480x480)"
    )
    parser.add_argument("--train-batch", type=int, default=2, help="training images per step (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--sections", default="forward,train", help="comma-separated: forward, train")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="the weights', images' and targets' seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.train_size, args.repeats, args.warmup = (320, 320), (256, 256), 1, 1
    if min(args.repeats, args.train_batch) < 1 or args.warmup < 0:
        parser.error(
            f"--repeats and --train-batch must be >= 1 and --warmup >= 0, "
            f"got {args.repeats}, {args.train_batch}, {args.warmup}"
        )
    sections = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(sections) - {"forward", "train"})
    if unknown or not sections:
        parser.error(f"unknown section(s) {unknown or args.sections!r}; valid: forward, train")
    args.sections = sections
    # every position of the three levels (strides 8, 16, 32) proposes one box; the 300 queries are the best
    for option, (height, width) in (("--size", args.size), ("--train-size", args.train_size)):
        positions = sum(-(-height // stride) * -(-width // stride) for stride in (8, 16, 32))
        if positions < R18["num_queries"]:
            parser.error(
                f"{option} {height}x{width} gives {positions} encoder positions, fewer than the "
                f"{R18['num_queries']} queries; use at least 128x128"
            )
    args.device = torch.device(args.device)
    return args


def print_section(title: str, section: dict) -> None:
    print(f"\n{title}")
    for name, timing in section["seconds"].items():
        print(
            f"  {name:<14}{timing['median_s'] * 1e3:10.1f} ms  (min {timing['min_s'] * 1e3:.1f}, max {timing['max_s'] * 1e3:.1f})"
        )
    print(f"  Hugging Face / ours: {section['hf_over_ours']:.2f}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import transformers

    generator = torch.Generator().manual_seed(args.seed)
    theirs = hugging_face_r18(args.seed).to(args.device)
    results: dict = {
        "machine": {**machine_info(args.device, 512 if args.quick else 2048), "transformers": transformers.__version__},
        "settings": {
            "model": "RT-DETRv2-R18 (random weights)",
            "forward_images": [1, 3, *args.size],
            "train_images": [args.train_batch, 3, *args.train_size],
            "boxes_per_image": BOXES_PER_IMAGE,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "sections": args.sections,
            "seed": args.seed,
        },
    }
    print(
        f"{results['machine']['cpu']}, {results['machine']['threads']} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = load_detector(folder).detector.to(args.device)
        results["check"] = check = same_outputs(ours, theirs, generator, args.device)
        images, batch = one_image(args, generator)
        print(f"same weights: {check['queries']} queries each, largest difference {check['max_abs_difference']:.1e}")
        if "forward" in args.sections:
            results["forward"] = forward_section(ours, theirs, images, batch, args)
            print_section(f"forward, 1x3x{args.size[0]}x{args.size[1]}, eval, inference_mode", results["forward"])
        if "train" in args.sections:
            del ours
            results["train"] = train_section(Path(folder), theirs, args, generator)
            height, width = args.train_size
            print_section(
                f"training step (forward + loss + backward), {args.train_batch}x3x{height}x{width}", results["train"]
            )
            print(f"  trained parameters: {results['train']['trained_parameters']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
