"""PyTorch -> Flax NNX weight conversion: file readers, one loader, one rename table per format."""

from mfuser_jax.weights.state_dict import (
    StateDictMismatchError,
    load_torch_state_dict,
    torch_state_dict_of,
)
from mfuser_jax.weights.torch_io import WeightFileError, read_state_dict

__all__ = [
    "StateDictMismatchError",
    "WeightFileError",
    "load_torch_state_dict",
    "read_state_dict",
    "torch_state_dict_of",
]
