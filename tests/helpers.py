"""Everything the tests share, in one place: tiny random Stable Diffusion models built with
diffusers/transformers in both checkpoint layouts (the references every parity test compares
against), the relative-error measure, the kernel judging rule, and running a script the way a user
does (in-process for speed, or as a subprocess where the exit code and stderr are the point)."""
import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from model import clip, unet, vae
from model.errors import UserError
from model.loader import COMPONENTS, SCHEDULE_KEYS, save_safetensors
from model.tokenizer import write_vocab_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
    """Relative Frobenius error of `a` against the reference `b`, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model, scale=0.1):
    """Default inits leave norms at 1/0 and some biases at 0: make every tensor matter."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(scale * torch.randn_like(p))
    return model.eval()


# -------------------------------------------------------------------------------------------------
# tiny reference models

UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, sample_size=32)
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def pipeline(folder, seed=0):
    """A tiny random StableDiffusionPipeline; its tokenizer files are written into `folder`."""
    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "tokenizer_files")
    os.makedirs(tok_dir, exist_ok=True)
    write_vocab_files(tok_dir)
    return StableDiffusionPipeline(
        vae=randomize(AutoencoderKL(**VAE)), text_encoder=randomize(CLIPTextModel(CLIPTextConfig(**TEXT))),
        tokenizer=CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                                model_max_length=77),
        unet=randomize(UNet2DConditionModel(**UNET)), scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_diffusers_folder(pipe, path):
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def original_state_dict(pipe, with_extras=True):
    """The original single-file layout, made from diffusers' weights by our name maps (diffusers'
    converters map it back exactly: tests/test_loader.py checks)."""
    parts = {"unet": (unet, pipe.unet), "vae": (vae, pipe.vae), "text_encoder": (clip, pipe.text_encoder)}
    out = {}
    for name, (lib, module) in parts.items():
        cfg = lib.config_from_diffusers(dict(module.config) if name != "text_encoder" else module.config.to_dict())
        with torch.device("meta"):
            shapes = COMPONENTS[name][1](cfg).state_dict()
        prefix = COMPONENTS[name][2]
        for key, value in module.state_dict().items():
            if key.endswith("position_ids"):
                continue
            ours = lib.diffusers_name(key, cfg)
            out[prefix + ours] = value.reshape(shapes[ours].shape).clone()
    if with_extras:  # what real files carry and the loader must skip
        for key in SCHEDULE_KEYS:
            out[key] = torch.rand(1000)
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    return out


def write_single_file(pipe, path):
    """Tiny head counts cannot be inferred from weights (SD1.5's can), so the configs ride along
    as metadata, as in the files model.save writes."""
    configs = {"unet_config": dict(pipe.unet.config), "vae_config": dict(pipe.vae.config),
               "text_encoder_config": pipe.text_encoder.config.to_dict()}
    libs = {"unet_config": unet, "vae_config": vae, "text_encoder_config": clip}
    metadata = {k: json.dumps(asdict(libs[k].config_from_diffusers(v))) for k, v in configs.items()}
    metadata["resolution"] = str(pipe.vae.config.sample_size)
    save_safetensors(original_state_dict(pipe), path, metadata)
    return path


# -------------------------------------------------------------------------------------------------
# How the kernel tests judge a result (the flash-attention rule): errors are relative Frobenius
# norms against a float64 reference (they do not hinge on one element's rounding, as a max would).
# fp32 must be within 1e-5. fp16/bf16 must be within twice the error of PyTorch's own computation in
# the same dtype, plus 1e-5 (the fp32 bound: both results round from fp32 arithmetic whose own
# differences are of that order, which matters only when torch's result happens to round exactly).

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # without CUDA, "cpu" means Triton's interpreter (conftest.py)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def each_case_in_each_dtype(cases, case_id, fast):
    """pytest params (case, dtype) for every case in every dtype of DTYPES. The fast subset keeps the
    first `fast` cases, one dtype each, taking the dtypes in turn so that each is there; the other
    pairs are marked slow (the Triton interpreter takes 0.5-3 s a pair)."""
    return [pytest.param(case, dtype, id=f"{case_id(case)}-{dtype}",
                         marks=() if i < fast and j == i % len(DTYPES) else pytest.mark.slow)
            for i, case in enumerate(cases) for j, dtype in enumerate(DTYPES)]


def assert_close_as_torch(ours, torch_same_dtype, ref64, dtype, what=""):
    assert ours.dtype == dtype and ours.shape == ref64.shape, what
    err = rel_err(ours, ref64)
    if dtype == torch.float32:
        assert err <= 1e-5, f"{what}: {err:.2e}"
    else:
        limit = 2 * rel_err(torch_same_dtype, ref64) + 1e-5
        assert err <= limit, f"{what}: ours {err:.2e} > 2 x torch's + 1e-5 = {limit:.2e}"


# -------------------------------------------------------------------------------------------------
# scripts as a user runs them

def script(name, *args, check=True):
    """Run a script in a fresh process: for exit codes, one-line errors and signals."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, name), *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    if check and out.returncode != 0:
        raise AssertionError(f"{name} failed:\n{out.stderr[-3000:]}")
    return out


def run_main(main, *args):
    """Call a script's main(argv) in this process (no interpreter start, no imports to pay);
    returns what it printed to stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main([str(a) for a in args])
    return buffer.getvalue()


def user_error(main, *args):
    """Call a script's main(argv) in this process; it must stop with a UserError, the error that
    `run.report_user_errors` prints as one line and exit 1 (each script has one subprocess test that
    checks that printing). Returns the message, checked to be one line."""
    with pytest.raises(UserError) as caught:
        run_main(main, *args)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


def assert_one_line_error(out, *words):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    for word in words:
        assert word.lower() in errors[0].lower(), errors[0]


def random_photo(seed, size=48):
    """A smooth random picture (never blank): low-resolution noise upsampled."""
    rng = np.random.default_rng(seed)
    small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def photo_folder(path, n=3, captions=True):
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        random_photo(i).save(os.path.join(path, f"{i:02d}.jpg"), quality=95)
        if captions:
            with open(os.path.join(path, f"{i:02d}.txt"), "w") as f:
                f.write(f"a toy on a {['red', 'green', 'blue', 'white'][i % 4]} table")
    return str(path)


def tokens_folder(out, token="<v>", width=32, vectors=1, seed=0):
    """A run folder holding only what stage 1 writes about its token (random vectors, named `token`):
    enough for the checks sample.py makes before it loads a model."""
    from model import run
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    run.save_tokens(str(out), torch.randn(vectors, width, generator=gen), torch.randn(2, 8, width, generator=gen),
                    {"target_token": token, "target_vectors": vectors, "images": ["00.jpg", "01.jpg"],
                     "settings": {"model": "default"}})
    return str(out)
