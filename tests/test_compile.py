"""torch.compile with varying image sizes: one static graph per batch shape, values of the eager model,
and batches padded to few shapes whenever the config compiles."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from benchmarks.compiled import break_even_steps
from detr_backbone.compilation import COMPILE_SIZE_DIVISIBILITY, compile_in_place
from detr_backbone.data import build_datamodule
from detr_backbone.data.collate import DetectionCollate
from detr_backbone.training import compile_padding
from detr_backbone.training.compile_padding import CompileCostWarning
from detr_backbone.training.job import build_module, validated

from .jobs import SMALL, compose_config

RTOL, ATOL = 1e-4, 1e-5

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported on this platform"
    ),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * max(1.0, expected.abs().max().item()))


@pytest.mark.slow
def test_inductor_compiled_convolution_trains_on_sizes_that_share_its_feature_map_size():
    """What a compiled model failed on: 22x22 then 21x22 (stride-2 outputs both 10x10). With automatic
    dynamic shapes the second size's graph took 21x22 and its backward asserted the 22x22 input's strides."""
    torch.manual_seed(0)
    eager = nn.Conv2d(3, 4, 3, stride=2)
    compiled = copy.deepcopy(eager)
    compile_in_place(compiled)  # the default backend, inductor, whose generated code failed
    generator = torch.Generator().manual_seed(0)
    for height, width in [(16, 16), (22, 22), (21, 22)]:
        images = torch.randn(2, 3, height, width, generator=generator)
        results = []
        for conv in (eager, compiled):
            conv.zero_grad(set_to_none=True)
            output = conv(images)
            output.square().mean().backward()
            results.append((output.detach(), conv.weight.grad, conv.bias.grad))
        for actual, expected in zip(results[1], results[0]):
            assert_close(actual, expected)


@pytest.mark.slow
def test_compiled_small_detector_trains_on_three_image_sizes_like_the_eager_one():
    """aot_eager: dynamo's guards and AOTAutograd's forward and backward graphs, without inductor's
    C++ compilation (minutes for a detector on a CPU). Unpadded batches, so every size gets its own graph."""
    cfg = validated(compose_config(*SMALL))
    datamodule = build_datamodule(cfg.data)
    dataset = datamodule.dataset("train")
    collate = DetectionCollate(size_divisibility=0)
    batches = [collate([dataset[index], dataset[index + 1]]) for index in (0, 2, 4)]
    assert len({tuple(images.tensors.shape) for images, _ in batches}) == 3
    torch.manual_seed(0)
    eager = build_module(cfg, datamodule.num_classes)
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compile_in_place(compiled.detector, backend=counter)
    optimizers = [torch.optim.SGD(module.parameters(), lr=0.05) for module in (eager, compiled)]
    for images, targets in batches:
        outputs = []
        for module, optimizer in zip((eager, compiled), optimizers):
            output = module(images)
            loss = module.criterion.weighted_total(module.criterion(output, targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            outputs.append(output)
        for key in ("pred_logits", "pred_boxes"):
            assert_close(outputs[1][key].detach(), outputs[0][key].detach())
    for trained, reference in zip(compiled.parameters(), eager.parameters()):
        assert_close(trained.detach(), reference.detach())
    # one graph per image size, each with the sizes as numbers: nothing left to a symbolic size
    assert counter.frame_count == 3
    sizes = [
        node.meta["example_value"].shape
        for graph in counter.graphs
        for node in graph.graph.find_nodes(op="placeholder")
        if isinstance(node.meta.get("example_value"), torch.Tensor)
    ]
    assert sizes and all(isinstance(side, int) for size in sizes for side in size)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.compile=true"], COMPILE_SIZE_DIVISIBILITY),
        (["backbone.compile=true"], COMPILE_SIZE_DIVISIBILITY),
        (["model.compile=true", "data.size_divisibility=16"], 16),  # a multiple set by hand is kept
        ([], 0),  # eager: no padding beyond the batch's largest image
    ],
)
def test_compiling_pads_batches_to_multiples_of_32_unless_a_multiple_is_set(overrides, expected, monkeypatch):
    messages: list[str] = []
    monkeypatch.setattr(compile_padding, "rank_zero_info", messages.append)
    cfg = validated(compose_config(*SMALL, *overrides))
    assert cfg.data.size_divisibility == expected
    chosen = expected == COMPILE_SIZE_DIVISIBILITY
    assert len(messages) == chosen
    assert not chosen or ("data.size_divisibility" in messages[0] and "multiples of 32" in messages[0])
    images, _ = next(iter(build_datamodule(cfg.data).train_dataloader()))
    if expected:
        assert images.tensors.shape[-2] % expected == 0 and images.tensors.shape[-1] % expected == 0
    else:  # SMALL's images are 32-48 px: the batch is as large as its largest image
        assert 32 <= images.tensors.shape[-1] <= 48 and not images.mask.all(dim=(0, 1)).any()


def test_break_even_counts_the_steps_until_the_compiled_run_is_ahead():
    assert break_even_steps(compile_s=10.0, eager_s=0.10, compiled_s=0.08) == pytest.approx(500)
    assert break_even_steps(compile_s=10.0, eager_s=0.08, compiled_s=0.10) is None  # never: compiled is slower


@pytest.mark.parametrize("head, name", [("dino_small", "DINO"), ("rtdetrv2_small", "RT-DETRv2")])
def test_compiling_a_denoising_head_says_before_compiling_why_it_will_not_pay(head, name):
    with pytest.warns(CompileCostWarning, match=f"^model.compile=true: {name} builds its denoising queries"):
        validated(compose_config(f"model={head}", "model.compile=true"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileCostWarning)
        validated(compose_config(*SMALL, "model.compile=true"))  # DETR's head compiles once per shape
