"""DreamBench as the personalisation papers report it: every subject personalised, 4 images for each
of its 25 prompts, scored with DINO, CLIP-I and CLIP-T beside the real-image oracle.

    python dreambench.py --data dreambooth/dataset --model sd15.safetensors --out bench/conceptprism
    torchrun --nproc_per_node 8 dreambench.py --data dreambooth/dataset --model sd15.safetensors --out bench/cp

--data is the dataset folder of github.com/google/dreambooth: one folder of photos per subject and
prompts_and_classes.txt, which names each subject's class word and holds the two 25-prompt
templates (objects; live subjects). Live subjects are those whose class is in --live_classes (cat
and dog: the paper's nine pets; the file does not mark them).

Per subject: stage1_tokens.py (and stage2_lora.py unless --no_stage2) into <out>/runs/<subject>,
with --stage1 / --stage2 flags passed through; then --n images per prompt into
<out>/images/<subject>/<NN>_<prompt>/. Prompts are the DreamBench templates with <v> as the unique
token and, only with --class_word, the class word after it: the ConceptPrism authors' inference
(infer_sd21.py) puts the target token alone. CLIP-T scores every image against its prompt with the
token replaced by the class word ("a dog in the jungle"). Seeds: stage 1 and 2 use --seed; image
k of prompt NN starts from the k-th noise of torch.Generator().manual_seed(seed + NN) (model/
generate.py), the same for every subject and every method, so methods are compared on the same noise.

Under torchrun the subjects are dealt round-robin to the ranks, each rank on its own GPU
(LOCAL_RANK); the rows are gathered to rank 0, which writes <out>/table.md and results.json. The
same command without torchrun does all of it in one process. A killed run resumes: a subject whose
scores are written is not touched again, a finished stage is skipped, an unfinished one continues
from its checkpoint (--resume), and a prompt whose images are all on disk is not sampled again.
"""
import argparse
import json
import os
import re
import shlex

import torch
import torch.distributed as dist

import model
import stage1_tokens
import stage2_lora
from model import lora, metrics, run
from model.data import IMAGE_EXTENSIONS, center_square, read_rgb
from model.generate import SAMPLERS, generate, grid, save_png, to_pil

PROMPTS_FILE = "prompts_and_classes.txt"
# What changes the generated images: a run folder made with other values must not be reused.
IMAGE_SETTINGS = ("model", "stage1", "stage2", "no_stage2", "class_word", "seed", "sampler", "sample_steps",
                  "guidance")


# -------------------------------------------------------------------------------------------------
# settings

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("I/O")
    io.add_argument("--data", required=True, help="DreamBench dataset folder (subject folders and "
                    f"{PROMPTS_FILE}), or the repository folder holding dataset/")
    io.add_argument("--out", required=True, help="output folder: run folders, images, contact sheets, table")
    io.add_argument("--subjects", default=None, help="comma-separated subset, e.g. dog,backpack (default all)")
    io.add_argument("--prompts", default=None, help="prompt numbers 0-24, e.g. 0,5,20 or 0-4 (default all)")
    method = p.add_argument_group("method")
    method.add_argument("--model", default=model.DEFAULT_MODEL, help="SD1.5 file, diffusers folder or hub id "
                        "(default: the embedded toy model)")
    method.add_argument("--stage1", default="", help='extra stage-1 flags, one string: "--steps 400 --dd_weight 0.1"')
    method.add_argument("--stage2", default="", help='extra stage-2 flags, one string: "--steps 120"')
    method.add_argument("--no_stage2", action="store_true", help="tokens only: no LoRA stage")
    method.add_argument("--class_word", action="store_true", help="put the class word after the token "
                        "('a <v> dog in the jungle'); off: 'a <v> in the jungle', as the ConceptPrism authors")
    sampling = p.add_argument_group("sampling")
    # torchrun reads an abbreviated "--n" as one of its own flags (--nnodes, --nproc_per_node...) and
    # stops: under torchrun write --images_per_prompt.
    sampling.add_argument("--n", "--images_per_prompt", dest="n", type=int, default=4, help="images per prompt")
    sampling.add_argument("--seed", type=int, default=42, help="stage seed; prompt NN samples from seed + NN")
    sampling.add_argument("--sampler", choices=list(SAMPLERS), default="ddim", help="DDIM, or DPM-Solver++ 2M (the "
                          "ConceptPrism authors' sampler, with --sample_steps 25)")
    sampling.add_argument("--sample_steps", type=int, default=None, help="sampler steps (default: 50 for ddim, 25 "
                          "for dpm++)")
    sampling.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the "
                          "model's, 7.5 for SD)")
    sampling.add_argument("--batch", type=int, default=4, help="images per sampling batch")
    scoring = p.add_argument_group("scoring")
    scoring.add_argument("--clip", default=metrics.DEFAULT_CLIP, help="CLIP for CLIP-I and CLIP-T: folder or hub id "
                         "in the local cache")
    scoring.add_argument("--dino", default=metrics.DEFAULT_DINO, help="DINO ViT for DINO: folder or hub id in the "
                         "local cache")
    scoring.add_argument("--live_classes", default="cat,dog", help="class words of the live subjects")
    scoring.add_argument("--sheet_prompts", type=int, default=4, help="prompts shown on each contact sheet")
    args = p.parse_args(argv)
    if args.sample_steps is None:
        args.sample_steps = SAMPLERS[args.sampler][1]
    if min(args.n, args.sample_steps, args.batch) < 1 or args.sheet_prompts < 0:
        raise model.UserError("--n, --sample_steps and --batch must be >= 1, --sheet_prompts >= 0")
    for flags, stage, owned in ((args.stage1, "--stage1", ("--images", "--out", "--resume", "--overwrite")),
                                (args.stage2, "--stage2", ("--out", "--resume", "--overwrite"))):
        try:
            words = shlex.split(flags)
        except ValueError as e:
            raise model.UserError(f"{stage} '{flags}' cannot be split into flags ({e})") from None
        taken = [w for w in words if w.split("=")[0] in owned]
        if taken:
            raise model.UserError(f"{stage} may not set {taken[0]}: dreambench.py chooses the folders and resumes "
                                  "by itself")
    return args


def read_benchmark(folder):
    """prompts_and_classes.txt -> (folder holding it, {subject: class word} in file order,
    {"object": [templates], "live": [templates]}). A template has {0} for the unique token and {1}
    for the class word, as the file writes them."""
    if not os.path.isfile(os.path.join(folder, PROMPTS_FILE)) and \
            os.path.isfile(os.path.join(folder, "dataset", PROMPTS_FILE)):
        folder = os.path.join(folder, "dataset")  # the cloned repository rather than its dataset/
    path = os.path.join(folder, PROMPTS_FILE)
    if not os.path.isfile(path):
        raise model.UserError(f"--data {folder} has no {PROMPTS_FILE}; pass the dataset/ folder of "
                              "https://github.com/google/dreambooth (git clone it)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    classes, prompts, section = {}, {"object": [], "live": []}, None
    for line in lines:
        heading = line.lower()
        if heading.startswith("subject_name"):
            section = "classes"
        elif heading == "object prompts":
            section = "object"
        elif heading == "live subject prompts":
            section = "live"
        elif section == "classes" and "," in line:
            subject, word = (part.strip() for part in line.split(",", 1))
            classes[subject] = word
        elif section == "classes" and not line and classes:
            section = None
        elif section in prompts:
            template = re.match(r"""(['"])(.*?)\1\s*\.format""", line)
            if template:
                prompts[section].append(template.group(2))
    problems = [what for what, missing in (("a subject_name,class table", not classes),
                                           ("an 'Object Prompts' list", not prompts["object"]),
                                           ("a 'Live Subject Prompts' list", not prompts["live"])) if missing]
    bad = [t for t in prompts["object"] + prompts["live"] if "{0}" not in t or "{1}" not in t]
    if problems or bad:
        raise model.UserError(f"{path} is not DreamBench's prompt file: " +
                              (f"it lacks {', '.join(problems)}" if problems else f"template '{bad[0]}' lacks {{0}} "
                               "or {1}"))
    return folder, classes, prompts


def prompt_text(template, class_word, with_class_word):
    """(prompt to generate, with <v>; text CLIP-T reads, with the class word instead of <v>)."""
    generate_with = template.format(run.TARGET_TOKEN, class_word if with_class_word else "")
    score_with = template.format("", class_word)
    return " ".join(generate_with.split()), " ".join(score_with.split())


def parse_numbers(text, count, flag):
    """'0,5,20' or '0-4,20' -> sorted unique ints in [0, count)."""
    numbers = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            numbers.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise model.UserError(f"{flag} '{text}': give numbers and ranges, e.g. 0,5,20 or 0-4") from None
    if not numbers or min(numbers) < 0 or max(numbers) >= count:
        raise model.UserError(f"{flag} '{text}': numbers run from 0 to {count - 1}")
    return sorted(numbers)


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


# -------------------------------------------------------------------------------------------------
# one subject: stages, images, scores

def run_stage(main, stage, run_dir, argv):
    """Skip a finished stage; continue an unfinished one from its checkpoint."""
    if os.path.exists(os.path.join(run_dir, f"DONE_{stage}")):
        print(f"{run_dir}: {stage} already done")
        return
    resume = os.path.exists(os.path.join(run_dir, f"{stage}_checkpoint.safetensors"))
    main(argv + (["--resume"] if resume else []))


def sample(args, run_dir, jobs, device):
    """Generate every (folder, prompt, seed) in `jobs` whose images are not all on disk yet."""
    todo = [(folder, prompt, seed) for folder, prompt, seed in jobs
            if not all(os.path.exists(os.path.join(folder, f"{k:02d}.png")) for k in range(args.n))]
    if not todo:
        return
    device, _, dtype = run.device_and_dtype(device, None)
    target, _, meta = run.load_tokens(run_dir)
    sd = model.load(args.model, device, dtype)  # the model stage 1 was given: the settings check ensures it
    stage1 = meta.get("settings", {})
    prediction_type = run.set_prediction_type(sd, stage1.get("prediction_type"), args.model)  # stage 1's answer
    resolution = stage1.get("resolution") or sd.resolution
    token = run.token_name(meta)  # a --token passed through --stage1 renames <v> in the prompts too
    sd.tokenizer.add_multi_vector_token(token, len(target))
    if not args.no_stage2:
        lora.load_lora(sd.unet, os.path.join(run_dir, "lora.peft.safetensors"))
        lora.merge_lora(sd.unet)
    guidance = args.guidance if args.guidance is not None else sd.guidance
    for folder, prompt, seed in todo:
        prompt = run.with_target_token(prompt, token)
        images = generate(sd, [prompt] * args.n, target.to(device, dtype), seed=seed,
                          steps=args.sample_steps, guidance=guidance, resolution=resolution, batch=args.batch,
                          sampler=args.sampler, prediction_type=prediction_type)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "prompt.txt"), "w") as f:
            f.write(f"{prompt}\nseed {seed}\n")
        for k, image in enumerate(images):
            save_png(to_pil(image), os.path.join(folder, f"{k:02d}.png"))


def contact_sheet(references, rows, path, columns):
    """References on top, then one row per prompt; squares of at most 256 px."""
    side = min(256, min(im.size[0] for row in rows for im in row) if rows else 256)
    cells = []
    for row in [references] + rows:
        row = [torch.from_numpy(center_square(im, side).copy()).permute(2, 0, 1).float() / 255 for im in row[:columns]]
        cells += row + [torch.ones(3, side, side)] * (columns - len(row))
    save_png(grid(torch.stack(cells), columns=columns), path)


def score_subject(scorer, real, generated, texts):
    """Scores of one subject: generated[p] are prompt p's images, texts[p] its CLIP-T text."""
    images = [im for group in generated for im in group]
    real_dino, real_clip = scorer.dino(real), scorer.clip_image(real)
    gen_clip = scorer.clip_image(images)
    text = scorer.clip_text(texts)
    per_image_text = torch.cat([text[p].expand(len(group), -1) for p, group in enumerate(generated)])
    return {"dino": metrics.mean_cosine(scorer.dino(images), real_dino),
            "clip_i": metrics.mean_cosine(gen_clip, real_clip),
            "clip_t": (gen_clip.double() * per_image_text.double()).sum(1).mean().item(),
            "real_dino": metrics.mean_cosine(real_dino, real_dino, exclude_self=True),
            "real_clip_i": metrics.mean_cosine(real_clip, real_clip, exclude_self=True),
            "images": len(images), "references": len(real)}


# -------------------------------------------------------------------------------------------------
# the table

COLUMNS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("real_dino", "real DINO"),
           ("real_clip_i", "real CLIP-I"))


def mean_row(rows):
    """Each subject weighs the same, whatever its number of reference photos."""
    if not rows:
        return None
    return {key: sum(r[key] for r in rows) / len(rows) for key, _ in COLUMNS} | {"subjects": len(rows)}


def table(rows, means, description):
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["# DreamBench", "", description, "",
             "| subject | class | live | " + " | ".join(name for _, name in COLUMNS) + " |",
             "|---|---|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['subject']} | {r['class']} | {'yes' if r['live'] else 'no'} | " +
                     " | ".join(fmt(r[key]) for key, _ in COLUMNS) + " |")
    for name, m in means.items():
        if m is not None:
            lines.append(f"| **{name.replace('_', ' ')}** ({m['subjects']}) | | | " +
                         " | ".join(fmt(m[key]) for key, _ in COLUMNS) + " |")
    m = means["mean"]
    lines += ["", "| | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|",
              f"| this method | {fmt(m['dino'])} | {fmt(m['clip_i'])} | {fmt(m['clip_t'])} |",
              f"| real images (oracle: real vs real, self-pairs excluded) | {fmt(m['real_dino'])} | "
              f"{fmt(m['real_clip_i'])} | – |", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    data, classes, templates = read_benchmark(args.data)
    subjects = list(classes)
    if args.subjects:
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
        unknown = [s for s in subjects if s not in classes]
        if unknown:
            raise model.UserError(f"--subjects: {unknown[0]} is not in {PROMPTS_FILE} (it has {', '.join(classes)})")
    missing = [s for s in subjects if not os.path.isdir(os.path.join(data, s))]
    if missing:
        raise model.UserError(f"{data} has no folder for subject {missing[0]} named in {PROMPTS_FILE}")
    count = min(len(templates["object"]), len(templates["live"]))
    prompt_ids = parse_numbers(args.prompts, count, "--prompts") if args.prompts else list(range(count))
    live_classes = {w.strip() for w in args.live_classes.split(",") if w.strip()}
    settings = {key: getattr(args, key) for key in IMAGE_SETTINGS}
    settings["model"] = os.path.abspath(args.model) if os.path.exists(args.model) else args.model

    # ---------------------------------------------------------------------------------------------
    # load: the scoring models first, so a missing one fails in seconds rather than after stage 1
    rank, world, device = run.start_distributed()
    scorer = metrics.Scorer(args.clip, args.dino, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings_path = os.path.join(args.out, "dreambench.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            before = json.load(f)
        changed = [k for k in IMAGE_SETTINGS if before.get(k) != settings[k]]
        if changed:
            raise model.UserError(f"{args.out} holds a run with another --{changed[0]} ({before.get(changed[0])!r}); "
                                  "choose another --out, or delete it to start again")
    elif rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(settings_path + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(settings_path + ".tmp", settings_path)
    scores_key = {"prompts": prompt_ids, "n": args.n, "clip": args.clip, "dino": args.dino}

    # ---------------------------------------------------------------------------------------------
    # loop: this rank's subjects, one at a time
    rows = []
    for subject in subjects[rank::world]:
        word, live = classes[subject], classes[subject] in live_classes
        scores_path = os.path.join(args.out, "scores", f"{subject}.json")
        if os.path.exists(scores_path):
            with open(scores_path) as f:
                done = json.load(f)
            if done["key"] == scores_key:
                print(f"{subject}: scored already")
                rows.append(done["row"])
                continue
        subject_dir, run_dir = os.path.join(data, subject), os.path.join(args.out, "runs", subject)
        common = ["--seed", str(args.seed), "--val_steps", "0"]  # the contact sheet replaces the stage grids
        run_stage(stage1_tokens.main, "stage1", run_dir, ["--images", subject_dir, "--out", run_dir, "--model",
                                                          args.model] + common + shlex.split(args.stage1))
        if not args.no_stage2:
            run_stage(stage2_lora.main, "stage2", run_dir, ["--out", run_dir] + common + shlex.split(args.stage2))
        lists = templates["live" if live else "object"]
        texts = [prompt_text(lists[p], word, args.class_word) for p in prompt_ids]
        folders = [os.path.join(args.out, "images", subject, f"{p:02d}_{slug(lists[p].format('', ''))}")
                   for p in prompt_ids]
        sample(args, run_dir, [(folder, gen, args.seed + p) for folder, (gen, _), p in zip(folders, texts, prompt_ids)],
               device)

        real = [read_rgb(os.path.join(subject_dir, name)) for name in sorted(os.listdir(subject_dir))
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
        generated = [[read_rgb(os.path.join(folder, f"{k:02d}.png")) for k in range(args.n)] for folder in folders]
        row = {"subject": subject, "class": word, "live": live,
               **score_subject(scorer, real, generated, [score for _, score in texts])}
        shown = range(0, len(generated), max(1, len(generated) // max(1, args.sheet_prompts)))
        os.makedirs(os.path.join(args.out, "sheets"), exist_ok=True)
        contact_sheet(real, [generated[p] for p in shown][:args.sheet_prompts],
                      os.path.join(args.out, "sheets", f"{subject}.png"), max(len(real), args.n))
        os.makedirs(os.path.dirname(scores_path), exist_ok=True)
        with open(scores_path + ".tmp", "w") as f:
            json.dump({"key": scores_key, "row": row}, f, indent=1)
        os.replace(scores_path + ".tmp", scores_path)  # written last: its presence means "subject done"
        print(f"{subject}: DINO {row['dino']:.4f} CLIP-I {row['clip_i']:.4f} CLIP-T {row['clip_t']:.4f}")
        rows.append(row)

    # ---------------------------------------------------------------------------------------------
    # save: rank 0 gathers every rank's rows and writes the table
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
        dist.destroy_process_group()
    if rank != 0:
        return
    rows.sort(key=lambda r: subjects.index(r["subject"]))
    means = {"mean": mean_row(rows), "mean_objects": mean_row([r for r in rows if not r["live"]]),
             "mean_live": mean_row([r for r in rows if r["live"]])}
    method = "ConceptPrism stage 1" + ("" if args.no_stage2 else " + stage 2 (LoRA)")
    example = prompt_text(templates["object"][prompt_ids[0]], "<class>", args.class_word)
    description = (
        f"{method}; model {os.path.basename(settings['model'])}; stage 1 flags '{args.stage1}', stage 2 flags "
        f"'{'' if args.no_stage2 else args.stage2}'.  \nPrompts: {len(prompt_ids)} per subject, e.g. '{example[0]}' "
        f"({'class word after the token' if args.class_word else 'no class word after the token, as the ConceptPrism authors'}); "
        f"CLIP-T reads '{example[1]}'. {args.n} images per prompt, {args.sampler} {args.sample_steps} steps, guidance "
        f"{'the model default' if args.guidance is None else args.guidance}, prompt NN from seed {args.seed} + NN.  \n"
        f"Scores: mean pairwise cosine; DINO {args.dino} (CLS token, short side 256 bicubic, crop 224, ImageNet "
        f"mean/std), CLIP-I and CLIP-T {args.clip} (CLIP's preprocessing). Means weigh every subject the same; "
        f"live subjects: class in {{{', '.join(sorted(live_classes))}}}.")
    results = {"settings": {**settings, "prompts": prompt_ids, "n": args.n, "clip": args.clip, "dino": args.dino,
                            "live_classes": sorted(live_classes)},
               "subjects": rows, **means}
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=1)),
                       ("table.md", table(rows, means, description))):
        with open(os.path.join(args.out, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
    print(f"{len(rows)} subjects: {args.out}/table.md and results.json; contact sheets in {args.out}/sheets")


if __name__ == "__main__":
    run.report_user_errors()
    main()
