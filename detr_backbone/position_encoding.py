"""2-D positional encodings of a feature map, as in DETR: fixed sine/cosine or a learned table, and the
bounded cache the sine encoding may keep (it depends on the padding mask alone)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .nested_tensor import MaskedImages, padding_mask


class MaskKeyedCache:
    """Least-recently-used cache keyed by a mask's shape, device, dtype and content.

    Callers always get a fresh copy: a caller that writes into its result in place cannot change
    what later calls receive. ``max_entries=0`` disables it; it steps aside while torch.compile
    traces, so the compiled graph computes the value itself instead of breaking on the lookup.
    """

    def __init__(self, max_entries: int):
        if max_entries < 0:
            raise ValueError(f"cache size must be >= 0 (0 disables the cache), got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get_or_compute(self, mask: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        if self.max_entries == 0 or torch.compiler.is_compiling():
            return compute(mask)
        key = (tuple(mask.shape), mask.device, mask.dtype, mask.detach().cpu().numpy().tobytes())
        value = self._entries.get(key)
        if value is None:
            value = compute(mask).detach()
            self._entries[key] = value
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return value.clone()


class PositionEmbeddingSine(nn.Module):
    """The Transformer's sine encoding applied to rows and columns, padding excluded.

    Positions count valid (unpadded) pixels; with ``normalize`` they are scaled to (0, ``scale``] by
    the last valid row/column. ``offset`` (Deformable-DETR uses -0.5) shifts positions to pixel
    centres before normalising. Output channels: y block then x block, each interleaving sin (even)
    and cos (odd), ``2 * num_pos_feats`` in all. Always computed in float32.

    The encoding depends only on the mask, so ``cache_size > 0`` keeps the last ``cache_size``
    results, keyed by the mask's shape, device and content (fixed-size batches hit every time).
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: float | None = None,
        *,
        eps: float = 1e-6,
        offset: float = 0.0,
        cache_size: int = 0,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError(f"scale={scale} is only used with normalize=True; set normalize=True or drop scale")
        if num_pos_feats <= 0 or num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be a positive even number (sin/cos pairs), got {num_pos_feats}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.eps = eps
        self.offset = offset
        self.cache = MaskKeyedCache(cache_size)

    def forward(self, tensor_list: MaskedImages) -> Tensor:
        mask = padding_mask(tensor_list)[1]
        if torch.jit.is_scripting():
            return self.encode(mask)  # the cache is a Python object; scripted code computes every time
        return self.cache.get_or_compute(mask, self.encode)

    def encode(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    @torch.jit.unused
    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}, "
            f"scale={self.scale:.4f}, eps={self.eps}, offset={self.offset}, "
            f"cache_size={self.cache.max_entries}"
        )


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)


class PositionEmbeddingLearned(nn.Module):
    """Absolute learned row and column tables, concatenated as [x part, y part]; the mask is ignored."""

    def __init__(self, num_pos_feats: int = 256, *, num_embeddings: int = 50):
        super().__init__()
        if num_embeddings <= 0:
            raise ValueError(f"num_embeddings must be > 0, got {num_embeddings}")
        self.num_embeddings = num_embeddings
        self.row_embed = nn.Embedding(num_embeddings, num_pos_feats)
        self.col_embed = nn.Embedding(num_embeddings, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: MaskedImages) -> Tensor:
        x = tensor_list.decompose()[0]
        h, w = x.shape[-2:]
        if h > self.num_embeddings or w > self.num_embeddings:
            raise ValueError(
                f"feature map of size {h}x{w} is larger than the learned positional table "
                f"({self.num_embeddings} rows and columns); raise position.num_embeddings to at least {max(h, w)}"
            )
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)
