"""The Stable Diffusion UNet: epsilon = unet(x_t, t, context).

Module paths follow the original (CompVis) checkpoint under `model.diffusion_model.`:
`input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`, `time_embed`, `out`, so an original
single file loads by name. One table (`_name_table`) maps diffusers' names to these and back.

For the batched multi-condition training step the UNet also takes a small table of distinct
conditions plus a per-row index (`context_index`): the cross-attention K/V projections then run
once per condition instead of once per row.
"""
import functools
import math
import re
from dataclasses import astuple, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ops


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with a transformer; the middle always has one
    num_heads: tuple = (8, 8, 8, 8)  # per level (SD1.5: 8 everywhere; SD2.x: channels / 64)
    context_dim: int = 768
    linear_proj: bool = False  # proj_in/proj_out: 1x1 convs in SD1.5, Linear in SD2.x
    norm_groups: int = 32
    upcast_attention: bool = False  # attention in fp32 under fp16/bf16 weights (SD 2.x: see Attention)


TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                  num_heads=(2, 2), context_dim=32)


def timestep_embedding(t, dim):
    """[cos, sin] of t * exp(-ln(1e4) * i / (dim/2)), as SD (diffusers' flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb_dim, groups):
        super().__init__()
        # Index positions are the original Sequential's (SiLU, dropout occupy the gaps).
        self.in_layers = nn.ModuleList([nn.GroupNorm(groups, cin), nn.Identity(), nn.Conv2d(cin, cout, 3, padding=1)])
        self.emb_layers = nn.ModuleList([nn.Identity(), nn.Linear(temb_dim, cout)])
        self.out_layers = nn.ModuleList([nn.GroupNorm(groups, cout), nn.Identity(), nn.Identity(),
                                         nn.Conv2d(cout, cout, 3, padding=1)])
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.in_layers[2](ops.group_norm_silu(x, self.in_layers[0]))
        h = h + self.emb_layers[1](F.silu(temb))[:, :, None, None]
        h = self.out_layers[3](ops.group_norm_silu(h, self.out_layers[0]))
        return self.skip_connection(x) + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given.

    upcast: the attention itself runs in fp32 when the weights are fp16/bf16. SD 2's 768-v model
    overflows fp16 attention scores (64-wide heads at 96x96 latents), which is why its original code
    computes them in fp32 and its diffusers config says `upcast_attention`. In fp32 it changes nothing."""

    def __init__(self, dim, heads, context_dim=None, upcast=False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None, context_index=None):
        context = x if context is None else context
        # [B, L, H*D] -> [B, H, L, D]; with an index, k and v have one row per condition.
        q, k, v = (p(s).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for p, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = ops.attention(q.float(), k.float(), v.float(), kv_index=context_index).to(q.dtype)
        else:
            out = ops.attention(q, k, v, kv_index=context_index)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        inner = 4 * dim
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(inner, dim)])
        self.net[0].proj = nn.Linear(dim, 2 * inner)  # GEGLU: value and gate halves

    def forward(self, x):
        return self.net[2](ops.geglu(self.net[0].proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim, upcast=False):
        super().__init__()
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, context_index):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_index)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, heads, context_dim, groups, linear_proj, upcast=False):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if linear_proj else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, heads, context_dim, upcast)])
        self.proj_out = nn.Linear(ch, ch) if linear_proj else nn.Conv2d(ch, ch, 1)
        self.linear_proj = linear_proj

    def forward(self, x, context, context_index):
        b, c, h, w = x.shape
        y = ops.group_norm_silu(x, self.norm, silu=False)
        if not self.linear_proj:
            y = self.proj_in(y)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, C, H, W] -> [B, HW, C]
        if self.linear_proj:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context, context_index)
        if self.linear_proj:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)  # back to [B, C, H, W]
        if not self.linear_proj:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    """One numbered entry of input_blocks / output_blocks: a ResBlock, then optional layers."""

    def forward(self, x, temb, context, context_index):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, temb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_index)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        ch0, groups = cfg.model_channels, cfg.norm_groups
        temb_dim = 4 * ch0
        self.time_embed = nn.ModuleList([nn.Linear(ch0, temb_dim), nn.Identity(), nn.Linear(temb_dim, temb_dim)])

        def transformer(ch, level):
            return SpatialTransformer(ch, cfg.num_heads[level], cfg.context_dim, groups, cfg.linear_proj,
                                      cfg.upcast_attention)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)])])
        skip_channels, ch = [ch0], ch0
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, ch0 * mult, temb_dim, groups)]
                ch = ch0 * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)

        last = len(cfg.channel_mult) - 1
        self.middle_block = TimestepEmbedSequential([ResBlock(ch, ch, temb_dim, groups), transformer(ch, last),
                                  ResBlock(ch, ch, temb_dim, groups)])

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ch0 * cfg.channel_mult[level], temb_dim, groups)]
                ch = ch0 * cfg.channel_mult[level]
                if level in cfg.attention_levels:
                    layers.append(transformer(ch, level))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.ModuleList([nn.GroupNorm(groups, ch), nn.Identity(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)])

    def forward(self, x, t, context, context_index=None):
        """x [B,C,h,w], t int64 [B] (or a scalar), context [B,S,D] or, with context_index
        (int64 [B]), a table [C,S,D] of distinct conditions that row b reads at context_index[b]."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        temb = timestep_embedding(t, self.config.model_channels).to(x.dtype)
        temb = self.time_embed[2](F.silu(self.time_embed[0](temb)))

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, temb, context, context_index)
            skips.append(h)
        h = self.middle_block(h, temb, context, context_index)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), temb, context, context_index)
        return self.out[2](ops.group_norm_silu(h, self.out[0]))


# ---------------------------------------------------------------------------------------------
# Configs from other formats, and the diffusers -> original name map

def config_from_diffusers(d):
    """UNetConfig from a diffusers unet/config.json dict."""
    levels = len(d["block_out_channels"])
    heads = d.get("attention_head_dim", 8)  # diffusers' name; for SD it holds the head count
    if d.get("num_attention_heads") is not None:
        heads = d["num_attention_heads"]
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * levels
    ch0 = d["block_out_channels"][0]
    if any(c % ch0 for c in d["block_out_channels"]):
        raise ValueError(f"block_out_channels {d['block_out_channels']} are not multiples of the first")
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=ch0,
        channel_mult=tuple(c // ch0 for c in d["block_out_channels"]),
        num_res_blocks=d.get("layers_per_block", 2),
        attention_levels=tuple(i for i, b in enumerate(d["down_block_types"]) if b.startswith("CrossAttn")),
        num_heads=heads, context_dim=d.get("cross_attention_dim", 768),
        linear_proj=bool(d.get("use_linear_projection", False)), norm_groups=d.get("norm_num_groups", 32),
        upcast_attention=bool(d.get("upcast_attention", False)))


def config_from_state_dict(state_dict):
    """UNetConfig from original-layout keys and shapes. Head counts are not in the weights: SD1.5
    uses 8 heads everywhere, SD2.x (context 1024) uses 64-channel heads. SD2.x's attention is
    upcast: its original code computes attention scores in fp32 for every SD 2 model, and diffusers'
    single-file loader configures such a file as SD 2.1 (upcast_attention true)."""
    ch0 = state_dict["input_blocks.0.0.weight"].shape[0]
    res_outs = {}  # input block number -> ResBlock output channels
    attn_blocks = set()
    for key in state_dict:
        m = re.match(r"input_blocks\.(\d+)\.(\d)\.", key)
        if m and m.group(2) == "0" and key.endswith("in_layers.2.weight"):
            res_outs[int(m.group(1))] = state_dict[key].shape[0]
        if m and m.group(2) == "1":
            attn_blocks.add(int(m.group(1)))
    downsamples = sorted(int(k.split(".")[1]) for k in state_dict
                         if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    num_res_blocks = downsamples[0] - 1 if downsamples else len(res_outs)
    levels = len(downsamples) + 1
    block = lambda level, j: 1 + level * (num_res_blocks + 1) + j
    mult = tuple(res_outs[block(level, 0)] // ch0 for level in range(levels))
    context_dim = state_dict["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    linear = len(state_dict["middle_block.1.proj_in.weight"].shape) == 2
    heads = tuple(8 if context_dim == 768 else ch0 * m // 64 for m in mult)
    return UNetConfig(
        in_channels=state_dict["input_blocks.0.0.weight"].shape[1], out_channels=state_dict["out.2.weight"].shape[0],
        model_channels=ch0, channel_mult=mult, num_res_blocks=num_res_blocks,
        attention_levels=tuple(lv for lv in range(levels) if block(lv, 0) in attn_blocks),
        num_heads=heads, context_dim=context_dim, linear_proj=linear, upcast_attention=context_dim == 1024)


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


@functools.lru_cache(maxsize=8)
def _name_table(cfg_fields):
    """diffusers module path -> ours, for every module of a UNet with these config fields: the one
    table both name maps read. Paths below a listed module (a transformer's inside, a conv's
    weight) are the same in both layouts."""
    cfg = UNetConfig(*cfg_fields)
    per_level, levels = cfg.num_res_blocks + 1, len(cfg.channel_mult)
    table = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.attentions.0": "middle_block.1"}

    def resnet(theirs, ours):
        table.update({f"{theirs}.{a}": f"{ours}.{b}" for a, b in _RESNET.items()})

    for i in range(levels):  # diffusers' down block i is level i
        for j in range(cfg.num_res_blocks):
            n = 1 + i * per_level + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
            if i in cfg.attention_levels:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i != levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * per_level}.0.op"
    for j in range(2):
        resnet(f"mid_block.resnets.{j}", f"middle_block.{2 * j}")
    for i in range(levels):  # up block i is level levels - 1 - i
        has_attn = levels - 1 - i in cfg.attention_levels
        for j in range(per_level):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * per_level + j}.0")
            if has_attn:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * per_level + j}.1"
        if i != levels - 1:  # the Upsample, after the ResBlock (and the transformer, if any)
            table[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * per_level + cfg.num_res_blocks}.{1 + has_attn}"
    return table, {ours: theirs for theirs, ours in table.items()}


def _rename(name, table, error):
    """name with its longest module path found in `table` replaced."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:k])
        if module in table:
            return ".".join([table[module], *parts[k:]])
    raise KeyError(f"{error}: {name}")


def diffusers_name(name, cfg: UNetConfig):
    """Our (original-layout) key for one diffusers UNet2DConditionModel key."""
    return _rename(name, _name_table(astuple(cfg))[0], "not a Stable Diffusion UNet weight")


def to_diffusers_name(name, cfg: UNetConfig):
    """The inverse of diffusers_name: the diffusers key for one of our keys (for LoRA exports)."""
    return _rename(name, _name_table(astuple(cfg))[1], "not a UNet weight")
