"""The whole guided sampling loops (DDIM, DPM-Solver++; epsilon and v prediction) against diffusers'
StableDiffusionPipeline on the tiny model."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import model
from model.generate import encode_prompts
from tests import helpers

pytestmark = pytest.mark.slow  # whole sampling loops of diffusers' pipeline: minutes on 2 cores


def ours_and_pipeline_latents(pipe, tmp_path, steps):
    """Our model loaded from the pipeline's weights, the two prompts' contexts, the shared initial
    latents, and the pipeline's final latents for them (guidance 7.5, 32 px)."""
    sd = model.load(helpers.write_single_file(pipe, str(tmp_path / "tiny.safetensors")))
    prompts = ["a photograph of an astronaut riding a horse", "a red striped star on a blue background"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = pipe(prompt=prompts, latents=latents.clone(), num_inference_steps=steps, guidance_scale=7.5,
                      height=32, width=32, output_type="latent").images
    return sd, encode_prompts(sd, prompts), encode_prompts(sd, [""] * 2), latents, theirs


@pytest.mark.parametrize("steps", [50, 20])
def test_guided_sampling_equals_stable_diffusion_pipeline(tmp_path, steps):
    pipe = helpers.pipeline(str(tmp_path / "tok"))
    sd, cond, uncond, latents, theirs = ours_and_pipeline_latents(pipe, tmp_path, steps)
    ours = model.ddim_sample(sd.unet, cond, uncond, latents.clone(), sd.alphas_cumprod, steps=steps, guidance=7.5)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4


# SD's scheduler_config.json as the hub stores it: no timestep_spacing (DPM-Solver++ takes 'linspace')
HUB_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


@pytest.mark.parametrize("sampler,steps,prediction_type", [
    ("dpm", 25, "epsilon"), ("dpm", 10, "epsilon"), ("dpm", 25, "v_prediction"), ("dpm", 10, "v_prediction"),
    ("ddim", 20, "v_prediction")])
def test_samplers_equal_stable_diffusion_pipeline(tmp_path, sampler, steps, prediction_type):
    """The pipeline as the ConceptPrism authors sample (`DPMSolverMultistepScheduler.from_config`),
    and DDIM, for an epsilon and a v-prediction model (the random UNet is either: only the scheduler
    reads its output differently)."""
    pipe = helpers.pipeline(str(tmp_path / "tok"))
    config = dict(HUB_CONFIG, prediction_type=prediction_type)
    pipe.scheduler = (DPMSolverMultistepScheduler if sampler == "dpm" else DDIMScheduler).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    sd, cond, uncond, latents, theirs = ours_and_pipeline_latents(pipe, tmp_path, steps)
    sample = model.schedule.dpm_sample if sampler == "dpm" else model.schedule.ddim_sample
    ours = sample(sd.unet, cond, uncond, latents.clone(), sd.alphas_cumprod, steps=steps, guidance=7.5,
                  prediction_type=prediction_type)
    assert helpers.rel_err(ours, theirs) <= 1e-4
