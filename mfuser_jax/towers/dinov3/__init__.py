"""DINOv3 ViT tower (model.py) and its weight converter (convert.py)."""
