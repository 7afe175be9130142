"""COCO's category names by id, the class rows of every COCO-trained DETR.

COCO numbers its 80 detection categories from 1 to 90 with gaps (ids left over from the 91
categories first planned). DETR gives every id its own row, so its class head has 92 rows: row i
is category id i, rows of unused ids are never trained, and row 91 is "no object". Hugging Face's
``id2label`` of the same models lists exactly these names, "N/A" included.
"""
from __future__ import annotations

UNUSED = "N/A"  # the name of the rows whose COCO id names no category

COCO_NAMES: tuple[str, ...] = (
    UNUSED, "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", UNUSED, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", UNUSED, "backpack", "umbrella", UNUSED,
    UNUSED, "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", UNUSED, "wine glass", "cup", "fork", "knife",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", UNUSED, "dining table", UNUSED, UNUSED,
    "toilet", UNUSED, "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", UNUSED, "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip
