"""Stage 2: LoRA on the UNet's attention, with the stage-1 tokens frozen (ConceptPrism Algorithm 2),
optionally with ACCORD's DDLoss.

    python stage2_lora.py --out runs/dog

Reads tokens.safetensors from the run folder stage 1 wrote and trains rank-4 LoRA on to_q, to_k,
to_v and to_out.0 of every attention layer with L_ft = ||eps - U_lora(z_t^i, t, E("<v> <r_i>"))||^2
(for a v-prediction model, stage 1's prediction type, the target is v_t instead of eps). The token
keeps the name stage 1 gave it (--token). The tokens are frozen, so every condition's text
embedding is computed once before the loop.
Writes the LoRA in the diffusers/PEFT layout (lora.peft.safetensors) and the kohya/A1111 layout
(lora.kohya.safetensors).
"""
import argparse
import json
import os

import torch
from tqdm import tqdm

import accord_losses
import model
from model import conditions, lora, run
from model.data import list_images, load_images
from model.generate import SAMPLERS, generate, grid, progress_bar, save_png
from model.schedule import add_noise
from model.training import Training


# -------------------------------------------------------------------------------------------------
# settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=run.HelpFormatter)
    io = p.add_argument_group("I/O")
    io.add_argument("--out", required=True, help="the run folder stage 1 wrote")
    io.add_argument("--images", default=None, help="reference photos (default: the folder stage 1 used)")
    io.add_argument("--model", default=None, help="model (default: the one stage 1 used)")
    io.add_argument("--save_every", type=int, default=50, help="checkpoint every this many steps")
    io.add_argument("--resume", action="store_true", help="continue the unfinished stage 2 in --out")
    io.add_argument("--overwrite", action="store_true", help="replace a finished stage 2 in --out")
    method = p.add_argument_group("method")
    method.add_argument("--rank", type=int, default=4, help="LoRA rank")
    method.add_argument("--alpha", type=float, default=4.0, help="LoRA alpha (scale = alpha / rank)")
    method.add_argument("--lora_init", choices=["gaussian", "kaiming"], default="gaussian", help="down projection "
                        "~ N(0, 1/rank^2) as the ConceptPrism authors (PEFT's 'gaussian'), or nn.Linear's init "
                        "(PEFT's default); up starts at zero either way")
    method.add_argument("--dd_weight", type=float, default=0.0, help="ACCORD DDLoss weight (0 = off)")
    method.add_argument("--dd_space", choices=["eps", "xprev"], default="eps", help="DDLoss in epsilon space (w_t "
                        "= 1, the paper's 0.1-0.3 weights apply) or in ACCORD's literal x_(t-1)-mean form "
                        "(w_t = beta_t / (2 alpha_t (1 - abar_t)), on average ~1/226 of eps: it needs a ~200x "
                        "larger --dd_weight)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=120, help="optimisation steps (the authors find ~120 best)")
    optim.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate")
    optim.add_argument("--weight_decay", type=float, default=1e-2, help="AdamW weight decay on the LoRA weights")
    optim.add_argument("--batch", type=int, default=4, help="images per step")
    system = p.add_argument_group("system")
    system.add_argument("--seed", type=int, default=42, help="seed for noise and sampling")
    system.add_argument("--precision", choices=list(run.PRECISIONS), default=None, help="frozen model dtype "
                        "(default bf16 on CUDA, fp32 on CPU)")
    system.add_argument("--device", default=None, help="default cuda when available")
    system.add_argument("--val_sampler", choices=list(SAMPLERS), default="ddim", help="sampler of the final "
                        "validation grid")
    system.add_argument("--val_steps", type=int, default=None, help="sampler steps of the final validation grid "
                        "(default: 50 for ddim, 25 for dpm++; 0 = no grid)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.lr <= 0 or args.batch < 1 or args.rank < 1 or args.dd_weight < 0 or \
            (args.val_steps or 0) < 0:
        raise model.UserError("--steps, --batch and --rank must be >= 1, --lr > 0, --dd_weight and --val_steps >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, precision, dtype = run.device_and_dtype(args.device, args.precision)
    torch.manual_seed(args.seed)

    # ---------------------------------------------------------------------------------------------
    # load: every input is checked before anything is written, the cheap checks first
    target, residual, meta = run.load_tokens(args.out)
    stage1 = meta.get("settings", {})
    run.check_out(args.out, "stage2", args.resume, args.overwrite)
    images = run.find_images(args.out, args.images)
    image_paths, _, _ = list_images(images)
    if [p.name for p in image_paths] != meta["images"]:
        raise model.UserError(f"the images in {images} are not the ones stage 1 learned from "
                              f"({len(meta['images'])} files: {', '.join(meta['images'][:3])}, ...)")
    model_path = run.find_model(args.out, args.model, stage1, model.DEFAULT_MODEL)
    token = run.token_name(meta)
    print(f"stage 2: LoRA for {token} of run folder {args.out}, photos in {images}")
    print(f"model: {run.describe_model(model_path, model.DEFAULT_MODEL)} on {device}, {precision}")
    sd = model.load(model_path, device, dtype)
    prediction_type = run.set_prediction_type(sd, stage1.get("prediction_type"), model_path)
    run.check_token_width(target, sd, args.out)
    resolution = stage1.get("resolution") or sd.resolution
    refs = load_images(images, resolution, None)
    n, per_image = residual.shape[:2]
    residual_tokens = run.residual_names(n, per_image)
    sd.tokenizer.add_multi_vector_token(token, len(target))
    sd.tokenizer.add_tokens(sum(residual_tokens, []))
    extra = torch.cat([target, residual.flatten(0, 1)]).to(device, dtype)
    with_dd = args.dd_weight > 0

    # Frozen tokens: every condition's embedding once, in conditions.stage2_table_layout's order.
    with_r = [" ".join(r) for r in residual_tokens]
    prompts = [f"{token} {r}" for r in with_r] + with_r + [token, ""]
    with torch.no_grad():
        table = sd.text_encoder(sd.tokenizer(prompts).to(device), extra_embeddings=extra)
        latents = torch.cat([sd.vae.encode(x[None].to(device, dtype))[0] for x in refs.images]) * sd.vae.scaling_factor
    alphas_cumprod = sd.alphas_cumprod.to(device)

    params = {f"lora{k}": p for k, p in enumerate(lora.add_lora(sd.unet, args.rank, args.alpha, init=args.lora_init))}
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(args.seed)
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "out", "images", "model")}
    settings.update(resolution=resolution, precision=precision, device=device, prediction_type=prediction_type,
                    model=run.model_name(model_path, model.DEFAULT_MODEL))  # no local path in shared files

    with Training(args.out, "stage2", params, optimizer, scaler, generator, args.steps, args.save_every, args.resume,
                  args.overwrite) as training:
        run.save_paths(args.out, images=images, model=model_path)

        # -----------------------------------------------------------------------------------------
        # train
        bar = tqdm(range(training.start, args.steps), initial=training.start, total=args.steps, desc="stage 2",
                   dynamic_ncols=True)
        for step in bar:
            rng_before, t0 = training.begin_step()
            i = torch.randint(n, (args.batch,), generator=generator)
            t = torch.randint(0, len(alphas_cumprod), (args.batch,), generator=generator)
            noise = torch.randn(args.batch, *latents.shape[1:], generator=generator).to(device, dtype)
            i, t = i.to(device), t.to(device)
            x = add_noise(latents[i], t, noise, alphas_cumprod)
            rows = conditions.stage2_rows(x, t, i, n, with_dd)
            eps, rec = conditions.for_losses(conditions.predict(sd.unet, table, rows), rows, latents[i], noise,
                                             alphas_cumprod, prediction_type)
            terms = accord_losses.loss_terms(eps, noise, t, alphas_cumprod, args.dd_space, rec=rec)
            loss = accord_losses.total(terms, {"dd": args.dd_weight})
            values, ms = training.record(step, loss, terms, rng_before, t0)
            bar.set_postfix({**{k: f"{v:.4f}" for k, v in values.items()}, "ms/step": f"{ms:.0f}"})
        bar.close()

        # -----------------------------------------------------------------------------------------
        # save
        lora_meta = {"rank": str(args.rank), "alpha": str(args.alpha), "settings": json.dumps(settings)}
        lora.save_lora(sd.unet, os.path.join(args.out, "lora.peft.safetensors"), "peft", lora_meta)
        lora.save_lora(sd.unet, os.path.join(args.out, "lora.kohya.safetensors"), "kohya", lora_meta)
        training.save(args.steps)
        if args.val_steps != 0:
            val_prompts = [run.with_target_token(prompt, token) for prompt in sd.prompts]
            with progress_bar("validation grid") as progress:
                pictures = generate(sd, val_prompts, extra, seed=args.seed, steps=args.val_steps,
                                    guidance=sd.guidance, resolution=resolution, progress=progress,
                                    sampler=args.val_sampler, prediction_type=prediction_type)
            save_png(grid(pictures, columns=len(sd.prompts)), os.path.join(args.out, "stage2_grid.png"))
    print(f"stage 2 done: {args.out}/lora.peft.safetensors and lora.kohya.safetensors")


if __name__ == "__main__":
    run.report_user_errors(interrupted="interrupted before training started; nothing was written")
    main()
