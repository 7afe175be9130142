"""The benchmark script: the reference it times is DETR's computation, and --quick runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import joiner as joiner_bench
from benchmarks import realtime, run
from benchmarks.machine import peak_memory_mb, theoretical_cpu_peak
from benchmarks.reference import ReferenceJoiner

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_layout_computes_what_our_plain_joiner_computes():
    torch.manual_seed(0)
    reference = ReferenceJoiner("resnet18", hidden_dim=joiner_bench.HIDDEN_DIM).eval()
    ours = joiner_bench.build_ours(joiner_bench.MODELS["resnet18"], joiner_bench.PLAIN)
    ours[0].body.load_state_dict(reference.body.state_dict())
    batch = joiner_bench.detr_batch(64, 96, torch.device("cpu"))
    with torch.no_grad():
        feature, mask, position = reference(batch.tensors, batch.mask)
        (our_feature,), (our_position,) = ours.eval()(batch)
    assert torch.equal(feature, our_feature.tensors) and torch.equal(mask, our_feature.mask)
    assert position.shape[1] == joiner_bench.HIDDEN_DIM and torch.equal(position, our_position)
    assert batch.mask[1].any() and not batch.mask[0].any()  # the second image is padded


def test_reference_freezes_like_detr():
    trained = {name for name, p in ReferenceJoiner("resnet18").named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("body.layer2", "body.layer3", "body.layer4")) for name in trained)


def test_peak_memory_sees_a_large_allocation():
    grown = peak_memory_mb(lambda: torch.ones(64, 2**20).sum(), torch.device("cpu"))  # 256 MiB, then freed
    assert 200 < grown < 400


def test_theoretical_peak_derivation_is_stated():
    peak = theoretical_cpu_peak()
    if peak is None:
        pytest.skip("no lscpu or no vector flags on this machine")
    assert peak["gflops"] == pytest.approx(peak["cores"] * peak["ghz"] * peak["flop_per_cycle"])
    assert "cores" in peak["derivation"] and "FLOP/cycle" in peak["derivation"]


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path):
    output = tmp_path / "quick.json"
    run.main(["--quick", "--output", str(output)])
    results = json.loads(output.read_text())
    assert set(results) == {"machine", "settings", "joiner", "loop", "default_job", "data"}
    assert results["machine"]["measured_peak_gflops"] > 0
    rows = results["joiner"]
    assert [(row["model"], row["mode"]) for row in rows] == [("resnet18", "inference"), ("resnet18", "train")]
    for row in rows:
        assert row["batch"] == [2, 3, 64, 96] and row["gflop"] > 0
        variants = row["variants"]
        assert set(variants) == {"reference", "plain", "default", "channels_last", "fold_frozen_bn", "pos_cache"}
        assert variants["reference"]["ratio_to_reference"] == 1.0
        assert row["reference_gflop"] == pytest.approx(row["gflop"])  # the same network, frozen the same way
        for numbers in variants.values():
            assert numbers["images_per_s"] == pytest.approx(2 / numbers["median_s"])
            assert numbers["gflops"] == pytest.approx(row["gflop"] / numbers["median_s"])
            assert numbers["pct_of_measured_peak"] == pytest.approx(
                100 * numbers["gflops"] / row["measured_peak_gflops"]
            )
    loop = results["loop"]
    assert loop["overhead_pct"] == pytest.approx(100 * (loop["lightning_s_per_step"] / loop["plain_s_per_step"] - 1))
    assert set(results["default_job"]["variants"]) == {"plain", "channels_last", "pos_cache", "default"}
    assert set(results["data"]["batches_per_s_by_workers"]) == {"0", "1"}
    assert results["data"]["batches_per_s_cached_in_process"] > 0


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--size", "16x16"], "at least 32x32"),
        (["--size", "big"], "HEIGHTxWIDTH"),
        (["--models", "resnet51"], "unknown model"),
        (["--sections", "joiner,speed"], "unknown section"),
        (["--repeats", "0"], "must be >= 1"),
    ],
)
def test_bad_flags_are_named(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert fragment in capsys.readouterr().err


@pytest.mark.slow
def test_rtdetrv2_run_checks_the_same_outputs_and_writes_its_keys(tmp_path):
    output = tmp_path / "rtdetrv2.json"
    argv = ["--size", "128x128", "--train-size", "128x128", "--train-batch", "1", "--repeats", "1", "--warmup", "0"]
    realtime.main([*argv, "--device", "cpu", "--output", str(output)])
    results = json.loads(output.read_text())
    assert set(results) == {"machine", "settings", "check", "forward", "train"}
    assert results["check"]["queries"] == 525 and results["check"]["max_abs_difference"] < 1e-4  # every position
    assert results["settings"]["forward_images"] == [1, 3, 128, 128]
    assert results["settings"]["train_images"] == [1, 3, 128, 128]
    for section in ("forward", "train"):
        seconds = results[section]["seconds"]
        assert set(seconds) == {"ours", "hugging_face"} and all(t["repeats"] == 1 for t in seconds.values())
        ratio = seconds["hugging_face"]["median_s"] / seconds["ours"]["median_s"]
        assert results[section]["hf_over_ours"] == pytest.approx(ratio)
    # both sides train the whole model: transformers' R18 holds 20,174,608 parameters (ResNet-18-vd 11,190,112)
    assert results["train"]["trained_parameters"] == {"ours": 20_174_608, "hugging_face": 20_174_608}


@pytest.mark.slow
def test_dfine_run_checks_the_same_outputs_on_its_two_levels(tmp_path):
    output = tmp_path / "dfine.json"
    argv = ["--model", "dfine", "--size", "320x320", "--sections", "forward", "--repeats", "1", "--warmup", "0"]
    results = realtime.main([*argv, "--device", "cpu", "--output", str(output)])
    assert results["settings"]["model"] == "D-FINE-N (random weights)"
    # strides 16 and 32 of a 160x160 image: 10 x 10 + 5 x 5 positions, every one a query
    assert results["check"]["queries"] == 125 and results["check"]["max_abs_difference"] < 1e-4
    assert set(results) == {"machine", "settings", "check", "forward"}


def test_rtdetrv2_check_pairs_queries_in_any_order_and_refuses_a_moved_one():
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 6, 3), torch.rand(2, 6, 4)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shifted = logits[:, order] + 5e-5
    ours = {"pred_logits": shifted, "pred_boxes": boxes[:, order]}
    largest = (shifted - logits[:, order]).abs().max().item()  # 5e-5 after float32 rounding
    assert realtime.max_query_difference(ours, logits, boxes) == largest
    ours["pred_boxes"] = ours["pred_boxes"].clone()
    ours["pred_boxes"][1, 2, 0] += 1e-3
    with pytest.raises(RuntimeError, match="image 1: largest difference 1.0"):
        realtime.max_query_difference(ours, logits, boxes)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--size", "96x96"], "fewer than the 300 queries of RT-DETRv2-R18"),
        # D-FINE-N proposes on strides 16 and 32 alone: 14 x 14 + 7 x 7 positions
        (["--model", "dfine", "--size", "224x224"], "--size 224x224 gives 245 encoder positions, fewer than the 300"),
        (["--train-size", "96x128"], "--train-size 96x128 gives 252"),
        (["--sections", "forward,speed"], "unknown section"),
        (["--train-batch", "0"], "must be >= 1"),
    ],
)
def test_rtdetrv2_bad_flags_are_named(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        realtime.parse_args(argv)
    assert fragment in capsys.readouterr().err
