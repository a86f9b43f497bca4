"""A from-scratch Stable Diffusion 1.5: the only library the scripts import.

    sd = model.load("v1-5-pruned-emaonly.safetensors", device="cuda", dtype=torch.bfloat16)
    eps = sd.unet(x_t, t, sd.text_encoder(sd.tokenizer(["a photo of a dog"])))
"""
from model.errors import UserError
from model.loader import load, save
from model.schedule import ddim_sample

# With no --model the scripts use this: SD1.5 from the local hub cache (a file or folder works too).
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
