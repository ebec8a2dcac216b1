"""Cityscapes' 19 evaluation classes, their palette, and id -> trainId tables.

Every dataset is brought to Cityscapes trainIds (0..18, 255 = ignore). The GTA5 and
SYNTHIA tables follow the reference conversion scripts
(devinxzhang/MFuser tools/convert_datasets/{gta,synthia}.py); Mapillary Vistas v1.2 has
two conversions (66 -> 19): by class name, as Rein's mapillary2cityscape.py does (the data
tree the reference's README shows; the default), and the 25-entry table of other DGSS code
(e.g. DAFormer/HRDA's and tue-mps/benchmark-vfm-ss's conversions). They differ on 11
classes (``MAPILLARY_MAPPINGS``).
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)

PALETTE = np.array(
    [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
     [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
     [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70],
     [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32]],
    dtype=np.uint8,
)

# Cityscapes labelIds (as in *_gtFine_labelIds.png); GTA5 uses the same id space.
CITYSCAPES_ID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
GTA_ID_TO_TRAINID = dict(CITYSCAPES_ID_TO_TRAINID)

# SYNTHIA RAND_CITYSCAPES class ids (first channel of GT/LABELS/*.png). The reference
# script also maps terrain (16), truck (18) and train (20), which never occur in
# SYNTHIA: the 16 evaluated classes are the remaining entries.
SYNTHIA_ID_TO_TRAINID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
    10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}
# trainIds SYNTHIA actually contains (its 16-class protocol).
SYNTHIA_16_TRAINIDS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)

# Mapillary Vistas v1.2 (66 classes, index PNGs) -> Cityscapes trainIds.
MAPILLARY_ID_TO_TRAINID = {
    13: 0,   # construction--flat--road
    24: 0,   # marking--general (lane marking)
    41: 0,   # object--manhole
    2: 1,    # construction--barrier--curb
    15: 1,   # construction--flat--sidewalk
    17: 2,   # construction--structure--building
    6: 3,    # construction--barrier--wall
    3: 4,    # construction--barrier--fence
    45: 5,   # object--support--pole
    47: 5,   # object--support--utility-pole
    48: 6,   # object--traffic-light
    50: 7,   # object--traffic-sign--front
    30: 8,   # nature--vegetation
    29: 9,   # nature--terrain
    27: 10,  # nature--sky
    19: 11,  # human--person
    20: 12,  # human--rider--bicyclist
    21: 12,  # human--rider--motorcyclist
    22: 12,  # human--rider--other-rider
    55: 13,  # object--vehicle--car
    61: 14,  # object--vehicle--truck
    54: 15,  # object--vehicle--bus
    58: 16,  # object--vehicle--on-rails
    57: 17,  # object--vehicle--motorcycle
    52: 18,  # object--vehicle--bicycle
}


# Mapillary Vistas v1.2 class names ("readable" in its config_v1.2.json), by class index.
MAPILLARY_V12_CLASSES = (
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane",
    "Crosswalk - Plain", "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road",
    "Service Lane", "Sidewalk", "Bridge", "Building", "Tunnel", "Person", "Bicyclist",
    "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk", "Lane Marking - General",
    "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner", "Bench",
    "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box",
    "Mailbox", "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole",
    "Traffic Sign Frame", "Utility Pole", "Traffic Light", "Traffic Sign (Back)",
    "Traffic Sign (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan",
    "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow",
    "Car Mount", "Ego Vehicle", "Unlabeled",
)


def mapillary_table_by_name(class_names=MAPILLARY_V12_CLASSES) -> dict[int, int]:
    """Mapillary index -> trainId by class name: the rule of w1oves/Rein
    tools/convert_datasets/mapillary2cityscape.py (from openseg.pytorch). Names are
    lower-cased without spaces and hyphens; an exact Cityscapes name wins, then the first
    matching substring rule below; anything else is ignored."""
    exact = {c.replace(" ", ""): i for i, c in enumerate(CLASSES)}
    substring_rules = (
        (("trafficsign", "front", "back"), 7),   # traffic sign (front, back, frame)
        (("onrail",), 16),                       # train
        (("cyclist", "rider"), 12),              # rider
        (("pole", "streetlight"), 5),            # pole
        (("curb", "pedestrianarea"), 1),         # sidewalk (curb, curb cut)
        (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), 0),
    )
    table = {}
    for index, name in enumerate(class_names):
        key = name.lower().replace(" ", "").replace("-", "")
        if key in exact:
            table[index] = exact[key]
            continue
        for substrings, train_id in substring_rules:
            if any(s in key for s in substrings):
                table[index] = train_id
                break
    return table


def make_lut(table: dict[int, int]) -> np.ndarray:
    """256-entry uint8 lookup: ``lut[label]`` converts a whole uint8 label map at once."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for k, v in table.items():
        lut[k] = v
    return lut


CITYSCAPES_LUT = make_lut(CITYSCAPES_ID_TO_TRAINID)
GTA_LUT = make_lut(GTA_ID_TO_TRAINID)
SYNTHIA_LUT = make_lut(SYNTHIA_ID_TO_TRAINID)
MAPILLARY_LUT = make_lut(MAPILLARY_ID_TO_TRAINID)
# prepare_data.py mapillary --mapillary_mapping NAME; the first is the default.
MAPILLARY_MAPPINGS = {
    "by-name": mapillary_table_by_name(),    # Rein's conversion (the reference's data tree)
    "25-class": MAPILLARY_ID_TO_TRAINID,     # DAFormer/HRDA-style table
}

# Training-time sanitiser: trainIds 0..18 stay, anything else becomes ignore.
TRAINID_LUT = make_lut({i: i for i in range(NUM_CLASSES)})


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) trainIds -> (H, W, 3) uint8 Cityscapes colours (ignore is black)."""
    pal = np.zeros((256, 3), np.uint8)
    pal[:NUM_CLASSES] = PALETTE
    return pal[np.asarray(label, dtype=np.uint8)]
