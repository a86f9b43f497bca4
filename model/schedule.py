"""SD1.5's noise schedule and the DDIM sampler with classifier-free guidance.

The numbers are diffusers' `DDIMScheduler` with SD's config (scaled_linear betas, 'leading' timestep
spacing, steps_offset 1, set_alpha_to_one False, no clipping, epsilon prediction), step for step:
tests/test_schedule.py checks every update is bit-identical in fp32.

    z = ddim_sample(unet, cond, uncond, torch.randn(1, 4, 64, 64), steps=50, guidance=7.5)
"""
import torch

from model.errors import UserError

TRAIN_STEPS = 1000


def alphas_cumprod():
    """abar_t for t = 0..999, float32 [1000]: z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(steps):
    """The timesteps DDIM visits, high to low: 50 steps -> 981, 961, ..., 1 ('leading' spacing + 1)."""
    if not 1 <= steps < TRAIN_STEPS:
        # From 1000 steps on, 'leading' + 1 would visit t = 1000, past the schedule's end.
        raise UserError(f"the number of sampling steps must be between 1 and {TRAIN_STEPS - 1}, got {steps}")
    stride = TRAIN_STEPS // steps
    return [i * stride + 1 for i in reversed(range(steps))]


def ddim_step(x, eps, t, t_prev, alphas=None, eta=0.0, generator=None, noise=None):
    """One DDIM update x_t -> x_{t_prev} from the predicted noise `eps`.

    t_prev < 0 (the last step) uses abar_0, not 1 (SD's set_alpha_to_one=False). With eta > 0 it adds
    std * noise, the noise drawn from `generator` (like diffusers: on the generator's device, in eps's
    dtype) unless given. The schedule terms stay 0-d float32 tensors as in diffusers, so torch's type
    promotion computes the update in x's dtype exactly as diffusers does.
    """
    alphas = alphas_cumprod() if alphas is None else alphas
    a_t = alphas[t]
    a_prev = alphas[t_prev] if t_prev >= 0 else alphas[0]
    b_t = 1 - a_t
    x0 = (x - b_t ** 0.5 * eps) / a_t ** 0.5
    # DDIM's sigma_t: eta = 1 is DDPM's posterior std, eta = 0 is deterministic.
    variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            device = generator.device if generator is not None else eps.device
            noise = torch.randn(eps.shape, generator=generator, device=device, dtype=eps.dtype).to(eps.device)
        x_prev = x_prev + std * noise
    return x_prev


@torch.no_grad()
def ddim_sample(unet, cond, uncond, latents, steps=50, guidance=7.5, eta=0.0, generator=None, progress=None):
    """Denoise `latents` (the initial noise, [B, 4, h, w]; DDIM's init_noise_sigma is 1) to z_0.

    `unet(x, t, context)` predicts the noise for int64 t [B] and context [B, 77, 768]. Guidance runs
    the unconditional and conditional branches in one batched call (uncond first, as diffusers) and
    uses eps_u + guidance * (eps_c - eps_u); like diffusers, guidance <= 1 (or uncond None) runs the
    conditional branch alone. `uncond` may have batch 1 (the empty prompt for every row).
    `progress(done, steps)` is called after each step.
    """
    guided = uncond is not None and guidance > 1
    if guided:
        uncond = uncond.expand(cond.shape[0], -1, -1) if uncond.shape[0] == 1 else uncond
        context = torch.cat([uncond, cond])
    else:
        context = cond
    alphas = alphas_cumprod()
    x = latents
    for done, t in enumerate(ddim_timesteps(steps), start=1):
        x_in = torch.cat([x, x]) if guided else x
        eps = unet(x_in, torch.full((x_in.shape[0],), t, dtype=torch.int64, device=x.device), context)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        # 'leading' spacing: the next timestep is always one stride lower (diffusers computes it so).
        x = ddim_step(x, eps, t, t - TRAIN_STEPS // steps, alphas, eta, generator)
        if progress is not None:
            progress(done, steps)
    return x
