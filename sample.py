"""Draw the learned concept in new scenes: prompts with <v> (or `*`, `{V}`), DDIM with guidance.

    python sample.py --out runs/dog --prompt "a photo of <v> on the beach" --n 4

Loads the target token from the run folder (residual tokens are never used at inference) and the
stage-2 LoRA when there is one. Every call writes a new numbered folder, <out>/samples/000,
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

import model
from model import lora, run
from model.generate import generate, grid, progress_bar, save_png, to_pil


# -------------------------------------------------------------------------------------------------
# settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=run.HelpFormatter)
    p.add_argument("--out", required=True, help="the run folder stage 1 (and stage 2) wrote")
    p.add_argument("--prompt", action="append", default=None, help="prompt with <v>; repeat for several "
                   "(default: the model's example scenes)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                   "model's, 7.5 for SD)")
    p.add_argument("--model", default=None, help="model (default: the one stage 1 used)")
    p.add_argument("--no_lora", action="store_true", help="ignore the stage-2 LoRA")
    p.add_argument("--samples", default=None, help="output folder (default: the next <out>/samples/NNN)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --samples folder")
    p.add_argument("--precision", choices=list(run.PRECISIONS), default=None, help="default bf16 on CUDA, fp32 "
                   "on CPU")
    p.add_argument("--device", default=None, help="default cuda when available")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        raise model.UserError("--n and --steps must be >= 1")
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


def main(argv=None):
    args = parse_args(argv)
    device, precision, dtype = run.device_and_dtype(args.device, args.precision)

    # ---------------------------------------------------------------------------------------------
    # load: every input is checked before anything is written
    target, _, meta = run.load_tokens(args.out)
    holder = run.RunLock.holder(args.out)
    if holder is not None:  # stage 2 may be replacing the LoRA this would read
        raise model.UserError(run.RunLock.busy_message(args.out, holder))
    if args.samples and os.path.exists(args.samples) and not args.overwrite:
        raise model.UserError(f"--samples {args.samples} already exists; choose another folder, pass --overwrite "
                              "to replace it, or leave --samples out to get a new numbered folder")
    stage1 = meta.get("settings", {})
    model_path = run.find_model(args.out, args.model, stage1, model.DEFAULT_MODEL)
    print(f"sampling {run.TARGET_TOKEN} of run folder {args.out}")
    print(f"model: {run.describe_model(model_path, model.DEFAULT_MODEL)} on {device}, {precision}")
    sd = model.load(model_path, device, dtype)
    resolution = stage1.get("resolution") or sd.resolution
    sd.tokenizer.add_multi_vector_token(run.TARGET_TOKEN, len(target))  # residual tokens stay out of inference
    lora_path = os.path.join(args.out, "lora.peft.safetensors")
    with_lora = os.path.exists(lora_path) and not args.no_lora
    if with_lora:
        lora.load_lora(sd.unet, lora_path)
        lora.merge_lora(sd.unet)  # folded into the weights: sampling pays nothing for it
        print(f"with the stage-2 LoRA from {lora_path}")
    prompts = [run.with_target_token(p) for p in (args.prompt or sd.prompts)]
    for prompt in prompts:
        if run.TARGET_TOKEN not in prompt:
            run.warn(f"prompt '{prompt}' does not contain <v>: it will not show the learned concept")
        if sd.tokenizer.count(prompt) > 75:
            run.warn(f"prompt '{prompt[:40]}...' is longer than 75 tokens and will be cut")

    # ---------------------------------------------------------------------------------------------
    # sample
    guidance = args.guidance if args.guidance is not None else sd.guidance
    all_prompts = [p for p in prompts for _ in range(args.n)]
    with progress_bar(f"{len(all_prompts)} images") as progress:
        images = generate(sd, all_prompts, target.to(device, dtype), seed=args.seed, steps=args.steps,
                          guidance=guidance, resolution=resolution, progress=progress)

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
            json.dump({"seed": args.seed, "steps": args.steps, "guidance": guidance, "n": args.n,
                       "lora": with_lora, "resolution": resolution, "precision": precision,
                       "model": run.model_name(model_path, model.DEFAULT_MODEL)}, f, indent=1)
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
