"""model/schedule.py against diffusers' DDIMScheduler and DPMSolverMultistepScheduler with Stable
Diffusion's config."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from model.errors import UserError
from model.schedule import (add_noise, alphas_cumprod, ddim_sample, ddim_step, ddim_timesteps, dpm_sample,
                            dpm_timesteps, velocity)

ABAR = alphas_cumprod()

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="leading")


def scheduler(steps, prediction_type="epsilon"):
    s = DDIMScheduler(**dict(SD_CONFIG, prediction_type=prediction_type))
    s.set_timesteps(steps)
    return s


# SD's scheduler_config.json as the hub stores it (SD 2.1's names v_prediction): no timestep_spacing,
# so DPMSolverMultistepScheduler.from_config takes its own default, 'linspace'.
HUB_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def dpm_scheduler(steps, prediction_type="epsilon", **config):
    s = DPMSolverMultistepScheduler.from_config(dict(HUB_CONFIG, prediction_type=prediction_type, **config))
    s.set_timesteps(steps)
    return s


def test_alphas_cumprod():
    ours = alphas_cumprod()
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    assert torch.equal(ours, DDIMScheduler(**SD_CONFIG).alphas_cumprod)


def test_timesteps():
    assert ddim_timesteps(50, 1000) == list(range(981, 0, -20))
    for steps in (1, 7, 20, 25, 50, 333, 999):
        assert ddim_timesteps(steps, 1000) == scheduler(steps).timesteps.tolist(), steps
    for bad in (0, -3, 1000):
        with pytest.raises(UserError):
            ddim_timesteps(bad, 1000)


@pytest.mark.parametrize("steps", [50, 20])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_every_step_matches_diffusers(steps, eta):
    ref = scheduler(steps)
    gen = torch.Generator().manual_seed(steps)
    for t in ref.timesteps:
        x, eps, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        expected = ref.step(eps, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
        got = ddim_step(x, eps, int(t), int(t) - 1000 // steps, ABAR, eta=eta, noise=noise)
        assert torch.equal(got, expected), int(t)


def test_step_noise_from_generator_and_low_precision():
    """eta > 0 draws its noise from the generator as diffusers does; bf16 rounds as diffusers does."""
    ref = scheduler(20)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (int(ref.timesteps[0]), int(ref.timesteps[-1])):
        expected = ref.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
        got = ddim_step(x, eps, t, t - 50, ABAR, eta=1.0, generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, expected)
        x16, eps16 = x.bfloat16(), eps.bfloat16()
        got = ddim_step(x16, eps16, t, t - 50, ABAR)
        assert got.dtype == torch.bfloat16 and torch.equal(got, ref.step(eps16, t, x16).prev_sample)


@pytest.mark.parametrize("steps", [50, 20])
def test_every_v_prediction_step_matches_diffusers(steps):
    ref = scheduler(steps, "v_prediction")
    gen = torch.Generator().manual_seed(steps)
    for t in ref.timesteps:
        x, v, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        for eta in (0.0, 0.6):
            expected = ref.step(v, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
            got = ddim_step(x, v, int(t), int(t) - 1000 // steps, ABAR, eta=eta, noise=noise,
                            prediction_type="v_prediction")
            assert torch.equal(got, expected), int(t)


def test_velocity_is_diffusers_get_velocity_and_exact_in_low_precision():
    gen = torch.Generator().manual_seed(8)
    z, eps = torch.randn(1000, 4, 2, 2, generator=gen), torch.randn(1000, 4, 2, 2, generator=gen)
    t = torch.arange(1000)
    got = velocity(z, eps, t, ABAR)
    assert torch.allclose(got, DDIMScheduler(**SD_CONFIG).get_velocity(z, eps, t), rtol=0, atol=1e-6)
    # the definition: x_t = sqrt(a) z + sqrt(1-a) eps and v recover z and eps exactly (a + (1-a) = 1)
    a = ABAR.double()[:, None, None, None]
    x_t = add_noise(z.double(), t, eps.double(), ABAR)
    v = velocity(z.double(), eps.double(), t, ABAR).double()
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, z.double(), atol=1e-5)
    got16 = velocity(z.bfloat16(), eps.bfloat16(), t, ABAR)
    assert got16.dtype == torch.bfloat16
    assert torch.equal(got16, velocity(z.bfloat16().float(), eps.bfloat16().float(), t, ABAR).bfloat16())


def test_dpm_timesteps():
    for steps in (1, 7, 10, 20, 25, 50, 333, 999):
        assert dpm_timesteps(steps, 1000) == dpm_scheduler(steps).timesteps.tolist(), steps
        for spacing in ("leading", "trailing"):
            assert dpm_timesteps(steps, 1000, spacing, 1) == \
                dpm_scheduler(steps, timestep_spacing=spacing).timesteps.tolist(), (steps, spacing)
    assert dpm_timesteps(25, 1000)[:3] == [999, 959, 919]
    for bad in (0, 1000):
        with pytest.raises(UserError):
            dpm_timesteps(bad, 1000)
    with pytest.raises(UserError):
        dpm_timesteps(10, 1000, "karras")


class FakeUNet:
    """A fixed random function of x, t and context, linear in each; records its calls."""

    def __init__(self, channels=4, width=16, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(channels, channels, generator=gen) * 0.3
        self.time = torch.randn(channels, generator=gen)
        self.text = torch.randn(width, channels, generator=gen) * 0.2
        self.batches = []

    def __call__(self, x, t, context):
        t = t.expand(x.shape[0]) if t.dim() == 0 else t  # diffusers passes one 0-d timestep
        assert t.dtype == torch.int64 and context.shape[0] == x.shape[0]
        self.batches.append(x.shape[0])
        out = torch.einsum("oc,bchw->bohw", self.mix, x) + (t.float() / 1000)[:, None, None, None] * self.time[:, None, None]
        return out + (context.mean(1) @ self.text)[:, :, None, None]


def diffusers_loop(unet, cond, uncond, latents, steps, guidance, eta, generator, sched=None):
    """StableDiffusionPipeline's denoising loop, by hand."""
    sched = sched or scheduler(steps)
    step_args = dict(eta=eta, generator=generator) if isinstance(sched, DDIMScheduler) else {}
    guided = guidance > 1
    context = torch.cat([uncond, cond]) if guided else cond
    for t in sched.timesteps:
        x_in = torch.cat([latents] * 2) if guided else latents
        eps = unet(sched.scale_model_input(x_in, t), t, context)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = sched.step(eps, t, latents, **step_args).prev_sample
    return latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,guidance", [(25, 7.5), (10, 7.5), (20, 1.0), (1, 7.5), (2, 3.0), (16, 5.0)])
def test_dpm_loop_matches_diffusers(steps, guidance, prediction_type):
    """Every lower-order rule of DPMSolverMultistepScheduler is met: first order at the start and on
    the final step, fewer and more than 15 steps, one and two steps."""
    gen = torch.Generator().manual_seed(11)
    cond, uncond = torch.randn(3, 77, 16, generator=gen), torch.randn(1, 77, 16, generator=gen)
    latents = torch.randn(3, 4, 8, 8, generator=gen)
    unet = FakeUNet()
    done = []
    ours = dpm_sample(unet, cond, uncond, latents, ABAR, steps=steps, guidance=guidance,
                      prediction_type=prediction_type, progress=lambda i, n: done.append((i, n)))
    assert unet.batches == [6 if guidance > 1 else 3] * steps
    assert done == [(i, steps) for i in range(1, steps + 1)]
    expected = diffusers_loop(FakeUNet(), cond, uncond.expand(3, -1, -1), latents, steps, guidance, 0.0, None,
                              sched=dpm_scheduler(steps, prediction_type))
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_dpm_loop_follows_the_configured_spacing(spacing):
    gen = torch.Generator().manual_seed(12)
    cond, uncond = torch.randn(2, 77, 16, generator=gen), torch.randn(2, 77, 16, generator=gen)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    ours = dpm_sample(FakeUNet(), cond, uncond, latents, ABAR, steps=20, spacing=spacing, steps_offset=1)
    expected = diffusers_loop(FakeUNet(), cond, uncond, latents, 20, 7.5, 0.0, None,
                              sched=dpm_scheduler(20, timestep_spacing=spacing))
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("steps", [20, 7])
def test_ddim_v_prediction_loop_matches_diffusers(steps):
    gen = torch.Generator().manual_seed(13)
    cond, uncond = torch.randn(2, 77, 16, generator=gen), torch.randn(2, 77, 16, generator=gen)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    ours = ddim_sample(FakeUNet(), cond, uncond, latents, ABAR, steps=steps, prediction_type="v_prediction")
    expected = diffusers_loop(FakeUNet(), cond, uncond, latents, steps, 7.5, 0.0, None,
                              sched=scheduler(steps, "v_prediction"))
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, ddim_sample(FakeUNet(), cond, uncond, latents, ABAR, steps=steps))
    with pytest.raises(UserError):
        ddim_sample(FakeUNet(), cond, uncond, latents, ABAR, steps=steps, prediction_type="sample")


@pytest.mark.parametrize("steps,guidance,eta", [(50, 7.5, 0.0), (20, 7.5, 0.5), (7, 1.0, 0.0), (20, 3.0, 1.0)])
def test_sampling_loop_matches_diffusers(steps, guidance, eta):
    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(3, 77, 16, generator=gen), torch.randn(3, 77, 16, generator=gen)
    latents = torch.randn(3, 4, 8, 8, generator=gen)
    unet = FakeUNet()
    done = []
    ours = ddim_sample(unet, cond, uncond, latents, ABAR, steps=steps, guidance=guidance, eta=eta,
                       generator=torch.Generator().manual_seed(2), progress=lambda i, n: done.append((i, n)))
    # One unet call per step, uncond and cond batched together when guided.
    assert unet.batches == [6 if guidance > 1 else 3] * steps
    assert done == [(i, steps) for i in range(1, steps + 1)]
    expected = diffusers_loop(FakeUNet(), cond, uncond, latents, steps, guidance, eta, torch.Generator().manual_seed(2))
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, latents)


def test_single_unconditional_row_is_shared():
    gen = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(2, 77, 16, generator=gen), torch.randn(1, 77, 16, generator=gen)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    unet = FakeUNet()
    ours = ddim_sample(unet, cond, uncond, latents, ABAR, steps=10)
    assert torch.equal(ours, ddim_sample(unet, cond, uncond.expand(2, -1, -1), latents, ABAR, steps=10))
    assert torch.equal(ours, diffusers_loop(unet, cond, uncond.expand(2, -1, -1), latents, 10, 7.5, 0.0, None))


def test_sampling_follows_the_schedule_it_is_given():
    """One schedule: a fork that trains on another schedule samples on it too (it is an argument,
    its length is T), and it matches diffusers configured with the same betas."""
    other = alphas_cumprod(num_steps=500, beta_start=0.0001, beta_end=0.02)
    gen = torch.Generator().manual_seed(6)
    cond, uncond = torch.randn(2, 77, 16, generator=gen), torch.randn(2, 77, 16, generator=gen)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    ours = ddim_sample(FakeUNet(), cond, uncond, latents, other, steps=10)
    assert not torch.equal(ours, ddim_sample(FakeUNet(), cond, uncond, latents, ABAR, steps=10))
    ref = DDIMScheduler(**dict(SD_CONFIG, num_train_timesteps=500, beta_start=0.0001, beta_end=0.02))
    assert torch.equal(ref.alphas_cumprod, other)
    ref.set_timesteps(10)
    assert ddim_timesteps(10, 500) == ref.timesteps.tolist()


def test_add_noise_is_the_forward_process_and_exact_in_low_precision():
    """z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, as diffusers' add_noise; in bf16 the result is the
    fp32 one rounded once, at every t including 0 and 1 (where bf16 abar would round to 1)."""
    gen = torch.Generator().manual_seed(7)
    z, eps = torch.randn(1000, 4, 2, 2, generator=gen), torch.randn(1000, 4, 2, 2, generator=gen)
    t = torch.arange(1000)
    got = add_noise(z, t, eps, ABAR)
    assert torch.allclose(got, DDIMScheduler(**SD_CONFIG).add_noise(z, eps, t), rtol=0, atol=1e-6)
    z16, eps16 = z.bfloat16(), eps.bfloat16()
    got16 = add_noise(z16, t, eps16, ABAR)
    assert got16.dtype == torch.bfloat16
    assert torch.equal(got16, add_noise(z16.float(), t, eps16.float(), ABAR).bfloat16())
    # what casting abar to bf16 first did: no noise at all at t = 0 and 1
    abar16 = ABAR.bfloat16()
    assert abar16[0] == 1 and abar16[1] == 1
    assert not torch.equal(got16[:2], z16[:2])
