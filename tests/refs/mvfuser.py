"""MFuser's MVFuser (devinxzhang/MFuser adapter_module.py: MVFuser.forward, the
parameter names and constructor) with mamba_ssm's ``selective_scan_ref`` and
``rms_norm_ref`` (RMSNormGated), restated in torch. Switches for the two easy-to-miss
details (dt bias added twice, norm before gate) let a test show that each one matters."""

import math

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's selective_scan_ref for real A and (batch, state, length) B/C, sequential
    over time; its argument order."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    inp = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[2]):
        h = decay[:, :, t] * h + inp[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def rms_norm_ref(x, weight, z, eps, norm_before_gate=True):
    """mamba_ssm's rms_norm_ref with group_size=None and no bias."""
    if not norm_before_gate:
        x = x * F.silu(z)
    out = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps) * weight
    return out * F.silu(z) if norm_before_gate else out


class TorchRMSNormGated(torch.nn.Module):
    def __init__(self, d, eps=1e-5, norm_before_gate=True):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.register_parameter("bias", None)

    def forward(self, x, z):
        return rms_norm_ref(x, self.weight, z, self.eps, self.norm_before_gate)


class TorchMVFuser(torch.nn.Module):
    """The original MVFuser (adapter_module.py), parameter names and all."""

    def __init__(self, d_model, d_state=8, d_conv=3, expand=1, conv_bias=True, proj_drop=0.1,
                 dt_bias_twice=True, norm_before_gate=True):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.dt_bias_twice = dt_bias_twice
        half = self.d_inner // 2
        self.in_proj = torch.nn.Linear(d_model, self.d_inner, bias=False)
        self.x_proj = torch.nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = torch.nn.Linear(self.dt_rank, half, bias=True)
        std = self.dt_rank**-0.5
        torch.nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(half) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = torch.nn.Parameter(torch.log(torch.arange(1, d_state + 1.0).repeat(half, 1)))
        self.D = torch.nn.Parameter(torch.ones(half))
        self.out_proj = torch.nn.Linear(half, d_model, bias=False)
        self.proj_drop = torch.nn.Dropout(proj_drop)
        self.conv1d_x = torch.nn.Conv1d(half, half, d_conv, groups=half, bias=conv_bias // 2)
        self.conv1d_z = torch.nn.Conv1d(half, half, d_conv, groups=half, bias=conv_bias // 2)
        self.norm = TorchRMSNormGated(half, eps=1e-5, norm_before_gate=norm_before_gate)
        self.scale = torch.nn.Parameter(torch.tensor(0.001))

    def forward(self, hidden_states):
        _, seqlen, _ = hidden_states.shape
        half = self.d_inner // 2
        xz = self.in_proj(hidden_states).transpose(1, 2)
        x, z = xz.chunk(2, dim=1)
        A = -torch.exp(self.A_log)
        x = F.silu(F.conv1d(x, self.conv1d_x.weight, self.conv1d_x.bias, padding="same", groups=half))
        z = F.silu(F.conv1d(z, self.conv1d_z.weight, self.conv1d_z.bias, padding="same", groups=half))
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(-1, half))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        bdl = lambda t: t.reshape(-1, seqlen, t.shape[-1]).transpose(1, 2)  # noqa: E731
        dt = bdl(self.dt_proj(dt))
        # the original passes delta_bias=dt_proj.bias on top of the biased Linear
        y = selective_scan_ref(x, dt, A, bdl(B), bdl(C), self.D, None,
                               self.dt_proj.bias if self.dt_bias_twice else None, True)
        y = self.norm(y.transpose(1, 2), z.transpose(1, 2))
        return self.proj_drop(self.out_proj(y)) * self.scale


def randomize_mvfuser_(module, gen):
    """Move the parameters that start at constants away from them, so they matter."""
    with torch.no_grad():
        module.A_log.add_(0.5 * torch.randn(module.A_log.shape, generator=gen))
        module.D.copy_(torch.randn(module.D.shape, generator=gen))
        module.norm.weight.copy_(1 + 0.3 * torch.randn(module.norm.weight.shape, generator=gen))
        module.scale.fill_(0.5)
        # trained-looking dt biases (softplus around 0.3-1.3) make the double bias visible
        module.dt_proj.bias.copy_(torch.randn(module.dt_proj.bias.shape, generator=gen) * 0.5)
    return module
