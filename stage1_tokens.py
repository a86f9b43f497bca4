"""Stage 1: learn a token <v> for the subject of a few photos (ConceptPrism), optionally with
ACCORD's DDLoss and PDLoss.

    python stage1_tokens.py --images photos/ --model sd15.safetensors --out runs/dog

Besides <v>, every photo i gets 8 residual tokens <r_i> that are free to absorb what is specific
to that photo (background, pose, light). The exclusion loss pushes <r_i> to say nothing about the
*other* photos, so what they share (the subject) can only live in <v>. The UNet stays frozen;
only the new vectors train. Each step evaluates the UNet on up to ten rows, named in
model/conditions.py (rec, p, g, null, anchor_g, anchor_null) and read by name by the losses in
accord_losses.py; docs/method.md has the table and the formulas. Only four distinct conditions
exist, so the text encoder runs on those four and the rows index them; the UNet runs once on the
gradient rows and once, without a graph, on the stop rows. Without DDLoss rows p, g, null disappear.
"""
import argparse
import json
import os

import torch
from tqdm import tqdm

import accord_losses
import model
from model import conditions, run
from model.data import NEUTRAL_CAPTION, list_images, load_images
from model.generate import SAMPLERS, generate, grid, progress_bar, save_png
from model.schedule import PREDICTION_TYPES, add_noise
from model.training import Training


# -------------------------------------------------------------------------------------------------
# settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=run.HelpFormatter)
    io = p.add_argument_group("I/O")
    io.add_argument("--images", required=True, help="folder of 2-6 photos of one subject (NN.txt captions beside them)")
    io.add_argument("--captions", default=None, help="JSON file mapping image file names to captions")
    io.add_argument("--model", default=model.DEFAULT_MODEL, help="SD 1.5 or 2.x .safetensors file, diffusers folder "
                    "or hub id (default: the embedded toy model)")
    io.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None, help="what the UNet predicts "
                    "(default: what the model says; an SD 2.x single file without that says nothing, and a 768-v "
                    "one needs v_prediction); stored with the run for stage 2 and sample.py")
    io.add_argument("--out", default=None, help="run folder (default runs/<images folder name>)")
    io.add_argument("--save_every", type=int, default=50, help="checkpoint every this many steps")
    io.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    io.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    method = p.add_argument_group("method")
    method.add_argument("--token", default=run.TARGET_TOKEN, help="the learned token's name in prompts and exports "
                        "(one new word, e.g. <dog>: concepts sampled together need different names)")
    method.add_argument("--target_vectors", type=int, default=1, help="vectors <v> stands for (1 in both papers)")
    method.add_argument("--residuals", type=int, default=8, help="residual tokens per image (0: textual inversion, "
                        "<v> alone)")
    method.add_argument("--residual_init", choices=["context", "words"], default="context", help="where each "
                        "photo's residuals start: the mean of its caption's text-encoder outputs (the authors'; "
                        "vectors far larger than a word's: 33x on the toy model), or the mean of its caption's "
                        "word embeddings (a word's scale)")
    method.add_argument("--beta", type=float, default=0.05, help="weight of the cross-image exclusion loss")
    method.add_argument("--dd_weight", type=float, default=0.0, help="ACCORD DDLoss weight (0 = off; paper: 0.1-0.3)")
    method.add_argument("--dd_space", choices=["eps", "xprev"], default="eps", help="DDLoss in epsilon space (w_t "
                        "= 1, the paper's 0.1-0.3 weights apply) or in ACCORD's literal x_(t-1)-mean form "
                        "(w_t = beta_t / (2 alpha_t (1 - abar_t)), on average ~1/226 of eps: it needs a ~200x "
                        "larger --dd_weight)")
    method.add_argument("--pd_weight", type=float, default=0.0, help="ACCORD PDLoss weight (0 = off; paper: "
                        "0.001-0.003)")
    method.add_argument("--superclass", default=None, help="PDLoss superclass word, e.g. dog (PDLoss needs it)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=200, help="optimisation steps")
    optim.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    optim.add_argument("--weight_decay", type=float, default=1e-2, help="AdamW weight decay on the new vectors")
    system = p.add_argument_group("data and system")
    system.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's, "
                        "512 for SD)")
    system.add_argument("--seed", type=int, default=42, help="seed for initialisation, noise and sampling")
    system.add_argument("--precision", choices=list(run.PRECISIONS), default=None, help="frozen model dtype "
                        "(default bf16 on CUDA, fp32 on CPU)")
    system.add_argument("--device", default=None, help="default cuda when available")
    system.add_argument("--val_sampler", choices=list(SAMPLERS), default="ddim", help="sampler of the final "
                        "validation grid")
    system.add_argument("--val_steps", type=int, default=None, help="sampler steps of the final validation grid "
                        "(default: 50 for ddim, 25 for dpm++; 0 = no grid)")
    args = p.parse_args(argv)
    run.check_token_name(args.token)
    if args.steps < 1 or args.target_vectors < 1 or args.lr <= 0 or (args.val_steps or 0) < 0 or \
            min(args.beta, args.dd_weight, args.pd_weight, args.residuals) < 0:
        raise model.UserError("--steps and --target_vectors must be >= 1, --lr > 0, --val_steps, --residuals and "
                              "the loss weights >= 0")
    if args.residuals == 0 and args.dd_weight > 0:
        raise model.UserError("--dd_weight needs residual tokens (its conditions include <r_i>); use --residuals > 0")
    if args.pd_weight > 0 and not args.superclass:
        raise model.UserError("--pd_weight needs --superclass (the subject's class word, e.g. dog)")
    args.out = args.out or os.path.join("runs", os.path.basename(os.path.normpath(args.images)))
    return args


def random_choices(generator, n_images, n_anchors, latent_shape, num_train_steps):
    """The random choices of one step (photo i, anchor photos, timesteps, noise), all from one CPU
    generator so --resume replays them."""
    i = int(torch.randint(n_images, (1,), generator=generator))
    others = [j for j in range(n_images) if j != i]
    anchors = [others[k] for k in torch.randperm(len(others), generator=generator)[:n_anchors].tolist()]
    t = torch.randint(0, num_train_steps, (1 + n_anchors,), generator=generator)
    noise = torch.randn(1 + n_anchors, *latent_shape, generator=generator)
    return i, anchors, t, noise


def main(argv=None):
    args = parse_args(argv)
    device, precision, dtype = run.device_and_dtype(args.device, args.precision)
    torch.manual_seed(args.seed)

    # ---------------------------------------------------------------------------------------------
    # load: every input is checked before the run folder is created, the cheap checks first
    run.check_out(args.out, "stage1", args.resume, args.overwrite)
    image_paths, _, _ = list_images(args.images, args.captions)
    print(f"stage 1: learning {args.token} from {len(image_paths)} photos in {args.images}, run folder "
          f"{args.out}")
    print(f"model: {run.describe_model(args.model, model.DEFAULT_MODEL)} on {device}, {precision}")
    sd = model.load(args.model, device, dtype)
    prediction_type = run.set_prediction_type(sd, args.prediction_type, args.model)
    # Only the new vectors train, and they pass through the text encoder: keep it in fp32, as the
    # ConceptPrism authors do (123M parameters next to the UNet's 860M, which stays in `dtype`). In
    # bf16 a residual vector's elements near 1 move in steps of ~0.008 while Adam moves them ~5e-4.
    sd.text_encoder.float()
    resolution = args.resolution or sd.resolution
    multiple = 2 ** (len(sd.vae.config.ch_mult) - 1 + len(sd.unet.config.channel_mult) - 1)
    if resolution % multiple:
        raise model.UserError(f"--resolution {resolution} must be a multiple of {multiple} for this model")
    refs = load_images(args.images, resolution, args.captions)
    for message in refs.warnings:
        run.warn(message)
    n = len(refs.names)
    captions = refs.captions or [NEUTRAL_CAPTION] * n
    if refs.captions is None:
        run.warn(f"no captions found: residual tokens start from the neutral caption '{NEUTRAL_CAPTION}'")
    beta = args.beta
    if n == 1 and beta > 0:
        run.warn("one image: the exclusion loss needs at least two, so it is off (beta = 0)")
        beta = 0.0
    if args.residuals == 0 and beta > 0:
        print("--residuals 0 (textual inversion): no residual tokens, so no exclusion loss (beta = 0)")
        beta = 0.0
    n_anchors = min(3, n - 1) if beta > 0 else 0
    with_dd = args.dd_weight > 0

    # The new tokens: ids after the frozen table, vectors in their own fp32 parameters.
    residual_tokens = run.residual_names(n, args.residuals)
    sd.tokenizer.add_multi_vector_token(args.token, args.target_vectors)
    sd.tokenizer.add_tokens(sum(residual_tokens, []))
    encoder = sd.text_encoder
    with torch.no_grad():
        vocabulary = encoder.embeddings.token_embedding.weight.float()
        init_gen = torch.Generator().manual_seed(args.seed)
        target0 = vocabulary.mean(0) + vocabulary.std(0) * torch.randn(args.target_vectors, vocabulary.shape[1],
                                                                       generator=init_gen).to(vocabulary.device)
        # Residuals start at the mean over the caption's tokens (BOS < position < first EOS) of its
        # contextual embeddings, or with --residual_init words of its word embeddings.
        ids = sd.tokenizer([c or NEUTRAL_CAPTION for c in captions]).to(device)  # an empty caption has no tokens
        hidden = encoder(ids).float() if args.residual_init == "context" else vocabulary[ids]
        position = torch.arange(ids.shape[1], device=device)[None]
        first_eos = (ids == sd.tokenizer.eos_id).int().argmax(1, keepdim=True)
        inside = (position > 0) & (position < first_eos)
        mean = (hidden * inside[..., None]).sum(1) / inside.sum(1, keepdim=True).clamp(min=1)
    target = torch.nn.Parameter(target0.to(device))
    residual = torch.nn.Parameter(mean[:, None].repeat(1, args.residuals, 1).contiguous())
    params = {"target": target, "residual": residual}
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(args.seed)

    def extra_embeddings():
        return torch.cat([target, residual.flatten(0, 1)])

    # Prompts of the four conditions per image, tokenised once; "" and the latents are constants.
    with_r = [" ".join(r) for r in residual_tokens]
    ids_pg = sd.tokenizer([f"{args.token} {r}" for r in with_r]).to(device)
    ids_g = sd.tokenizer(with_r).to(device)
    ids_p = sd.tokenizer([args.token]).to(device)
    with torch.no_grad():
        empty = encoder(sd.tokenizer([""]).to(device))
        latents = torch.cat([sd.vae.encode(x[None].to(device, dtype))[0] for x in refs.images]) * sd.vae.scaling_factor
    if args.pd_weight > 0:
        ids_pd = sd.tokenizer([f"a photo of {args.token}"]).to(device)
        with torch.no_grad():
            f_s = encoder.pooled(sd.tokenizer([f"a photo of {args.superclass}"]).to(device)).float()
            f_g = encoder.pooled(sd.tokenizer(captions).to(device)).float()
    alphas_cumprod = sd.alphas_cumprod.to(device)
    weights = {"excl": beta, "dd": args.dd_weight, "pd": args.pd_weight}

    # Shared files name no local path (people pass run folders and tokens around): the photos and
    # the model are found again through the run's local paths.json.
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "out", "images", "captions")}
    settings.update(beta=beta, resolution=resolution, precision=precision, device=device,
                    prediction_type=prediction_type, model=run.model_name(args.model, model.DEFAULT_MODEL))

    with Training(args.out, "stage1", params, optimizer, scaler, generator, args.steps, args.save_every, args.resume,
                  args.overwrite, meta={"settings": json.dumps(settings)}) as training:
        run.save_paths(args.out, images=args.images, model=args.model)

        # -----------------------------------------------------------------------------------------
        # train
        bar = tqdm(range(training.start, args.steps), initial=training.start, total=args.steps, desc="stage 1",
                   dynamic_ncols=True)
        for step in bar:
            rng_before, t0 = training.begin_step()
            i, anchors, t, noise = random_choices(generator, n, n_anchors, latents.shape[1:], len(alphas_cumprod))
            t, noise = t.to(device), noise.to(device, dtype)
            # the four conditions of photo i (and PDLoss's prompt), then the UNet rows that read them
            ids = torch.cat([ids_pg[i:i + 1], ids_p, ids_g[i:i + 1]] + ([ids_pd] if args.pd_weight > 0 else []))
            hidden = encoder(ids, extra_embeddings=extra_embeddings())
            table = torch.cat([hidden[:3], empty]).to(dtype)  # as conditions.STAGE1
            x_i = add_noise(latents[i:i + 1], t[:1], noise[:1], alphas_cumprod)
            x_anchors = add_noise(latents[anchors], t[1:], noise[1:], alphas_cumprod)
            rows = conditions.stage1_rows(x_i, t[:1], x_anchors, t[1:], with_dd)
            eps, rec = conditions.for_losses(conditions.predict(sd.unet, table, rows), rows, latents[i:i + 1],
                                             noise[:1], alphas_cumprod, prediction_type)
            pd_features = None
            if args.pd_weight > 0:
                pd_features = (encoder.pooled_from_hidden(hidden[3:], ids[3:]).float(), f_s, f_g)
            terms = accord_losses.loss_terms(eps, noise[:1], t[:1], alphas_cumprod, args.dd_space, pd_features, rec)
            loss = accord_losses.total(terms, weights)
            values, ms = training.record(step, loss, terms, rng_before, t0)
            bar.set_postfix({**{k: f"{v:.4f}" for k, v in values.items()}, "ms/step": f"{ms:.0f}"})
        bar.close()

        # -----------------------------------------------------------------------------------------
        # save
        run.save_tokens(args.out, target, residual, {
            "format": "conceptprism-tokens-v1", "target_token": args.token, "target_vectors": args.target_vectors,
            "images": refs.names, "captions": captions, "residuals_per_image": args.residuals, "steps": args.steps,
            "settings": settings})
        training.save(args.steps)
        if args.val_steps != 0:
            prompts = [run.with_target_token(prompt, args.token) for prompt in sd.prompts]
            with progress_bar("validation grid") as progress:
                images = generate(sd, prompts, extra_embeddings().detach(), seed=args.seed, steps=args.val_steps,
                                  guidance=sd.guidance, resolution=resolution, progress=progress,
                                  sampler=args.val_sampler, prediction_type=prediction_type)
            save_png(grid(images, columns=len(sd.prompts)), os.path.join(args.out, "stage1_grid.png"))
    print(f"stage 1 done: {args.out}/{run.TOKENS_FILE} (target token {args.token} also in v.diffusers.safetensors "
          "and v.a1111.safetensors)")


if __name__ == "__main__":
    run.report_user_errors(interrupted="interrupted before training started; nothing was written")
    main()
