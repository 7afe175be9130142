"""Typed configuration of the Joiner: dataclass schemas that validate themselves.

The same schemas back the Hydra config groups (registered in Hydra's ConfigStore by
``register_configs``) and plain Python use. ``JoinerConfig.from_args`` also reads DETR's flat
argument object, so DETR's ``build_backbone(args)`` call keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .backbones.freezing import NUM_STAGES
from .targets import is_own
from .validation import require, structured

# Our own targets, by the kind names DETR-style args and older checkpoints use
BACKBONE_TARGETS = {
    "torchvision": "detr_backbone.Backbone",
    "groupnorm": "detr_backbone.GroupNormBackbone",
    "timm": "detr_backbone.TimmBackbone",
    "resnet_vd": "detr_backbone.ResNetVdBackbone",
}
TIMM_KINDS = ("timm", "resnet_vd")  # built by timm: kwargs, lr_layer_decay and freeze_norm apply
POSITION_TARGETS = {"sine": "detr_backbone.PositionEmbeddingSine", "learned": "detr_backbone.PositionEmbeddingLearned"}
DETR_POSITION_NAMES = {"sine": "sine", "v2": "sine", "learned": "learned", "v3": "learned"}


def own_kind(target: str, targets: Mapping[str, str]) -> str | None:
    """The kind of one of our targets, by its public path or a module's of ours (``detr_backbone.backbone.Backbone``
    as earlier checkpoints saved it, ``detr_backbone.backbones.backbone.Backbone``)."""
    for kind, public in targets.items():
        if target == public or (is_own(target) and target.rpartition(".")[2] == public.rpartition(".")[2]):
            return kind
    return None


@dataclass
class BackboneOptions:
    """What the Joiner does with any backbone, ours or one named by the user's ``_target_``."""

    _target_: str = ""  # the class or function that builds the backbone (first, so configs show it first)
    return_interm_layers: bool = False  # return every level, not only the last
    main_layer: int = -1  # which level is returned without return_interm_layers (-1: last)
    # the levels returned, 1-based ([2, 3, 4]: Deformable-DETR's); null: the two knobs above
    levels: Optional[list[int]] = None
    trainable_layers: Optional[int] = None  # trailing stages that train, 0..5; None: DETR's rule
    freeze: bool = False  # freeze the whole Joiner, learned positional table included
    checkpoint: Optional[str] = None  # weights file: state dict, GN ImageNet checkpoint or detector checkpoint
    strict: bool = True  # checkpoint keys must match exactly
    # fast paths (docs/performance.md); each gives the plain path's numbers within float rounding
    channels_last: Optional[bool] = None  # NHWC weights and inputs; null: on where it measured faster (not GroupNorm)
    compile: bool = False  # torch.compile the Joiner (the first batch of each shape pays the compilation)

    def __post_init__(self) -> None:
        require(
            self.trainable_layers is None
            or 0 <= self.trainable_layers <= (self.max_trainable_layers or self.trainable_layers),
            f"backbone.trainable_layers={self.trainable_layers} must be null (DETR's rule) or 0..{NUM_STAGES}",
        )
        if self.levels is not None:
            levels = list(self.levels)
            require(
                bool(levels) and levels == sorted(set(levels)) and all(level >= 1 for level in levels),
                f"backbone.levels={levels} must be increasing stage numbers in 1..4, e.g. [2, 3, 4] (or null)",
            )
            require(
                not self.return_interm_layers and self.main_layer == -1,
                f"backbone.levels={levels} replaces return_interm_layers={self.return_interm_layers} and "
                f"main_layer={self.main_layer}; leave those at false and -1",
            )

    @property
    def max_trainable_layers(self) -> int | None:
        """The most stages the backbone has; None when only the built backbone knows (a ViT's blocks)."""
        return NUM_STAGES

    @property
    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(BackboneOptions)}


@dataclass
class BackboneConfig(BackboneOptions):
    """One of our backbones (conf/backbone/*.yaml): ``_target_`` is Backbone, GroupNormBackbone, TimmBackbone or
    ResNetVdBackbone."""

    _target_: str = BACKBONE_TARGETS["torchvision"]
    name: str = "resnet50"  # torchvision ResNet name, or any timm model name for TimmBackbone
    dilation: bool = False  # DC5: the last stage dilated instead of strided (stride 16)
    pretrained: bool = False  # torchvision / timm ImageNet weights (needs network or a filled cache)
    fold_frozen_bn: bool = True  # frozen BatchNorm applied through the conv weights (ResNets: torchvision's, timm's)
    # timm: more timm.create_model arguments, one a key: +backbone.kwargs.drop_path_rate=0.1
    kwargs: dict[str, Any] = field(default_factory=dict)
    # timm transformers: block i of n trains at lr_backbone * decay ** (n - i), the embeddings at decay ** (n + 1)
    lr_layer_decay: Optional[float] = None
    # timm kinds: false keeps the BatchNorms of trained stages live (RT-DETR's R18/R34 recipe)
    freeze_norm: bool = True

    def __post_init__(self) -> None:
        valid = ", ".join(BACKBONE_TARGETS.values())
        require(self.kind is not None, f"backbone._target_={self._target_!r} is not one of {valid}")
        super().__post_init__()
        require(-4 <= self.main_layer <= 3, f"backbone.main_layer={self.main_layer} must be in -4..3")
        highest = 5 if self.kind in TIMM_KINDS else 4
        require(
            self.levels is None or max(self.levels) <= highest,
            f"backbone.levels={self.levels} must be increasing stage numbers in 1..4, e.g. [2, 3, 4] (or null)"
            + (" (2..5 for a single-stride ViT's pyramid)" if highest == 5 else ""),
        )
        for key, unset in (("kwargs", {}), ("lr_layer_decay", None), ("freeze_norm", True)):
            require(
                self.kind in TIMM_KINDS or getattr(self, key) == unset,
                f"backbone.{key}={getattr(self, key)} applies to backbones timm builds only (backbone=timm, resnet18vd, ...), not to {self._target_}",
            )
        require(
            self.freeze_norm or not self.freeze,
            "backbone.freeze_norm=false keeps BatchNorms live, backbone.freeze=true freezes everything; set one",
        )
        require(
            self.lr_layer_decay is None or 0 < self.lr_layer_decay <= 1,
            f"backbone.lr_layer_decay={self.lr_layer_decay} must be null (off) or in (0, 1], e.g. 0.75",
        )

    @property
    def max_trainable_layers(self) -> int | None:
        return None if self.kind in TIMM_KINDS else NUM_STAGES

    @property
    def kind(self) -> str | None:
        return own_kind(self._target_, BACKBONE_TARGETS)


@dataclass
class CustomBackboneConfig(BackboneOptions):
    """A backbone of the user's own: ``_target_`` builds it from ``arguments`` (the node's other keys)."""

    arguments: dict[str, Any] = field(default_factory=dict)
    kind = "custom"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self._target_), "backbone._target_ is empty: name the class or function that builds the backbone")

    def as_node(self) -> dict[str, Any]:
        """The flat config node it came from (``_target_``, its arguments, the options)."""
        return {"_target_": self._target_, **self.arguments, **self.options}


@dataclass
class PositionConfig:
    """One of our encodings (conf/position/*.yaml): ``_target_`` is PositionEmbeddingSine or PositionEmbeddingLearned."""

    _target_: str = POSITION_TARGETS["sine"]
    temperature: float = 10000.0  # sine
    normalize: bool = True  # sine: scale positions to (0, scale]
    scale: Optional[float] = None  # sine: null means 2*pi
    offset: float = 0.0  # sine: -0.5 reproduces Deformable-DETR
    eps: float = 1e-6  # sine
    num_embeddings: int = 50  # learned: rows and columns of the table
    lr: Optional[float] = None  # the encoding's lr if it learns; null = lr_backbone (what DETR's name match gave it)
    cache_size: int = 0  # sine: encodings kept for repeated masks; off: no gain measured, a key per call

    def __post_init__(self) -> None:
        valid = ", ".join(POSITION_TARGETS.values())
        require(self.kind is not None, f"position._target_={self._target_!r} is not one of {valid}")
        require(self.lr is None or self.lr >= 0, f"position.lr={self.lr} must be null or >= 0")
        require(self.temperature > 0, f"position.temperature={self.temperature} must be > 0")
        require(self.num_embeddings > 0, f"position.num_embeddings={self.num_embeddings} must be > 0")
        require(self.cache_size >= 0, f"position.cache_size={self.cache_size} must be >= 0 (0 disables the cache)")
        require(
            self.scale is None or self.normalize,
            f"position.scale={self.scale} is only used with position.normalize=true",
        )

    @property
    def kind(self) -> str | None:
        return own_kind(self._target_, POSITION_TARGETS)


@dataclass
class CustomPositionConfig:
    """An encoding of the user's own: ``_target_(num_pos_feats=hidden_dim // 2, **arguments)``."""

    _target_: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None
    kind = "custom"

    def __post_init__(self) -> None:
        require(bool(self._target_), "position._target_ is empty: name the class or function that builds the encoding")
        require(self.lr is None or self.lr >= 0, f"position.lr={self.lr} must be null or >= 0")

    def as_node(self) -> dict[str, Any]:
        return {"_target_": self._target_, **self.arguments, "lr": self.lr}


def part_config(values: Any, where: str, targets: Mapping[str, str], own: type, custom: type) -> Any:
    """A backbone or position node as its schema: ours checked key by key, the user's own split into
    the options we apply and the arguments its target receives. ``kind`` (DETR-style names, older
    checkpoints) still selects one of ours."""
    if isinstance(values, (own, custom)):
        return values
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    values = dict(values or {})
    if "kind" in values:
        kind = values.pop("kind")
        require(kind in targets, f"{where}.kind={kind!r} is not one of {', '.join(targets)}")
        require(
            values.get("_target_") in (None, targets[kind]),
            f"{where}.kind={kind!r} and {where}._target_={values.get('_target_')!r} disagree; set only _target_",
        )
        values["_target_"] = targets[kind]
    target = values.get("_target_", own._target_)
    if not isinstance(target, str) or own_kind(target, targets) is not None or is_own(target):
        return structured(own, values, where)
    option_names = {f.name for f in fields(custom)} - {"_target_", "arguments"}
    options = {name: values.pop(name) for name in list(values) if name in option_names}
    target = values.pop("_target_")
    arguments = {**values.pop("arguments", {}), **values}
    return structured(custom, {"_target_": target, "arguments": arguments, **options}, where)


def backbone_config(values: Any) -> BackboneConfig | CustomBackboneConfig:
    return part_config(values, "backbone", BACKBONE_TARGETS, BackboneConfig, CustomBackboneConfig)


def position_config(values: Any) -> PositionConfig | CustomPositionConfig:
    return part_config(values, "position", POSITION_TARGETS, PositionConfig, CustomPositionConfig)


@dataclass
class JoinerConfig:
    backbone: BackboneConfig | CustomBackboneConfig = field(default_factory=BackboneConfig)
    position: PositionConfig | CustomPositionConfig = field(default_factory=PositionConfig)
    hidden_dim: int = 256
    lr_backbone: float = 1e-5

    def __post_init__(self) -> None:
        require(
            self.hidden_dim > 0 and self.hidden_dim % 2 == 0,
            f"hidden_dim={self.hidden_dim} must be a positive even number (half for rows, half for columns)",
        )
        require(self.lr_backbone >= 0, f"lr_backbone={self.lr_backbone} must be >= 0 (0 freezes the backbone)")
        require(
            self.lr_backbone > 0 or not self.backbone.trainable_layers,
            f"backbone.trainable_layers={self.backbone.trainable_layers} trains stages that lr_backbone=0 "
            "would never update; set lr_backbone > 0 or trainable_layers=0",
        )

    @property
    def train_backbone(self) -> bool:
        return self.lr_backbone > 0

    @property
    def position_lr(self) -> float:
        return self.lr_backbone if self.position.lr is None else self.position.lr

    @classmethod
    def from_args(cls, args: Any) -> JoinerConfig:
        """From our config (dataclass, dict or DictConfig) or from DETR's or Deformable-DETR's argparse namespace."""
        if isinstance(args, JoinerConfig):
            return args
        get = args.get if isinstance(args, Mapping) else lambda key, default=None: getattr(args, key, default)
        if isinstance(get("backbone"), str):
            return cls._from_detr_args(get)
        return cls(
            backbone=backbone_config(get("backbone")),
            position=position_config(get("position")),
            hidden_dim=get("hidden_dim", 256),
            lr_backbone=get("lr_backbone", 1e-5),
        )

    @classmethod
    def _from_detr_args(cls, get) -> JoinerConfig:
        name: str = get("backbone")
        if name.startswith("timm_"):
            kind, name = "timm", name.removeprefix("timm_")
        elif name.endswith(("-gn", "_gn")):
            kind, name = "groupnorm", name[:-3]
        else:
            kind = "torchvision"
        encoding = get("position_embedding", "sine")
        require(
            encoding in DETR_POSITION_NAMES,
            f"position_embedding={encoding!r} is not one of {', '.join(DETR_POSITION_NAMES)}",
        )
        masks = bool(get("masks", False))
        # Deformable-DETR's namespace has num_feature_levels: layers 2-4 (or layer4 alone), per-level
        # channel lists, and its sine encoding counted from pixel centres
        deformable = get("num_feature_levels") is not None
        backbone = BackboneConfig(
            _target_=BACKBONE_TARGETS[kind],
            name=name,
            dilation=bool(get("dilation", False)),
            return_interm_layers=masks and not deformable,
            levels=([2, 3, 4] if masks or get("num_feature_levels") > 1 else [4]) if deformable else None,
            freeze=bool(get("freeze_backbone", False)),
            # the reference code path, for bit-identical numbers; our configs default to the fast paths
            channels_last=False,
            fold_frozen_bn=False,
        )
        position = PositionConfig(
            _target_=POSITION_TARGETS[DETR_POSITION_NAMES[encoding]], normalize=True, offset=-0.5 if deformable else 0.0
        )
        return cls(backbone, position, hidden_dim=get("hidden_dim", 256), lr_backbone=get("lr_backbone", 1e-5))
