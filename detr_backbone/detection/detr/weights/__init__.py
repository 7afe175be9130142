"""Published DETR weights under our DETR's names: DETR's own checkpoints and Hugging Face DETR folders."""

from .hugging_face import HUGGING_FACE_DETR
from .official import DETR_CHECKPOINT
from .source import DetrArchitecture, architecture_of_state, is_detr_state

__all__ = ["DETR_CHECKPOINT", "HUGGING_FACE_DETR", "DetrArchitecture", "architecture_of_state", "is_detr_state"]
