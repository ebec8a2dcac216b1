"""EVA02-CLIP as MFuser uses it, restated in torch: devinxzhang/MFuser
models/backbones/eva_clip/eva_vit_model.py (Attention with subln, SwiGLU, Block,
EVAVisionTransformer), rope.py (VisionRotaryEmbeddingFast), transformer.py (TextTransformer
with CoOp context) and utils.py (resize_evaclip_pos_embed). Switches (``variants`` of TEVA)
build the tempting wrong variants, so a test can show that each really differs."""

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


def t_rotate_half(x, half_split=False):
    if half_split:  # the GPT-NeoX / LLaMA convention: NOT what EVA does
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x = x.unflatten(-1, (-1, 2))  # '... (d r) -> ... d r', r=2
    x1, x2 = x.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class TRope(tnn.Module):
    """VisionRotaryEmbeddingFast(dim, pt_seq_len, ft_seq_len), freqs_for='lang'."""

    def __init__(self, dim, pt_seq_len, ft_seq_len, half_split=False):
        super().__init__()
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        f = torch.einsum("..., f -> ... f", t, freqs)
        f = f.repeat_interleave(2, dim=-1)  # '... n -> ... (n r)', r=2
        n = ft_seq_len
        f = torch.cat([f[:, None, :].expand(n, n, -1), f[None, :, :].expand(n, n, -1)], dim=-1)
        self.register_buffer("freqs_cos", f.cos().view(-1, f.shape[-1]))
        self.register_buffer("freqs_sin", f.sin().view(-1, f.shape[-1]))
        self.half_split = half_split

    def forward(self, t):
        return t * self.freqs_cos + t_rotate_half(t, self.half_split) * self.freqs_sin


class TAttention(tnn.Module):
    def __init__(self, dim, heads, rope, eps, v):
        super().__init__()
        self.heads, self.scale, self.v = heads, (dim // heads) ** -0.5, v
        self.q_proj = tnn.Linear(dim, dim, bias=False)
        self.k_proj = tnn.Linear(dim, dim, bias=False)
        self.v_proj = tnn.Linear(dim, dim, bias=False)
        self.q_bias = tnn.Parameter(torch.zeros(dim))
        self.v_bias = tnn.Parameter(torch.zeros(dim))
        self.inner_attn_ln = tnn.LayerNorm(dim, eps=eps)
        self.proj = tnn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x):
        b, n, c = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight, self.v_bias if self.v.get("k_bias") else None)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))
        if self.v.get("shift_rope"):  # rope on tokens 0..n-2 instead of the patches 1..n-1
            q = torch.cat((self.rope(q[:, :, :-1]), q[:, :, -1:]), -2)
            k = torch.cat((self.rope(k[:, :, :-1]), k[:, :, -1:]), -2)
        else:
            q = torch.cat((q[:, :, :1], self.rope(q[:, :, 1:])), -2)
            k = torch.cat((k[:, :, :1], self.rope(k[:, :, 1:])), -2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.inner_attn_ln(x))


class TSwiGLU(tnn.Module):
    def __init__(self, dim, hidden, eps, v):
        super().__init__()
        self.w1, self.w2 = tnn.Linear(dim, hidden), tnn.Linear(dim, hidden)
        self.ffn_ln = tnn.LayerNorm(hidden, eps=eps)
        self.w3 = tnn.Linear(hidden, dim)
        self.v = v

    def forward(self, x):
        h = F.silu(self.w1(x)) * self.w2(x)
        return self.w3(h if self.v.get("no_ffn_ln") else self.ffn_ln(h))


class TBlock(tnn.Module):
    def __init__(self, dim, heads, ratio, rope, eps, v):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=eps)
        self.attn = TAttention(dim, heads, rope, eps, v)
        self.norm2 = tnn.LayerNorm(dim, eps=eps)
        self.mlp = TSwiGLU(dim, int(dim * ratio), eps, v)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TPatchEmbed(tnn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = tnn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class TEVA(tnn.Module):
    """EVAVisionTransformer as EVA02-CLIP-L builds it (rope, intp_freq, subln, naiveswiglu).
    ``variants``: half_split, shift_rope, k_bias, no_ffn_ln (each one a wrong variant)."""

    def __init__(self, *, img, patch, dim, heads, depth, ratio, out, pt=16, eps=1e-6,
                 **variants):
        super().__init__()
        grid = img // patch
        self.patch_embed = TPatchEmbed(patch, dim)
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = tnn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.rope = TRope(dim // heads // 2, pt, grid, half_split=variants.get("half_split"))
        self.blocks = tnn.ModuleList(
            [TBlock(dim, heads, ratio, self.rope, eps, variants) for _ in range(depth)]
        )
        self.norm = tnn.LayerNorm(dim, eps=eps)
        self.head = tnn.Linear(dim, out)

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        tokens = []
        for blk in self.blocks:
            x = blk(x)
            tokens.append(x)
        return tokens, self.head(self.norm(x)[:, 0])


def randomize(module, seed, small_input=False):
    """Random values for every parameter of ``module`` (a TEVA or TTextTransformer; default
    inits leave biases (q_bias, v_bias ...) zero and norms at one); returns it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            parent = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in name else ""
            if "norm" in parent or parent.endswith("_ln") or parent.startswith("ln"):
                p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)
            elif name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            if small_input and (name.startswith("patch_embed") or name in ("cls_token",
                                                                          "pos_embed")):
                p.mul_(1e-3)  # tokens with variance ~1e-6: LayerNorm's eps matters
    return module


def visual_state_dict(tmod):
    """TEVA's state dict without the rotary buffers (the loader drops and recomputes them)."""
    return {k: v for k, v in tmod.state_dict().items() if "freqs_" not in k}


class TTextBlock(tnn.Module):
    def __init__(self, w, heads, act):
        super().__init__()
        self.ln_1 = tnn.LayerNorm(w)
        self.attn = tnn.MultiheadAttention(w, heads)
        self.ln_2 = tnn.LayerNorm(w)
        self.mlp = tnn.Sequential()
        self.mlp.add_module("c_fc", tnn.Linear(w, 4 * w))
        self.mlp.add_module("gelu", act)
        self.mlp.add_module("c_proj", tnn.Linear(4 * w, w))

    def forward(self, x, mask):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class TTextTransformer(tnn.Module):
    """open_clip's TextTransformer (exact nn.GELU unless ``act``) with MFuser's CoOp context."""

    def __init__(self, context_length, *, vocab, width, heads, layers, out, act=None):
        super().__init__()
        self.token_embedding = tnn.Embedding(vocab, width)
        self.positional_embedding = tnn.Parameter(torch.zeros(context_length, width))
        self.transformer = tnn.Module()
        self.transformer.resblocks = tnn.ModuleList(
            [TTextBlock(width, heads, act or tnn.GELU()) for _ in range(layers)]
        )
        self.ln_final = tnn.LayerNorm(width)
        self.text_projection = tnn.Parameter(torch.zeros(width, out))
        self.context_length = context_length

    def forward(self, text, context):
        x_text = self.token_embedding(text)
        k, n1, c = x_text.shape
        b, n2, _ = context.shape
        eos = (text.argmax(dim=-1) + n2).reshape(1, k).expand(b, k).reshape(-1)
        x_text = x_text.reshape(1, k, n1, c).expand(b, k, n1, c)
        context = context.reshape(b, 1, n2, c).expand(b, k, n2, c)
        x = torch.cat([x_text[:, :, :1], context, x_text[:, :, 1:]], dim=2).reshape(b * k, -1, c)
        x = x + self.positional_embedding
        mask = torch.full((n1 + n2, n1 + n2), float("-inf")).triu_(1)
        x = x.permute(1, 0, 2)
        for blk in self.transformer.resblocks:
            x = blk(x, mask)
        x = self.ln_final(x.permute(1, 0, 2))
        return (x[torch.arange(x.shape[0]), eos] @ self.text_projection).reshape(b, k, -1)


def clip_state_dict(tvisual, ttext):
    """An EVA02-CLIP-like state dict: visual.* (rope buffers included), text.*, logit_scale."""
    sd = {f"visual.{k}": v for k, v in tvisual.state_dict().items()}
    sd.update({f"text.{k}": v for k, v in ttext.state_dict().items()})
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


def resize_evaclip_pos_embed(pos, new_size):
    """utils.py resize_evaclip_pos_embed on one (1, 1 + g*g, D) tensor."""
    extra, tokens = pos[:, :1], pos[:, 1:]
    g = int(tokens.shape[1] ** 0.5)
    tokens = tokens.reshape(-1, g, g, pos.shape[-1]).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_size, new_size), mode="bicubic",
                           align_corners=False)
    return torch.cat((extra, tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def resize_float16_on_gpu(pos, new_size):
    """resize_evaclip_pos_embed on a float16 table as MFuser runs it: loaded onto the GPU,
    whose bicubic kernel computes a float16 input in float32 and rounds once. On the CPU
    that is the float32 kernel on the same layout, then the rounding (the CPU's float16
    kernel keeps its weights in float16 instead)."""
    return resize_evaclip_pos_embed(pos.float(), new_size).half()
