"""Export round trips on a checkpoint trained here: ONNX through onnxruntime and the torch.export program,
each on image sizes never traced, against eager PyTorch within the documented tolerance."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import onnxruntime
import pytest
import torch

from detr_backbone.commands.evaluate import main as evaluate_main
from detr_backbone.commands.export import main as export_main
from detr_backbone.data import IMAGENET_MEAN, IMAGENET_STD, ShapesDataset
from detr_backbone.inference import ExportableDetector, ExportCheckError, Tolerance, load_detector, load_exported
from detr_backbone.inference.export import traced_detector, write_exported
from detr_backbone.nested_tensor import nested_tensor_from_tensor_list
from detr_backbone.training import DetrModule

from .tiny_checkpoint import CLASS_NAMES, DEFORMABLE_HEAD, DINO_HEAD, MULTI_SCALE, NUM_QUERIES, train_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TRACE, CHECK = (64, 80), (72, 64)  # the example batch traced, and the one the export checks itself on
OUTPUTS = ("pred_logits", "pred_boxes", "scores", "labels", "boxes")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint  # trained once a session (tests/conftest.py)


@pytest.fixture(scope="module")
def traced(checkpoint):
    return traced_detector(load_detector(checkpoint), postprocess=True, trace_size=TRACE)


@pytest.fixture(scope="module")
def eager(checkpoint) -> ExportableDetector:
    """The reference: the checkpoint as Lightning loads it, run eagerly."""
    module = DetrModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    return ExportableDetector(module.detector, postprocess=True).eval()


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """``onnx_export(traced)``: the report of its ONNX file, written once per checkpoint for the tests that read it."""
    reports = {}

    def export(traced):
        source = traced.metadata["source"]["path"]
        if source not in reports:
            folder = tmp_path_factory.mktemp("onnx")
            reports[source] = write_exported(traced, "onnx", folder / "detector.onnx", CHECK)
        return reports[source]

    return export


def unseen_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real images at sizes neither traced nor checked: one alone, then two of different sizes padded together."""
    dataset = ShapesDataset(3, min_size=50, max_size=100, split="test")
    images = [dataset[index][0] for index in range(3)]
    batches = [nested_tensor_from_tensor_list(images[:1]), nested_tensor_from_tensor_list(images[1:])]
    for batch in batches:
        assert tuple(batch.tensors.shape[-2:]) not in (TRACE, CHECK)
    assert batches[1].mask.any()  # the smaller image is padded
    return [(batch.tensors, batch.mask) for batch in batches]


def assert_within_tolerance(got: list[torch.Tensor], expected: tuple[torch.Tensor, ...], side: int) -> None:
    tolerance = Tolerance()
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
    for name, have, want in zip(OUTPUTS, got, expected):
        if name == "labels":  # an argmax: equal wherever the best class leads by more than the tolerance
            top2 = expected[0].softmax(-1)[..., :-1].topk(2).values
            clear = (top2[..., 0] - top2[..., 1]) > 1e-3
            assert torch.equal(have[clear], want[clear])
            continue
        scale = side if name == "boxes" else 1  # pixel boxes compared relative to the image, as the export does
        have, want = have.double() / scale, want.double() / scale
        assert ((have - want).abs() <= tolerance.atol + tolerance.rtol * want.abs()).all(), name


@pytest.mark.slow
def test_onnx_in_onnxruntime_matches_eager_on_sizes_never_traced(traced, eager, onnx_export):
    report = onnx_export(traced)
    assert report.path.is_file() and [p.name for p in report.path.parent.iterdir()] == ["detector.onnx"]
    assert set(report.max_abs_diff) == {"pred_logits", "pred_boxes", "scores", "boxes"}
    assert max(report.max_abs_diff.values()) <= Tolerance().atol
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert [(i.name, i.shape) for i in inputs] == [
        ("images", ["batch", 3, "height", "width"]),
        ("mask", ["batch", "height", "width"]),
    ]
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    for images, mask in unseen_batches():
        got = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})
        with torch.inference_mode():
            expected = eager(images, mask)
        assert got[0].shape == (len(images), NUM_QUERIES, len(CLASS_NAMES) + 1)
        assert_within_tolerance([torch.from_numpy(array) for array in got], expected, max(images.shape[-2:]))
    metadata = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    assert metadata["class_names"] == CLASS_NAMES and metadata["category_ids"] == [1, 2, 3]
    assert metadata["normalization"] == {"pixel_scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert metadata["resize"] == {"shorter_side": None, "max_size": 1333}
    assert metadata["dynamic_shapes"]["batch"] == [1, None] and metadata["dynamic_shapes"]["height"][1] is None


@pytest.mark.slow
def test_torch_export_program_matches_eager_on_sizes_never_traced(traced, eager, tmp_path):
    report = write_exported(traced, "torch_export", tmp_path / "detector.pt2", CHECK)
    extra = {"metadata.json": ""}
    program = torch.export.load(str(report.path), extra_files=extra)
    assert json.loads(extra["metadata.json"])["class_names"] == CLASS_NAMES
    module = program.module()
    for images, mask in unseen_batches():
        with torch.inference_mode():
            got, expected = module(images, mask), eager(images, mask)
        assert_within_tolerance(list(got), expected, max(images.shape[-2:]))


def test_a_file_that_fails_its_check_is_removed(traced, tmp_path):
    # in the fast tier: one trace and one torch.export program, the export module's cheapest whole path
    wrong = copy.deepcopy(traced.model)
    with torch.no_grad():
        wrong.detector.class_embed.bias += 0.1  # the eager reference no longer is what was traced
    missed = r"detector\.pt2 differs from eager PyTorch on a 3x3x72x64 batch .* pred_logits max \|diff\| 0\.1"
    with pytest.raises(ExportCheckError, match=missed):
        write_exported(replace(traced, model=wrong), "torch_export", tmp_path / "detector.pt2", CHECK)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"check_size=\[64, 80\] must differ from the traced size"):
        write_exported(traced, "onnx", tmp_path / "detector.onnx", TRACE)


@pytest.mark.slow
def test_export_command_writes_and_checks_the_file(checkpoint, tmp_path, capsys):
    output = tmp_path / "models" / "detector.pt2"
    export_main(
        [
            f"ckpt_path={checkpoint}",
            "format=torch_export",
            f"output={output}",
            "trace_size=[64,80]",
            "check_size=[72,64]",
        ]
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote {output} (torch.export program, ") and len(printed) == 3
    assert "dynamic: batch 1.., height" in printed[1]
    assert printed[2].startswith(
        "checked with torch.export.load on 3x3x72x64 (traced at 2x3x64x80): max |diff| pred_logits "
    )
    assert sorted(p.name for p in output.parent.iterdir()) == ["detector.pt2"]


# --- the multi-scale heads (DINO's, the default job's, and Deformable DETR's): sigmoid classes, top-k detections ---

# Deformable DETR with box refinement: its decoder's boxes are the detector's (the plain head's path is DINO's)
# RT-DETRv2: its hybrid encoder and query selection, fed pixels / 255 on squares (its input record)
MULTI_SCALE_HEADS = {
    "dino": DINO_HEAD,
    "deformable_detr": [*DEFORMABLE_HEAD, "model.with_box_refine=true"],
    "rtdetrv2": ["model=rtdetrv2_small", *MULTI_SCALE, "lr=1e-3", "lr_backbone=1e-3"],  # 40 steps learn something
    # D-FINE: its edges as distributions (softmax over bins, the weighting function) and per-level points
    "dfine": ["model=dfine_small", *MULTI_SCALE, "model.num_points=[2,4,2]", "lr=1e-3", "lr_backbone=1e-3"],
}


@pytest.fixture(scope="module", params=list(MULTI_SCALE_HEADS))
def multi_scale_checkpoint(request, tmp_path_factory):
    if request.param == "dino":  # the TINY_RUN job with DINO_HEAD, trained once a session (tests/conftest.py)
        return request.getfixturevalue("tiny_dino_run").run_dir / "checkpoints" / "last.ckpt"
    return train_tiny_checkpoint(tmp_path_factory.mktemp(request.param), *MULTI_SCALE_HEADS[request.param])


@pytest.fixture(scope="module")
def multi_scale_traced(multi_scale_checkpoint):
    return traced_detector(load_detector(multi_scale_checkpoint), postprocess=True, trace_size=TRACE)


@pytest.mark.parametrize("format, suffix", [("onnx", "onnx"), ("torch_export", "pt2")])
@pytest.mark.slow
def test_a_multi_scale_heads_export_matches_eager_on_sizes_never_traced(
    multi_scale_checkpoint, multi_scale_traced, format, suffix, onnx_export, tmp_path
):
    if format == "onnx":
        report = onnx_export(multi_scale_traced)
    else:
        report = write_exported(multi_scale_traced, format, tmp_path / f"detector.{suffix}", CHECK)
    assert max(report.max_abs_diff.values()) <= Tolerance().atol
    exported = load_exported(report.path)
    module = DetrModule.load_from_checkpoint(multi_scale_checkpoint, map_location="cpu", weights_only=True)
    eager = ExportableDetector(module.detector, postprocess=True).eval()
    pairs = NUM_QUERIES * len(CLASS_NAMES)  # fewer (query, class) pairs than the 100 kept: all of them, ranked
    tolerance = Tolerance()
    for images, mask in unseen_batches():
        got = exported(images, mask)
        with torch.inference_mode():
            expected = eager(images, mask)
        batch, side = len(images), max(images.shape[-2:])
        assert [tuple(g.shape) for g in got] == [
            (batch, NUM_QUERIES, len(CLASS_NAMES)),  # one sigmoid logit per class, no "no object" column
            (batch, NUM_QUERIES, 4),
            (batch, pairs),
            (batch, pairs),
            (batch, pairs, 4),
        ]
        for name, have, want in zip(OUTPUTS, got, expected):
            if name == "labels":
                continue
            scale = side if name == "boxes" else 1
            have, want = have.double() / scale, want.double() / scale
            assert ((have - want).abs() <= tolerance.atol + tolerance.rtol * want.abs()).all(), name
        # the ranking: the same (query, class) pair wherever its score leads the next one by more than the tolerance
        scores = expected[2]
        clear = torch.cat([scores[:, :-1] - scores[:, 1:] > 1e-3, torch.ones(batch, 1, dtype=torch.bool)], 1)
        assert torch.equal(got[3][clear], expected[3][clear]) and clear.float().mean() > 0.5
    outputs = exported.metadata["outputs"]
    assert outputs["pred_logits"].startswith("(batch, queries, classes) sigmoid class logits")
    assert "best (query, class) pairs" in outputs["scores"] and exported.metadata["class_names"] == CLASS_NAMES


# --- evaluating what was exported ----------------------------------------------------------------

TINY_DATA = ["data.val_size=16", "data.min_size=32", "data.max_size=48", "progress=false"]  # the tiny runs' sizes


def assert_evaluated_as_its_checkpoint(checkpoint, exported, folder, capsys) -> None:
    """``evaluate`` on ``exported``, an ONNX export of ``checkpoint``: its metrics, and their difference to the
    checkpoint's."""
    metrics = evaluate_main([f"ckpt_path={exported}", *TINY_DATA, f"output_dir={folder / 'exported'}"])
    printed = capsys.readouterr().out
    saved = json.loads((folder / "exported" / "metrics.json").read_text())
    source = saved["source"]
    assert source["path"] == str(checkpoint.resolve()) and source["found"]
    reference = json.loads((folder / "exported" / "source" / "metrics.json").read_text())
    assert source["summary"] == reference["summary"] and saved["summary"] == metrics.summary
    for name in ("AP", "AP50", "AP75"):
        assert source["difference"][name] == pytest.approx(metrics.summary[name] - reference["summary"][name])
        assert abs(source["difference"][name]) <= 1e-3  # the file's detections are the checkpoint's, within 1e-4
    assert max(reference["summary"].values()) > 0  # not a comparison of zeros
    assert f"against its checkpoint {checkpoint.resolve()}: AP " in printed


@pytest.mark.slow
def test_an_exported_file_is_evaluated_as_its_checkpoint_and_compared_with_it(
    checkpoint, traced, onnx_export, tmp_path, capsys
):
    assert_evaluated_as_its_checkpoint(checkpoint, onnx_export(traced).path, tmp_path, capsys)


@pytest.mark.parametrize(
    "multi_scale_checkpoint", ["dino", "rtdetrv2", "dfine"], indirect=True
)  # the default job's head
@pytest.mark.slow
def test_an_exported_real_time_or_dino_head_is_evaluated_as_its_checkpoint(
    multi_scale_checkpoint, multi_scale_traced, onnx_export, tmp_path, capsys
):
    assert_evaluated_as_its_checkpoint(multi_scale_checkpoint, onnx_export(multi_scale_traced).path, tmp_path, capsys)


def test_an_exported_file_without_detections_or_metadata_is_refused_in_one_line(tmp_path):
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    # as an export with postprocess=false describes itself: raw outputs only
    metadata = {"class_names": CLASS_NAMES, "category_ids": [1, 2, 3], "outputs": dict.fromkeys(OUTPUTS[:2], "")}
    path = tmp_path / "raw.pt2"
    torch.export.save(program, str(path), extra_files={"metadata.json": json.dumps(metadata)})
    with pytest.raises(SystemExit) as stopped:
        evaluate_main([f"ckpt_path={path}", *TINY_DATA, f"output_dir={tmp_path / 'out'}"])
    assert stopped.value.code == (
        f"error: {path} has the outputs pred_logits, pred_boxes, not a detector's detections (scores, labels, boxes): "
        "export it with postprocess=true to evaluate it"
    )
    plain = tmp_path / "plain.pt2"
    torch.export.save(program, str(plain))
    with pytest.raises(SystemExit) as stopped:
        evaluate_main([f"ckpt_path={plain}", *TINY_DATA, f"output_dir={tmp_path / 'out'}"])
    assert stopped.value.code == (
        f"error: {plain} holds no detector's metadata (class_names, category_ids, outputs): "
        "give a file written by python -m detr_backbone export"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("multi_scale_checkpoint", ["rtdetrv2", "dfine"], indirect=True)
@pytest.mark.slow
def test_discrete_sampling_of_the_real_time_heads_exports_without_grid_sample(multi_scale_checkpoint, tmp_path):
    """The same weights with ``cross_attn_method=discrete``: one gather a level, no GridSample in the graph, and the
    file equal to eager PyTorch on the export's own check."""
    import onnx

    loaded = load_detector(multi_scale_checkpoint)
    for module in loaded.detector.modules():
        if hasattr(module, "discrete"):
            module.discrete = True
    report = write_exported(
        traced_detector(loaded, postprocess=True, trace_size=TRACE), "onnx", tmp_path / "d.onnx", CHECK
    )
    assert max(report.max_abs_diff.values()) <= Tolerance().atol
    operators = {node.op_type for node in onnx.load(report.path).graph.node}
    assert "GridSample" not in operators and "GatherElements" in operators
    bilinear = write_exported(
        traced_detector(load_detector(multi_scale_checkpoint), trace_size=TRACE), "onnx", tmp_path / "b.onnx", CHECK
    )
    assert "GridSample" in {node.op_type for node in onnx.load(bilinear.path).graph.node}
