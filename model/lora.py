"""LoRA on the UNet's attention projections (ConceptPrism stage 2), and its two file layouts.

Each targeted nn.Linear (to_q, to_k, to_v, to_out.0 of attn1 and attn2) becomes a LoRALinear that
shares the frozen weight and bias Parameters and adds y += (alpha / rank) * up(down(x)). The base
keys stay as they were, so the model loads and saves exactly as before.

Files, both with module paths in diffusers' names:
  peft:  unet.<path>.lora_A.weight [rank, in], unet.<path>.lora_B.weight [out, rank]. The layout
         has no place for alpha: diffusers reads it from the safetensors metadata entry
         `lora_adapter_metadata` (JSON of LoraConfig arguments prefixed `unet.`) and without that
         entry assumes alpha = rank. We always write the entry.
  kohya: lora_unet_<path with _ for .>.lora_down.weight, .lora_up.weight and .alpha (a scalar),
         as A1111, ComfyUI and diffusers read it.
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import unet as unet_lib
from model.errors import UserError
from model.loader import SafetensorsFile, save_safetensors

TARGET = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
# Key endings after the module path: (down, up, alpha); the peft layout has no alpha tensor.
SUFFIXES = {"peft": (".lora_A.weight", ".lora_B.weight", None),
            "kohya": (".lora_down.weight", ".lora_up.weight", ".alpha")}
METADATA_KEY = "lora_adapter_metadata"  # where diffusers looks for the LoraConfig


class LoRALinear(nn.Linear):
    """A Linear with a low-rank update. The LoRA factors keep their own dtype (fp32 by default) and
    are cast to the input's dtype in forward, so a bf16 UNet computes in bf16 while the optimizer
    updates fp32 factors."""

    def __init__(self, base: nn.Linear, rank, alpha, dtype=torch.float32, init="gaussian"):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank
        device = base.weight.device
        self.lora_down = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_up = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        # Up is zero, so training starts at the base model. "gaussian" is PEFT's init_lora_weights=
        # "gaussian", which the ConceptPrism authors train with: down ~ N(0, 1/rank^2). "kaiming" is
        # PEFT's default, down initialised like nn.Linear (std ~ 1/sqrt(3 fan_in): 0.016-0.032 at
        # SD1.5's widths). Under Adam the early change of the update scales with down's size, so the
        # kaiming init moves SD1.5's LoRA 8-16x less in the same steps.
        if init == "gaussian":
            nn.init.normal_(self.lora_down, std=1 / rank)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        else:
            raise ValueError(f"LoRA init must be 'gaussian' or 'kaiming', not {init!r}")

    def forward(self, x):
        down, up = self.lora_down.to(x.dtype), self.lora_up.to(x.dtype)
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, down), up)

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _targets(unet):
    return [name for name, m in unet.named_modules() if TARGET.fullmatch(name) and isinstance(m, nn.Linear)]


def _replace(unet, name, module):
    parent, _, child = name.rpartition(".")
    setattr(unet.get_submodule(parent), child, module)


def _lora_modules(unet):
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}


def add_lora(unet, rank=4, alpha=4.0, dtype=torch.float32, init="gaussian"):
    """Wrap every attention projection with a fresh LoRA (init: "gaussian" or "kaiming", see
    LoRALinear); freeze everything else. Returns the new trainable parameters."""
    unet.requires_grad_(False)  # LoRA fine-tuning trains the factors only
    params = []
    for name in _targets(unet):
        module = LoRALinear(unet.get_submodule(name), rank, alpha, dtype, init)
        _replace(unet, name, module)
        params += [module.lora_down, module.lora_up]
    return params


def _without_lora(m: LoRALinear):
    plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    plain.weight, plain.bias = m.weight, m.bias  # the same Parameters: nothing is copied
    return plain


def merge_lora(unet, scale=1.0):
    """Fold each LoRA into its base weight, W += scale * (alpha / rank) * up @ down (computed in fp32),
    and restore plain Linears: sampling then costs nothing extra. Several LoRAs add up: load and
    merge one after the other, each with its own `scale`. Further training needs a new add_lora."""
    for name, m in _lora_modules(unet).items():
        with torch.no_grad():
            delta = (m.scale * scale) * (m.lora_up.float() @ m.lora_down.float())
            m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
        _replace(unet, name, _without_lora(m))


# ---------------------------------------------------------------------------------------------
# files

def _file_name(name, cfg, layout):
    """Module path in a file for one of our module names."""
    path = unet_lib.to_diffusers_name(name + ".weight", cfg).removesuffix(".weight")
    return f"unet.{path}" if layout == "peft" else "lora_unet_" + path.replace(".", "_")


def lora_state_dict(unet, layout):
    """The LoRA tensors under the file keys of `layout` ("peft" or "kohya")."""
    if layout not in SUFFIXES:
        raise ValueError(f"layout must be 'peft' or 'kohya', not {layout!r}")
    modules = _lora_modules(unet)
    if not modules:
        raise ValueError("the UNet has no LoRA: call add_lora or load_lora first")
    down_key, up_key, alpha_key = SUFFIXES[layout]
    out = {}
    for name, m in modules.items():
        prefix = _file_name(name, unet.config, layout)
        out[prefix + down_key], out[prefix + up_key] = m.lora_down.detach(), m.lora_up.detach()
        if alpha_key:
            out[prefix + alpha_key] = torch.tensor(m.alpha)
    return out


def save_lora(unet, path, layout, metadata=None):
    """Write the LoRA as .safetensors in the given layout; `metadata` (str -> str) is kept too."""
    tensors = lora_state_dict(unet, layout)
    # The kohya layout carries alpha as tensors, and diffusers refuses a file that has the entry too.
    header = {k: v for k, v in (metadata or {}).items() if k != METADATA_KEY}
    header["format"] = "pt"
    if layout == "peft":
        modules = _lora_modules(unet)
        ranks = {m.rank for m in modules.values()}
        alphas = {m.alpha for m in modules.values()}
        if len(ranks) > 1 or len(alphas) > 1:
            raise ValueError("the peft layout is written with one rank and alpha for all modules")
        config = {"r": ranks.pop(), "lora_alpha": alphas.pop(),
                  "target_modules": sorted(_file_name(n, unet.config, layout)[len("unet."):] for n in modules)}
        header[METADATA_KEY] = json.dumps({f"unet.{k}": v for k, v in config.items()})
    save_safetensors(tensors, path, header)


def _read(path, unet, targets):
    """{our module name: [down, up, alpha or None]} from a LoRA file in either layout, checked
    against the UNet's targets."""
    if not os.path.isfile(path):
        raise UserError(f"LoRA file {path} does not exist")
    st = SafetensorsFile(path)
    keys = list(st.keys())
    layout = ("kohya" if any(k.startswith("lora_unet_") for k in keys) else
              "peft" if any(k.startswith("unet.") and ".lora_A." in k for k in keys) else None)
    if layout is None:
        raise UserError(f"{path} is not a UNet LoRA in the diffusers/PEFT or kohya layout "
                        f"(first key: {keys[0] if keys else 'none'}); pass a LoRA file")
    ours = {_file_name(n, unet.config, layout): n for n in targets}
    found = {}
    with open(path, "rb") as f:
        for key in keys:
            for slot, suffix in enumerate(SUFFIXES[layout]):
                if suffix and key.endswith(suffix) and key[:-len(suffix)] in ours:
                    name = ours[key[:-len(suffix)]]
                    found.setdefault(name, [None, None, None])[slot] = st.read(key, f)
                    break
            else:
                raise UserError(f"{path} holds {key}, which is not a LoRA weight of this UNet's attention "
                                "projections; it was made for another model or another kind of LoRA")
    for name, (down, up, _) in found.items():
        base = unet.get_submodule(name)
        fits = (down is not None and up is not None and down.dim() == 2
                and down.shape[1] == base.in_features and up.shape == (base.out_features, down.shape[0]))
        if not fits:
            raise UserError(f"{path}: the LoRA for {name} is incomplete or has the wrong shape for this UNet "
                            "(made for another model?)")

    if layout == "peft" and METADATA_KEY in st.metadata:
        try:
            config = json.loads(st.metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise UserError(f"{path}: the {METADATA_KEY} metadata is not JSON; re-export the LoRA") from None
        if config.get("unet.rank_pattern") or config.get("unet.alpha_pattern") or config.get("unet.use_rslora"):
            raise UserError(f"{path} uses per-module ranks/alphas or rsLoRA, which this loader does not read")
        if "unet.lora_alpha" in config:
            for entry in found.values():
                entry[2] = torch.tensor(float(config["unet.lora_alpha"]))
    return found


def load_lora(unet, path, rank=None, alpha=None):
    """Read a LoRA file in either layout into the UNet, adding LoRA modules where needed. Modules the
    file does not cover get none. `alpha` overrides the file's; `rank`, if given, must match.
    Returns the LoRA parameters (for resuming training)."""
    targets = _targets(unet)
    found = _read(path, unet, targets)
    ranks = {down.shape[0] for down, _, _ in found.values()}
    if rank is not None and ranks != {rank}:  # checked before any module changes
        raise UserError(f"{path} has rank {'/'.join(map(str, sorted(ranks)))} LoRA weights, but rank {rank} "
                        "was asked for")
    params = []
    for name in targets:
        base = unet.get_submodule(name)
        if name not in found:  # the file leaves this projection alone
            if isinstance(base, LoRALinear):
                _replace(unet, name, _without_lora(base))
            continue
        down, up, file_alpha = found[name]
        r = down.shape[0]
        # Both ecosystems take alpha = rank (scale 1) when a file does not say.
        a = alpha if alpha is not None else file_alpha.item() if file_alpha is not None else r
        module = LoRALinear(base, r, a, base.lora_down.dtype if isinstance(base, LoRALinear) else torch.float32)
        with torch.no_grad():
            module.lora_down.copy_(down)
            module.lora_up.copy_(up)
        _replace(unet, name, module)
        params += [module.lora_down, module.lora_up]
    return params
