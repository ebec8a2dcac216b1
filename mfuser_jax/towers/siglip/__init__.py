"""siglip tower: spec.py (what MFuser needs to know), model.py, convert.py."""
