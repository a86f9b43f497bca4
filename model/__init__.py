"""A from-scratch Stable Diffusion 1.5: the only library the scripts import.

    sd = model.load("v1-5-pruned-emaonly.safetensors", device="cuda", dtype=torch.bfloat16)
    eps = sd.unet(x_t, t, sd.text_encoder(sd.tokenizer(["a photo of a dog"])))
"""
import os

from model.errors import UserError
from model.loader import load, save
from model.schedule import ddim_sample

# With no --model the scripts use the embedded toy model (made by toy/pretrain_tiny.py, described in
# toy/tiny/tiny_sd.md), so a fresh CPU machine runs every script in minutes. Real work passes SD1.5:
# a .safetensors file, a diffusers folder, or a hub id in the local cache. The weights live with the
# toy world that made them, beside this package rather than in it: the library holds no toy code.
TINY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy", "tiny")
DEFAULT_MODEL = os.path.join(TINY_DIR, "tiny_sd.safetensors")
