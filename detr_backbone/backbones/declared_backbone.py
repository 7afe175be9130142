"""A backbone of the user's own, given the same treatment as ours once its levels are declared.

Any ``nn.Module`` that maps images (B, C, H, W) to a list, tuple or dict of feature maps (shallow
to deep) can be a backbone. It declares its maps in one of two ways:

- ``num_channels`` and ``strides``: lists with one entry per map, as Deformable-DETR's backbones
  name them; optionally ``stage_modules``, the names of the submodules that end each stage, so
  that ``trainable_layers`` can freeze the early ones;
- timm's ``feature_info`` (a ``features_only`` model, or a list of dicts with ``num_chs``,
  ``reduction`` and ``module``), which gives all three.

``DeclaredBackbone`` then selects levels, downsamples the mask to each, freezes stages and runs in
channels_last exactly as for our own backbones.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .backbone import BackboneBase, find_module, select_levels
from .freezing import NUM_STAGES, detr_trainable_layers

DECLARATION = (
    "give it `num_channels` and `strides` lists, one entry per returned map (as Deformable-DETR's "
    "backbones), or timm's `feature_info`"
)


def declared_levels(body: nn.Module, target: str) -> tuple[list[int], list[int], list[str]]:
    """(channels, strides, stage modules) a body declares; a one-line error if it declares none."""
    info = getattr(body, "feature_info", None)
    if info is not None and hasattr(info, "channels"):  # timm's FeatureInfo
        channels, strides = info.channels(), info.reduction()
        stages = [found for name in info.module_name() if (found := find_module(body, name))]
    elif isinstance(info, Sequence) and info and all(isinstance(level, dict) for level in info):
        channels, strides = [level.get("num_chs") for level in info], [level.get("reduction") for level in info]
        stages = [found for level in info if level.get("module") and (found := find_module(body, level["module"]))]
    elif isinstance(getattr(body, "num_channels", None), Sequence) and isinstance(
        getattr(body, "strides", None), Sequence
    ):
        channels, strides = list(body.num_channels), list(body.strides)
        stages = list(getattr(body, "stage_modules", []))
    else:
        raise ValueError(
            f"backbone._target_={target!r} built a {type(body).__name__} that does not declare its feature maps: {DECLARATION}"
        )
    valid = (
        channels and len(channels) == len(strides) and all(isinstance(n, int) and n > 0 for n in (*channels, *strides))
    )
    if not valid:
        raise ValueError(
            f"backbone._target_={target!r} declares num_channels={channels} and strides={strides}: "
            "they must be lists of positive ints of the same, non-zero length"
        )
    return list(channels), list(strides), stages


class DeclaredBackbone(BackboneBase):
    """A user's body whose maps are declared (see the module's docstring); ``levels`` number them from 1.

    Its declared stages are taken as the last ones, so ``trainable_layers = k`` trains the last k of
    them (the stem, whatever precedes the first, counting as one more stage) and DETR's rule trains
    the last three. Without ``stage_modules`` only 0 (frozen) and 5 (everything trains) are possible;
    left null it then trains every parameter (or none with ``lr_backbone=0``).
    """

    def __init__(
        self,
        body: nn.Module,
        target: str,
        *,
        train_backbone: bool,
        return_interm_layers: bool = False,
        main_layer: int = -1,
        levels: Sequence[int] | None = None,
        trainable_layers: int | None = None,
    ):
        if not isinstance(body, nn.Module):
            raise ValueError(f"backbone._target_={target!r} returned a {type(body).__name__}, not an nn.Module")
        channels, strides, stages = declared_levels(body, target)
        if trainable_layers is None:
            trainable_layers = detr_trainable_layers(train_backbone) if stages else NUM_STAGES * train_backbone
        if not stages and trainable_layers not in (0, NUM_STAGES):
            raise ValueError(
                f"backbone.trainable_layers={trainable_layers} needs the stages of {target!r} declared: give it "
                f"`stage_modules` (the submodules that end each stage), or use 0 or {NUM_STAGES}"
            )
        self.target = target
        self.declared_count = len(channels)
        self.returned = select_levels(return_interm_layers, main_layer, levels, count=len(channels))
        picked = [channels[i] for i in self.returned], [strides[i] for i in self.returned]
        # freeze_stages numbers the stages 1..len(stages) from the first; these are the last ones
        counted_from_first = (
            min(trainable_layers + NUM_STAGES - 1 - len(stages), NUM_STAGES) if stages else trainable_layers
        )
        super().__init__(body, stages, counted_from_first, *picked, channel_list=levels is not None)
        self.trainable_layers = trainable_layers

    def feature_maps(self, images: Tensor, mask: Tensor) -> list[Tensor]:
        features = self.body(images)
        if isinstance(features, dict):
            features = list(features.values())
        if not isinstance(features, (list, tuple)) or len(features) != self.declared_count:
            got = type(features).__name__ if not isinstance(features, (list, tuple)) else f"{len(features)} maps"
            raise ValueError(
                f"backbone._target_={self.target!r} returned {got}; it declares {self.declared_count} feature maps "
                "and must return them as a list, tuple or dict"
            )
        picked = [features[index] for index in self.returned]
        for feature, channels in zip(picked, self.feature_channels):
            if not isinstance(feature, Tensor) or feature.dim() != 4 or feature.shape[1] != channels:
                shape = tuple(feature.shape) if isinstance(feature, Tensor) else type(feature).__name__
                raise ValueError(
                    f"backbone._target_={self.target!r} returned a map of shape {shape} where it declares {channels} "
                    "channels (batch, channels, height, width)"
                )
        return picked
