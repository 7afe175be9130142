"""RT-DETR's hybrid encoder, with its module names so its checkpoints load: AIFI, a transformer encoder layer
over the deepest level alone (intra-scale interaction, where attention is cheap), then CCFF, a CNN that fuses
the levels top-down and bottom-up (cross-scale fusion).

Every level is first projected to ``hidden_dim`` by a 1x1 convolution and BatchNorm. The fusion's convolutions
are ``ConvNormLayer`` (convolution, BatchNorm, SiLU); AIFI's activation is GELU. No padding mask: RT-DETR
resizes every image of a batch to one size.

Two fusions (``fusion``): RT-DETR's (``csp``: CSP blocks of RepVGG blocks, a strided 3x3 convolution down)
and D-FINE's (``gelan``: GELAN blocks, each two CSP blocks in an ELAN, a 1x1 then a strided depthwise 3x3
convolution down, and no activation on the lateral and downsampling convolutions).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ResidualLayer, clones, with_position

FUSION_ACTIVATION = nn.SiLU
SINE_TEMPERATURE = 10000.0


class ConvNormLayer(nn.Module):
    """Convolution ("same" padding for odd kernels), BatchNorm, then ``activation`` (none: identity).

    In evaluation the BatchNorm is an affine map of each channel, folded into the convolution's weight and bias
    on every call (``folded``): one pass over the map instead of two, and the state dict unchanged."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        activation: bool = True,
        groups: int = 1,
    ):
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = FUSION_ACTIVATION() if activation else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.act(self.norm(self.conv(x)))
        weight, bias = self.folded()
        return self.act(F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding, groups=self.conv.groups))

    def folded(self) -> tuple[Tensor, Tensor]:
        """The convolution's weight and bias with the BatchNorm's running statistics and affine terms folded in."""
        norm = self.norm
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        return self.conv.weight * scale[:, None, None, None], norm.bias - norm.running_mean * scale


class RepVggBlock(nn.Module):
    """A 3x3 and a 1x1 branch (each with BatchNorm) summed, then SiLU. In evaluation the two branches are one
    3x3 convolution (RepVGG's re-parameterisation: the 1x1 kernel is the centre of a 3x3 one), made on every call
    from the trained weights, so the state dict stays RT-DETR's."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 3, activation=False)
        self.conv2 = ConvNormLayer(channels, channels, 1, activation=False)
        self.act = FUSION_ACTIVATION()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.act(self.conv1(x) + self.conv2(x))
        (wide, wide_bias), (point, point_bias) = self.conv1.folded(), self.conv2.folded()
        weight = wide + F.pad(point, [1, 1, 1, 1])
        return self.act(F.conv2d(x, weight, wide_bias + point_bias, 1, 1))


class CSPRepLayer(nn.Module):
    """Cross-stage partial block: one 1x1 branch through ``num_blocks`` RepVGG blocks, another 1x1 branch
    beside it, summed and projected to ``out_channels`` (no projection when the hidden width is already it)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, expansion: float):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, out_channels, 1) if hidden != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class GelanBlock(nn.Module):
    """D-FINE's ``RepNCSPELAN4``: a 1x1 convolution to ``split_channels``, split in halves; the second half
    through a CSP block and a 3x3 convolution, that through another pair; the halves and both results
    concatenated and projected to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, split_channels: int, branch_channels: int, blocks: int):
        super().__init__()
        self.cv1 = ConvNormLayer(in_channels, split_channels, 1)
        self.cv2 = nn.Sequential(
            CSPRepLayer(split_channels // 2, branch_channels, blocks, 1.0),
            ConvNormLayer(branch_channels, branch_channels, 3),
        )
        self.cv3 = nn.Sequential(
            CSPRepLayer(branch_channels, branch_channels, blocks, 1.0),
            ConvNormLayer(branch_channels, branch_channels, 3),
        )
        self.cv4 = ConvNormLayer(split_channels + 2 * branch_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        parts.append(self.cv2(parts[-1]))
        parts.append(self.cv3(parts[-1]))
        return self.cv4(torch.cat(parts, 1))


class SpatialChannelDown(nn.Module):
    """D-FINE's ``SCDown``: a 1x1 convolution, then a strided depthwise 3x3 one, both without activation."""

    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = ConvNormLayer(channels, channels, 1, activation=False)
        self.cv2 = ConvNormLayer(channels, channels, 3, 2, activation=False, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))


FUSIONS = ("csp", "gelan")


class AifiLayer(ResidualLayer):
    """A post-norm transformer encoder layer: self-attention with the position added to queries and keys,
    then the GELU feed-forward block."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__(normalize_before=False)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.add_feedforward(d_model, dim_feedforward, dropout, "gelu")
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        def attend(x: Tensor) -> Tensor:
            query = key = with_position(x, pos)
            return self.self_attn(query, key, x, need_weights=False)[0]

        src = self.residual(src, self.norm1, self.dropout1, attend)
        return self.residual(src, self.norm2, self.dropout2, self.feedforward)


class AifiEncoder(nn.Module):
    def __init__(self, layer: AifiLayer, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src


def grid_sine_embedding(height: int, width: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(1, height * width, dim): RT-DETR's fixed 2-D encoding of a flattened (row-major) map.

    Position k gets the integer coordinates (k // height, k % height), which are (row, column) on a square
    map (RT-DETR's meshgrid order, kept so its weights see what they were trained with); channels are
    sin and cos of the first coordinate, then of the second, at ``dim / 4`` frequencies
    ``1 / 10000^(i / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(
            f"the 2-D sine encoding needs hidden_dim divisible by 4 (sin/cos of two coordinates), got {dim}"
        )
    # a (width, height) grid flattened: position k is (k // height, k % height)
    first, second = torch.meshgrid(
        torch.arange(width, dtype=torch.float32, device=device),
        torch.arange(height, dtype=torch.float32, device=device),
        indexing="ij",
    )
    first, second = first.flatten(), second.flatten()
    quarter = dim // 4
    omega = 1.0 / SINE_TEMPERATURE ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    first, second = first[:, None] * omega, second[:, None] * omega
    return torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], 1)[None]


class HybridEncoder(nn.Module):
    """``forward(features)``: the backbone's maps (B, C_i, h_i, w_i), shallow to deep, in; as many fused maps
    (B, hidden_dim, h_i, w_i) out, each map about twice the size of the next (strides 8/16/32)."""

    def __init__(
        self,
        in_channels: list[int],
        hidden_dim: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        num_encoder_layers: int,
        expansion: float,
        depth_mult: float,
        fusion: str = "csp",
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion!r} is not one of {', '.join(FUSIONS)}")
        self.hidden_dim = hidden_dim
        self.num_encoder_layers = num_encoder_layers
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                OrderedDict(conv=nn.Conv2d(channels, hidden_dim, 1, bias=False), norm=nn.BatchNorm2d(hidden_dim))
            )
            for channels in in_channels
        )
        # one AIFI encoder, on the deepest level (RT-DETR's use_encoder_idx [-1])
        layer = AifiLayer(hidden_dim, nhead, dim_feedforward, dropout)
        self.encoder = nn.ModuleList([AifiEncoder(layer, num_encoder_layers)])
        blocks = round(3 * depth_mult)
        fusions = len(in_channels) - 1
        if fusion == "csp":

            def block() -> nn.Module:
                return CSPRepLayer(2 * hidden_dim, hidden_dim, blocks, expansion)

            def down() -> nn.Module:
                return ConvNormLayer(hidden_dim, hidden_dim, 3, 2)

        else:
            # D-FINE's branch width: round(expansion * hidden_dim // 2), the floor division taken first
            branch = round(expansion * hidden_dim // 2)

            def block() -> nn.Module:
                return GelanBlock(2 * hidden_dim, hidden_dim, 2 * hidden_dim, branch, blocks)

            def down() -> nn.Module:
                return nn.Sequential(SpatialChannelDown(hidden_dim))

        lateral_activation = fusion == "csp"
        self.lateral_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 1, activation=lateral_activation) for _ in range(fusions)
        )
        self.fpn_blocks = nn.ModuleList(block() for _ in range(fusions))
        self.downsample_convs = nn.ModuleList(down() for _ in range(fusions))
        self.pan_blocks = nn.ModuleList(block() for _ in range(fusions))
        # NHWC convolutions: oneDNN takes them without reordering every map (RT-DETRv2-R18's encoder at 640x640 ran
        # in 71 ms instead of 99 on two CPU cores); the values are the same
        self.to(memory_format=torch.channels_last)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        if len(features) != len(self.input_proj):
            raise ValueError(f"the hybrid encoder takes {len(self.input_proj)} levels, got {len(features)}")
        maps = [projection(feature) for projection, feature in zip(self.input_proj, features)]
        if self.num_encoder_layers > 0:
            deepest = maps[-1]
            batch, channels, height, width = deepest.shape
            pos = grid_sine_embedding(height, width, channels, deepest.device).to(deepest.dtype)
            memory = self.encoder[0](deepest.flatten(2).transpose(1, 2), pos)
            maps[-1] = memory.transpose(1, 2).reshape(batch, channels, height, width)
        # top-down: each deeper map, reduced, upsampled and fused with the next shallower one
        top_down = [maps[-1]]
        for step, shallower in enumerate(reversed(maps[:-1])):
            deeper = self.lateral_convs[step](top_down[0])
            top_down[0] = deeper
            # RT-DETR doubles the size (scale_factor 2): the same where sides are multiples of the deepest stride,
            # and this also fits the maps of other sizes (an odd side's deeper map is rounded up)
            upsampled = F.interpolate(deeper, size=shallower.shape[-2:], mode="nearest")
            top_down.insert(0, self.fpn_blocks[step](torch.cat([upsampled, shallower], 1)))
        # bottom-up: each shallower output, strided down and fused with the next deeper top-down map
        outputs = [top_down[0]]
        for step, deeper in enumerate(top_down[1:]):
            downsampled = self.downsample_convs[step](outputs[-1])
            outputs.append(self.pan_blocks[step](torch.cat([downsampled, deeper], 1)))
        return outputs
