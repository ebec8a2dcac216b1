"""PyTorch restatements of the original modules, the references of the parity tests.

Each module restates one area of the original MFuser code (devinxzhang/MFuser and the
libraries it builds on: OpenAI CLIP, EVA02-CLIP, mamba_ssm, mmcv/mmseg/mmdet) in plain
torch, with the original's parameter names, so that a state dict of a restatement is what
the original holds and its forward is the numerical reference. They are written from the
original code for these tests, never derived from the JAX model. Its docstring names what
each module restates. Import them as ``tests.refs.<area>`` (the repository root is on the
path: pyproject's ``pythonpath``).
"""
