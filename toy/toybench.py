"""ToyBench: concept leakage counted exactly, on the toy world of toy/world.py.

    python toy/toybench.py --scenario all                       # both scenarios, every row
    python toy/toybench.py --scenario shared --concepts 1 --seeds 1 --steps 20 --stage2_steps 10 --sample_steps 10
    torchrun --nproc_per_node 2 toy/toybench.py --scenario all  # (scenario, concept, seed) jobs shared out

For every scenario, held-out concept and seed it renders reference photos of the concept
(world.reference_set), personalises the embedded toy model with each method below, then asks for the
concept with two kinds of prompt:

  named  "a large <v> on a {colour} background, center", for every background colour no reference had
  open   "a large <v>": no background, no place, so nothing in the prompt overrules a leak

Scenarios: "distinct" gives every photo a background colour and a corner of its own (ConceptPrism's
case: what is specific to one photo); "shared" puts every photo on the same background colour and in
the same corner (ACCORD's case: a context that comes with the subject every time).

The attribute classifier reads every generated image:

  fidelity          the concept is drawn: share of its shape, colour and pattern found (each also alone)
  alignment         named prompts: the prompted background colour is there
  leak_bg_{kind}    share of images of that prompt kind on a reference photo's background colour
  leak_pos_{kind}   share with the object in a reference photo's corner
  excess_*          the leak minus the same share for the `words` row on the same prompts, same concept
                    and seed: leakage above the base rate at which an unpersonalised model draws those
                    colours and corners anyway (in "distinct" four of eight colours and all four corners
                    are a reference's, so the raw share is high for every row; only the excess says
                    anything; in "shared" one colour and one corner are the references', so the
                    base rate is low and a learned context shows)

Rows: `words` asks for the concept by name ("purple dotted heart"; pretraining never showed those
combinations): the base rate. Then textual inversion (<v> alone); DreamBooth-LoRA (textual inversion,
then the LoRA stage on the prompt "<v>" alone, as long as the ConceptPrism + LoRA row: the positive
control, which nothing stops from memorising backgrounds); ConceptPrism stage 1 with beta 0 and with
its default beta; + ACCORD's DDLoss; ConceptPrism's stage 1 + its LoRA stage; DDLoss in both stages.
There is no "DreamBooth-LoRA + DDLoss" row: without residual tokens <r_i> is empty, so DDLoss's
condition "<v> <r_i>" is "<v>" and "<r_i>" is "": A_p = 0 and A_g = A_0, and the loss is zero for
any weights (stage1_tokens.py refuses --dd_weight with --residuals 0 for that reason).

Results are appended to <out>/results.jsonl as each (scenario, concept, seed, method) finishes, and a
finished training stage is reused, so a killed benchmark continues where it stopped. Under torchrun the
unfinished (scenario, concept, seed) jobs are dealt out to the ranks (each rank on its own GPU, or one
CPU thread each: torchrun sets OMP_NUM_THREADS=1), all appending to the one results.jsonl; rank 0
gathers the grid pictures and writes the tables. Every job is seeded by itself, so the tables do not
depend on how many processes ran them. <out>/table.md has a table per scenario, <out>/summary.json
{scenario: {method: {measure: [mean, std]}}} (mean and std over all concept x seed runs),
<out>/grid_<scenario>.png the first concept at seed 0: references on top, then per method its named
images (one per colour) and then its open images.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist

# Run as `python toy/<script>.py`, Python puts toy/ first on sys.path, not the repository root
# where the `model` library, the stage scripts and the `toy` package are: add the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model
import stage1_tokens
import stage2_lora
from model import lora, run
from model.generate import generate, grid, save_png
from toy import world

TI = ["--residuals", "0"]
DD = ["--dd_weight", "0.1"]
METHODS = {  # name: stage-1 arguments (None: no learning), stage-2 arguments (None: no LoRA stage)
    "words": (None, None),
    "textual inversion": (TI, None),
    "DreamBooth-LoRA": (TI, []),
    "ConceptPrism stage 1 (beta 0)": (["--beta", "0"], None),
    "ConceptPrism stage 1": ([], None),
    "+ DDLoss": (DD, None),
    "+ LoRA stage": ([], []),
    "+ DDLoss in both stages": (DD, DD),
}
SCENE = "scene"  # stage-1 argument "--captions scene": captions naming only each photo's background and corner
EXPERIMENTS = {  # rows outside the default run (name them in --methods): why ConceptPrism is less faithful here
    # The toy captions name every attribute of the subject, so the residuals start out holding it
    # (they start at the caption's embedding); the paper's VLM captions describe the whole scene.
    "ConceptPrism stage 1 (scene captions)": (["--captions", SCENE], None),
    # The residuals start as text-encoder outputs, 33x a word embedding's norm, and move ~3% of it
    # in 400 steps: they may outweigh <v> in "<v> <r_i>" from the first step.
    "ConceptPrism stage 1 (word-scale residuals)": (["--residual_init", "words"], None),
}
ROWS = {**METHODS, **EXPERIMENTS}
BASE_RATE = "words"
CONTROL = "DreamBooth-LoRA"
CONCEPT_PARTS = ("shape", "colour", "pattern")  # what a held-out concept is made of, in HELD_OUT's order
KINDS = ("open", "named")
LEAKS = [f"leak_{what}_{kind}" for what in ("bg", "pos") for kind in KINDS]
MEASURES = ("fidelity", *CONCEPT_PARTS, "alignment", *LEAKS, *[m.replace("leak", "excess") for m in LEAKS])
SCENARIOS = world.REFERENCE_SCENARIOS


# -------------------------------------------------------------------------------------------------
# settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=run.HelpFormatter)
    p.add_argument("--out", default="runs/toybench", help="runs, results.jsonl, table.md, summary.json, grids")
    p.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all", help="reference photos on "
                   "backgrounds of their own (distinct), on one background (shared), or both")
    p.add_argument("--model", default=model.DEFAULT_MODEL, help="a toy-world model (default: the embedded one)")
    p.add_argument("--classifier", default=os.path.join(model.TINY_DIR, "classifier.safetensors"),
                   help="the attribute classifier toy/train_classifier.py wrote "
                   "(default: the shipped one, toy/tiny/classifier.safetensors)")
    p.add_argument("--concepts", type=int, default=3, help="how many of the held-out concepts (at most 5)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per concept: reference photos, training, sampling "
                   "(1 keeps the default run near 45 min on 2 CPU cores; the spread is then over concepts)")
    p.add_argument("--images", type=int, default=4, help="reference photos per concept")
    p.add_argument("--steps", type=int, default=400, help="stage-1 steps (the README's first command's)")
    p.add_argument("--lr", type=float, default=None, help="stage-1 learning rate (default: stage 1's)")
    p.add_argument("--target_vectors", type=int, default=3, help="vectors <v> stands for (the README's first "
                   "command's: one per attribute the toy model's words name)")
    p.add_argument("--stage2_steps", type=int, default=120, help="stage-2 steps")
    p.add_argument("--per_prompt", type=int, default=4, help="images per named prompt (one prompt per colour)")
    p.add_argument("--open_images", type=int, default=16, help="images of the open prompt")
    p.add_argument("--sample_steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--methods", default=None, help="comma-separated rows to run, e.g. 'DreamBooth-LoRA' to check "
                   "the instrument alone (default: every row; words always runs, it is the base rate)")
    p.add_argument("--device", default=None, help="default cuda when available")
    args = p.parse_args(argv)
    chosen = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in chosen if m not in ROWS]
    if unknown:
        raise model.UserError(f"unknown --methods {', '.join(unknown)}; the rows are: {', '.join(ROWS)}")
    args.methods = [m for m in ROWS if m == BASE_RATE or m in chosen]
    if not 1 <= args.concepts <= len(world.HELD_OUT):
        raise model.UserError(f"--concepts must be 1 to {len(world.HELD_OUT)}")
    if not 2 <= args.images <= 6:
        raise model.UserError("--images must be 2 to 6 (exclusion needs two; the method is meant for a few photos)")
    if min(args.seeds, args.steps, args.stage2_steps, args.per_prompt, args.open_images, args.sample_steps,
           args.target_vectors) < 1:
        raise model.UserError("--seeds, --steps, --stage2_steps, --per_prompt, --open_images, --sample_steps and "
                              "--target_vectors must be >= 1")
    if not os.path.exists(args.classifier):
        raise model.UserError(f"no classifier at {args.classifier}; train one with python toy/train_classifier.py")
    return args


# -------------------------------------------------------------------------------------------------
# one method on one reference set

def scene_captions_file(refs):
    """Where main() writes the captions file of the experiment rows' "--captions scene"."""
    return refs.rstrip("/") + "_scene_captions.json"


def personalise(args, refs, folder, stage1_args, stage2_args, seed):
    """Train into `folder` (a finished stage is reused, so an interrupted benchmark resumes); returns
    the folder whose tokens (and LoRA) to sample with. Methods with the same stage 1 share its folder;
    each stage 2 gets a subfolder of its own holding a copy of the stage-1 tokens."""
    common = ["--model", args.model, "--seed", str(seed), "--val_steps", "0"] + (
        ["--device", args.device] if args.device else [])

    def again(where, stage):  # continue a stage a killed benchmark left half done
        half_done = os.path.exists(os.path.join(where, f"{stage}_checkpoint.safetensors"))
        return "--resume" if half_done else "--overwrite"

    if not os.path.exists(os.path.join(folder, "DONE_stage1")):
        if stage1_args[-2:] == ["--captions", SCENE]:
            stage1_args = stage1_args[:-1] + [scene_captions_file(refs)]
        lr = ["--lr", str(args.lr)] if args.lr else []
        stage1_tokens.main(["--images", refs, "--out", folder, "--steps", str(args.steps), "--target_vectors",
                            str(args.target_vectors), again(folder, "stage1")] + lr + stage1_args + common)
    if stage2_args is None:
        return folder
    lora_folder = os.path.join(folder, "lora_" + ("_".join(stage2_args).replace("-", "") or "default"))
    if not os.path.exists(os.path.join(lora_folder, "DONE_stage2")):
        os.makedirs(lora_folder, exist_ok=True)
        shutil.copy(os.path.join(folder, run.TOKENS_FILE), lora_folder)
        stage2_lora.main(["--out", lora_folder, "--images", refs, "--steps", str(args.stage2_steps),
                          again(lora_folder, "stage2")] + stage2_args + common)
    return lora_folder


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


def prompts_for(subject, grounds, n_open):
    """(named prompts, one per entry of `grounds`, then n_open open prompts), and the kind of each."""
    named = [f"a large {subject} on {world.background_words(g)}, center" for g in grounds]
    return named + [f"a large {subject}"] * n_open, ["named"] * len(grounds) + ["open"] * n_open


def measures(read, concept, kinds, grounds, ref_attrs):
    """The raw measures of one method's images from the classifier's reading `read` ({attribute: value
    per image}): `kinds` says each image's prompt kind, `grounds` the background each named prompt asked
    for (in order). The excess needs the words row and is computed by `excess`."""
    ref_grounds = {a["background"] for a in ref_attrs}
    ref_corners = {a["position"] for a in ref_attrs}
    n = len(kinds)
    parts = {k: float(np.mean([read[k][i] == v for i in range(n)])) for k, v in zip(CONCEPT_PARTS, concept)}
    named = [i for i in range(n) if kinds[i] == "named"]
    out = {"fidelity": float(np.mean(list(parts.values()))), **parts,
           "alignment": float(np.mean([read["background"][i] == g for i, g in zip(named, grounds)]))}
    for kind in KINDS:
        which = [i for i in range(n) if kinds[i] == kind]
        out[f"leak_bg_{kind}"] = float(np.mean([read["background"][i] in ref_grounds for i in which]))
        out[f"leak_pos_{kind}"] = float(np.mean([read["position"][i] in ref_corners for i in which]))
    return out


def excess(record, words_record):
    """The leaks of `record` above the words row's on the same scenario, concept, seed and prompts."""
    return {m.replace("leak", "excess"): record[m] - words_record[m] for m in LEAKS}


def summarise(records, methods=ROWS):
    """{scenario: {method: {measure: [mean, std]}}} over every (concept, seed) the records hold, the
    excess taken against the words row of the same scenario, concept and seed."""
    words = {(r["scenario"], r["concept"], r["seed"]): r for r in records if r["method"] == BASE_RATE}
    summary = {}
    for scenario in SCENARIOS:
        rows = {}
        for method in methods:
            runs = [{**r, **excess(r, words[(r["scenario"], r["concept"], r["seed"])])} for r in records
                    if r["scenario"] == scenario and r["method"] == method
                    and (r["scenario"], r["concept"], r["seed"]) in words]
            if runs:
                rows[method] = {m: [float(np.mean([r[m] for r in runs])), float(np.std([r[m] for r in runs]))]
                                for m in MEASURES}
        if rows:
            summary[scenario] = rows
    return summary


def table(rows):
    """One scenario's summary as a markdown table."""
    lines = [f"| method | {' | '.join(MEASURES)} |", "|---" * (len(MEASURES) + 1) + "|"]
    for method, values in rows.items():
        lines.append(f"| {method} | " + " | ".join(f"{values[m][0]:.2f} ± {values[m][1]:.2f}" for m in MEASURES)
                     + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# the benchmark

def append_result(path, record):
    """One line, in one write to a file opened for appending: the lines of several ranks never mix."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def main(argv=None):
    args = parse_args(argv)
    rank, ranks, device = run.start_distributed()
    args.device = device or args.device
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    done = {}
    if rank == 0 and os.path.exists(results_path):
        with open(results_path) as f:
            for line in f:
                r = json.loads(line)
                if "scenario" in r and all(m in r for m in LEAKS):  # rows of an older ToyBench are measured again
                    done[(r["scenario"], r["concept"], r["seed"], r["method"])] = r
    if ranks > 1:  # every rank deals from what rank 0 read, not from a file another rank may be appending to
        shared = [done]
        dist.broadcast_object_list(shared, src=0)
        done = shared[0]
    classifier = world.load_classifier(args.classifier)
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)

    # Scenarios innermost, so a run stopped early has both scenarios' first concepts.
    jobs = [(c, concept, seed, scenario) for c, concept in enumerate(world.HELD_OUT[:args.concepts])
            for seed in range(args.seeds) for scenario in scenarios]
    # Only unfinished jobs are dealt out, so the ranks of a resumed run share what is left evenly. The
    # first concept's seed 0 always runs: its pictures are drawn again (training is reused) for the grids.
    jobs = [(c, concept, seed, scenario) for c, concept, seed, scenario in jobs if (c, seed) == (0, 0) or any(
        (scenario, world.concept_name(concept), seed, method) not in done for method in args.methods)]
    pictures = {}  # first concept, seed 0, per scenario: references, then a row per method
    for c, concept, seed, scenario in jobs[rank::ranks]:
        name = world.concept_name(concept)
        first = c == 0 and seed == 0
        if first:
            pictures[scenario] = []
        images, captions, ref_attrs = world.reference_set(concept, args.images,
                                                          np.random.default_rng([seed, c]), scenario)
        tag = f"{scenario}/{name.replace(' ', '_')}_seed{seed}"
        refs = os.path.join(args.out, "refs", tag)
        names = world.write_folder(refs, images, captions)
        with open(scene_captions_file(refs), "w") as f:
            json.dump({n: world.scene_caption(a) for n, a in zip(names, ref_attrs)}, f, indent=1)
        ref_grounds = {a["background"] for a in ref_attrs}
        grounds = [g for g in world.RGB if g != concept[1] and g not in ref_grounds]
        grounds = [g for g in grounds for _ in range(args.per_prompt)]
        for method in args.methods:
            stage1_args, stage2_args = ROWS[method]
            key = (scenario, name, seed, method)
            if key in done and not first:
                continue
            folder = None
            if stage1_args is not None:
                stage1_name = "_".join(stage1_args).replace("-", "") or "default"
                folder = os.path.join(args.out, "runs", tag, stage1_name)
                folder = personalise(args, refs, folder, stage1_args, stage2_args, seed)
            prompts, kinds = prompts_for(name if folder is None else "<v>", grounds, args.open_images)
            generated = generate_images(args, prompts, folder, stage2_args is not None, seed)
            if first:
                open_shown = min(args.open_images, 4)
                pictures[scenario].append(torch.cat([generated[:len(grounds):args.per_prompt],
                                                     generated[len(grounds):len(grounds) + open_shown]]))
            if key not in done:
                read = classifier.predict(generated * 2 - 1)
                done[key] = {"scenario": scenario, "concept": name, "seed": seed, "method": method,
                             **measures(read, concept, kinds, grounds, ref_attrs)}
                append_result(results_path, done[key])
            print(f"{scenario}, {name}, seed {seed}, {method}: " + ", ".join(
                f"{m} {done[key][m]:.2f}" for m in ("fidelity", "alignment", *LEAKS)), flush=True)
        if first:
            pictures[scenario].insert(0, world.to_tensor(images) / 2 + 0.5)
    if ranks > 1:  # rank 0 gets every rank's measures and pictures, then writes the tables alone
        gathered = [None] * ranks
        dist.all_gather_object(gathered, (done, pictures))
        dist.destroy_process_group()
        for part_done, part_pictures in gathered:
            done.update(part_done)
            pictures.update(part_pictures)
    if rank != 0:
        return
    for scenario, rows in pictures.items():
        columns = max(len(p) for p in rows)
        rows = [torch.cat([p, torch.ones(columns - len(p), *p.shape[1:])]) for p in rows]
        save_png(grid(torch.cat(rows), columns=columns), os.path.join(args.out, f"grid_{scenario}.png"))

    # ---------------------------------------------------------------------------------------------
    # the tables: every scenario the results hold (a run of one scenario keeps the other's rows)
    summary = summarise(list(done.values()))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    setup = (f"{args.concepts} concepts x {args.seeds} seeds, {args.images} reference photos, <v> of "
             f"{args.target_vectors} vector{'s' * (args.target_vectors > 1)}, stage 1 {args.steps} steps, stage 2 "
             f"{args.stage2_steps} steps, {args.per_prompt} images per named prompt, {args.open_images} open images, "
             f"DDIM {args.sample_steps}; mean ± std over concept x seed runs; higher is better for fidelity and "
             f"alignment, lower for leakage; excess = leak minus the words row's on the same prompts")
    text = "\n\n".join(f"### {scenario}\n\n{table(rows)}" for scenario, rows in summary.items()) + "\n\n" + setup
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"{args.out}/table.md, summary.json, grid_<scenario>.png (first concept, seed 0: references on top, then "
          f"one row per method, named images then open ones: {', '.join(args.methods)})")


if __name__ == "__main__":
    run.report_user_errors()
    main()
