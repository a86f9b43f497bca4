"""Pretrain the embedded toy Stable Diffusion on the generated world of toy/world.py, on a CPU.

    python toy/pretrain_tiny.py    # about 80 min on 2 CPU cores -> toy/tiny/tiny_sd.safetensors (+ .md card)
    python toy/pretrain_tiny.py --vae_steps 20 --unet_steps 20 --pool 64 --out /tmp/t.safetensors --work /tmp/t  # smoke

The model is SD1.5's architecture (the same model/ classes, the real CLIP tokenizer) at a small
size, so every script runs on it unchanged and a personalisation run takes minutes on a CPU. It is
trained the way SD was, in two phases:
  1. the VAE: 64x64 images <-> 8x8x4 latents, squared-error reconstruction plus a small KL term (no
     perceptual or adversarial loss: flat shapes need neither; L1 was tried and learns far slower);
  2. the UNet and the text encoder together: epsilon loss on SD's noise schedule, captions dropped
     10% of the time so that classifier-free guidance works, and half of the rest replaced by a loose
     description of the same image (world.loose_caption: some of its words, in any order), so that
     the text encoder, like SD's, reads a word wherever it stands: personalisation prompts such as
     "<v>" or "<v> <r_1> ... <r_8>" are not captions.
The world's held-out objects (world.HELD_OUT) never appear: they are what personalisation learns.
Everything follows from --seed (world images from (seed, phase, step), noise from a generator whose
state the checkpoints keep), so a run is reproducible and --resume continues it exactly.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

# Run as `python toy/<script>.py`, Python puts toy/ first on sys.path, not the repository root
# where the `model` library and the `toy` package are: add the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model
from model import clip, run, unet, vae
from model.errors import UserError
from model.generate import generate, grid, save_png
from model.loader import StableDiffusion, save_safetensors
from model.schedule import add_noise, alphas_cumprod
from model.tokenizer import Tokenizer
from toy import world

# The sizes: all three in fp16 together stay under 20 MB (8.6M parameters, 17.2 MB).
# GroupNorm groups: SD keeps 4-40 channels in each group; 32 groups at these widths would leave 1-2
# (instance norm), which erases the flat colour fields this world is made of and stalls training.
# Text encoder, 3.37M: the real CLIP vocabulary's 49,408 rows are 3.16M of it at width 64 (width 96
# would pass 20 MB); 4 layers are plenty for captions of about 16 tokens.
TEXT = clip.CLIPConfig(width=64, layers=4, heads=4, mlp_dim=256)
# VAE, 1.03M: four levels make SD's factor 8 (64x64 -> 8x8x4). Widths 32/32/64/64: a width-64 second
# level would make its 64x64 upsampling conv the costliest layer of the model for little gain.
VAE = vae.VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8)
# UNet, 4.19M: two levels (8x8, 4x4) with cross-attention at both; its context is the text width.
UNET = unet.UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                       num_heads=(4, 4), context_dim=TEXT.width, norm_groups=8)
RESOLUTION = world.SIZE
# Saved with the model as its example prompts (validation grids, sample.py's default): the world's
# captions with <v> for the object, in each background style and a few places.
EXAMPLE_PROMPTS = ["a large <v> on a white background, center", "a small <v> on a cloudy black background, top right",
                   "a large <v> on an orange gradient background, bottom left",
                   "a large <v> on a red background, center"]
# The run's random streams, each seeded from (--seed, stream) so that none shares another's numbers.
VAE_IMAGES, VAE_NOISE, POOL_IMAGES, SCALE_NOISE, UNET_NOISE, CHECK_IMAGES, PROMPTS, LOOSE = range(1, 9)


# -------------------------------------------------------------------------------------------------
# settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=run.HelpFormatter)
    p.add_argument("--out", default=model.DEFAULT_MODEL, help="the fp16 model file, card beside it with the same "
                   "name in .md (default: the embedded model, toy/tiny/tiny_sd.safetensors)")
    p.add_argument("--work", default="runs/pretrain_tiny", help="checkpoints, logs and sample grids")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the world images and the noise")
    p.add_argument("--vae_steps", type=int, default=2500, help="phase 1 steps (fresh world images every step)")
    p.add_argument("--vae_batch", type=int, default=16, help="phase 1 images per step")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="phase 1 peak learning rate (warmup, cosine decay)")
    p.add_argument("--kl_weight", type=float, default=1e-4, help="KL weight (KL per latent, error per pixel)")
    p.add_argument("--pool", type=int, default=50000, help="world images encoded once for phase 2")
    p.add_argument("--unet_steps", type=int, default=6000, help="phase 2 steps")
    p.add_argument("--unet_batch", type=int, default=64, help="phase 2 latents per step")
    p.add_argument("--unet_lr", type=float, default=1e-3, help="phase 2 peak learning rate (warmup, cosine decay)")
    p.add_argument("--cfg_dropout", type=float, default=0.1, help="share of captions replaced by '' in phase 2")
    p.add_argument("--loose", type=float, default=0.5, help="share of the other captions replaced by a loose "
                   "description of the image (world.loose_caption)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the phase 2 weights that are saved")
    p.add_argument("--vae_minutes", type=float, default=None, help="cut phase 1's steps to fit this many minutes")
    p.add_argument("--unet_minutes", type=float, default=None, help="cut phase 2's steps to fit this many minutes")
    p.add_argument("--save_every", type=int, default=500, help="checkpoint every this many steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --work from its checkpoints")
    p.add_argument("--sample_steps", type=int, default=50, help="DDIM steps of the sample grid")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance of the sample grid, "
                   "saved as the model's default")
    p.add_argument("--classifier", default=os.path.join(model.TINY_DIR, "classifier.safetensors"),
                   help="attribute classifier for the card's prompt-following score, skipped if missing "
                   "(default: toy/tiny/classifier.safetensors)")
    p.add_argument("--eval_prompts", type=int, default=200, help="generated images the classifier scores")
    p.add_argument("--device", default=None, help="default cuda when available")
    args = p.parse_args(argv)
    if min(args.vae_steps, args.vae_batch, args.pool, args.unet_steps, args.unet_batch, args.save_every) < 1:
        raise UserError("--vae_steps, --vae_batch, --pool, --unet_steps, --unet_batch and --save_every must be >= 1")
    if not 0 <= args.cfg_dropout < 1 or not 0 <= args.ema < 1 or not 0 <= args.loose <= 1:
        raise UserError("--cfg_dropout and --ema must be in [0, 1), --loose in [0, 1]")
    return args


# -------------------------------------------------------------------------------------------------
# the loop both phases share

def learning_rate(step, steps, peak, warmup):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def stream_seed(seed, stream):
    """Independent seeds for the separate random streams of one run."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def train(phase, stream, params, loss_fn, steps, lr, warmup, args, started, minutes=None, ema=None):
    """AdamW (no weight decay: most of the 49,408 token rows never get a gradient, and decay would
    shrink them, skewing the table statistics stage 1 draws <v> from), gradient clipping, optional
    EMA, checkpoints every --save_every steps, exact resume, a log and a progress bar.
    `loss_fn(step, generator) -> (loss, {term: tensor})`. Returns the number of steps run."""
    warmup = min(warmup, steps // 10 + 1)  # from the requested steps, so a time cut leaves it alone
    checkpoint = os.path.join(args.work, f"{phase}_checkpoint.safetensors")
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(stream_seed(args.seed, stream))
    # The EMA copies ride in the checkpoint like parameters: resume restores them too.
    state = {**params, **{f"ema.{k}": v for k, v in (ema or {}).items()}}
    start = 0
    if args.resume and os.path.exists(checkpoint):
        start, meta = run.load_checkpoint(checkpoint, state, optimizer, generator)
        steps = int(meta["steps"])  # a time budget may have cut it; keep that cut
        print(f"{phase}: resuming at step {start} of {steps}")
    log = run.Log(os.path.join(args.work, f"{phase}_log.jsonl"), resume_step=start if args.resume else None)
    bar = tqdm(total=steps, initial=start, desc=phase, dynamic_ncols=True)
    step, timed_from, t_phase = start, None, time.perf_counter()
    while step < steps:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        loss, terms = loss_fn(step, generator)
        if not torch.isfinite(loss):
            raise UserError(f"{phase}: the loss became {loss.item()} at step {step}; lower the learning rate "
                            f"and continue from the last checkpoint with --resume")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        if ema is not None:  # the short warmup keeps the average from starting at the random init
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for name, shadow in ema.items():
                    shadow.lerp_(params[name].detach(), 1 - decay)
        step += 1
        ms = (time.perf_counter() - t0) * 1000
        log.write({"step": step, "loss": round(loss.item(), 6),
                   **{k: round(v.item(), 6) for k, v in terms.items()}, "ms": round(ms, 1)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", s_per_step=f"{ms / 1000:.2f}")
        # Project the phase's duration from steps 5-25 (the first ones pay one-off warm-up costs).
        if step == start + 5:
            timed_from = time.perf_counter()
        if step == start + 25 and step < steps:
            rate = (time.perf_counter() - timed_from) / 20
            if minutes is not None and start == 0:  # a resumed phase keeps the cut it was given
                fit = step + int((minutes * 60 - (time.perf_counter() - t_phase)) / rate)
                steps = max(step, min(steps, fit))
                bar.total = steps
            bar.write(f"{phase}: {rate:.3f} s/step, {steps} steps, projected {rate * (steps - start) / 60:.1f} min "
                      f"(the run so far: {(time.perf_counter() - started) / 60:.1f} min)")
        if step % args.save_every == 0 and step < steps:
            run.save_checkpoint(checkpoint, state, optimizer, generator, step, {"steps": str(steps)})
    bar.close()
    run.save_checkpoint(checkpoint, state, optimizer, generator, step, {"steps": str(steps)})
    return steps


@torch.no_grad()
def encode(vae_model, images, device, batch=64):
    """uint8 world images -> (mean, logvar) latents, in chunks to bound memory."""
    parts = [vae_model.encode(world.to_tensor(images[i:i + batch]).to(device))
             for i in range(0, len(images), batch)]
    return torch.cat([m for m, _ in parts]), torch.cat([lv for _, lv in parts])


def main(argv=None):
    args = parse_args(argv)
    # Always fp32: these are the weights being made (saved as fp16 at the end), not frozen ones.
    device, _, _ = run.device_and_dtype(args.device, "fp32")
    torch.manual_seed(args.seed)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not args.resume:  # a fresh run must not pick up another run's leftovers later
        for name in ("vae_checkpoint.safetensors", "unet_checkpoint.safetensors", "vae.safetensors"):
            if os.path.exists(os.path.join(args.work, name)):
                os.remove(os.path.join(args.work, name))
    t_start = time.perf_counter()

    # ---------------------------------------------------------------------------------------------
    # the model, at random (CLIP's own init for the embeddings: small, so the table stays well scaled)
    vae_model, unet_model = vae.VAE(VAE).to(device), unet.UNet(UNET).to(device)
    text_encoder = clip.CLIPTextEncoder(TEXT).to(device)
    torch.nn.init.normal_(text_encoder.embeddings.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(text_encoder.embeddings.position_embedding.weight, std=0.01)
    tokenizer = Tokenizer.from_clip_bpe()
    for module in (vae_model, unet_model, text_encoder):
        print(f"{type(module).__name__}: {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters")

    # ---------------------------------------------------------------------------------------------
    # phase 1: the VAE on fresh world images
    vae_file = os.path.join(args.work, "vae.safetensors")
    if args.resume and os.path.exists(vae_file):
        vae_model.load_state_dict(load_file(vae_file, device=device))
        with safe_open(vae_file, "pt") as f:
            vae_steps = int(f.metadata()["steps"])
        print(f"vae: phase 1 finished earlier, loaded {vae_file}")
    else:
        def vae_loss(step, generator):
            images, _, _ = world.batch(np.random.default_rng([args.seed, VAE_IMAGES, step]), args.vae_batch)
            x = world.to_tensor(images).to(device)
            mean, logvar = vae_model.encode(x)
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator).to(device)
            mse = ((vae_model.decode(z) - x) ** 2).mean()
            kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
            return mse + args.kl_weight * kl, {"mse": mse, "kl": kl}

        vae_model.train()
        vae_steps = train("vae", VAE_NOISE, dict(vae_model.named_parameters()), vae_loss, args.vae_steps,
                          args.vae_lr, 100, args, t_start, args.vae_minutes)
        save_safetensors(vae_model.state_dict(), vae_file, {"steps": str(vae_steps)})
    vae_model.eval().requires_grad_(False)

    # A fixed set of unseen images: reconstruction quality for the card, and a picture of it.
    check, _, _ = world.batch(np.random.default_rng([args.seed, CHECK_IMAGES]), 64)
    with torch.no_grad():
        recon = vae_model.decode(encode(vae_model, check, device)[0]).clamp(-1, 1).cpu()
    recon_mse = ((recon - world.to_tensor(check)) ** 2).mean().item()
    vae_psnr = 10 * math.log10(4 / recon_mse)  # the image range [-1, 1] spans 2
    save_png(grid(torch.cat([world.to_tensor(check[:8]), recon[:8]]) / 2 + 0.5, columns=8),
             os.path.join(args.work, "vae_reconstructions.png"))
    print(f"vae: reconstruction PSNR {vae_psnr:.1f} dB on unseen images (top row: originals)")

    # ---------------------------------------------------------------------------------------------
    # phase 2: UNet + text encoder on a pool of latents encoded once
    images, captions, pool_attrs = world.batch(np.random.default_rng([args.seed, POOL_IMAGES]), args.pool)
    pool_mean, pool_logvar = encode(vae_model, images, device)
    del images
    # SD's recipe: scale latents to unit variance (SD1.5's 0.18215 is 1/std of its VAE's latents).
    generator = torch.Generator().manual_seed(stream_seed(args.seed, SCALE_NOISE))
    noise = torch.randn(pool_mean.shape, generator=generator).to(device)
    scale = round(1 / (pool_mean + (0.5 * pool_logvar).exp() * noise).std().item(), 5)
    vae_model.config.scaling_factor = vae_model.scaling_factor = scale
    pool_ids = tokenizer(captions).to(device)
    empty_ids = tokenizer([""]).to(device)
    alphas = alphas_cumprod().to(device)
    print(f"pool: {args.pool} latents, scaling factor {scale}")

    def unet_loss(step, generator):
        b = args.unet_batch
        index = torch.randint(args.pool, (b,), generator=generator).to(device)
        eps_posterior, eps = (torch.randn(b, *pool_mean.shape[1:], generator=generator).to(device) for _ in range(2))
        t = torch.randint(0, len(alphas), (b,), generator=generator).to(device)
        dropped = (torch.rand(b, generator=generator) < args.cfg_dropout).to(device)
        z = (pool_mean[index] + (0.5 * pool_logvar[index]).exp() * eps_posterior) * scale
        z_t = add_noise(z, t, eps, alphas)
        ids = torch.where(dropped[:, None], empty_ids, pool_ids[index])
        # Loose descriptions, drawn from (seed, step) alone so that --resume replays them.
        rng = np.random.default_rng([args.seed, LOOSE, step])
        loose = [k for k in range(b) if rng.random() < args.loose and not dropped[k]]
        if loose:
            ids[loose] = tokenizer([world.loose_caption(pool_attrs[int(index[k])], rng) for k in loose]).to(device)
        mse = F.mse_loss(unet_model(z_t, t, text_encoder(ids)), eps)
        return mse, {}

    params = {**{f"unet.{k}": v for k, v in unet_model.named_parameters()},
              **{f"text.{k}": v for k, v in text_encoder.named_parameters()}}
    ema = {k: v.detach().clone() for k, v in params.items()}
    unet_model.train()
    text_encoder.train()
    unet_steps = train("unet", UNET_NOISE, params, unet_loss, args.unet_steps, args.unet_lr, 500, args, t_start,
                       args.unet_minutes, ema)
    with torch.no_grad():  # ship the averaged weights
        for name, p in params.items():
            p.copy_(ema[name])

    # ---------------------------------------------------------------------------------------------
    # save, then sample from the saved fp16 file: what ships is what gets checked
    sd = StableDiffusion(unet_model, vae_model, text_encoder, tokenizer, alphas.cpu(), RESOLUTION,
                         EXAMPLE_PROMPTS, args.guidance)
    model.save(sd, args.out, dtype=torch.float16, resolution=RESOLUTION)
    sd = model.load(args.out, device=device)
    rng = np.random.default_rng([args.seed, PROMPTS])
    prompts = [world.caption(world.sample_attributes(rng)) for _ in range(12)]
    prompts += [f"a large {world.concept_name(c)} on a white background, center" for c in world.HELD_OUT]
    pictures = generate(sd, prompts, seed=args.seed, steps=args.sample_steps, guidance=args.guidance,
                        resolution=RESOLUTION, batch=32)
    save_png(grid(pictures, columns=6), samples_path(args.out))
    following = None
    if os.path.exists(args.classifier) and args.eval_prompts > 0:
        # Share of generated images whose attributes the classifier reads as the prompt asked.
        attrs = [world.sample_attributes(rng) for _ in range(args.eval_prompts)]
        pictures = generate(sd, [world.caption(a) for a in attrs], seed=args.seed + 1, steps=args.sample_steps,
                            guidance=args.guidance, resolution=RESOLUTION, batch=64)
        classifier = world.load_classifier(args.classifier)
        predicted = classifier.predict(pictures * 2 - 1)
        following = {k: round(float(np.mean([p == a[k] for p, a in zip(v, attrs)])), 3) for k, v in predicted.items()}
        print("prompt following (classifier agreement per attribute):", following)

    minutes = (time.perf_counter() - t_start) / 60
    write_card(args, device, sd, vae_steps, unet_steps, vae_psnr, following, minutes, prompts)
    print(f"saved {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB) in {minutes:.1f} min; samples in "
          f"{samples_path(args.out)}")


def samples_path(out):
    """The card's picture, beside the model: toy/tiny/tiny_sd_samples.png."""
    return os.path.splitext(out)[0] + "_samples.png"


def final_loss(args, phase, key="loss", last=200):
    """Mean of a phase's last `last` logged values: one step's loss is too noisy to report."""
    with open(os.path.join(args.work, f"{phase}_log.jsonl")) as f:
        values = [json.loads(line)[key] for line in f][-last:]
    return sum(values) / len(values)


def command_line(args):
    """The command that repeats this run: the script plus every setting that is not a default."""
    defaults = vars(parse_args([]))
    changed = [f"--{k} {v}" for k, v in vars(args).items() if v != defaults[k] and k != "resume"]
    return " ".join(["python toy/pretrain_tiny.py"] + changed)


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPU cores"


def write_card(args, device, sd, vae_steps, unet_steps, vae_psnr, following, minutes, prompts):
    """A short model card beside the weights: what it is, how it was made, how well it does."""
    counts = {name: sum(p.numel() for p in getattr(sd, name).parameters()) for name in ("vae", "text_encoder", "unet")}
    steps = f"{vae_steps} VAE + {unet_steps} UNet/text steps"
    lines = [
        "# Tiny Stable Diffusion for the toy world",
        "",
        "SD1.5's architecture (this repository's `model/` classes, the real CLIP BPE tokenizer) at a small size,",
        "trained from scratch by `toy/pretrain_tiny.py` on the generated images of `toy/world.py`: coloured",
        "shapes with patterns on plain, gradient or cloudy backgrounds, 64x64 pixels, 8x8x4 latents. No",
        "third-party weights or images went into it. It exists so that personalisation runs (and tests) work",
        "on a CPU with nothing to download, and so that leakage can be measured with the attribute classifier.",
        "",
        f"- Made with: `{command_line(args)}` ({steps}, {minutes:.0f} min on {device_name(device)})",
        f"- Parameters: {', '.join(f'{k} {v / 1e6:.2f}M' for k, v in counts.items())}; stored as fp16, "
        f"{os.path.getsize(args.out) / 1e6:.1f} MB",
        *[f"- `{name}` config: `{json.dumps(asdict(getattr(sd, name).config))}`"
          for name in ("vae", "text_encoder", "unet")],
        f"- Data: {args.vae_steps * args.vae_batch:,} fresh world images for the VAE, a pool of {args.pool:,} "
        f"encoded once for the UNet and text encoder, captions dropped {args.cfg_dropout:.0%} of the time and "
        f"{args.loose:.0%} of the rest replaced by a loose description (some of the words, any order)",
        f"- Final losses (mean of the last 200 steps): VAE squared error {final_loss(args, 'vae', 'mse'):.5f}, "
        f"KL {final_loss(args, 'vae', 'kl'):.3f}; UNet epsilon loss {final_loss(args, 'unet'):.4f}",
        f"- Resolution {RESOLUTION}; VAE scaling factor {sd.vae.scaling_factor}; reconstruction PSNR "
        f"{vae_psnr:.1f} dB on unseen images",
        "- Held out of pretraining (the concepts to personalise): "
        + ", ".join(world.concept_name(c) for c in world.HELD_OUT),
        f"- Captions look like: \"{prompts[0]}\"",
    ]
    if following:
        lines.append(f"- Prompt following ({args.eval_prompts} prompts, DDIM {args.sample_steps}, guidance "
                     f"{args.guidance}; share the classifier reads as asked): "
                     + ", ".join(f"{k} {v:.0%}" for k, v in following.items()))
    lines += ["", "Load it with `model.load(path)`; prompts are captions like the one above.", "",
              f"![samples]({os.path.basename(samples_path(args.out))})", "",
              f"Samples (DDIM {args.sample_steps}, guidance {args.guidance}): twelve fresh captions, then the "
              "held-out objects named in words (never seen together in pretraining, so these are not expected "
              "to be right: that is what personalisation is for)."]
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    run.report_user_errors()
    main()
