"""The CLIP text encoder of Stable Diffusion 1.x: token ids [B, 77] -> conditions [B, 77, 768].

Module paths follow the original checkpoint under `cond_stage_model.transformer.text_model.`
(which is also transformers' CLIPTextModel under `text_model.`), so either loads by name.

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


# The full vocabulary stays so real tokenizer ids (EOS 49407) are rows of the table.
TINY = CLIPConfig(width=32, layers=2, heads=4, mlp_dim=64)
EOS_ID = 49407  # CLIP BPE end-of-text (also the padding); pooling reads the first one


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids, extra_embeddings=None):
        table = self.token_embedding.weight
        if extra_embeddings is None:
            x = F.embedding(ids, table)
        else:
            # Ids past the table read rows of extra_embeddings; both lookups use clamped ids and
            # torch.where picks, so gradients reach extra_embeddings only at the new tokens.
            n = table.shape[0]
            new = (ids >= n)[..., None]
            x = torch.where(new, F.embedding((ids - n).clamp(min=0), extra_embeddings.to(table.dtype)),
                            F.embedding(ids.clamp(max=n - 1), table))
        return x + self.position_embedding.weight[: ids.shape[1]]


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
# Configs from other formats, and the transformers -> original name map

def config_from_diffusers(d):
    """CLIPConfig from a transformers text_encoder/config.json dict (CLIPTextConfig, or a full
    CLIPConfig with a text_config inside)."""
    d = d.get("text_config", d)
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise UserError(f"text_encoder/config.json has hidden_act {act!r}; only quick_gelu and gelu are supported")
    return CLIPConfig(
        vocab_size=d.get("vocab_size", 49408), width=d.get("hidden_size", 768),
        layers=d.get("num_hidden_layers", 12), heads=d.get("num_attention_heads", 12),
        mlp_dim=d.get("intermediate_size", 3072), max_positions=d.get("max_position_embeddings", 77),
        act=act, layer_norm_eps=d.get("layer_norm_eps", 1e-5))


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
