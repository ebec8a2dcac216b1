"""MFuser's tqdm head restated in torch: tqdmHead and tqdmMSDeformAttnPixelDecoder the way
the original constructors build them (devinxzhang/MFuser tqdm_head.py,
tqdm_msdeformattn_pixel_decoder.py), with mmcv 1.5's MultiheadAttention ->
torch.nn.MultiheadAttention, FFN, BaseTransformerLayer, MultiScaleDeformableAttention with
its grid_sample reference and constructor-time inits, mmseg's SinePositionalEncoding and
MlvlPointGenerator; the same module names, so its state dict defines the expected keys and
parameter count, and its forward is the numerical reference. Sequence-first, NCHW, as in
mmcv/mmseg.
"""

import math

import torch
import torch.nn as tnn
import torch.nn.functional as F

# The released CLIP config (mfuser_clip_vit-l_1e-4_20k-g2c-512.py, decode_head). Both FFNs
# are 2048 wide: mmcv's BaseTransformerLayer copies the layer's deprecated
# `feedforward_channels=2048` over `ffn_cfgs.feedforward_channels=1024`.
FULL_TORCH = dict(in_channels=(2048,) * 4, feat=256, out=256, num_classes=19, queries=19,
                  levels=3, text_dim=768, groups=32, pd_layers=6, pd_heads=8, points=4,
                  pd_ffn=2048, dec_layers=9, dec_heads=8, dec_ffn=2048)


def torch_cfg(c):
    """THead's config for a TqdmHead keyword config ``c``."""
    return dict(in_channels=c["in_channels"], feat=c["feat_channels"], out=c["out_channels"],
                num_classes=c["num_classes"], queries=c["num_queries"], levels=3,
                text_dim=c["text_dim"], groups=c["num_groups"],
                pd_layers=c["pixel_decoder_layers"], pd_heads=c["pixel_decoder_heads"],
                points=c["num_points"], pd_ffn=c["pixel_decoder_ffn_channels"],
                dec_layers=c["num_decoder_layers"], dec_heads=c["decoder_heads"],
                dec_ffn=c["decoder_ffn_channels"])


def t_sine_pos(b, h, w, num_feats, temperature=10000, scale=2 * math.pi, eps=1e-6):
    not_mask = torch.ones(b, h, w, dtype=torch.int)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).view(b, h, w, -1)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).view(b, h, w, -1)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class TConvModule(tnn.Module):
    def __init__(self, cin, cout, k, bias, groups, relu):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
        self.gn = tnn.GroupNorm(groups, cout)
        self.relu = relu

    def forward(self, x):
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class TMHA(tnn.Module):  # mmcv MultiheadAttention
    def __init__(self, e, heads):
        super().__init__()
        self.attn = tnn.MultiheadAttention(e, heads)

    def forward(self, query, key, value, query_pos=None, key_pos=None, attn_mask=None, **kw):
        out = self.attn(query + query_pos, key + key_pos, value, attn_mask=attn_mask)[0]
        return query + out


def t_msda_core(value, shapes, sampling_locations, attention_weights):
    bs, _, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1
    samples = []
    for lvl, v in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        v = v.flatten(2).transpose(1, 2).reshape(bs * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    a = attention_weights.transpose(1, 2).reshape(bs * heads, 1, q, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(bs, heads * d, q)
    return out.transpose(1, 2)


class TMSDA(tnn.Module):  # mmcv MultiScaleDeformableAttention, batch_first=False
    def __init__(self, e, heads, levels, points):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = tnn.Linear(e, heads * levels * points * 2)
        self.attention_weights = tnn.Linear(e, heads * levels * points)
        self.value_proj = tnn.Linear(e, e)
        self.output_proj = tnn.Linear(e, e)

    def forward(self, query, key, value, query_pos=None, reference_points=None,
                spatial_shapes=None, **kw):
        identity = query
        query = (query + query_pos).permute(1, 0, 2)
        value = value.permute(1, 0, 2)
        bs, nq, _ = query.shape
        value = self.value_proj(value).view(bs, value.shape[1], self.heads, -1)
        off = self.sampling_offsets(query).view(bs, nq, self.heads, self.levels, self.points, 2)
        aw = self.attention_weights(query).view(bs, nq, self.heads, self.levels * self.points)
        aw = aw.softmax(-1).view(bs, nq, self.heads, self.levels, self.points)
        ss = torch.as_tensor(spatial_shapes)
        normalizer = torch.stack([ss[..., 1], ss[..., 0]], -1).float()
        loc = reference_points[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
        out = self.output_proj(t_msda_core(value, spatial_shapes, loc, aw))
        return out.permute(1, 0, 2) + identity


class TFFN(tnn.Module):
    def __init__(self, e, hidden):
        super().__init__()
        self.layers = tnn.Sequential(
            tnn.Sequential(tnn.Linear(e, hidden), tnn.ReLU(), tnn.Dropout(0.0)),
            tnn.Linear(hidden, e), tnn.Dropout(0.0))

    def forward(self, x):
        return x + self.layers(x)


class TLayer(tnn.Module):  # mmcv BaseTransformerLayer, post-norm
    def __init__(self, attentions, e, hidden, order):
        super().__init__()
        self.order = order
        self.attentions = tnn.ModuleList(attentions)
        self.ffns = tnn.ModuleList([TFFN(e, hidden)])
        self.norms = tnn.ModuleList([tnn.LayerNorm(e) for op in order if op == "norm"])

    def forward(self, query, key, value, query_pos, key_pos, attn_masks=None, **kw):
        attn_masks = attn_masks or [None] * len(self.attentions)
        a = n = 0
        for op in self.order:
            if op == "self_attn":
                query = self.attentions[a](query, query, query, query_pos=query_pos,
                                           key_pos=query_pos, attn_mask=attn_masks[a], **kw)
                a += 1
            elif op == "cross_attn":
                query = self.attentions[a](query, key, value, query_pos=query_pos,
                                           key_pos=key_pos, attn_mask=attn_masks[a], **kw)
                a += 1
            elif op == "norm":
                query = self.norms[n](query)
                n += 1
            else:
                query = self.ffns[0](query)
        return query


class TSeq(tnn.Module):  # DetrTransformerDecoder
    def __init__(self, layers, e):
        super().__init__()
        self.layers = tnn.ModuleList(layers)
        self.post_norm = tnn.LayerNorm(e)


class TPixelDecoder(tnn.Module):
    def __init__(self, c):
        super().__init__()
        ins, e, lv = c["in_channels"], c["feat"], c["levels"]
        self.strides = [4, 8, 16, 32]
        n_in = len(ins)
        self.n_in, self.lv = n_in, lv
        self.input_convs = tnn.ModuleList([TConvModule(ins[i], e, 1, True, c["groups"], False)
                                           for i in range(n_in - 1, n_in - lv - 1, -1)])
        order = ("self_attn", "norm", "cross_attn", "norm", "ffn", "norm")  # config override
        self.encoder = TSeq([TLayer([TMSDA(e, c["pd_heads"], lv, c["points"]),
                                     TMHA(e, c["pd_heads"])], e, c["pd_ffn"], order)
                             for _ in range(c["pd_layers"])], e)
        self.level_encoding = tnn.Embedding(lv, e)
        self.lateral_convs = tnn.ModuleList()
        self.output_convs = tnn.ModuleList()
        for i in range(n_in - lv - 1, -1, -1):
            self.lateral_convs.append(TConvModule(ins[i], e, 1, False, c["groups"], False))
            self.output_convs.append(TConvModule(e, e, 3, False, c["groups"], True))
        self.mask_feature = tnn.Conv2d(e, c["out"], 1)
        self.text_proj = tnn.Linear(c["text_dim"], e)
        self.text_pos_embed = tnn.Embedding(c["queries"], e)

    def forward(self, feats, texts):
        bs = feats[0].shape[0]
        inputs, poss, shapes, refs = [], [], [], []
        for i in range(self.lv):
            level_idx = self.n_in - i - 1
            feat = feats[level_idx]
            h, w = feat.shape[-2:]
            proj = self.input_convs[i](feat)
            pos = t_sine_pos(bs, h, w, proj.shape[1] // 2)
            pos = self.level_encoding.weight[i].view(1, -1, 1, 1) + pos
            stride = self.strides[level_idx]
            sx = (torch.arange(w) + 0.5) * stride
            sy = (torch.arange(h) + 0.5) * stride
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            ref = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
            refs.append(ref / (torch.tensor([[w, h]]) * stride))
            inputs.append(proj.flatten(2).permute(2, 0, 1))
            poss.append(pos.flatten(2).permute(2, 0, 1))
            shapes.append((h, w))
        query = torch.cat(inputs, 0)
        pos = torch.cat(poss, 0)
        ref = torch.cat(refs, 0)[None, :, None].repeat(bs, 1, self.lv, 1)
        text = self.text_proj(texts).permute(1, 0, 2)
        text_pos = self.text_pos_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        for layer in self.encoder.layers:
            query = layer(query, text, text, pos, text_pos, reference_points=ref,
                          spatial_shapes=shapes)
        memory = self.encoder.post_norm(query).permute(1, 2, 0)
        outs = torch.split(memory, [h * w for h, w in shapes], dim=-1)
        outs = [x.reshape(bs, -1, h, w) for x, (h, w) in zip(outs, shapes)]
        for i in range(self.n_in - self.lv - 1, -1, -1):
            cur = self.lateral_convs[i](feats[i])
            y = cur + F.interpolate(outs[-1], size=cur.shape[-2:], mode="bilinear",
                                    align_corners=False)
            outs.append(self.output_convs[i](y))
        return self.mask_feature(outs[-1]), outs[: self.lv]


class THead(tnn.Module):  # tqdmHead
    def __init__(self, c):
        super().__init__()
        e, lv = c["feat"], c["levels"]
        self.lv, self.heads = lv, c["dec_heads"]
        self.pixel_decoder = TPixelDecoder(c)
        order = ("cross_attn", "norm", "self_attn", "norm", "ffn", "norm")
        self.transformer_decoder = TSeq(
            [TLayer([TMHA(e, c["dec_heads"]), TMHA(e, c["dec_heads"])], e, c["dec_ffn"], order)
             for _ in range(c["dec_layers"])], e)
        self.decoder_input_projs = tnn.ModuleList([tnn.Identity() for _ in range(lv)])
        self.query_embed = tnn.Embedding(c["queries"], e)
        self.text_proj = tnn.Sequential(tnn.Linear(c["text_dim"], e), tnn.ReLU(),
                                        tnn.Linear(e, e))
        self.level_embed = tnn.Embedding(lv, e)
        self.cls_embed = tnn.Linear(e, c["num_classes"] + 1)
        self.mask_embed = tnn.Sequential(tnn.Linear(e, e), tnn.ReLU(), tnn.Linear(e, e),
                                         tnn.ReLU(), tnn.Linear(e, c["out"]))

    def forward_head(self, out, mask_feature, size):
        out = self.transformer_decoder.post_norm(out).transpose(0, 1)
        cls = self.cls_embed(out)
        mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_feature)
        am = F.interpolate(mask, size, mode="bilinear", align_corners=False)
        am = am.flatten(2).unsqueeze(1).repeat((1, self.heads, 1, 1)).flatten(0, 1)
        return cls, mask, am.sigmoid() < 0.5

    def forward(self, feats, texts):
        bs = feats[0].shape[0]
        mask_features, mems = self.pixel_decoder(feats, texts)
        inputs, poss = [], []
        for i in range(self.lv):
            x = self.decoder_input_projs[i](mems[i]).flatten(2).permute(2, 0, 1)
            inputs.append(x + self.level_embed.weight[i].view(1, 1, -1))
            h, w = mems[i].shape[-2:]
            poss.append(t_sine_pos(bs, h, w, x.shape[-1] // 2).flatten(2).permute(2, 0, 1))
        query = self.text_proj(texts).permute(1, 0, 2)
        qpos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        cls, mask, am = self.forward_head(query, mask_features, mems[0].shape[-2:])
        cls_l, mask_l = [cls], [mask]
        for i, layer in enumerate(self.transformer_decoder.layers):
            lvl = i % self.lv
            am[torch.where(am.sum(-1) == am.shape[-1])] = False
            query = layer(query, inputs[lvl], inputs[lvl], qpos, poss[lvl],
                          attn_masks=[am, None])
            cls, mask, am = self.forward_head(query, mask_features,
                                              mems[(i + 1) % self.lv].shape[-2:])
            cls_l.append(cls)
            mask_l.append(mask)
        return cls_l, mask_l


def mmcv_constructor_inits(module):
    """What mmcv 1.5's constructors run on top of torch's defaults."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, TConvModule):  # ConvModule.init_weights -> kaiming_init
                tnn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
                if m.conv.bias is not None:
                    tnn.init.zeros_(m.conv.bias)
            elif isinstance(m, TMSDA):  # MultiScaleDeformableAttention.init_weights
                tnn.init.zeros_(m.sampling_offsets.weight)
                thetas = torch.arange(m.heads, dtype=torch.float32) * (2.0 * math.pi / m.heads)
                grid = torch.stack([thetas.cos(), thetas.sin()], -1)
                grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(m.heads, 1, 1, 2)
                grid = grid.repeat(1, m.levels, m.points, 1)
                for i in range(m.points):
                    grid[:, :, i, :] *= i + 1
                m.sampling_offsets.bias.copy_(grid.view(-1))
                tnn.init.zeros_(m.attention_weights.weight)
                tnn.init.zeros_(m.attention_weights.bias)
                for lin in (m.value_proj, m.output_proj):
                    tnn.init.xavier_uniform_(lin.weight)
                    tnn.init.zeros_(lin.bias)
    return module
