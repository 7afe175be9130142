"""The real-time heads against Hugging Face's models with the same weights: RT-DETRv2-R18 against
``RTDetrV2ForObjectDetection``, D-FINE-N against ``DFineForObjectDetection``.

    python -m benchmarks.realtime                  # RT-DETRv2-R18: forward 1x3x640x640, training step 2x3x480x480
    python -m benchmarks.realtime --model dfine    # D-FINE-N, the same cases
    python -m benchmarks.realtime --quick          # 320x320 and 256x256, one round: proves the script works
    python -m benchmarks.realtime --repeats 10 --train-batch 2 --train-size 640x640 --output /tmp/rtdetrv2.json

Hugging Face's model is built with the published sizes and random weights (none are downloaded): RT-DETRv2-R18
(lyuwenyu/RT-DETR's rtdetrv2_r18vd_120e_coco.yml, published as ``PekingU/rtdetr_v2_r18vd``: ResNet-18-vd, encoder
input channels 128/256/512, hidden 256, fusion expansion 0.5, 3 decoder layers) or D-FINE-N (Peterande/D-FINE's
dfine_hgnetv2_n_coco.yml: HGNetv2-B0's strides 16 and 32, hidden 128, feed-forward 512, fusion expansion 0.34 and
depth 0.5, 3 decoder layers with 6 points a level), each with 300 queries, 100 denoising queries and 80
classes. It is saved with ``save_pretrained`` into a temporary folder, and ours is loaded from that folder
(``load_detector``), so both hold the same tensors. Before timing, one forward of each checks that they give
the same queries (logits and box within 1e-4, matched one to one): the encoder's class head is drawn with
std 1 first, so that its top-k proposals are not decided by rounding.

Both sides run in this process, in interleaved rounds (ours, theirs, ours, ...) after untimed warm-up
rounds, and the medians are compared; the ratio is Hugging Face's median over ours (above 1: ours is faster).

- ``forward``: eval mode under ``torch.inference_mode()``, one image, float32, no post-processing;
- ``train``: train mode, the same images and targets (5 random boxes an image); forward, the whole loss
  (every decoder layer, the proposals, the denoising queries; ours through our criterion, theirs through
  ``labels=``) and backward; the optimizer step is left out on both sides. Both train every parameter they
  hold, the whole backbone included (RT-DETRv2-R18's and D-FINE-N's ``freeze_at: -1``); the backbone's
  BatchNorms are frozen on both, as Hugging Face's ``freeze_backbone_batch_norms`` does.

The JSON (``--output``; by default benchmarks/results/<model>_latest.json) holds ``machine``, ``settings``, ``check`` (``max_abs_difference``, ``queries``),
``forward`` and ``train`` (each ``seconds``: ``ours`` and ``hugging_face`` medians with their spread, and
``hf_over_ours``), and ``train``'s ``trained_parameters`` of each side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detr_backbone.detection.criterion import identity
from detr_backbone.detection.registry import build_criterion, published_folder
from detr_backbone.inference import load_detector
from detr_backbone.inference.checkpoint import published_detector
from detr_backbone.nested_tensor import NestedTensor

from .compiled import random_targets
from .run import machine_info, parse_size
from .timing import interleaved_medians

RESULTS = Path(__file__).resolve().parent / "results"
COCO_LABELS = 80  # the real-time heads' classes: COCO's 80, no "no object" row
BOXES_PER_IMAGE = 5
TOLERANCE = 1e-4


def hugging_face_rtdetrv2_r18(seed: int):
    """RT-DETRv2-R18 in Hugging Face's terms; the rest are RTDetrV2Config's defaults, which are RT-DETRv2's."""
    from transformers import RTDetrResNetConfig, RTDetrV2Config, RTDetrV2ForObjectDetection

    torch.manual_seed(seed)
    backbone = RTDetrResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        out_features=["stage2", "stage3", "stage4"],
    )
    config = RTDetrV2Config(
        backbone_config=backbone,
        encoder_in_channels=[128, 256, 512],
        hidden_expansion=0.5,
        decoder_layers=3,
        num_queries=300,
        num_labels=COCO_LABELS,
    )
    return RTDetrV2ForObjectDetection(config).eval()


# HGNetV2-B0 (D-FINE-N's and S's backbone) with its learnable affine blocks, in transformers' terms
HUGGING_FACE_HGNETV2_B0 = dict(
    stem_channels=[3, 16, 16],
    stage_in_channels=[16, 64, 256, 512],
    stage_mid_channels=[16, 32, 64, 128],
    stage_out_channels=[64, 256, 512, 1024],
    hidden_sizes=[64, 256, 512, 1024],
    depths=[1, 1, 2, 1],
    stage_num_blocks=[1, 1, 2, 1],
    stage_downsample=[False, True, True, True],
    stage_light_block=[False, False, True, True],
    stage_kernel_size=[3, 3, 5, 5],
    stage_numb_of_layers=[3, 3, 3, 3],
    use_learnable_affine_block=True,
)


def hugging_face_dfine_n(seed: int):
    """D-FINE-N in Hugging Face's terms (HGNetV2-B0's stages 3 and 4)."""
    from transformers import DFineConfig, DFineForObjectDetection, HGNetV2Config

    torch.manual_seed(seed)
    backbone = HGNetV2Config(**HUGGING_FACE_HGNETV2_B0, out_features=["stage3", "stage4"])
    config = DFineConfig(
        backbone_config=backbone,
        encoder_in_channels=[512, 1024],
        feat_strides=[16, 32],
        encode_proj_layers=[1],
        d_model=128,
        encoder_hidden_dim=128,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        hidden_expansion=0.34,
        depth_mult=0.5,
        num_feature_levels=2,
        decoder_in_channels=[128, 128],
        decoder_n_points=[6, 6],
        decoder_layers=3,
        num_queries=300,
        num_labels=COCO_LABELS,
    )
    return DFineForObjectDetection(config).eval()


@dataclass(frozen=True)
class Compared:
    """A model both sides build: its name, Hugging Face's builder (random weights from a seed), and the strides of
    the levels its encoder proposes boxes on."""

    title: str
    hugging_face: Callable[[int], Any]
    strides: tuple[int, ...]
    queries: int = 300


MODELS = {
    "rtdetrv2": Compared("RT-DETRv2-R18", hugging_face_rtdetrv2_r18, (8, 16, 32)),
    "dfine": Compared("D-FINE-N", hugging_face_dfine_n, (16, 32)),
}


def positions(side: tuple[int, int], strides: tuple[int, ...]) -> int:
    """The encoder positions of an image: each proposes one box."""
    height, width = side
    return sum(-(-height // stride) * -(-width // stride) for stride in strides)


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
                f"our detector does not give Hugging Face's queries on image {image}: largest difference "
                f"{largest:.2e} (tolerance {TOLERANCE:g}), {len(set(nearest.indices.tolist()))} of "
                f"{len(theirs)} queries matched"
            )
    return largest


def with_ratio(times: dict) -> dict:
    return {"seconds": times, "hf_over_ours": times["hugging_face"]["median_s"] / times["ours"]["median_s"]}


def one_image(args, generator: torch.Generator) -> tuple[torch.Tensor, NestedTensor]:
    images = torch.rand(1, 3, *args.size, generator=generator).to(args.device)
    return images, NestedTensor(images, torch.zeros(1, *args.size, dtype=torch.bool, device=args.device))


CHECK_SIDE = 160  # the check's image: RT-DETRv2's 20x20 + 10x10 + 5x5 = 525 positions, every one a query


def same_outputs(ours, theirs, generator: torch.Generator, device: str, strides: tuple[int, ...]) -> dict:
    """One forward of each in eval mode with every encoder position a query (random weights score proposals
    within rounding of each other, so which 300 are the best is not a fair test): the largest difference of
    their queries (an error beyond the tolerance)."""
    images = torch.rand(1, 3, CHECK_SIDE, CHECK_SIDE, generator=generator).to(device)
    count = positions((CHECK_SIDE, CHECK_SIDE), strides)
    kept = ours.decoder.num_queries
    ours.decoder.num_queries = theirs.config.num_queries = count
    try:
        with torch.inference_mode():
            reference = theirs(pixel_values=images)
            difference = max_query_difference(ours(list(images)), reference.logits, reference.pred_boxes)
    finally:
        ours.decoder.num_queries = theirs.config.num_queries = kept
    return {"max_abs_difference": difference, "queries": count, "tolerance": TOLERANCE}


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
    # RT-DETRv2-R18 and D-FINE-N train their whole backbone (freeze_at -1), as Hugging Face's models do; the reader keeps
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realtime", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="rtdetrv2", help="the head compared (default rtdetrv2)"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON file to write (default: benchmarks/results/<model>_latest.json)"
    )
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
    # every position of the encoder's levels proposes one box; the 300 queries are the best
    compared = MODELS[args.model]
    for option, (height, width) in (("--size", args.size), ("--train-size", args.train_size)):
        found = positions((height, width), compared.strides)
        if found < compared.queries:
            parser.error(
                f"{option} {height}x{width} gives {found} encoder positions, fewer than the {compared.queries} "
                f"queries of {compared.title}"
            )
    args.output = args.output or RESULTS / f"{args.model}_latest.json"
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
    compared = MODELS[args.model]
    theirs = compared.hugging_face(args.seed).to(args.device)
    results: dict = {
        "machine": {**machine_info(args.device, 512 if args.quick else 2048), "transformers": transformers.__version__},
        "settings": {
            "model": f"{compared.title} (random weights)",
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
        results["check"] = check = same_outputs(ours, theirs, generator, args.device, compared.strides)
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
