"""The text encoders of Stable Diffusion: token ids [B, 77] -> conditions [B, 77, width].

SD 1.x: OpenAI's CLIP ViT-L text tower (`CLIPTextEncoder`, width 768, quick_gelu). Module paths
follow the original checkpoint under `cond_stage_model.transformer.text_model.` (which is also
transformers' CLIPTextModel under `text_model.`), so either loads by name.

SD 2.x: OpenCLIP's ViT-H text tower (`OpenCLIPTextEncoder`, width 1024, 16 heads, exact GELU), read
at its penultimate block: SD 2 conditions on the output of 23 of the 24 blocks, then the final
LayerNorm. Module paths follow the original checkpoint under `cond_stage_model.model.` (fused
`attn.in_proj_weight`, `mlp.c_fc`, `ln_1`, ...); diffusers folders store the same tower as a
23-layer transformers CLIPTextModel with GELU, fused here on load (`from_transformers`). The last
block, `text_projection` and `logit_scale` of the original file are not used by SD 2 and not kept.

New tokens (textual-inversion style) get ids past the frozen table; their vectors are passed in
as `extra_embeddings` so only they receive gradients and the table is never copied or edited.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.errors import UserError


@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 77
    act: str = "quick_gelu"  # "gelu" (exact erf) for OpenCLIP towers
    layer_norm_eps: float = 1e-5
    layout: str = "openai"  # "openclip": SD 2's tower (OpenCLIPTextEncoder); layers = the blocks used


# The full vocabulary stays so real tokenizer ids (EOS 49407) are rows of the table.
TINY = CLIPConfig(width=32, layers=2, heads=4, mlp_dim=64)
EOS_ID = 49407  # CLIP BPE end-of-text (SD 1's padding too; SD 2 pads with '!'); pooling reads the first one


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids, extra_embeddings=None):
        return embed(ids, self.token_embedding.weight, self.position_embedding.weight, extra_embeddings)


def embed(ids, table, positions, extra_embeddings=None):
    """Token plus position embeddings. Ids past the table read rows of extra_embeddings; both lookups
    use clamped ids and torch.where picks, so gradients reach extra_embeddings only at the new tokens."""
    if extra_embeddings is None:
        x = F.embedding(ids, table)
    else:
        n = table.shape[0]
        new = (ids >= n)[..., None]
        x = torch.where(new, F.embedding((ids - n).clamp(min=0), extra_embeddings.to(table.dtype)),
                        F.embedding(ids.clamp(max=n - 1), table))
    return x + positions[: ids.shape[1]]


class SelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        # [B, L, H*D] -> [B, H, L, D]
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # Causal: ops.attention has no mask argument (and 77-token attention is not worth a kernel).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, width, mlp_dim, act):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)
        self.act = act

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.act)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.layers)])


class CLIPTextEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, ids, extra_embeddings=None, clip_skip=0):
        """ids int64 [B, L] (L <= 77) -> last_hidden_state [B, L, width], after the final LayerNorm.

        extra_embeddings [n_new, width]: vectors of the added tokens, id vocab_size + i -> row i.
        clip_skip: skip that many last layers (1 = penultimate, as SD2 and diffusers' clip_skip);
        the final LayerNorm is still applied.
        """
        x = self.embeddings(ids, extra_embeddings)
        for layer in self.encoder.layers[: len(self.encoder.layers) - clip_skip]:
            x = layer(x)
        return self.final_layer_norm(x)

    def pooled(self, ids, extra_embeddings=None):
        """transformers' pooler_output: the last hidden state at the first EOS, [B, width]."""
        return self.pooled_from_hidden(self(ids, extra_embeddings), ids)

    @staticmethod
    def pooled_from_hidden(hidden, ids):
        # transformers takes ids.argmax() for SD1.5's config (eos_token_id 2); that is the same
        # position for plain ids, but added tokens have larger ids, so look for EOS itself.
        first_eos = (ids == EOS_ID).int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_eos]


# ---------------------------------------------------------------------------------------------
# SD 2.x: OpenCLIP's text tower, module paths as under `cond_stage_model.model.`

class OpenCLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameters (one fused q/k/v projection, out_proj), causal."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = (p.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for p in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head dim), as MHA
        return self.out_proj(out.transpose(1, 2).flatten(2))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width, mlp_dim):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact GELU: OpenCLIP's ViT-H is not quick_gelu


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = OpenCLIPAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = OpenCLIPMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(cfg) for _ in range(cfg.layers)])


class OpenCLIPTextEncoder(nn.Module):
    """SD 2's text encoder: the first `cfg.layers` blocks of the OpenCLIP tower (23 of ViT-H's 24),
    then ln_final. The same interface as CLIPTextEncoder (added-token vectors, pooling)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    @property
    def embeddings(self):
        """`encoder.embeddings.token_embedding` reaches the token table as in CLIPTextEncoder (the
        scripts read it there); this tower keeps it at the top level, as the original file does."""
        return self

    def forward(self, ids, extra_embeddings=None, clip_skip=0):
        """ids int64 [B, L] (L <= 77) -> [B, L, width] after ln_final; as CLIPTextEncoder.forward."""
        x = embed(ids, self.token_embedding.weight, self.positional_embedding, extra_embeddings)
        for block in self.transformer.resblocks[: len(self.transformer.resblocks) - clip_skip]:
            x = block(x)
        return self.ln_final(x)

    def pooled(self, ids, extra_embeddings=None):
        """transformers' pooler_output of the same (23-layer) tower: the output at the first EOS."""
        return self.pooled_from_hidden(self(ids, extra_embeddings), ids)

    pooled_from_hidden = staticmethod(CLIPTextEncoder.pooled_from_hidden)


def build(cfg: CLIPConfig):
    """The text encoder class the config's layout names."""
    return OpenCLIPTextEncoder(cfg) if cfg.layout == "openclip" else CLIPTextEncoder(cfg)


# ---------------------------------------------------------------------------------------------
# Configs from other formats, and the transformers -> original name map

def config_from_diffusers(d):
    """CLIPConfig from a transformers text_encoder/config.json dict (CLIPTextConfig, or a full
    CLIPConfig with a text_config inside). GELU marks SD 2's OpenCLIP tower (stored by diffusers as a
    CLIPTextModel): OpenAI's CLIP towers, SD 1.x's, all use quick_gelu."""
    d = d.get("text_config", d)
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise UserError(f"text_encoder/config.json has hidden_act {act!r}; only quick_gelu and gelu are supported")
    return CLIPConfig(
        vocab_size=d.get("vocab_size", 49408), width=d.get("hidden_size", 768),
        layers=d.get("num_hidden_layers", 12), heads=d.get("num_attention_heads", 12),
        mlp_dim=d.get("intermediate_size", 3072), max_positions=d.get("max_position_embeddings", 77),
        act=act, layer_norm_eps=d.get("layer_norm_eps", 1e-5), layout="openclip" if act == "gelu" else "openai")


OPENCLIP_UNUSED = ("text_projection", "logit_scale")  # in SD 2's file, used by no SD 2 pipeline


def openclip_config_from_state_dict(state_dict):
    """CLIPConfig of SD 2's tower from original `cond_stage_model.model.` keys and shapes. The file
    holds the whole tower (24 blocks for ViT-H); SD 2 uses all but the last (its "penultimate"
    layer), so layers = blocks - 1. Heads are 64 wide, as in every OpenCLIP tower."""
    vocab, width = state_dict["token_embedding.weight"].shape
    blocks = sum(1 for k in state_dict if re.fullmatch(r"transformer\.resblocks\.\d+\.ln_1\.weight", k))
    return CLIPConfig(vocab_size=vocab, width=width, layers=blocks - 1, heads=max(1, width // 64),
                      mlp_dim=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                      max_positions=state_dict["positional_embedding"].shape[0], act="gelu", layout="openclip")


def openclip_unused(key, cfg: CLIPConfig):
    """Whether an original-file key (below `cond_stage_model.model.`) is one SD 2 does not use: the
    blocks past the ones it reads, the projection into CLIP's joint space, the logit scale."""
    m = re.match(r"transformer\.resblocks\.(\d+)\.", key)
    return key in OPENCLIP_UNUSED or (m is not None and int(m[1]) >= cfg.layers)


_OPENCLIP_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def from_transformers(tensors, cfg: CLIPConfig):
    """Our state dict from a transformers CLIPTextModel state dict: renamed for the openai layout,
    renamed and q/k/v fused (q, k, v stacked in that order, as nn.MultiheadAttention's in_proj) for
    the openclip one. Keys that are no weight of ours are kept under their own names, for the
    caller's report; `position_ids` buffers are dropped."""
    out, qkv = {}, {}
    for name, value in tensors.items():
        if name.endswith("position_ids"):
            continue
        if cfg.layout != "openclip":
            try:
                out[diffusers_name(name, cfg)] = value
            except KeyError:
                out[name] = value
            continue
        key = name[len("text_model."):] if name.startswith("text_model.") else name
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".")[-1]] = value
        elif m and int(m[1]) < cfg.layers and m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2][-6]] = value
        elif m and int(m[1]) < cfg.layers and m[2] in _OPENCLIP_NAMES:
            out[f"transformer.resblocks.{m[1]}.{_OPENCLIP_NAMES[m[2]]}.{m[3]}"] = value
        else:
            out[name] = value
    for (layer, kind), parts in qkv.items():
        if len(parts) != 3:
            raise UserError(f"text encoder layer {layer}: the {kind} of q, k and v are not all there")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    return out


def config_from_state_dict(state_dict):
    """CLIPConfig from original-layout keys and shapes. Heads, activation and eps are not in the
    weights: CLIP towers use 64-wide heads, and SD1.x's quick_gelu and 1e-5 are assumed."""
    vocab, width = state_dict["embeddings.token_embedding.weight"].shape
    layers = sum(1 for k in state_dict if re.fullmatch(r"encoder\.layers\.\d+\.layer_norm1\.weight", k))
    return CLIPConfig(
        vocab_size=vocab, width=width, layers=layers, heads=max(1, width // 64),
        mlp_dim=state_dict["encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_positions=state_dict["embeddings.position_embedding.weight"].shape[0])


def diffusers_name(name, cfg: CLIPConfig):
    """Our (original-layout) key for one transformers CLIPTextModel key, with or without the
    `text_model.` prefix. `embeddings.position_ids` is a buffer, not a weight: KeyError like any
    other non-weight (callers skip it)."""
    ours = name[len("text_model."):] if name.startswith("text_model.") else name
    if ours in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                "final_layer_norm.weight", "final_layer_norm.bias"):
        return ours
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])"
                     r"\.(weight|bias)", ours)
    if m and int(m[1]) < cfg.layers:
        return ours
    raise KeyError(f"not a CLIP text encoder weight: {name}")
