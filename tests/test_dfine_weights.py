"""D-FINE's published weights: a Hugging Face ``DFineForObjectDetection`` folder (and its weights file alone) gives
its own logits and boxes, D-FINE's released layout (``{"model"}`` and ``{"ema": {"module"}}``) loads strictly with
its architecture read back, and init_from carries its class rows by name."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.realtime import HUGGING_FACE_HGNETV2_B0
from detr_backbone.detection import build_detector
from detr_backbone.detection.coco_names import COCO_80
from detr_backbone.detection.dfine import DFineConfig
from detr_backbone.detection.dfine.weights import DFINE_CHECKPOINT, is_dfine_state, points_per_level
from detr_backbone.detection.rtdetrv2.weights import RTDETRV2_CHECKPOINT, is_rtdetrv2_state
from detr_backbone.inference import load_detector

from .test_rtdetrv2 import assert_same_queries, randomise_batch_norms

SIDE_HEIGHT, SIDE_WIDTH = 128, 96  # not square: the encoder's grid order shows
QUERIES = (SIDE_HEIGHT // 16) * (SIDE_WIDTH // 16) + (SIDE_HEIGHT // 32) * (SIDE_WIDTH // 32)  # every position
# HGNetV2-B0 (D-FINE-N's and S's backbone) with its learnable affine blocks, in transformers' terms
HGNETV2_B0 = dict(model_type="hgnet_v2", **HUGGING_FACE_HGNETV2_B0, out_features=["stage3", "stage4"])
# a small D-FINE-N-like model with settings away from the defaults (3 and 5 points, 16 bins, reg_scale 6); every
# position a query (random weights score the proposals within float noise of each other, so with all of them the
# outputs are the same set in any order)
HUGGING_FACE_SMALL = dict(
    encoder_in_channels=[512, 1024],
    feat_strides=[16, 32],
    encode_proj_layers=[1],
    num_feature_levels=2,
    d_model=64,
    encoder_hidden_dim=64,
    decoder_in_channels=[64, 64],
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    hidden_expansion=0.5,
    depth_mult=0.34,
    decoder_n_points=[3, 5],
    decoder_layers=3,
    max_num_bins=16,
    reg_scale=6.0,
    num_queries=QUERIES,
    num_denoising=10,
    num_labels=80,
    id2label=dict(enumerate(COCO_80)),
    label2id={name: index for index, name in enumerate(COCO_80)},
)
# our own D-FINE of the same sizes, with a last layer twice as wide after eval_idx -2 (D-FINE's layer_scale, which
# transformers' model cannot evaluate), and the run that fits it (init_from)
OURS = DFineConfig(
    num_queries=QUERIES,
    num_feature_levels=2,
    num_points=[3, 5],
    dec_layers=3,
    eval_idx=-2,
    layer_scale=2,
    dim_feedforward=128,
    expansion=0.5,
    depth_mult=0.34,
    reg_max=16,
    reg_scale=6,
    dn_number=10,
)
JOINER = {
    "backbone": {"_target_": "detr_backbone.TimmBackbone", "name": "hgnetv2_b0", "levels": [3, 4]},
    "position": {"_target_": "detr_backbone.PositionEmbeddingSine"},
    "hidden_dim": 64,
}
FITTING = [
    "model=dfine",
    "backbone=hgnetv2_b0",
    "backbone.levels=[3,4]",
    "hidden_dim=64",
    "model.num_queries=20",
    "model.num_feature_levels=2",
    "model.num_points=[3,5]",
    "model.dec_layers=3",
    "model.eval_idx=-2",
    "model.layer_scale=2",
    "model.dim_feedforward=128",
    "model.expansion=0.5",
    "model.depth_mult=0.34",
    "model.reg_max=16",
    "model.reg_scale=6",
    "model.dn_number=10",
]


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorms, learnable affines and the zero-initialised last layers of the box heads drawn at random, so
    that a misplaced one shows."""
    randomise_batch_norms(model)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(("lab.scale", "lab.bias")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + (0.5 if name.endswith("scale") else -0.5))
            elif re.search(r"(bbox_embed|bbox_head)\.\d*\.?layers\.2\.", name):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def hugging_face_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.DFineConfig(backbone_config=transformers.HGNetV2Config(**HGNETV2_B0), **HUGGING_FACE_SMALL)
    torch.manual_seed(0)
    model = randomised(transformers.DFineForObjectDetection(config))
    generator = torch.Generator().manual_seed(4)
    folder = tmp_path_factory.mktemp("dfine_hf")
    model.save_pretrained(folder)
    images = torch.rand(2, 3, SIDE_HEIGHT, SIDE_WIDTH, generator=generator)  # pixels / 255: D-FINE's input
    with torch.no_grad():
        out = model(pixel_values=images)
    return folder, images, out.logits, out.pred_boxes


@pytest.mark.parametrize(
    ("naming", "alone"),
    [
        ("Hub names", False),
        pytest.param("Hub names", True, marks=pytest.mark.slow),
        pytest.param("transformers 5 names", False, marks=pytest.mark.slow),
    ],
    ids=["folder", "weights-file", "transformers-5-names"],
)
def test_a_hugging_face_dfine_gives_its_own_logits_and_boxes(hugging_face_folder, tmp_path, naming, alone):
    """Through its folder, or its weights file alone (config.json beside it), under either naming."""
    folder, images, logits, boxes = hugging_face_folder
    weights = folder / "model.safetensors"
    if naming == "transformers 5 names":  # what the model holds in memory (save_pretrained writes the Hub's)
        import shutil

        from transformers import DFineForObjectDetection

        shutil.copy(folder / "config.json", tmp_path / "config.json")
        model = DFineForObjectDetection.from_pretrained(folder)
        folder, weights = tmp_path, tmp_path / "pytorch_model.bin"
        torch.save(model.state_dict(), weights)
    loaded = load_detector(weights if alone else folder)
    assert loaded.source == f"Hugging Face D-FINE ({naming})"
    assert loaded.class_names == list(COCO_80)
    assert (loaded.input.normalize, loaded.input.resize) == (False, "square")
    assert loaded.detector.backbone[0].body.default_cfg["architecture"] == "hgnetv2_b0"
    with torch.no_grad():
        assert_same_queries(loaded.detector(list(images)), logits, boxes)


def released_layout(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our D-FINE's tensors under D-FINE's names (the backbone's: timm's ``stages_N`` are D-FINE's ``stages.N``),
    with the buffers D-FINE derives: each layer's ``num_points_scale`` (1 / n for a level's n points) and the
    anchors."""
    released = {
        re.sub(
            r"^backbone\.0\.body\.(stages_(\d)\.)?", lambda m: f"backbone.stages.{m[2]}." if m[1] else "backbone.", key
        ): value
        for key, value in ours.items()
        if not (key.startswith("backbone.") and key.endswith("num_batches_tracked"))
    }
    for layer in range(OURS.dec_layers):
        released[f"decoder.decoder.layers.{layer}.cross_attn.num_points_scale"] = torch.tensor(
            [1 / 3] * 3 + [1 / 5] * 5
        )
    released["decoder.anchors"], released["decoder.valid_mask"] = torch.zeros(1, 10, 4), torch.ones(1, 10, 1)
    return released


@pytest.fixture(scope="module")
def our_dfine():
    """Our D-FINE (random weights, 80 classes) and its tensors under D-FINE's released names."""
    torch.manual_seed(1)
    model = randomised(build_detector(JOINER, OURS, num_classes=80))
    return model, released_layout(model.state_dict())


@pytest.mark.parametrize("form", ["model", pytest.param("ema", marks=pytest.mark.slow)])
def test_the_released_layout_loads_strictly_with_its_architecture(our_dfine, tmp_path, form):
    ours, released = our_dfine
    assert (
        "backbone.stem.stem1.lab.scale" in released and "backbone.stages.2.blocks.1.layers.2.conv2.lab.bias" in released
    )
    assert is_dfine_state(released) and not is_rtdetrv2_state(released)
    stale = {key: torch.zeros_like(value) for key, value in released.items()}
    content = {"model": released} if form == "model" else {"ema": {"module": released, "updates": 5}, "model": stale}
    path = tmp_path / "dfine_small.pth"
    torch.save(content, path)
    assert RTDETRV2_CHECKPOINT.read(content, path) is None
    weights = DFINE_CHECKPOINT.read(content, path)
    found = weights.architecture
    assert (found.backbone_name, found.levels, found.hidden_dim, found.num_points) == ("hgnetv2_b0", (3, 4), 64, (3, 5))
    assert (found.reg_max, found.reg_scale, found.layer_scale, found.eval_idx) == (16, 6.0, 2.0, -2)
    assert (found.expansion, found.depth_mult, found.dec_layers, found.dim_feedforward) == (0.5, 0.34, 3, 128)
    assert weights.skipped == ([] if form == "model" else ["model"])
    loaded = load_detector(path)
    assert loaded.source == "D-FINE checkpoint" and loaded.class_names == list(COCO_80)
    # released files do not record the query count: every published config has 300, this small model QUERIES
    assert loaded.detector.decoder.num_queries == 300
    loaded.detector.decoder.num_queries = QUERIES
    images = [torch.rand(3, SIDE_HEIGHT, SIDE_WIDTH, generator=torch.Generator().manual_seed(5))]
    with torch.no_grad():
        expected, got = ours(images), loaded.detector(images)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], atol=1e-4, rtol=0)


def test_an_rtdetrv2_state_is_not_read_as_dfine():
    rtdetrv2 = {
        key: torch.zeros(1)
        for key in (
            "decoder.dec_score_head.0.weight",
            "encoder.input_proj.0.conv.weight",
            "decoder.query_pos_head.layers.0.weight",
            "backbone.stem.stem1.conv.weight",
        )
    }
    assert is_rtdetrv2_state(rtdetrv2) and not is_dfine_state(rtdetrv2)
    assert DFINE_CHECKPOINT.read({"model": rtdetrv2}, "rtdetrv2.pth") is None


@pytest.mark.parametrize(
    ("scales", "total", "levels", "expected"),
    [
        ([1 / 3] * 3 + [1 / 6] * 6 + [1 / 3] * 3, 12, 3, (3, 6, 3)),  # D-FINE-S..X
        ([1 / 6] * 12, 12, 2, (6, 6)),  # D-FINE-N: two levels of 6 in one run
        (None, 12, 3, (4, 4, 4)),  # no scales: an even split
        (None, 12, 5, None),
    ],
)
def test_points_per_level_from_dfines_scales(scales, total, levels, expected):
    assert points_per_level(None if scales is None else torch.tensor(scales), total, levels) == expected


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:data=coco with the CPU default job")
def test_init_from_a_released_file_carries_the_coco_rows_by_name(our_dfine, tmp_path):
    from detr_backbone.training.init_from import REPORT_FILE
    from detr_backbone.training.job import Job, validated

    from .jobs import TINY, compose_config
    from .test_init_from_objects365 import coco_folder

    released = our_dfine[1]
    torch.save({"model": released}, tmp_path / "dfine.pth")
    overrides = [*TINY, *FITTING, *coco_folder(tmp_path / "data", {1: "person", 3: "car", 200: "widget"})]
    run = Job(validated(compose_config(*overrides, f"init_from={tmp_path / 'dfine.pth'}")), tmp_path / "run")
    fresh = Job(validated(compose_config(*overrides)), tmp_path / "fresh").module.detector.state_dict()
    state = run.module.detector.state_dict()
    heads = ["decoder.enc_score_head", *(f"decoder.dec_score_head.{layer}" for layer in range(3))]
    for key in [f"{head}.{suffix}" for head in heads for suffix in ("weight", "bias")]:
        # person <- COCO row 0, car <- row 2, widget fresh
        assert torch.equal(state[key][0], released[key][0]) and torch.equal(state[key][1], released[key][2])
        assert torch.equal(state[key][2], fresh[key][2])
    table = "decoder.denoising_class_embed.weight"  # + the padding row, the checkpoint's
    assert torch.equal(state[table][:2], released[table][[0, 2]]) and torch.equal(state[table][3], released[table][80])
    assert torch.equal(state[table][2], fresh[table][2])
    # every other tensor is the checkpoint's (under our names: ours, which the file was written from)
    source = our_dfine[0].state_dict()
    carried = [key for key in state if not key.startswith((*heads, table)) and not key.endswith("num_batches_tracked")]
    assert set(carried) <= set(source) and all(torch.equal(state[key], source[key]) for key in carried)
    report = (tmp_path / "run" / REPORT_FILE).read_text()
    assert "classes carried over (2): person <- row 0, car <- row 2\n" in report and "new classes (1): widget" in report
