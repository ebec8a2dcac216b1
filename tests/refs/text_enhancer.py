"""MFuser's text enhancer restated in torch: ContextDecoder, its MTEnhancer layers
(self-attention, an MVFuser over [text, visual, text], MLP) and their Attention
(devinxzhang/MFuser models/backbones/clip/models.py), with the original's names."""

import torch

from tests.refs.mvfuser import TorchMVFuser, randomize_mvfuser_


class TorchAttention(torch.nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = torch.nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = torch.nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = torch.nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = torch.nn.Linear(dim, dim)
        self.proj_drop = torch.nn.Dropout(proj_drop)

    def forward(self, q, k, v):
        B, N, C = q.shape
        M = k.shape[1]
        h = self.num_heads
        q = self.q_proj(q).reshape(B, N, h, C // h)
        k = self.k_proj(k).reshape(B, M, h, C // h)
        v = self.v_proj(v).reshape(B, M, h, C // h)
        attn = (torch.einsum("bnkc,bmkc->bknm", q, k) * self.scale).softmax(dim=-1)
        x = torch.einsum("bknm,bmkc->bnkc", attn, v).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TorchMTEnhancer(torch.nn.Module):
    def __init__(self, d_model, nhead, dropout=0.1):
        super().__init__()
        self.self_attn = TorchAttention(d_model, nhead, proj_drop=dropout)
        self.cross_attn = TorchMVFuser(d_model, d_state=16)
        self.norm1 = torch.nn.LayerNorm(d_model)
        self.norm2 = torch.nn.LayerNorm(d_model)
        self.norm3 = torch.nn.LayerNorm(d_model)
        self.dropout = torch.nn.Dropout(dropout)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d_model, d_model * 4),
            torch.nn.GELU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(d_model * 4, d_model),
        )

    def forward(self, x, visual):
        q = self.norm1(x)
        x = x + self.self_attn(q, q, q)
        m = self.cross_attn(torch.cat([self.norm2(x), visual, self.norm2(x)], dim=1))
        x = x + m[:, : x.shape[1], :] + m[:, -x.shape[1]:, :]
        return x + self.dropout(self.mlp(self.norm3(x)))


class TorchContextDecoder(torch.nn.Module):
    def __init__(self, transformer_width=256, transformer_heads=4, transformer_layers=6,
                 visual_dim=1024, dropout=0.1):
        super().__init__()
        ln, lin = torch.nn.LayerNorm, torch.nn.Linear
        self.memory_proj = torch.nn.Sequential(ln(visual_dim), lin(visual_dim, transformer_width),
                                               ln(transformer_width))
        self.text_proj = torch.nn.Sequential(ln(visual_dim), lin(visual_dim, transformer_width))
        self.decoder = torch.nn.ModuleList(
            [TorchMTEnhancer(transformer_width, transformer_heads, dropout) for _ in range(transformer_layers)]
        )
        self.out_proj = torch.nn.Sequential(ln(transformer_width), lin(transformer_width, visual_dim))

    def forward(self, text, visual):
        visual = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, visual)
        return self.out_proj(x)


def random_torch_decoder(width, heads, layers, visual_dim, seed=0):
    """A TorchContextDecoder with random norms, biases and MVFuser constants (eval mode)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ref = TorchContextDecoder(width, heads, layers, visual_dim)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, TorchMVFuser):
                randomize_mvfuser_(m, gen)
    return ref.eval()
