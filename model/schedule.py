"""The noise schedule, written once: the forward process every training script noises with (and
the v-prediction target), and the two samplers with classifier-free guidance: DDIM and DPM-Solver++.

The schedule is one tensor, `alphas_cumprod` (abar_t for t = 0..T-1), made by `alphas_cumprod()`
for SD's scaled-linear betas and carried by the loaded model as `sd.alphas_cumprod`. Everything
below takes it as an argument and reads T from its length, so a fork that changes the schedule
changes it in one place and trains and samples on the same one.

The sampler's numbers are diffusers' `DDIMScheduler` with SD's config (scaled_linear betas,
'leading' timestep spacing, steps_offset 1, set_alpha_to_one False, no clipping, epsilon
prediction or v prediction), step for step: tests/test_schedule.py checks every update is
bit-identical in fp32. DPM-Solver++ is diffusers' `DPMSolverMultistepScheduler.from_config(<SD's
scheduler config>)` with its defaults (2M: second-order multistep, first order at the start and the
final step, 'linspace' timesteps since SD's config names no spacing), the sampler the ConceptPrism
authors use.

    z = ddim_sample(unet, cond, uncond, torch.randn(1, 4, 64, 64), sd.alphas_cumprod, steps=50, guidance=7.5)
    z = dpm_sample(unet, cond, uncond, torch.randn(1, 4, 96, 96), sd.alphas_cumprod, steps=25,
                   prediction_type="v_prediction")   # SD 2.1 768-v
"""
import math

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


def velocity(latents, noise, t, alphas_cumprod):
    """The v-prediction target v_t = sqrt(abar_t) eps - sqrt(1 - abar_t) z (what SD 2's 768-v UNet
    predicts instead of eps), one timestep per row; in float32 and cast once, for add_noise's reason."""
    abar = alphas_cumprod.to(latents.device, torch.float32)[t].view(-1, *[1] * (latents.dim() - 1))
    v = abar.sqrt() * noise.float() - (1 - abar).sqrt() * latents.float()
    return v.to(latents.dtype)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def epsilon_from(output, z_t, t, alphas_cumprod, prediction_type):
    """The noise a UNet output stands for, one timestep per row: the output itself for an epsilon
    model; for a v model, eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t (from z_t = sqrt(abar_t) z +
    sqrt(1 - abar_t) eps and v = sqrt(abar_t) eps - sqrt(1 - abar_t) z). float32 for a v model."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return output
    abar = alphas_cumprod.to(output.device, torch.float32)[t].view(-1, *[1] * (output.dim() - 1))
    return abar.sqrt() * output.float() + (1 - abar).sqrt() * z_t.float()


def _check_prediction_type(prediction_type):
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def ddim_timesteps(steps, num_train_steps):
    """The timesteps DDIM visits, high to low: 50 of 1000 -> 981, 961, ..., 1 ('leading' spacing + 1)."""
    if not 1 <= steps < num_train_steps:
        # From T steps on, 'leading' + 1 would visit t = T, past the schedule's end.
        raise UserError(f"the number of sampling steps must be between 1 and {num_train_steps - 1}, got {steps}")
    stride = num_train_steps // steps
    return [i * stride + 1 for i in reversed(range(steps))]


def ddim_step(x, eps, t, t_prev, alphas_cumprod, eta=0.0, generator=None, noise=None, prediction_type="epsilon"):
    """One DDIM update x_t -> x_{t_prev} from the UNet's output `eps`: the predicted noise, or with
    prediction_type "v_prediction" the predicted velocity v (x0 and eps are then both read from it).

    t_prev < 0 (the last step) uses abar_0, not 1 (SD's set_alpha_to_one=False). With eta > 0 it adds
    std * noise, the noise drawn from `generator` (like diffusers: on the generator's device, in eps's
    dtype) unless given. The schedule terms stay 0-d float32 tensors as in diffusers, so torch's type
    promotion computes the update in x's dtype exactly as diffusers does.
    """
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else alphas_cumprod[0]
    b_t = 1 - a_t
    if prediction_type == "v_prediction":
        # x_t = sqrt(a) x0 + sqrt(b) eps and v = sqrt(a) eps - sqrt(b) x0, with a + b = 1, invert to:
        x0 = a_t ** 0.5 * x - b_t ** 0.5 * eps
        eps = a_t ** 0.5 * eps + b_t ** 0.5 * x
    else:
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
                progress=None, prediction_type="epsilon"):
    """Denoise `latents` (the initial noise, [B, 4, h, w]; DDIM's init_noise_sigma is 1) to z_0 on
    the schedule `alphas_cumprod` (the one the model was trained on: sd.alphas_cumprod).

    `unet(x, t, context)` predicts the noise (or v, with prediction_type "v_prediction") for int64
    t [B] and context [B, 77, width]. Guidance runs
    the unconditional and conditional branches in one batched call (uncond first, as diffusers) and
    uses eps_u + guidance * (eps_c - eps_u); like diffusers, guidance <= 1 (or uncond None) runs the
    conditional branch alone. `uncond` may have batch 1 (the empty prompt for every row).
    `progress(done, steps)` is called after each step.
    """
    _check_prediction_type(prediction_type)
    predict = _guided_unet(unet, cond, uncond, guidance)
    alphas = alphas_cumprod.cpu()  # indexed by Python ints: 0-d CPU scalars, as diffusers keeps them
    num_train_steps = len(alphas)
    x = latents
    for done, t in enumerate(ddim_timesteps(steps, num_train_steps), start=1):
        # 'leading' spacing: the next timestep is always one stride lower (diffusers computes it so).
        x = ddim_step(x, predict(x, t), t, t - num_train_steps // steps, alphas, eta, generator,
                      prediction_type=prediction_type)
        if progress is not None:
            progress(done, steps)
    return x


def _guided_unet(unet, cond, uncond, guidance):
    """x, t -> the UNet's output with classifier-free guidance: the unconditional and conditional
    branches in one batched call (uncond first, as diffusers), out_u + guidance * (out_c - out_u);
    guidance <= 1 (or uncond None) runs the conditional branch alone, as diffusers does. Guidance
    acts on the raw output (eps or v) before any conversion, as in StableDiffusionPipeline."""
    guided = uncond is not None and guidance > 1
    if guided:
        uncond = uncond.expand(cond.shape[0], -1, -1) if uncond.shape[0] == 1 else uncond
        context = torch.cat([uncond, cond])
    else:
        context = cond

    def predict(x, t):
        x_in = torch.cat([x, x]) if guided else x
        out = unet(x_in, torch.full((x_in.shape[0],), t, dtype=torch.int64, device=x.device), context)
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        return out
    return predict


# -------------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022), the 2M multistep form. It integrates the probability-flow ODE in
# lambda = log(alpha / sigma) (half the log-SNR), with the model's x0 prediction as the integrand:
# x_t = sigma_t / sigma_s x_s - alpha_t (e^-h - 1) D, h = lambda_t - lambda_s, where D is x0 (first
# order) or x0 plus half a finite-difference correction from the previous step's x0 (second order).

def dpm_timesteps(steps, num_train_steps, spacing="linspace", steps_offset=0):
    """The timesteps DPM-Solver++ visits, high to low, as diffusers spaces them.

    'linspace' (what `from_config` of SD's scheduler config gives, since that config names no
    spacing): round(linspace(0, T-1, steps+1)) without its 0; 25 of 1000 -> 999, 959, ..., 40.
    'leading' and 'trailing' for configs that ask for them (SD 2's do not)."""
    if not 1 <= steps < num_train_steps:
        raise UserError(f"the number of sampling steps must be between 1 and {num_train_steps - 1}, got {steps}")
    if spacing == "linspace":
        # float64 i * ((T-1)/steps) is numpy's linspace value; round() is half-to-even as numpy's.
        ts = [round(i * ((num_train_steps - 1) / steps)) for i in range(steps + 1)][::-1][:-1]
    elif spacing == "leading":
        ratio = num_train_steps // (steps + 1)
        ts = [i * ratio + steps_offset for i in range(steps + 1)][::-1][:-1]
    elif spacing == "trailing":
        ratio = num_train_steps / steps
        # numpy's arange(T, 0, -ratio): T - i * ratio for i < ceil(T / ratio), rounded, minus one
        ts = [round(num_train_steps - i * ratio) - 1 for i in range(math.ceil(num_train_steps / ratio))]
    else:
        raise UserError(f"timestep spacing must be linspace, leading or trailing, got {spacing!r}")
    return ts


def _alpha_sigma(sigma):
    """alpha_t, sigma_t of the VP process from sigma = sqrt((1 - abar) / abar), computed as diffusers
    does (0-d float32 tensors), so that every update below rounds the same way."""
    alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
    return alpha, sigma * alpha


@torch.no_grad()
def dpm_sample(unet, cond, uncond, latents, alphas_cumprod, steps=25, guidance=7.5, prediction_type="epsilon",
               spacing="linspace", steps_offset=0, progress=None):
    """Denoise `latents` (the initial noise; init_noise_sigma is 1) to z_0 with DPM-Solver++ 2M on
    the schedule `alphas_cumprod`, with the UNet and guidance conventions of ddim_sample.

    diffusers' numbers step for step: lower_order_final (first order on the last step, and with fewer
    than 15 steps second order on the one before, which 2M already is), the final sigma 0 (the last
    step returns the x0 prediction), the update in float32 and the result cast back to the UNet
    output's dtype. `spacing` and `steps_offset` are the scheduler config's timestep_spacing and
    steps_offset (SD's config: linspace, where the offset is unused)."""
    _check_prediction_type(prediction_type)
    predict = _guided_unet(unet, cond, uncond, guidance)
    abar = alphas_cumprod.detach().cpu().float()
    timesteps = dpm_timesteps(steps, len(abar), spacing, steps_offset)
    table = ((1 - abar) / abar) ** 0.5
    sigmas = [table[t] for t in timesteps] + [torch.tensor(0.0)]  # 0-d float32, as diffusers keeps them
    x, x0_prev = latents, None
    for i, t in enumerate(timesteps):
        out = predict(x, t)
        # The data prediction x0, in the UNet output's dtype (diffusers converts before upcasting).
        alpha_s, sigma_s = _alpha_sigma(sigmas[i])
        if prediction_type == "v_prediction":
            x0 = alpha_s * x - sigma_s * out
        else:
            x0 = (x - sigma_s * out) / alpha_s
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf at the final sigma 0: e^-h = 0
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        h = lambda_t - lambda_s
        sample = x.float()
        if x0_prev is None or i == len(timesteps) - 1:
            # first order (DDIM in this parametrisation): at the start, and on the final step
            x_next = (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_r, sigma_r = _alpha_sigma(sigmas[i - 1])
            lambda_r = torch.log(alpha_r) - torch.log(sigma_r)
            r = (lambda_s - lambda_r) / h
            d1 = (1.0 / r) * (x0 - x0_prev)  # the slope of x0 in lambda, times h
            x_next = ((sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                      - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        x, x0_prev = x_next.to(out.dtype), x0
        if progress is not None:
            progress(i + 1, steps)
    return x
