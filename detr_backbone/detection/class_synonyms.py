"""Names that denote one class in different datasets, so that ``init_from`` carries its row across them.

Each group is one class under every name it goes by (case aside: names match case-insensitively
anyway). The groups come from three sources:

- D-FINE's Objects365 -> COCO class map, wherever the two names differ by more than case. Some pairs
  are close relatives rather than the same thing ("sports ball" is Objects365's "Baseball", "skis"
  its "Skating and Skiing shoes"); they are the map's choices, kept so that a COCO run from an
  Objects365 checkpoint starts every one of its 80 classes from a trained row.
- Objects365's misspelled names with their usual spelling ("Dinning Table", "Bakset").
- Pascal VOC's names where COCO's differ ("motorbike", "sofa", "tvmonitor").

No name belongs to two groups.
"""

from __future__ import annotations

SYNONYMS: tuple[tuple[str, ...], ...] = (
    # COCO, Objects365 (as its files spell it), the usual spelling, Pascal VOC
    ("airplane", "aeroplane"),
    ("motorcycle", "motorbike"),
    ("couch", "sofa"),
    ("potted plant", "pottedplant"),
    ("dining table", "Dinning Table", "diningtable"),
    ("tv", "Moniter/TV", "Monitor/TV", "tvmonitor"),
    ("bird", "Wild Bird"),
    ("handbag", "Handbag/Satchel"),
    ("suitcase", "Luggage"),
    ("skis", "Skating and Skiing shoes"),
    ("sports ball", "Baseball"),
    ("bowl", "Bowl/Basin"),
    ("orange", "Orange/Tangerine"),
    ("teddy bear", "Stuffed Toy"),
    ("hair drier", "Hair Dryer"),
    # Objects365's misspellings
    ("Bakset", "Basket"),
    ("Ballon", "Balloon"),
    ("Billards", "Billiards"),
    ("Extention Cord", "Extension Cord"),
    ("Hotair ballon", "Hot Air Balloon"),
    ("Hamimelon", "Hami Melon"),
    ("Mushroon", "Mushroom"),
    ("Tape Measur/ Ruler", "Tape Measure/Ruler"),
    ("Campel", "Camel"),
    ("Meat ball", "Meatball"),
    ("Buttefly", "Butterfly"),
    ("Noddles", "Noodles"),
    ("Table Teniis paddle", "Table Tennis Paddle"),
)
