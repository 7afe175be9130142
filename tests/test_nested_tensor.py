"""NestedTensor padding, casting and the nearest-neighbour mask downsampling DETR relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detr_backbone import NestedTensor, downsample_mask, nested_tensor_from_tensor_list


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_pads_bottom_right_with_zeros_and_masks_padding(dtype):
    """Each image sits in the top-left corner of a zero canvas of the largest H and W; mask = padding."""
    torch.manual_seed(0)
    images = [(torch.rand(2, h, w) * 100 + 1).to(dtype) for h, w in [(5, 3), (2, 6), (4, 4)]]
    batch = nested_tensor_from_tensor_list(images)
    assert batch.tensors.shape == (3, 2, 5, 6) and batch.tensors.dtype == dtype
    assert batch.mask.shape == (3, 5, 6) and batch.mask.dtype == torch.bool
    for b, image in enumerate(images):
        _, h, w = image.shape
        for r in range(5):
            for c in range(6):
                inside = r < h and c < w
                assert batch.mask[b, r, c].item() == (not inside)
                expected = image[:, r, c] if inside else torch.zeros(2, dtype=dtype)
                assert torch.equal(batch.tensors[b, :, r, c], expected)


def test_size_divisibility_rounds_up_each_side():
    batch = nested_tensor_from_tensor_list([torch.ones(3, 100, 70), torch.ones(3, 40, 50)], size_divisibility=32)
    assert batch.tensors.shape == (2, 3, 128, 96)
    assert not batch.mask[0, :100, :70].any() and batch.mask[0, 100:].all() and batch.mask[0, :, 70:].all()
    assert batch.tensors[0, :, 100:].abs().sum() == 0 and batch.tensors[0, :, :, 70:].abs().sum() == 0
    # Already a multiple: no extra padding.
    exact = nested_tensor_from_tensor_list([torch.ones(3, 64, 32)], size_divisibility=32)
    assert exact.tensors.shape == (1, 3, 64, 32) and not exact.mask.any()


def test_from_tensor_list_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty"):
        nested_tensor_from_tensor_list([])
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        nested_tensor_from_tensor_list([torch.zeros(3, 4, 5), torch.zeros(4, 5)])  # 2-D image
    with pytest.raises(ValueError, match=r"\(1, 4, 5\)"):
        nested_tensor_from_tensor_list([torch.zeros(3, 4, 5), torch.zeros(1, 4, 5)])  # channel count differs
    with pytest.raises(ValueError, match="-32"):
        nested_tensor_from_tensor_list([torch.zeros(3, 4, 5)], size_divisibility=-32)


@pytest.mark.parametrize(
    "args, kwargs, dtype",
    [
        ((torch.float16,), {}, torch.float16),
        ((torch.bfloat16,), {}, torch.bfloat16),
        (("cpu",), {"dtype": torch.float64}, torch.float64),
    ],
)
def test_to_casts_tensors_but_mask_stays_bool(args, kwargs, dtype):
    """DETR-derived code passed the dtype on to the mask too, turning it into floats."""
    batch = nested_tensor_from_tensor_list([torch.randn(3, 6, 4), torch.randn(3, 3, 5)])
    moved = batch.to(*args, **kwargs)
    assert moved.tensors.dtype == dtype
    torch.testing.assert_close(moved.tensors, batch.tensors.to(dtype), atol=0, rtol=0)
    assert moved.mask.dtype == torch.bool
    assert torch.equal(moved.mask, batch.mask) and batch.mask.any()


def test_decompose_returns_tensors_then_mask():
    tensors, mask = torch.randn(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.bool)
    got_tensors, got_mask = NestedTensor(tensors, mask).decompose()
    assert got_tensors is tensors and got_mask is mask


def test_constructor_rejects_bad_masks():
    with pytest.raises(TypeError, match="bool"):
        NestedTensor(torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5))  # float mask
    with pytest.raises(ValueError) as error:
        NestedTensor(torch.zeros(2, 3, 4, 5), torch.zeros(2, 5, 4, dtype=torch.bool))
    assert "(2, 5, 4)" in str(error.value) and "(2, 3, 4, 5)" in str(error.value)


def nearest_reference(mask: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Nearest resize by explicit indexing: source index = floor(dst * in_size / out_size)."""
    _, in_h, in_w = mask.shape
    out = torch.zeros(mask.shape[0], out_h, out_w, dtype=torch.bool)
    for r in range(out_h):
        for c in range(out_w):
            out[:, r, c] = mask[:, r * in_h // out_h, c * in_w // out_w]
    return out


@pytest.mark.parametrize(
    "in_hw, out_hw", [((32, 32), (1, 1)), ((13, 17), (4, 5)), ((96, 128), (3, 4)), ((7, 10), (9, 15))]
)
def test_downsample_mask_is_detr_nearest_interpolation(in_hw, out_hw):
    torch.manual_seed(0)
    mask = torch.rand(3, *in_hw) > 0.5
    result = downsample_mask(mask, out_hw)
    assert result.dtype == torch.bool and result.shape == (3, *out_hw)
    assert torch.equal(result, F.interpolate(mask[None].float(), size=out_hw).bool()[0])
    assert torch.equal(result, nearest_reference(mask, *out_hw))


def test_downsample_mask_is_not_bilinear():
    """A lone padded pixel between sampled positions vanishes with nearest but smears in with bilinear."""
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1] = True
    assert not downsample_mask(mask, (2, 2)).any()  # nearest samples rows/columns 0 and 2 only
    bilinear = F.interpolate(mask[None].float(), size=(2, 2), mode="bilinear", align_corners=False).bool()[0]
    assert bilinear[0, 0, 0]
