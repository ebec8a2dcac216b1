"""Label tables value by value against the lists of the reference's conversion scripts
(tools/convert_datasets/{gta,synthia,cityscapes}.py in the original MFuser/Rein)."""
import numpy as np
import pytest

from mfuser_jax.data import labels as L


def test_classes_and_palette():
    assert len(L.CLASSES) == 19 and L.CLASSES[0] == "road" and L.CLASSES[18] == "bicycle"
    assert L.CLASSES[10] == "sky" and L.CLASSES[13] == "car"
    assert L.PALETTE.shape == (19, 3) and L.PALETTE.dtype == np.uint8
    assert L.PALETTE[0].tolist() == [128, 64, 128] and L.PALETTE[13].tolist() == [0, 0, 142]
    assert L.IGNORE_INDEX == 255


# GTA5 ids 7, 8, 11, ..., 33 -> trainIds 0..18, every other id 255 (the reference's gta.py).
GTA_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
# SYNTHIA ids 3, 4, 2, ..., 11 -> trainIds 0..8, 10..13, 15, 17, 18 (the reference's synthia.py).
SYN_IDS = [3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]
SYN_TRAIN = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]


@pytest.mark.parametrize("table,lut", [(L.GTA_ID_TO_TRAINID, L.GTA_LUT),
                                       (L.CITYSCAPES_ID_TO_TRAINID, L.CITYSCAPES_LUT)])
def test_gta_and_cityscapes(table, lut):
    assert table == {i: t for t, i in enumerate(GTA_IDS)}
    for v in range(256):
        assert lut[v] == (GTA_IDS.index(v) if v in GTA_IDS else 255), v


def test_synthia():
    for i, t in zip(SYN_IDS, SYN_TRAIN):
        assert L.SYNTHIA_ID_TO_TRAINID[i] == t and L.SYNTHIA_LUT[i] == t
    # The reference script's three extra entries (classes absent from SYNTHIA).
    extra = {k: v for k, v in L.SYNTHIA_ID_TO_TRAINID.items() if k not in SYN_IDS}
    assert extra == {16: 9, 18: 14, 20: 16}
    assert tuple(SYN_TRAIN) == L.SYNTHIA_16_TRAINIDS
    for v in set(range(256)) - set(L.SYNTHIA_ID_TO_TRAINID):
        assert L.SYNTHIA_LUT[v] == 255
    assert L.SYNTHIA_LUT[0] == 255 and L.SYNTHIA_LUT[13] == 255 and L.SYNTHIA_LUT[22] == 255


def test_mapillary():
    expected = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6,
                50: 7, 30: 8, 29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13,
                61: 14, 54: 15, 58: 16, 57: 17, 52: 18}
    assert L.MAPILLARY_ID_TO_TRAINID == expected
    for v in range(256):
        assert L.MAPILLARY_LUT[v] == expected.get(v, 255)
    # every trainId is reachable
    assert set(expected.values()) == set(range(19))


def test_mapillary_by_name_is_reins_conversion():
    """Rein's mapillary2cityscape.py maps by class name: bike lane, crosswalk-plain,
    parking, service lane and crosswalk markings -> road; curb cut, pedestrian area ->
    sidewalk; street light -> pole; sign frame and back -> traffic sign; manhole ignored.
    Everything else as the 25-entry table."""
    names = L.MAPILLARY_V12_CLASSES
    assert len(names) == 66 and names[13] == "Road" and names[65] == "Unlabeled"
    idx = {n: i for i, n in enumerate(names)}
    changed = {"Bike Lane": 0, "Crosswalk - Plain": 0, "Parking": 0, "Service Lane": 0,
               "Lane Marking - Crosswalk": 0, "Curb Cut": 1, "Pedestrian Area": 1,
               "Street Light": 5, "Traffic Sign Frame": 7, "Traffic Sign (Back)": 7,
               "Manhole": None}
    want = dict(L.MAPILLARY_ID_TO_TRAINID)
    for name, train_id in changed.items():
        want.pop(idx[name], None)
        if train_id is not None:
            want[idx[name]] = train_id
    assert L.MAPILLARY_MAPPINGS["by-name"] == want
    assert list(L.MAPILLARY_MAPPINGS)[0] == "by-name"  # the default
    assert L.MAPILLARY_MAPPINGS["25-class"] == L.MAPILLARY_ID_TO_TRAINID


def test_luts_convert_maps_and_sanitise():
    raw = np.array([[7, 33, 0], [255, 26, 34]], np.uint8)
    assert L.GTA_LUT[raw].tolist() == [[0, 18, 255], [255, 13, 255]]
    assert L.TRAINID_LUT[np.array([0, 18, 19, 254, 255])].tolist() == [0, 18, 255, 255, 255]
    assert L.colorize(np.array([[0, 255]])).tolist() == [[[128, 64, 128], [0, 0, 0]]]
