"""The whole guided DDIM loop against diffusers' StableDiffusionPipeline on the tiny model."""
import pytest
import torch

import model
from model.generate import encode_prompts
from tests import helpers


@pytest.mark.parametrize("steps", [50, 20])
def test_guided_sampling_equals_stable_diffusion_pipeline(tmp_path, steps):
    pipe = helpers.pipeline(str(tmp_path / "tok"))
    sd = model.load(helpers.write_single_file(pipe, str(tmp_path / "tiny.safetensors")))
    prompts = ["a photograph of an astronaut riding a horse", "a red striped star on a blue background"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = pipe(prompt=prompts, latents=latents.clone(), num_inference_steps=steps, guidance_scale=7.5,
                      height=32, width=32, output_type="latent").images
    cond, uncond = encode_prompts(sd, prompts), encode_prompts(sd, [""] * 2)
    ours = model.ddim_sample(sd.unet, cond, uncond, latents.clone(), sd.alphas_cumprod, steps=steps, guidance=7.5)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4
