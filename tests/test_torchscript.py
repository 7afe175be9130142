"""TorchScript and ONNX, as DETR's own test suite exercises them: every scripted module gives eager's numbers,
a scripted detector reads DETR's NestedTensor class as well as ours, and a detector takes a NestedTensor, a 4-D
tensor or a list of images, scripted or exported to ONNX."""

from __future__ import annotations

import io
import warnings
from typing import Optional

import onnxruntime
import pytest
import torch
from torch import Tensor, nn

from detr_backbone import (
    Backbone,
    GroupNormBackbone,
    Joiner,
    NestedTensor,
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    build_backbone,
    nested_tensor_from_tensor_list,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


def images(*sizes: tuple[int, int]) -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


def assert_same_outputs(eager, scripted, exact: bool = True) -> None:
    (features, positions), (script_features, script_positions) = eager, scripted
    assert len(features) == len(script_features) and len(positions) == len(script_positions)
    for feature, script_feature in zip(features, script_features):
        assert torch.equal(feature.mask, script_feature.mask)
        if exact:
            assert torch.equal(feature.tensors, script_feature.tensors)
        else:  # the folded BatchNorm's eager path against the scripted conv-then-norm path
            torch.testing.assert_close(script_feature.tensors, feature.tensors, rtol=1e-4, atol=1e-5)
    for position, script_position in zip(positions, script_positions):
        assert torch.equal(position, script_position)


@pytest.mark.parametrize("backbone_class", [Backbone, GroupNormBackbone])
def test_scripted_backbones_give_eager_features_at_every_level(backbone_class):
    backbone = backbone_class("resnet18", True, True, False).eval()
    scripted = torch.jit.script(backbone)
    batch = nested_tensor_from_tensor_list(images((64, 80), (50, 96)))
    eager, script = backbone(batch), scripted(batch)
    assert list(script) == list(eager) == ["0", "1", "2", "3"]
    for name in eager:
        assert torch.equal(script[name].tensors, eager[name].tensors)
        assert torch.equal(script[name].mask, eager[name].mask)


def test_scripted_encodings_equal_eager_on_a_padded_mask():
    batch = nested_tensor_from_tensor_list(images((6, 9), (8, 5)))
    for encoding in (PositionEmbeddingSine(16, normalize=True, offset=-0.5), PositionEmbeddingLearned(16)):
        assert torch.equal(torch.jit.script(encoding)(batch), encoding(batch))


@pytest.mark.parametrize(
    ("config", "exact"),
    [
        ({"backbone": {"name": "resnet18", "fold_frozen_bn": False, "channels_last": False}}, True),
        ({"backbone": {"name": "resnet18", "levels": [2, 3, 4]}, "position": {"kind": "learned"}}, False),
    ],
    ids=["plain", "fast-paths"],
)
def test_scripted_joiner_equals_eager(config, exact):
    joiner = build_backbone(config).eval()
    batch = nested_tensor_from_tensor_list(images((64, 72), (40, 96)))
    assert_same_outputs(joiner(batch), torch.jit.script(joiner)(batch), exact)


@torch.jit.script
class DetrNestedTensor:
    """DETR's util.misc.NestedTensor as TorchScript sees it: its own class, an optional mask."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def decompose(self):
        return self.tensors, self.mask


class TinyDetr(nn.Module):
    """DETR's forward contract around a Joiner: a NestedTensor, a 4-D tensor or a list of (3, H, W) images in,
    per-query class logits and sigmoid boxes out; one cross-attention of the queries over the masked memory
    stands for the transformer, to stay small."""

    def __init__(self, joiner: Joiner, hidden_dim: int = 32, num_queries: int = 5):
        super().__init__()
        self.backbone = joiner
        self.input_proj = nn.Conv2d(joiner.num_channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, 4)
        self.bbox_embed = nn.Linear(hidden_dim, 4)

    def forward(self, samples: NestedTensor) -> dict[str, Tensor]:
        features, positions = self.backbone(samples)
        source, mask = features[-1].decompose()
        memory = (self.input_proj(source) + positions[-1]).flatten(2).transpose(1, 2)
        scores = self.query_embed.weight @ memory.transpose(1, 2) / memory.shape[-1] ** 0.5
        hidden = scores.masked_fill(mask.flatten(1)[:, None, :], float("-inf")).softmax(-1) @ memory
        return {"pred_logits": self.class_embed(hidden), "pred_boxes": self.bbox_embed(hidden).sigmoid()}


class FromImageList(nn.Module):
    def __init__(self, detector: TinyDetr):
        super().__init__()
        self.detector = detector

    def forward(self, inputs: list[Tensor]) -> dict[str, Tensor]:
        return self.detector(nested_tensor_from_tensor_list(inputs))


class FromDetrNestedTensor(nn.Module):
    """A scripted caller that hands the Joiner DETR's NestedTensor class, not ours."""

    def __init__(self, joiner: Joiner):
        super().__init__()
        self.joiner = joiner

    def forward(self, tensors: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        features, positions = self.joiner(DetrNestedTensor(tensors, mask))
        return [feature.tensors for feature in features], positions


@pytest.fixture(scope="module")
def detector() -> TinyDetr:
    torch.manual_seed(0)
    joiner = build_backbone({"backbone": {"name": "resnet18"}, "hidden_dim": 32})
    return TinyDetr(joiner).eval()


def test_scripted_detector_takes_a_nested_tensor_and_a_list_of_images(detector):
    batch = images((64, 64), (64, 80))
    nested = nested_tensor_from_tensor_list(batch)
    eager = detector(nested)
    for scripted, inputs in ((torch.jit.script(detector), nested), (torch.jit.script(FromImageList(detector)), batch)):
        out = scripted(inputs)
        assert out["pred_logits"].shape == (2, 5, 4) and out["pred_boxes"].shape == (2, 5, 4)
        torch.testing.assert_close(out["pred_logits"], eager["pred_logits"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["pred_boxes"], eager["pred_boxes"], rtol=1e-4, atol=1e-5)


def test_scripted_joiner_reads_detrs_own_nested_tensor_class():
    joiner = build_backbone({"backbone": {"name": "resnet18", "return_interm_layers": True}}).eval()
    nested = nested_tensor_from_tensor_list(images((48, 64), (64, 40)))
    features, positions = torch.jit.script(FromDetrNestedTensor(joiner))(nested.tensors, nested.mask)
    eager_features, eager_positions = joiner(nested)
    assert len(features) == 4
    for feature, eager_feature in zip(features, eager_features):
        torch.testing.assert_close(feature, eager_feature.tensors, rtol=1e-4, atol=1e-5)
    for position, eager_position in zip(positions, eager_positions):
        assert torch.equal(position, eager_position)


@pytest.mark.slow
def test_detector_exported_to_onnx_from_a_4d_tensor_runs_other_sizes_in_onnxruntime(detector):
    class FromTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.detector = detector

        def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
            out = self.detector(nested_tensor_from_tensor_list(list(images.unbind(0))))
            return out["pred_logits"], out["pred_boxes"]

    model = FromTensor().eval()
    stream = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(1, 3, 64, 64),),
            stream,
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=["pred_logits", "pred_boxes"],
            dynamic_axes={"images": {2: "height", 3: "width"}},
        )
    session = onnxruntime.InferenceSession(stream.getvalue(), providers=["CPUExecutionProvider"])
    other = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    logits, boxes = session.run(None, {"images": other.numpy()})
    with torch.no_grad():
        eager_logits, eager_boxes = model(other)
    torch.testing.assert_close(torch.from_numpy(logits), eager_logits, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(boxes), eager_boxes, rtol=1e-3, atol=1e-4)
