"""The pretrained towers, one folder each (model, weight conversion, tokenizer, fused backbone, spec); registry.py lists them."""
