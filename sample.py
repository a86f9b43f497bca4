"""Draw the learned concept in new scenes: prompts with <v> (or `*`, `{V}`), DDIM or DPM-Solver++
with guidance; or several concepts learned separately, in one prompt.

    python sample.py --out runs/dog --prompt "a photo of <v> on the beach" --n 4
    python sample.py --runs runs/dog runs/cat --prompt "a <dog> next to a <cat>" --sampler dpm++

Loads the target token from the run folder under the name stage 1 gave it (--token; residual
tokens are never used at inference) and the stage-2 LoRA when there is one. With --runs, every
run's token is loaded under its own name (two runs with the same name are refused) and every LoRA
is merged into the UNet: the sum of their low-rank updates, each scaled by its --lora_scale. The
model, its prediction type and the resolution are those stage 1 used (the first run's, with
--runs). Every call writes a new numbered folder, <out>/samples/000 (with --runs, the first run's),
001, ...: one PNG per image (PP_NN.png: prompt PP, image NN), grid.png (a row per prompt),
prompts.txt and settings.json. Sampling is for trying prompts and seeds, so a call never touches
an earlier call's pictures (which a refusal without --overwrite would protect too, at the cost of
a flag on every try), and each folder holds exactly the pictures its prompts.txt lists. With
--samples DIR the pictures go to DIR instead, which must not exist yet unless --overwrite is given.
A folder appears only when complete: it is written under a temporary name and renamed.
"""
import argparse
import json
import os
import re
import shutil

import torch

import model
from model import lora, run
from model.generate import SAMPLERS, generate, grid, progress_bar, save_png, to_pil


# -------------------------------------------------------------------------------------------------
# settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=run.HelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--out", help="the run folder stage 1 (and stage 2) wrote")
    which.add_argument("--runs", nargs="+", help="several run folders, sampled together: each token under its "
                       "own name (stage 1's --token), every LoRA merged; the pictures go to the first run's "
                       "samples/NNN (or --samples)")
    p.add_argument("--prompt", action="append", default=None, help="prompt with the token (<v> unless stage 1 "
                   "named it otherwise); repeat for several (default: the model's example scenes; --runs needs it)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim", help="DDIM, or DPM-Solver++ 2M (the "
                   "ConceptPrism authors' sampler, with --steps 25)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 50 for ddim, 25 for dpm++)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                   "model's, 7.5 for SD)")
    p.add_argument("--model", default=None, help="model (default: the one stage 1 used)")
    p.add_argument("--no_lora", action="store_true", help="ignore the stage-2 LoRA (of every run)")
    p.add_argument("--lora_scale", type=float, nargs="+", default=None, help="scale of each run's LoRA update, one "
                   "per run in the order of --out/--runs (default: 1 each)")
    p.add_argument("--samples", default=None, help="output folder (default: the next <out>/samples/NNN; with "
                   "--runs, in the first run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --samples folder")
    p.add_argument("--precision", choices=list(run.PRECISIONS), default=None, help="default bf16 on CUDA, fp32 "
                   "on CPU")
    p.add_argument("--device", default=None, help="default cuda when available")
    args = p.parse_args(argv)
    args.runs = args.runs or [args.out]
    args.out = args.runs[0]  # where the samples go
    if args.n < 1 or (args.steps is not None and args.steps < 1):
        raise model.UserError("--n and --steps must be >= 1")
    if args.lora_scale is not None and len(args.lora_scale) != len(args.runs):
        raise model.UserError(f"--lora_scale takes one scale per run: {len(args.runs)} runs, "
                              f"{len(args.lora_scale)} scales")
    if len(set(map(os.path.realpath, args.runs))) < len(args.runs):
        raise model.UserError("--runs names the same run folder twice")
    if len(args.runs) > 1 and not args.prompt:
        raise model.UserError("--runs needs --prompt: a prompt with the runs' tokens, e.g. \"a <dog> next to a <cat>\"")
    args.lora_scale = args.lora_scale or [1.0] * len(args.runs)
    return args


def next_number(samples):
    """The number after the highest numbered folder in `samples` (000 when there is none)."""
    taken = [int(name) for name in os.listdir(samples) if re.fullmatch(r"\d{3,}", name)] \
        if os.path.isdir(samples) else []
    return max(taken, default=-1) + 1


def publish(tmp, args):
    """Give the finished temporary folder its name; returns it."""
    if args.samples:
        if os.path.exists(args.samples):  # checked before sampling; --overwrite was given
            old = f"{os.path.normpath(args.samples)}.old{os.getpid()}"
            os.rename(args.samples, old)
            os.rename(tmp, args.samples)
            shutil.rmtree(old)
        else:
            os.rename(tmp, args.samples)
        return args.samples
    samples = os.path.join(args.out, "samples")
    number = next_number(samples)
    while True:  # another sample.py may take the same number meanwhile: renaming onto its folder fails
        folder = os.path.join(samples, f"{number:03d}")
        try:
            if not os.path.exists(folder):
                os.rename(tmp, folder)
                return folder
        except OSError:
            pass
        number += 1


def load_runs(runs):
    """[(run folder, token name, target vectors, stage-1 settings)], each checked readable and not being
    written, the token names distinct (the tokenizer matches them case-insensitively, multi-vector
    names included)."""
    loaded, owner = [], {}
    for out in runs:
        target, _, meta = run.load_tokens(out)
        holder = run.RunLock.holder(out)
        if holder is not None:  # stage 2 may be replacing the LoRA this would read
            raise model.UserError(run.RunLock.busy_message(out, holder))
        token = run.token_name(meta)
        for name in [token] + [f"{token}_{k}" for k in range(1, len(target))]:
            if name.lower() in owner:
                raise model.UserError(f"{owner[name.lower()]} and {out} both name their token {token}: sampled "
                                      "together each needs its own name (stage1_tokens.py --token <name>)")
            owner[name.lower()] = out
        loaded.append((out, token, target, meta.get("settings", {})))
    return loaded


def main(argv=None):
    args = parse_args(argv)
    device, precision, dtype = run.device_and_dtype(args.device, args.precision)

    # ---------------------------------------------------------------------------------------------
    # load: every input is checked before anything is written
    runs = load_runs(args.runs)
    if args.samples and os.path.exists(args.samples) and not args.overwrite:
        raise model.UserError(f"--samples {args.samples} already exists; choose another folder, pass --overwrite "
                              "to replace it, or leave --samples out to get a new numbered folder")
    stage1 = runs[0][3]
    for out, _, _, settings in runs[1:]:
        for key in ("model", "prediction_type"):
            if not args.model and settings.get(key) != stage1.get(key):
                raise model.UserError(f"{args.runs[0]} and {out} were learned with different models ({key} "
                                      f"{stage1.get(key)} and {settings.get(key)}); pass --model to sample them "
                                      "on one anyway")
    model_path = run.find_model(args.runs[0], args.model, stage1, model.DEFAULT_MODEL)
    tokens = [token for _, token, _, _ in runs]
    print(f"sampling {', '.join(tokens)} of run folder{'s' * (len(runs) > 1)} {', '.join(args.runs)}")
    print(f"model: {run.describe_model(model_path, model.DEFAULT_MODEL)} on {device}, {precision}")
    sd = model.load(model_path, device, dtype)
    prediction_type = run.set_prediction_type(sd, stage1.get("prediction_type"), model_path)
    resolution = stage1.get("resolution") or sd.resolution
    for out, token, target, _ in runs:  # residual tokens stay out of inference
        run.check_token_width(target, sd, out)
        sd.tokenizer.add_multi_vector_token(token, len(target))
    extra = torch.cat([target for _, _, target, _ in runs]).to(device, dtype)  # in the order of the new ids
    with_lora = []
    for (out, _, _, _), scale in zip(runs, args.lora_scale):
        lora_path = os.path.join(out, "lora.peft.safetensors")
        with_lora.append(os.path.exists(lora_path) and not args.no_lora)
        if with_lora[-1]:
            lora.load_lora(sd.unet, lora_path)
            lora.merge_lora(sd.unet, scale)  # folded into the weights: sampling pays nothing for it
            print(f"with the stage-2 LoRA from {lora_path}" + (f" at scale {scale:g}" if scale != 1 else ""))
    if len(runs) == 1:
        prompts = [run.with_target_token(p, tokens[0]) for p in (args.prompt or sd.prompts)]
    else:
        prompts = list(args.prompt)
    for prompt in prompts:  # with several runs a prompt may name any of them
        if not any(token.lower() in prompt.lower() for token in tokens):
            run.warn(f"prompt '{prompt}' contains no {' or '.join(tokens)}: it will show no learned concept")
        if sd.tokenizer.count(prompt) > 75:
            run.warn(f"prompt '{prompt[:40]}...' is longer than 75 tokens and will be cut")

    # ---------------------------------------------------------------------------------------------
    # sample
    guidance = args.guidance if args.guidance is not None else sd.guidance
    steps = args.steps or SAMPLERS[args.sampler][1]
    all_prompts = [p for p in prompts for _ in range(args.n)]
    with progress_bar(f"{len(all_prompts)} images") as progress:
        images = generate(sd, all_prompts, extra, seed=args.seed, steps=steps, guidance=guidance,
                          resolution=resolution, progress=progress, sampler=args.sampler,
                          prediction_type=prediction_type)

    # ---------------------------------------------------------------------------------------------
    # save: into a temporary folder beside the final one, renamed when complete
    parent = os.path.dirname(os.path.normpath(args.samples)) if args.samples else os.path.join(args.out, "samples")
    os.makedirs(parent or ".", exist_ok=True)
    tmp = os.path.join(parent, f".partial{os.getpid()}")
    try:
        os.makedirs(tmp)
        for k, image in enumerate(images):
            save_png(to_pil(image), os.path.join(tmp, f"{k // args.n:02d}_{k % args.n:02d}.png"))
        save_png(grid(images, columns=args.n), os.path.join(tmp, "grid.png"))
        with open(os.path.join(tmp, "prompts.txt"), "w") as f:
            f.write("\n".join(f"{k:02d}: {p}" for k, p in enumerate(prompts)) + "\n")
        with open(os.path.join(tmp, "settings.json"), "w") as f:  # what reproduces these pictures; no paths
            settings = {"seed": args.seed, "sampler": args.sampler, "steps": steps, "guidance": guidance, "n": args.n,
                        "lora": with_lora[0], "resolution": resolution, "precision": precision,
                        "prediction_type": prediction_type, "token": tokens[0],
                        "model": run.model_name(model_path, model.DEFAULT_MODEL)}
            if len(runs) > 1:  # run folders by their names only, as every shared file
                settings.update(runs=[os.path.basename(os.path.normpath(out)) for out in args.runs], token=tokens,
                                lora=with_lora, lora_scale=args.lora_scale)
            elif args.lora_scale[0] != 1:
                settings["lora_scale"] = args.lora_scale[0]
            json.dump(settings, f, indent=1)
        folder = publish(tmp, args)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise model.UserError(f"cannot write the samples into {parent} ({e.strerror or e}); earlier samples are "
                                  "untouched") from None
        raise
    print(f"{len(images)} images, grid.png and prompts.txt in {folder}")


if __name__ == "__main__":
    run.report_user_errors(interrupted="interrupted; no samples were written (earlier ones are untouched)")
    main()
