"""Datasets, label tables, transforms, rare-class sampling and grain pipelines."""
