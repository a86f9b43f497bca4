"""ToyBench: concept leakage counted exactly, on the toy world of toy/world.py.

    python toy/toybench.py                                      # 3 concepts x 3 seeds, ~13 min on 2 CPU cores
    python toy/toybench.py --concepts 1 --seeds 1 --steps 20 --stage2_steps 10 --sample_steps 10   # smoke

For every held-out concept and seed it renders reference photos of the concept, each on a background
colour of its own and in a corner of its own (world.reference_set), personalises the embedded toy
model with each method below, then asks for the concept somewhere new: "a large <v> on a {colour}
background, center" for every background colour no reference used. The attribute classifier reads
every generated image:

  fidelity   the concept is drawn: share of its shape, colour and pattern the classifier finds (and
             each of the three on its own)
  alignment  the prompt is followed: the prompted background colour is there
  leak bg    a reference photo's background colour is there instead
  leak pos   the object sits in a reference photo's corner, although the prompt says center

Methods, each row adding one thing: "<v> alone" (textual inversion), ConceptPrism stage 1 with beta 0
(residual tokens, no exclusion), ConceptPrism stage 1, + ACCORD's DDLoss, + the stage-2 LoRA; then
ConceptPrism stage 1 with a one-vector <v> (the papers' choice for SD) against the three vectors every
other row uses. A "words" row asks for the concept by name ("purple dotted heart"): pretraining never
showed those combinations, so it is the score of describing the subject instead of learning it.

Results are appended to <out>/results.jsonl as each run finishes, so a killed benchmark continues where
it stopped; the table (mean and spread over seeds) goes to <out>/table.md and a picture to <out>/grid.png.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

# Run as `python toy/<script>.py`, Python puts toy/ first on sys.path, not the repository root
# where the `model` library, the stage scripts and the `toy` package are: add the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model
import stage1_tokens
import stage2_lora
from model import lora, run
from model.generate import generate, grid, save_png
from toy import world

METHODS = {  # name: stage-1 arguments (None: no learning), LoRA stage after it
    "words (no learning)": (None, False),
    "<v> alone (textual inversion)": (["--residuals", "0"], False),
    "ConceptPrism stage 1, beta 0": (["--beta", "0"], False),
    "ConceptPrism stage 1": ([], False),
    "+ DDLoss": (["--dd_weight", "0.1"], False),
    "+ DDLoss + LoRA stage": (["--dd_weight", "0.1"], True),
    "ConceptPrism stage 1, <v> of 1 vector": (["--target_vectors", "1"], False),
}
CONCEPT_PARTS = ("shape", "colour", "pattern")  # what a held-out concept is made of, in HELD_OUT's order
MEASURES = ("fidelity", *CONCEPT_PARTS, "alignment", "leak bg", "leak pos")


# -------------------------------------------------------------------------------------------------
# settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=run.HelpFormatter)
    p.add_argument("--out", default="runs/toybench", help="runs, results.jsonl, table.md and grid.png")
    p.add_argument("--model", default=model.DEFAULT_MODEL, help="a toy-world model (default: the embedded one)")
    p.add_argument("--classifier", default=os.path.join(model.TINY_DIR, "classifier.safetensors"),
                   help="the attribute classifier toy/train_classifier.py wrote "
                   "(default: the shipped one, toy/tiny/classifier.safetensors)")
    p.add_argument("--concepts", type=int, default=3, help="how many of the held-out concepts (at most 5)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per concept: reference photos, training, sampling")
    p.add_argument("--images", type=int, default=4, help="reference photos per concept")
    p.add_argument("--steps", type=int, default=400, help="stage-1 steps (the README's first command's)")
    p.add_argument("--lr", type=float, default=None, help="stage-1 learning rate (default: stage 1's)")
    p.add_argument("--target_vectors", type=int, default=3, help="vectors <v> stands for (the README's first "
                   "command's: one per attribute the toy model's words name)")
    p.add_argument("--stage2_steps", type=int, default=120, help="stage-2 steps")
    p.add_argument("--per_prompt", type=int, default=4, help="images generated per prompt")
    p.add_argument("--sample_steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--device", default=None, help="default cuda when available")
    args = p.parse_args(argv)
    if not 1 <= args.concepts <= len(world.HELD_OUT):
        raise model.UserError(f"--concepts must be 1 to {len(world.HELD_OUT)}")
    if not 2 <= args.images <= 6:
        raise model.UserError("--images must be 2 to 6 (exclusion needs two; the method is meant for a few photos)")
    if min(args.seeds, args.steps, args.stage2_steps, args.per_prompt, args.sample_steps, args.target_vectors) < 1:
        raise model.UserError("--seeds, --steps, --stage2_steps, --per_prompt, --sample_steps and --target_vectors "
                              "must be >= 1")
    if not os.path.exists(args.classifier):
        raise model.UserError(f"no classifier at {args.classifier}; train one with python toy/train_classifier.py")
    return args


# -------------------------------------------------------------------------------------------------
# one method on one reference set

def personalise(args, refs, folder, stage1_args, with_lora, seed):
    """Train into `folder` (a finished stage is reused, so an interrupted benchmark resumes)."""
    common = ["--model", args.model, "--seed", str(seed), "--val_steps", "0"] + (
        ["--device", args.device] if args.device else [])

    def again(stage):  # continue a stage a killed benchmark left half done
        half_done = os.path.exists(os.path.join(folder, f"{stage}_checkpoint.safetensors"))
        return "--resume" if half_done else "--overwrite"

    if not os.path.exists(os.path.join(folder, "DONE_stage1")):
        lr = ["--lr", str(args.lr)] if args.lr else []
        stage1_tokens.main(["--images", refs, "--out", folder, "--steps", str(args.steps), "--target_vectors",
                            str(args.target_vectors), again("stage1")] + lr + stage1_args + common)
    if with_lora and not os.path.exists(os.path.join(folder, "DONE_stage2")):
        stage2_lora.main(["--out", folder, "--steps", str(args.stage2_steps), again("stage2")] + common)


def generate_images(args, prompts, folder, with_lora, seed):
    """The prompts drawn with the learned <v> (and LoRA), as sample.py would; words alone without a folder."""
    device, _, dtype = run.device_and_dtype(args.device, None)
    sd = model.load(args.model, device, dtype)
    target = None
    if folder is not None:
        target, _, _ = run.load_tokens(folder)
        target = target.to(device, dtype)
        sd.tokenizer.add_multi_vector_token(run.TARGET_TOKEN, len(target))
        if with_lora:
            lora.load_lora(sd.unet, os.path.join(folder, "lora.peft.safetensors"))
            lora.merge_lora(sd.unet)
    return generate(sd, prompts, target, seed=seed, steps=args.sample_steps, guidance=sd.guidance,
                    resolution=sd.resolution, batch=64)


def score(classifier, images, concept, grounds, ref_attrs):
    """The measures of one method's images (see the module docstring)."""
    read = classifier.predict(images * 2 - 1)
    ref_grounds = {a["background"] for a in ref_attrs}
    ref_corners = {a["position"] for a in ref_attrs}
    n = len(images)
    parts = {k: float(np.mean([read[k][i] == v for i in range(n)])) for k, v in zip(CONCEPT_PARTS, concept)}
    return {"fidelity": float(np.mean(list(parts.values()))), **parts,
            "alignment": float(np.mean([read["background"][i] == grounds[i] for i in range(n)])),
            "leak bg": float(np.mean([read["background"][i] in ref_grounds for i in range(n)])),
            "leak pos": float(np.mean([read["position"][i] in ref_corners for i in range(n)]))}


# -------------------------------------------------------------------------------------------------
# the benchmark

def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    done = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            for line in f:
                r = json.loads(line)
                if all(m in r for m in MEASURES):  # rows of an older ToyBench are measured again
                    done[(r["concept"], r["seed"], r["method"])] = r
    classifier = world.load_classifier(args.classifier)
    pictures = []  # the first concept and seed: references, then a row of images per method

    for c, concept in enumerate(world.HELD_OUT[:args.concepts]):
        name = world.concept_name(concept)
        for seed in range(args.seeds):
            images, captions, ref_attrs = world.reference_set(concept, args.images, np.random.default_rng([seed, c]))
            refs = os.path.join(args.out, "refs", f"{name.replace(' ', '_')}_seed{seed}")
            world.write_folder(refs, images, captions)
            grounds = [g for g in world.RGB if g != concept[1] and g not in {a["background"] for a in ref_attrs}]
            grounds = [g for g in grounds for _ in range(args.per_prompt)]
            for method, (stage1_args, with_lora) in METHODS.items():
                key = (name, seed, method)
                folder = None
                if stage1_args is not None:  # methods that share a stage 1 share its folder
                    folder = os.path.join(args.out, "runs", f"{name.replace(' ', '_')}_seed{seed}",
                                          "_".join(stage1_args).replace("-", "") or "default")
                subject = name if folder is None else "<v>"
                prompts = [f"a large {subject} on {world.background_words(g)}, center" for g in grounds]
                if key in done and not (c == 0 and seed == 0):
                    continue
                if folder is not None:
                    personalise(args, refs, folder, stage1_args, with_lora, seed)
                generated = generate_images(args, prompts, folder, with_lora, seed)
                if c == 0 and seed == 0:
                    pictures.append(generated[::args.per_prompt])
                if key not in done:
                    done[key] = {"concept": name, "seed": seed, "method": method,
                                 **score(classifier, generated, concept, grounds, ref_attrs)}
                    with open(results_path, "a") as f:
                        f.write(json.dumps(done[key]) + "\n")
                print(f"{name}, seed {seed}, {method}: " + ", ".join(f"{m} {done[key][m]:.2f}" for m in MEASURES))
            if c == 0 and seed == 0:
                pictures.insert(0, world.to_tensor(images) / 2 + 0.5)

    # ---------------------------------------------------------------------------------------------
    # the table: per seed the mean over concepts and images, then mean and spread over seeds
    lines = [f"| method | {' | '.join(MEASURES)} |", "|---" * (len(MEASURES) + 1) + "|"]
    for method in METHODS:
        cells = []
        for m in MEASURES:
            per_seed = [np.mean([r[m] for r in done.values() if r["method"] == method and r["seed"] == s])
                        for s in range(args.seeds)]
            cells.append(f"{np.mean(per_seed):.2f} ± {np.std(per_seed):.2f}")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    setup = (f"{args.concepts} concepts x {args.seeds} seeds, {args.images} reference photos, <v> of "
             f"{args.target_vectors} vector{'s' * (args.target_vectors > 1)}, stage 1 {args.steps} steps, stage 2 "
             f"{args.stage2_steps} steps, {len(grounds)} images per run, DDIM {args.sample_steps}; mean ± std over "
             f"seeds; higher is better for fidelity and alignment, lower for leakage")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n\n" + setup + "\n")
    columns = max(len(p) for p in pictures)
    rows = [torch.cat([p, torch.ones(columns - len(p), *p.shape[1:])]) for p in pictures]
    save_png(grid(torch.cat(rows), columns=columns), os.path.join(args.out, "grid.png"))
    print(table + "\n\n" + setup)
    print(f"{args.out}/table.md, {args.out}/grid.png (first concept, seed 0: references on top, then one row per "
          f"method: {', '.join(METHODS)})")


if __name__ == "__main__":
    run.report_user_errors()
    main()
