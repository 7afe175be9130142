"""The backbone family: torchvision, GroupNorm and timm backbones on one base class, a backbone of the user's own
with its levels declared, frozen BatchNorm (and its folded fast path), stage freezing, layer-wise lr decay, the
simple feature pyramid of one-stride ViTs and timm models on images of any size. The package root re-exports the
public names (``from detr_backbone import Backbone``), as DETR's ``models/backbone.py`` gave them."""
