"""The generic PyTorch -> NNX loader: layout rules per module type, and its error report."""

import numpy as np
import pytest
import torch
from flax import nnx
import jax.numpy as jnp

from mfuser_jax.weights import (
    StateDictMismatchError,
    WeightFileError,
    load_torch_state_dict,
    read_state_dict,
    torch_state_dict_of,
)
from mfuser_jax.nn.layers import TiledConvTranspose


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(6, 5, 2, 2)
        self.bn = torch.nn.BatchNorm2d(5)
        self.gain = torch.nn.Parameter(torch.randn(5))

    def forward(self, x):  # x NHWC like ours
        x = self.fc(x).permute(0, 3, 1, 2)
        x = self.bn(self.up(self.conv(x)))
        return (x * self.gain[:, None, None]).permute(0, 2, 3, 1)


class Net(nnx.Module):
    def __init__(self, rngs, up=nnx.ConvTranspose):
        self.fc = nnx.Linear(3, 4, rngs=rngs)
        self.conv = nnx.Conv(4, 6, (3, 3), padding=1, rngs=rngs)
        self.up = up(6, 5, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
        self.bn = nnx.BatchNorm(5, use_running_average=True, rngs=rngs)
        self.gain = nnx.Param(jnp.zeros(5))

    def __call__(self, x):
        return self.bn(self.up(self.conv(self.fc(x)))) * self.gain[...]


@pytest.fixture
def torch_net():
    torch.manual_seed(0)
    net = TorchNet().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("up", [nnx.ConvTranspose, TiledConvTranspose])
def test_layout_rules_match_pytorch(torch_net, up):
    net = load_torch_state_dict(Net(nnx.Rngs(0), up), torch_net.state_dict())
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    want = torch_net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(net(x)), want, rtol=1e-5, atol=1e-5)


def test_export_inverts_import(torch_net):
    net = load_torch_state_dict(Net(nnx.Rngs(0)), torch_net.state_dict())
    exported = torch_state_dict_of(net)
    for key, value in torch_net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_mismatch_lists_every_problem(torch_net):
    sd = dict(torch_net.state_dict())
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["conv.weight"] = torch.zeros(6, 4, 5, 5)
    with pytest.raises(StateDictMismatchError) as info:
        load_torch_state_dict(Net(nnx.Rngs(0)), sd)
    message = str(info.value)
    assert "fc.bias" in message and "extra.weight" in message
    assert "conv.weight: expected (6, 4, 3, 3)" in message
    assert info.value.missing == ["fc.bias"] and info.value.unexpected == ["extra.weight"]


def test_non_strict_skips_missing_but_not_misshaped(torch_net):
    sd = dict(torch_net.state_dict())
    sd.pop("gain")
    load_torch_state_dict(Net(nnx.Rngs(0)), sd, strict=False)
    sd["fc.weight"] = torch.zeros(2, 2)
    with pytest.raises(StateDictMismatchError, match="fc.weight"):
        load_torch_state_dict(Net(nnx.Rngs(0)), sd, strict=False)


def test_read_state_dict_formats(tmp_path, torch_net):
    from safetensors.torch import save_file

    torch.save({"state_dict": torch_net.state_dict(), "meta": {"epoch": 3}}, tmp_path / "a.pth")
    save_file({k: v.contiguous() for k, v in torch_net.state_dict().items()}, str(tmp_path / "b.safetensors"))
    a = read_state_dict(tmp_path / "a.pth")
    b = read_state_dict(tmp_path / "b.safetensors")
    assert set(a) == set(b) == set(torch_net.state_dict())
    np.testing.assert_array_equal(a["fc.weight"], b["fc.weight"])


def test_read_state_dict_rejects_garbage(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightFileError, match="garbage.pth"):
        read_state_dict(bad)
    with pytest.raises(WeightFileError, match="no such file"):
        read_state_dict(tmp_path / "absent.pth")
