"""Prompts -> images with the learned tokens: text encoder, DDIM or DPM-Solver++ with guidance,
VAE decode, PNGs.

Shared by sample.py and the validation grids at the end of each training stage.
"""
import contextlib
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model.errors import UserError
from model.schedule import PREDICTION_TYPES, ddim_sample, dpm_sample

# sampler name -> (function, default steps): DDIM 50 is SD's usual setting; DPM-Solver++ 2M at 25
# steps is the ConceptPrism authors' (DPMSolverMultistepScheduler.from_config of SD's config).
SAMPLERS = {"ddim": (ddim_sample, 50), "dpm++": (dpm_sample, 25)}


@torch.no_grad()
def encode_prompts(sd, prompts, extra_embeddings=None):
    """The UNet's context for `prompts`, in the UNet's dtype (the text encoder may run in another:
    stage 1 keeps it in fp32)."""
    weight = sd.unet.out[2].weight
    ids = sd.tokenizer(prompts).to(weight.device)
    return sd.text_encoder(ids, extra_embeddings=extra_embeddings).to(weight.dtype)


@torch.no_grad()
def generate(sd, prompts, extra_embeddings=None, seed=0, steps=None, guidance=7.5, resolution=512, batch=4,
             progress=None, sampler="ddim", prediction_type=None):
    """Images in [0, 1], [len(prompts), 3, H, W] float32 on the CPU. Each image's starting noise
    depends only on the seed and its position, so a run is reproducible batch size aside.
    `sampler` is a name in SAMPLERS; steps None is its default (DDIM 50, DPM-Solver++ 25).
    `prediction_type` (default: the model's, sd.prediction_type) says what the UNet predicts.
    `progress(done, total)` is called after every sampler step of every batch (total = batches x steps)."""
    if sampler not in SAMPLERS:
        raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    sample, default_steps = SAMPLERS[sampler]
    steps = steps or default_steps
    prediction_type = prediction_type or sd.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise UserError("the model does not say what its UNet predicts: pass --prediction_type (v_prediction for "
                        "SD 2.x 768-v, epsilon for a 512 base model)")
    weight = sd.unet.out[2].weight
    latent = resolution // 2 ** (len(sd.vae.config.ch_mult) - 1)  # SD's VAE: 8x smaller
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), 4, latent, latent, generator=generator)
    uncond_one = encode_prompts(sd, [""])
    images = []
    total = math.ceil(len(prompts) / batch) * steps
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        cond = encode_prompts(sd, chunk, extra_embeddings)
        uncond = uncond_one.expand(len(chunk), -1, -1)
        before = start // batch * steps
        step_done = None if progress is None else (lambda done, _, before=before: progress(before + done, total))
        z = sample(sd.unet, cond, uncond, noise[start:start + batch].to(weight.device, weight.dtype),
                   sd.alphas_cumprod, steps=steps, guidance=guidance, progress=step_done,
                   prediction_type=prediction_type)
        x = sd.vae.decode(z / sd.vae.scaling_factor)
        images.append((x.float() / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(images)


def to_pil(image):
    """[3, H, W] in [0, 1] -> an 8-bit RGB image."""
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def grid(images, columns=None):
    """One picture of [N, 3, H, W] images, row by row."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = torch.ones(3, rows * h, columns * w)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        canvas[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return to_pil(canvas)


def save_png(pil_image, path):
    """Atomic, like every output: a killed run leaves no half-written picture, and a failed write (a
    full disk) leaves the previous picture and a one-line UserError."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        pil_image.save(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e}); free some disk space and run again") from None
        raise


@contextlib.contextmanager
def progress_bar(desc):
    """A tqdm bar over generate()'s sampler steps: `with progress_bar("sampling") as p: generate(...,
    progress=p)`. Sampling SD1.5 on a loaded machine can take minutes; the bar shows it is working."""
    with tqdm(desc=desc, unit="step", dynamic_ncols=True) as bar:
        def update(done, total):
            bar.total = total
            bar.update(done - bar.n)
        yield update
