"""MFuser's CLIP towers (devinxzhang/MFuser models/backbones/clip/models.py:
CLIPVisionTransformer, CLIPTextContextEncoder, the init_weights resize) and OpenAI CLIP's
model layout (openai/CLIP clip/model.py), restated in torch with OpenAI's parameter names.
Sequence-first blocks, as in the originals."""

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


class TQuickGELU(tnn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class TBlock(tnn.Module):
    """ResidualAttentionBlock."""

    def __init__(self, w, h, mask=None):
        super().__init__()
        self.attn = tnn.MultiheadAttention(w, h)
        self.ln_1 = tnn.LayerNorm(w)
        self.mlp = tnn.Sequential(OrderedDict(
            c_fc=tnn.Linear(w, 4 * w), gelu=TQuickGELU(), c_proj=tnn.Linear(4 * w, w)))
        self.ln_2 = tnn.LayerNorm(w)
        self.attn_mask = mask

    def forward(self, x):  # (L, N, W), sequence first as in the reference
        m = None if self.attn_mask is None else self.attn_mask[: x.shape[0], : x.shape[0]]
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False,
                          attn_mask=m)[0]
        return x + self.mlp(self.ln_2(x))


class TTransformer(tnn.Module):
    def __init__(self, w, layers, h, mask=None):
        super().__init__()
        self.resblocks = tnn.Sequential(*[TBlock(w, h, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class TVisual(tnn.Module):
    """MFuser's CLIPVisionTransformer image path: prepare_tokens_with_masks + blocks, then
    ln_post(CLS) @ proj (the pooled embedding the JAX tower's __call__ returns)."""

    def __init__(self, res, patch, w, layers, h, out):
        super().__init__()
        self.spatial_size = (res // patch, res // patch)
        self.conv1 = tnn.Conv2d(3, w, patch, patch, bias=False)
        self.class_embedding = tnn.Parameter(torch.randn(w))
        self.positional_embedding = tnn.Parameter(torch.randn(self.spatial_size[0] ** 2 + 1, w))
        self.ln_pre = tnn.LayerNorm(w)
        self.transformer = TTransformer(w, layers, h)
        self.ln_post = tnn.LayerNorm(w)
        self.proj = tnn.Parameter(torch.randn(w, out))

    def forward(self, x):
        x = self.conv1(x)
        B, C, H, Wd = x.shape
        x = x.reshape(B, C, -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(B, 1, C), x], dim=1)
        pos = self.positional_embedding
        cls_pos = pos[0, :] + self.class_embedding  # MFuser adds the class embedding again
        sp = F.interpolate(pos[1:].reshape(1, *self.spatial_size, C).permute(0, 3, 1, 2),
                           size=(H, Wd), mode="bilinear")
        sp = sp.reshape(1, C, H * Wd).permute(0, 2, 1)
        x = x + torch.cat([cls_pos.reshape(1, 1, C), sp], dim=1)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


def causal_mask(n):
    return torch.full((n, n), float("-inf")).triu_(1)


class TCLIP(tnn.Module):
    """OpenAI's CLIP layout (visual.* + text at top level + logit_scale + metadata)."""

    def __init__(self, img, patch, w, layers, heads, vocab, ctx, embed):
        super().__init__()
        self.visual = TVisual(img, patch, w, layers, heads, embed)
        self.transformer = TTransformer(w, layers, heads, causal_mask(ctx))
        self.token_embedding = tnn.Embedding(vocab, w)
        self.positional_embedding = tnn.Parameter(torch.randn(ctx, w))
        self.ln_final = tnn.LayerNorm(w)
        self.text_projection = tnn.Parameter(torch.randn(w, embed))
        self.logit_scale = tnn.Parameter(torch.tensor(2.6592))
        for k, v in dict(input_resolution=img, context_length=ctx, vocab_size=vocab).items():
            self.register_buffer(k, torch.tensor(v))

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
        return self.visual(image), self.encode_text(text)


class TText(tnn.Module):
    """CLIPTextContextEncoder's parameters: names and shapes."""

    def __init__(self, ctx, vocab, w, layers, h, embed):
        super().__init__()
        self.transformer = TTransformer(w, layers, h, causal_mask(ctx))
        self.token_embedding = tnn.Embedding(vocab, w)
        self.positional_embedding = tnn.Parameter(torch.randn(ctx, w) * 0.01)
        self.ln_final = tnn.LayerNorm(w)
        self.text_projection = tnn.Parameter(torch.randn(w, embed) * w ** -0.5)


def context_forward(text_sd, text, context, layers, heads):
    """CLIPTextContextEncoder.forward(text, context), restated over a state dict."""
    sd = {k: torch.as_tensor(np.asarray(v)) for k, v in text_sd.items()}
    ctx_len, width = sd["positional_embedding"].shape
    tr = TTransformer(width, layers, heads, causal_mask(ctx_len))
    tr.load_state_dict({k[len("transformer."):]: v for k, v in sd.items()
                        if k.startswith("transformer.")})
    ln = tnn.LayerNorm(width)
    ln.load_state_dict({"weight": sd["ln_final.weight"], "bias": sd["ln_final.bias"]})
    x_text = F.embedding(text, sd["token_embedding.weight"])
    K, N1, C = x_text.shape
    if context.dim() == 3:
        B, N2, C = context.shape
        eos = (text.argmax(dim=-1) + N2).reshape(1, K).expand(B, K).reshape(-1)
        x_text = x_text.reshape(1, K, N1, C).expand(B, K, N1, C)
        context = context.reshape(B, 1, N2, C).expand(B, K, N2, C)
    else:
        B, K, N2, C = context.shape
        eos = (text.argmax(dim=-1) + N2).reshape(1, K).expand(B, K).reshape(-1)
        x_text = x_text.reshape(1, K, N1, C).expand(B, K, N1, C)
    x = torch.cat([x_text[:, :, 0:1], context, x_text[:, :, 1:]], dim=2).reshape(B * K, N1 + N2, C)
    x = x + sd["positional_embedding"]
    x = tr(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = ln(x)
    return (x[torch.arange(x.shape[0]), eos] @ sd["text_projection"]).reshape(B, K, -1)


def mfuser_init_resize(visual_sd, patch, res):
    """CLIPVisionTransformer.init_weights' resize of the positions and the patch kernel."""
    sd = {k: torch.as_tensor(np.asarray(v)) for k, v in visual_sd.items()}
    spatial = (res // patch, res // patch)
    pos = sd["positional_embedding"]
    width = pos.shape[-1]
    orig = int(pos[1:].shape[0] ** 0.5)
    sp = F.interpolate(pos[1:].reshape(1, orig, orig, width).permute(0, 3, 1, 2), size=spatial,
                       mode="bilinear")
    sp = sp.reshape(width, spatial[0] * spatial[1]).permute(1, 0)
    sd["positional_embedding"] = torch.cat([pos[:1], sp], dim=0)
    sd["conv1.weight"] = F.interpolate(sd["conv1.weight"], size=(patch, patch), mode="bilinear")
    return sd
