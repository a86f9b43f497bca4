"""The Stable Diffusion VAE (KL autoencoder): images [-1, 1] <-> 8x smaller 4-channel latents.

Module paths follow the original (CompVis) checkpoint under `first_stage_model.`: `encoder.down.I`,
`encoder.mid`, `decoder.up.I`, `quant_conv`, ..., so an original single file loads by name.
`diffusers_name` is the one explicit map from diffusers' AutoencoderKL names.

Latents for the UNet are `mean * scaling_factor`; `decode` takes them unscaled (divide first).
"""
import re
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from model import ops
from model.errors import UserError
from model.unet import Upsample  # nearest x2, then a 3x3 conv: the same in both networks


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; decoder levels have one more
    z_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # latents' std normaliser used by the UNet's training


# Two levels, one res block: still every block kind (channel-changing resnet with nin_shortcut,
# downsample, upsample, mid attention).
TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
NORM_EPS = 1e-6  # every GroupNorm in the SD VAE


def group_norm(groups, ch):
    return nn.GroupNorm(groups, ch, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = group_norm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # The original only has a shortcut projection where the width changes.
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(ops.group_norm_silu(x, self.norm1))
        h = self.conv2(ops.group_norm_silu(h, self.norm2))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in the original."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = group_norm(groups, ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = ops.group_norm_silu(x, self.norm, silu=False)
        # [B, C, H, W] -> [B, 1, HW, C]: one head whose dim is the full width
        q, k, v = (p(y).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        out = ops.attention(q, k, v)
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)  # back to [B, C, H, W]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        # Asymmetric padding (right and bottom only) is what the weights were trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution: res blocks `block.J`, then `downsample` (encoder) or `upsample` (decoder)
    unless it is the innermost / outermost level."""

    def __init__(self, cin, cout, n_blocks, groups, resample=None):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n_blocks)])
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList([
            Level(widths[i - 1] if i else cfg.ch, widths[i], cfg.num_res_blocks, cfg.norm_groups,
                  "down" if i != last else None)
            for i in range(len(widths))])
        self.mid = Mid(widths[-1], cfg.norm_groups)
        self.norm_out = group_norm(cfg.norm_groups, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(ops.group_norm_silu(self.mid(h), self.norm_out))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], cfg.norm_groups)
        # up[i] is resolution level i (same numbering as the encoder), run from the deepest up;
        # each level's input is the width of the level below it.
        self.up = nn.ModuleList([
            Level(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1, cfg.norm_groups,
                  "up" if i != 0 else None)
            for i in range(len(widths))])
        self.norm_out = group_norm(cfg.norm_groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(ops.group_norm_silu(h, self.norm_out))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.scaling_factor = cfg.scaling_factor
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):
        """x [B,3,H,W] in [-1, 1] -> (mean, logvar), each [B,4,H/8,W/8] (unscaled latents)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite, as the original

    def decode(self, z):
        """Unscaled latents (divide by scaling_factor first) -> image, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


# ---------------------------------------------------------------------------------------------
# Configs from other formats, and the diffusers -> original name map

def config_from_diffusers(d):
    """VAEConfig from a diffusers vae/config.json dict."""
    if d.get("shift_factor") is not None:  # SD3/Flux latents are shifted too: a different model family
        raise UserError(f"vae/config.json has shift_factor {d['shift_factor']}: not a Stable Diffusion 1.x/2.x VAE")
    widths = d["block_out_channels"]
    ch = widths[0]
    if any(w % ch for w in widths):
        raise UserError(f"vae/config.json block_out_channels {widths} are not multiples of the first")
    return VAEConfig(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), ch=ch,
        ch_mult=tuple(w // ch for w in widths), num_res_blocks=d.get("layers_per_block", 2),
        z_channels=d.get("latent_channels", 4), norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.18215))


def config_from_state_dict(state_dict):
    """VAEConfig from original-layout keys and shapes. GroupNorm groups and the scaling factor are
    not in the weights: the SD values (32, 0.18215) are used."""
    conv_in = state_dict["encoder.conv_in.weight"].shape
    levels = sum(1 for k in state_dict if re.fullmatch(r"encoder\.down\.\d+\.block\.0\.conv1\.weight", k))
    blocks = sum(1 for k in state_dict if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k))
    ch = conv_in[0]
    return VAEConfig(
        in_channels=conv_in[1], out_channels=state_dict["decoder.conv_out.weight"].shape[0], ch=ch,
        ch_mult=tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
        num_res_blocks=blocks, z_channels=state_dict["post_quant_conv.weight"].shape[0])


# diffusers' sub-names -> the original's: resnets, and the mid attention (both current names and the
# pre-0.14 ones old checkpoints still carry: query/key/value/proj_attn).
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def diffusers_name(name, cfg: VAEConfig):
    """Our (original-layout) key for one diffusers AutoencoderKL key."""
    levels = len(cfg.ch_mult)
    fixed = {"quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
             "decoder.conv_out"}
    module, _, param = name.rpartition(".")
    if param not in ("weight", "bias"):
        raise KeyError(f"not a Stable Diffusion VAE weight: {name}")
    if module in fixed:
        return name
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module)
    if m:
        return f"{m[1]}.norm_out.{param}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets\.([01])\.(\w+)|attentions\.0\.(\w+(?:\.0)?))", module)
    if m and m[4] in _RESNET:
        return f"{m[1]}.mid.block_{int(m[3]) + 1}.{_RESNET[m[4]]}.{param}"
    if m and m[5] in _ATTN:
        return f"{m[1]}.mid.attn_1.{_ATTN[m[5]]}.{param}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)\.(\w+)|downsamplers\.0\.conv)", module)
    if m and int(m[1]) < levels:
        i = int(m[1])
        if m[3] is None and i != levels - 1:
            return f"encoder.down.{i}.downsample.conv.{param}"
        if m[3] is not None and int(m[3]) < cfg.num_res_blocks and m[4] in _RESNET:
            return f"encoder.down.{i}.block.{m[3]}.{_RESNET[m[4]]}.{param}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)\.(\w+)|upsamplers\.0\.conv)", module)
    if m and int(m[1]) < levels:
        i = levels - 1 - int(m[1])  # diffusers counts up_blocks from the deepest level
        if m[3] is None and i != 0:
            return f"decoder.up.{i}.upsample.conv.{param}"
        if m[3] is not None and int(m[3]) <= cfg.num_res_blocks and m[4] in _RESNET:
            return f"decoder.up.{i}.block.{m[3]}.{_RESNET[m[4]]}.{param}"
    raise KeyError(f"not a Stable Diffusion VAE weight: {name}")
