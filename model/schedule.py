"""The noise schedule, written once: the forward process every training script noises with, and
the DDIM sampler with classifier-free guidance that every grid and sample denoises with.

The schedule is one tensor, `alphas_cumprod` (abar_t for t = 0..T-1), made by `alphas_cumprod()`
for SD's scaled-linear betas and carried by the loaded model as `sd.alphas_cumprod`. Everything
below takes it as an argument and reads T from its length, so a fork that changes the schedule
changes it in one place and trains and samples on the same one.

The sampler's numbers are diffusers' `DDIMScheduler` with SD's config (scaled_linear betas,
'leading' timestep spacing, steps_offset 1, set_alpha_to_one False, no clipping, epsilon
prediction), step for step: tests/test_schedule.py checks every update is bit-identical in fp32.

    z = ddim_sample(unet, cond, uncond, torch.randn(1, 4, 64, 64), sd.alphas_cumprod, steps=50, guidance=7.5)
"""
import torch

from model.errors import UserError


def alphas_cumprod(num_steps=1000, beta_start=0.00085, beta_end=0.012):
    """SD's schedule: abar_t for t = 0..num_steps-1, float32, from betas linear in sqrt space."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(latents, t, noise, alphas_cumprod):
    """The forward process z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, one timestep per row.

    Computed in float32 and cast to the latents' dtype at the end: in bf16, abar_t at t = 0 and 1
    rounds to 1.0 (no noise at all) and the noise variance of many small t is off by several percent.
    """
    abar = alphas_cumprod.to(latents.device, torch.float32)[t].view(-1, *[1] * (latents.dim() - 1))
    z_t = abar.sqrt() * latents.float() + (1 - abar).sqrt() * noise.float()
    return z_t.to(latents.dtype)


def ddim_timesteps(steps, num_train_steps):
    """The timesteps DDIM visits, high to low: 50 of 1000 -> 981, 961, ..., 1 ('leading' spacing + 1)."""
    if not 1 <= steps < num_train_steps:
        # From T steps on, 'leading' + 1 would visit t = T, past the schedule's end.
        raise UserError(f"the number of sampling steps must be between 1 and {num_train_steps - 1}, got {steps}")
    stride = num_train_steps // steps
    return [i * stride + 1 for i in reversed(range(steps))]


def ddim_step(x, eps, t, t_prev, alphas_cumprod, eta=0.0, generator=None, noise=None):
    """One DDIM update x_t -> x_{t_prev} from the predicted noise `eps`.

    t_prev < 0 (the last step) uses abar_0, not 1 (SD's set_alpha_to_one=False). With eta > 0 it adds
    std * noise, the noise drawn from `generator` (like diffusers: on the generator's device, in eps's
    dtype) unless given. The schedule terms stay 0-d float32 tensors as in diffusers, so torch's type
    promotion computes the update in x's dtype exactly as diffusers does.
    """
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else alphas_cumprod[0]
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
def ddim_sample(unet, cond, uncond, latents, alphas_cumprod, steps=50, guidance=7.5, eta=0.0, generator=None,
                progress=None):
    """Denoise `latents` (the initial noise, [B, 4, h, w]; DDIM's init_noise_sigma is 1) to z_0 on
    the schedule `alphas_cumprod` (the one the model was trained on: sd.alphas_cumprod).

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
    alphas = alphas_cumprod.cpu()  # indexed by Python ints: 0-d CPU scalars, as diffusers keeps them
    num_train_steps = len(alphas)
    x = latents
    for done, t in enumerate(ddim_timesteps(steps, num_train_steps), start=1):
        x_in = torch.cat([x, x]) if guided else x
        eps = unet(x_in, torch.full((x_in.shape[0],), t, dtype=torch.int64, device=x.device), context)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        # 'leading' spacing: the next timestep is always one stride lower (diffusers computes it so).
        x = ddim_step(x, eps, t, t - num_train_steps // steps, alphas, eta, generator)
        if progress is not None:
            progress(done, steps)
    return x
