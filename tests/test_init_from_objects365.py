"""init_from: Objects365-trained checkpoints carry their class rows by name, through synonyms where COCO's,
Objects365's and Pascal VOC's names differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_backbone.config import BackboneConfig, JoinerConfig
from detr_backbone.detection import DetrConfig, build_detector
from detr_backbone.detection.class_synonyms import SYNONYMS
from detr_backbone.detection.coco_names import COCO_80, COCO_NAMES, UNUSED
from detr_backbone.detection.objects365_names import OBJECTS365_BY_ID, OBJECTS365_NAMES
from detr_backbone.detection.published import published_class_names
from detr_backbone.training.init_from import REPORT_FILE, class_key, class_rows
from detr_backbone.training.job import Job, validated

from .jobs import TINY, compose_config

# D-FINE's Objects365 -> COCO map (src/solver/_solver.py, ``obj365_ids``): for COCO's classes in category id
# order, the 0-based index of the Objects365 category whose row D-FINE copies; its 366-row heads hold it at
# row index + 1.
DFINE_OBJECTS365_OF_COCO = (
    *(0, 46, 5, 58, 114, 55, 116, 65, 21, 40, 176, 127, 249, 24, 56, 139, 92, 78, 99, 96),
    *(144, 295, 178, 180, 38, 39, 13, 43, 120, 219, 148, 173, 165, 154, 137, 113, 145, 146, 204, 8),
    *(35, 10, 88, 84, 93, 26, 112, 82, 265, 104, 141, 152, 234, 143, 150, 97, 2, 50, 25, 75),
    *(98, 153, 37, 73, 115, 132, 106, 61, 163, 134, 277, 81, 133, 18, 94, 30, 169, 70, 328, 226),
)


def test_objects365_names_are_the_365_categories_in_id_order():
    assert len(OBJECTS365_NAMES) == 365 and len({class_key(name) for name in OBJECTS365_NAMES}) == 365
    # category id i is at index i - 1
    assert [OBJECTS365_NAMES[i - 1] for i in (1, 2, 38, 99, 366 - 1)] == [
        "Person",
        "Sneakers",
        "Moniter/TV",
        "Dinning Table",
        "Table Tennis",
    ]
    assert OBJECTS365_BY_ID[0] == UNUSED and OBJECTS365_BY_ID[1:] == OBJECTS365_NAMES
    assert all(name == name.strip() for name in OBJECTS365_NAMES)


def test_the_row_count_of_a_published_head_tells_its_names():
    assert published_class_names(80) == list(COCO_80) and published_class_names(80)[79] == "toothbrush"
    assert published_class_names(91) == list(COCO_NAMES)
    assert published_class_names(365)[:2] == ["Person", "Sneakers"]
    assert published_class_names(366)[:3] == [UNUSED, "Person", "Sneakers"]
    assert published_class_names(20) is None and published_class_names(364) is None


@pytest.mark.parametrize(("names", "offset"), [(OBJECTS365_NAMES, 0), (OBJECTS365_BY_ID, 1)], ids=["365", "366"])
def test_every_coco_class_finds_the_objects365_row_of_d_fines_map(names, offset):
    carried = class_rows(list(names), COCO_80)
    assert [carry.name for carry in carried] == list(COCO_80)  # all 80 match
    assert [carry.row for carry in carried] == [index + offset for index in DFINE_OBJECTS365_OF_COCO]
    # a synonym exactly where the names differ by more than case
    through_synonyms = {carry.name: carry.checkpoint_name for carry in carried if carry.synonym}
    assert through_synonyms == {
        coco: names[index + offset]
        for coco, index in zip(COCO_80, DFINE_OBJECTS365_OF_COCO, strict=True)
        if class_key(coco) != class_key(names[index + offset])
    }
    assert len(through_synonyms) == 11 and through_synonyms["tv"] == "Moniter/TV"


def test_custom_names_match_through_synonyms_both_ways():
    custom = ["motorbike", "Motorcycle", "Sofa", "Dining Table", "basket", "widget"]
    found = {carry.name: (carry.row, carry.synonym) for carry in class_rows(list(OBJECTS365_NAMES), custom)}
    assert found == {
        "motorbike": (58, True),
        "Motorcycle": (58, False),
        "Sofa": (50, True),
        "Dining Table": (98, True),
        "basket": (52, True),
    }
    # and onto a COCO checkpoint: Objects365's and VOC's names find COCO's rows (row i is COCO id i)
    found = {carry.name: carry.row for carry in class_rows(list(COCO_NAMES), ["Moniter/TV", "aeroplane", "Wild Bird"])}
    assert found == {"Moniter/TV": 72, "aeroplane": 5, "Wild Bird": 16}


def test_no_name_is_in_two_synonym_groups():
    keys = [class_key(name) for group in SYNONYMS for name in group]
    assert len(keys) == len(set(keys)) and all(len(group) >= 2 for group in SYNONYMS)


# --- a published file with an Objects365 head, onto COCO-named and custom classes ----------------


def coco_folder(root: Path, categories: dict[int, str]) -> list[str]:
    """Overrides of a one-image COCO-format folder with these categories (id -> name)."""
    root.mkdir()
    Image.new("RGB", (40, 30), (90, 120, 200)).save(root / "a.png")
    first = min(categories)
    box = {"id": 1, "image_id": 1, "category_id": first, "bbox": [4, 6, 10, 8], "area": 80, "iscrowd": 0}
    (root / "instances.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                "annotations": [box],
                "categories": [{"id": id, "name": name} for id, name in categories.items()],
            }
        )
    )
    files = {"images": root, "annotations": root / "instances.json"}
    return ["data=coco", *(f"data.{split}_{kind}={files[kind]}" for split in ("train", "val") for kind in files)]


def objects365_detr_file(path: Path, rows: int) -> dict[str, torch.Tensor]:
    """DETR's published layout (TINY's size) with random weights and a class head of ``rows`` + no-object."""
    joiner = JoinerConfig(backbone=BackboneConfig(name="resnet18"), hidden_dim=32)
    head = DetrConfig(num_queries=5, enc_layers=1, dec_layers=1, dim_feedforward=64)
    generator = torch.Generator().manual_seed(7)
    state = {
        key: torch.randn(value.shape, generator=generator)
        for key, value in build_detector(joiner, head, rows).state_dict().items()
    }
    assert state["class_embed.weight"].shape == (rows + 1, 32)
    torch.save({"model": state}, path)
    return state


@pytest.mark.filterwarnings("ignore:data=coco with the CPU default job")
@pytest.mark.parametrize("rows", [365, pytest.param(366, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    ("categories", "expected", "carried_line"),
    [
        (
            # labels in category id order: person, airplane, sports ball, dining table, tv, widget
            {1: "person", 5: "airplane", 37: "sports ball", 67: "dining table", 72: "tv", 200: "widget"},
            {0: "Person", 1: "Airplane", 2: "Baseball", 3: "Dinning Table", 4: "Moniter/TV"},
            "classes carried over (5, 3 through a synonym): person <- row {Person} (Person), airplane <- row "
            "{Airplane} (Airplane), sports ball <- row {Baseball} (synonym Baseball), dining table <- row "
            "{Dinning Table} (synonym Dinning Table), tv <- row {Moniter/TV} (synonym Moniter/TV)\n",
        ),
        (
            {1: "Motorbike", 2: "sofa", 3: "Basket", 4: "gizmo", 5: "Person"},
            {0: "Motorcycle", 1: "Couch", 2: "Bakset", 4: "Person"},
            "classes carried over (4, 3 through a synonym): Motorbike <- row {Motorcycle} (synonym Motorcycle), "
            "sofa <- row {Couch} (synonym Couch), Basket <- row {Bakset} (synonym Bakset), Person <- row {Person}\n",
        ),
    ],
    ids=["coco-names", "custom-names"],
)
def test_an_objects365_checkpoint_carries_its_rows_by_name(tmp_path, rows, categories, expected, carried_line):
    source = objects365_detr_file(tmp_path / "objects365.pth", rows)
    overrides = [*TINY, *coco_folder(tmp_path / "data", categories)]
    run = Job(validated(compose_config(*overrides, f"init_from={tmp_path / 'objects365.pth'}")), tmp_path / "run")
    fresh = Job(validated(compose_config(*overrides)), tmp_path / "fresh").module.detector.state_dict()
    state = run.module.detector.state_dict()

    names = published_class_names(rows)
    row_of = {name: names.index(name) for name in names}  # 365: id i at row i - 1; 366: at row i
    assert row_of["Person"] == rows - 365
    for key in ("class_embed.weight", "class_embed.bias"):
        assert state[key].shape[0] == len(categories) + 1
        for label in range(len(categories)):
            if label in expected:  # the checkpoint's row of the matched Objects365 class
                assert torch.equal(state[key][label], source[key][row_of[expected[label]]])
            else:  # a fresh head's
                assert torch.equal(state[key][label], fresh[key][label])
                assert not any(torch.equal(state[key][label], row) for row in source[key])
        assert torch.equal(state[key][-1], source[key][rows])  # no object
    assert all(torch.equal(state[key], source[key]) for key in source if not key.startswith("class_embed."))

    report = (tmp_path / "run" / REPORT_FILE).read_text()
    assert (
        f"source: DETR checkpoint (resnet18, hidden_dim 32, 1 encoder + 1 decoder layers, 5 queries, {rows} " in report
    )
    assert carried_line.format(**row_of) in report
    new = [name for label, name in enumerate(categories.values()) if label not in expected]
    assert f"new classes ({len(new)}): {', '.join(new)}\n" in report


def test_published_rows_get_their_datasets_category_ids():
    from detr_backbone.detection.published import published_category_ids

    coco = published_category_ids(80)
    assert coco[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13] and coco[-1] == 90 and len(set(coco)) == 80
    assert published_category_ids(365) == list(range(1, 366))
    assert published_category_ids(366) == list(range(366))
    assert published_category_ids(91) == list(range(91))
