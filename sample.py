"""Draw the learned concept in new scenes: prompts with <v> (or `*`, `{V}`), DDIM with guidance.

    python sample.py --out runs/dog --prompt "a photo of <v> on the beach" --n 4

Loads the target token from the run folder (residual tokens are never used at inference) and the
stage-2 LoRA when there is one; writes one PNG per image and a grid into <out>/samples/.
"""
import argparse
import os

import torch

import model
from model import lora, run
from model.generate import generate, grid, save_png, to_pil


# -------------------------------------------------------------------------------------------------
# settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--samples", default=None, help="output folder (default <out>/samples)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        raise model.UserError("--n and --steps must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, _, dtype = run.device_and_dtype(args.device, args.precision)

    # ---------------------------------------------------------------------------------------------
    # load
    target, _, meta = run.load_tokens(args.out)
    stage1 = meta.get("settings", {})
    sd = model.load(args.model or stage1.get("model") or model.DEFAULT_MODEL, device, dtype)
    resolution = stage1.get("resolution") or sd.resolution
    sd.tokenizer.add_multi_vector_token(run.TARGET_TOKEN, len(target))  # residual tokens stay out of inference
    lora_path = os.path.join(args.out, "lora.peft.safetensors")
    if os.path.exists(lora_path) and not args.no_lora:
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
    folder = args.samples or os.path.join(args.out, "samples")
    os.makedirs(folder, exist_ok=True)
    all_prompts = [p for p in prompts for _ in range(args.n)]
    images = generate(sd, all_prompts, target.to(device, dtype), seed=args.seed, steps=args.steps,
                      guidance=args.guidance if args.guidance is not None else sd.guidance, resolution=resolution)

    # ---------------------------------------------------------------------------------------------
    # save
    for k, image in enumerate(images):
        save_png(to_pil(image), os.path.join(folder, f"{k // args.n:02d}_{k % args.n:02d}.png"))
    save_png(grid(images, columns=args.n), os.path.join(folder, "grid.png"))
    with open(os.path.join(folder, "prompts.txt"), "w") as f:
        f.write("\n".join(f"{k:02d}: {p}" for k, p in enumerate(prompts)) + "\n")
    print(f"{len(images)} images and grid.png in {folder}")


if __name__ == "__main__":
    run.report_user_errors()
    main()
