"""Read weight files into a flat {name: numpy array} dict.

Formats: PyTorch pickles (.pth/.pt/.bin, plain state dicts or checkpoints with a
'state_dict'/'model'/'module' entry, as mmseg and DINOv2 write them), TorchScript archives
(OpenAI's CLIP .pt files) and .safetensors. PyTorch is imported lazily: it is needed only
for the pickle formats.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import numpy as np

from mfuser_jax.errors import WeightFileError

__all__ = ["WeightFileError", "read_state_dict", "truncate_positions"]

_NESTED_KEYS = ("state_dict", "model", "module", "model_state_dict")


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        elif hasattr(value, "detach"):
            value = value.detach().cpu()
            if str(value.dtype) == "torch.bfloat16":
                value = value.float()
            out[name] = value.numpy()
        elif isinstance(value, np.ndarray):
            out[name] = value
    return out


def _import_torch(path: str):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise WeightFileError(
            f"{path}: reading PyTorch files needs PyTorch; the CPU build is enough: "
            "pip install torch --index-url https://download.pytorch.org/whl/cpu"
        ) from e
    return torch


def _read_torch(path: str) -> dict[str, np.ndarray]:
    torch = _import_torch(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_torchscript = any(n.endswith("/constants.pkl") for n in zf.namelist())
        if is_torchscript:
            module = torch.jit.load(path, map_location="cpu")
            return _flatten(module.state_dict())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Older checkpoints (mmcv) pickle non-tensor metadata: retry without the
        # weights-only guard, which the user opted into by converting the file.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    for key in _NESTED_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return _flatten(obj)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover
        raise WeightFileError(f"{path}: reading .safetensors needs `pip install safetensors`") from e
    return dict(load_file(path))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return the tensors of a weight file as numpy arrays; WeightFileError on any failure."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{path}: no such file")
    try:
        if path.endswith(".safetensors"):
            state = _read_safetensors(path)
        elif path.endswith(".npz"):
            with np.load(path) as data:
                state = {k: data[k] for k in data.files}
        else:
            state = _read_torch(path)
    except WeightFileError:
        raise
    except Exception as e:
        raise WeightFileError(
            f"{path}: not a readable PyTorch, TorchScript or safetensors weight file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not state:
        raise WeightFileError(f"{path}: the file holds no tensors")
    return state


def truncate_positions(table: np.ndarray, context_length: int, name: str) -> np.ndarray:
    """The first ``context_length`` rows of a pretrained text position table: MFuser's text
    towers keep only the positions its prompts use (5 name tokens + the contexts)."""
    if table.shape[0] < context_length:
        raise WeightFileError(f"{name} has {table.shape[0]} positions, fewer than "
                              f"context_length={context_length}")
    return table[:context_length]
