"""The embedded default: the shipped toy model, classifier and demo folder, the README's main command
(shortened) with no --model, textual-inversion mode, the tiny model following prompts, and ToyBench."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import model
import sample
import stage1_tokens
import stage2_lora
from model import run
from model.generate import generate
from tests.helpers import assert_one_line_error, run_main
from toy import toybench, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "purple_dotted_heart")
CLASSIFIER = os.path.join(model.TINY_DIR, "classifier.safetensors")


def test_shipped_files_are_small_and_described():
    card = os.path.splitext(model.DEFAULT_MODEL)[0] + ".md"
    assert os.path.getsize(model.DEFAULT_MODEL) + os.path.getsize(CLASSIFIER) <= 20e6
    with safe_open(model.DEFAULT_MODEL, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    text = open(card).read()
    for needed in ("python toy/pretrain_tiny.py", "Prompt following", "min on", "Final losses", "tiny_sd_samples.png"):
        assert needed in text, needed
    assert os.path.exists(os.path.join(model.TINY_DIR, "tiny_sd_samples.png"))
    sd = model.load(model.DEFAULT_MODEL)
    assert sd.resolution == world.SIZE and all("<v>" in p for p in sd.prompts) and sd.guidance > 1


def test_the_library_holds_no_toy_code():
    """model/ is Stable Diffusion only; the toy world, its weights and scripts are in toy/."""
    assert os.path.dirname(model.DEFAULT_MODEL) == model.TINY_DIR == os.path.join(ROOT, "toy", "tiny")
    for name in os.listdir(os.path.join(ROOT, "model")):
        if name.endswith(".py"):
            source = open(os.path.join(ROOT, "model", name)).read()
            assert "from toy" not in source and "import toy" not in source, name


def test_demo_folder_is_toybench_first_reference_set():
    """The shipped photos are reproducible: concept 0, seed 0 of world.reference_set."""
    images, captions, _ = world.reference_set(world.HELD_OUT[0], 4, np.random.default_rng([0, 0]))
    for k, (image, text) in enumerate(zip(images, captions), 1):
        assert np.array_equal(np.asarray(Image.open(os.path.join(DEMO, f"{k:02d}.png"))), image)
        assert open(os.path.join(DEMO, f"{k:02d}.txt")).read().strip() == text
    assert len(os.listdir(DEMO)) == 8


def readme_main_command():
    """The stage-1 arguments of the README's first set-up command, as written there."""
    line = next(line for line in open(os.path.join(ROOT, "README.md")) if "python stage1_tokens.py" in line)
    return line.split("python stage1_tokens.py", 1)[1].split()


@pytest.mark.slow
def test_main_command_runs_on_the_default_model(tmp_path, monkeypatch):
    """README's first command, with few steps, then stage 2 and sample.py: no --model anywhere."""
    monkeypatch.chdir(ROOT)  # the command's paths are relative to the repository root, where it is typed
    out = str(tmp_path / "demo")
    argv = readme_main_command()
    assert argv[:2] == ["--images", "examples/purple_dotted_heart"] and "--model" not in argv
    run_main(stage1_tokens.main, *argv, "--out", out, "--steps", 4, "--val_steps", 2)
    run_main(stage2_lora.main, "--out", out, "--steps", 2, "--val_steps", 2)
    run_main(sample.main, "--out", out, "--n", 1, "--steps", 2)
    target, residual, meta = run.load_tokens(out)
    width = model.load(model.DEFAULT_MODEL).text_encoder.config.width
    vectors = int(argv[argv.index("--target_vectors") + 1]) if "--target_vectors" in argv else 1
    assert target.shape == (vectors, width) and residual.shape == (4, 8, width)
    assert meta["settings"]["model"] == run.DEFAULT_MODEL_NAME  # shared metadata names no local path
    for name in ("stage1_grid.png", "stage2_grid.png", "lora.peft.safetensors", "samples/000/grid.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert Image.open(os.path.join(out, "samples", "000", "grid.png")).size == (64, 4 * 64)  # the model's 4 prompts


def test_textual_inversion_mode(tmp_path):
    out = str(tmp_path / "ti")
    printed = run_main(stage1_tokens.main, "--images", DEMO, "--out", out, "--steps", 3, "--val_steps", 0,
                       "--residuals", 0)
    assert "beta = 0" in printed
    _, residual, meta = run.load_tokens(out)
    assert residual.shape[:2] == (4, 0) and meta["settings"]["beta"] == 0
    log = [json.loads(line) for line in open(os.path.join(out, "stage1_log.jsonl"))]
    assert len(log) == 3 and all("excl" not in r for r in log)
    # Refused before any work; how a refusal reaches the user (one line, exit 1) is tests/test_scripts.py's.
    with pytest.raises(model.UserError, match="residual"):
        stage1_tokens.main(["--images", DEMO, "--out", str(tmp_path / "x"), "--residuals", "0", "--dd_weight", "0.1"])


@pytest.mark.slow
def test_tiny_model_follows_prompts():
    """A short check of the shipped weights (the card has the full measurement): colour and background
    asked for in fresh captions are drawn far above chance (1/6 and 1/9)."""
    torch.manual_seed(0)
    sd = model.load(model.DEFAULT_MODEL)
    classifier = world.load_classifier(CLASSIFIER)
    rng = np.random.default_rng(123)
    attrs = [world.sample_attributes(rng) for _ in range(32)]
    images = generate(sd, [world.caption(a) for a in attrs], seed=1, steps=20, guidance=sd.guidance,
                      resolution=sd.resolution, batch=32)
    read = classifier.predict(images * 2 - 1)
    for name in ("colour", "background"):
        agree = np.mean([p == a[name] for p, a in zip(read[name], attrs)])
        assert agree >= 0.6, (name, agree)


@pytest.mark.slow
def test_toybench_smoke_and_resume(tmp_path):
    argv = ["--out", str(tmp_path), "--concepts", "1", "--seeds", "1", "--images", "2", "--steps", "1",
            "--stage2_steps", "1", "--sample_steps", "1", "--per_prompt", "1", "--open_images", "2"]
    toybench.main(argv + ["--scenario", "distinct"])
    results = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert [(r["scenario"], r["method"]) for r in results] == [("distinct", m) for m in toybench.METHODS]
    # A killed run: the last result never written. Running both scenarios measures it and the shared
    # scenario, and writes nothing twice.
    lines = open(tmp_path / "results.jsonl").readlines()
    open(tmp_path / "results.jsonl", "w").writelines(lines[:-1])
    toybench.main(argv + ["--scenario", "all"])
    results = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    keys = [(r["scenario"], r["method"]) for r in results]
    assert sorted(keys) == sorted((s, m) for s in ("distinct", "shared") for m in toybench.METHODS)
    for r in results:
        assert all(0 <= r[m] <= 1 for m in ("fidelity", "alignment", *toybench.LEAKS)), r
    summary = json.load(open(tmp_path / "summary.json"))
    assert list(summary) == ["distinct", "shared"]
    measures = {"fidelity", "alignment"} | {f"{what}_{attr}_{kind}" for what in ("leak", "excess")
                                            for attr in ("bg", "pos") for kind in ("open", "named")}
    for scenario in summary.values():
        assert list(scenario) == list(toybench.METHODS) and "words" in scenario and "DreamBooth-LoRA" in scenario
        for method, values in scenario.items():
            assert measures <= set(values) and all(len(v) == 2 and v[1] >= 0 for v in values.values())
        assert all(scenario["words"][m][0] == 0 for m in measures if m.startswith("excess"))  # the base rate itself
    table = open(tmp_path / "table.md").read()
    assert "### distinct" in table and "### shared" in table
    assert all(table.count(f"| {method} |") == 2 for method in toybench.METHODS)
    for scenario in ("distinct", "shared"):
        named = 9 - 1 - (2 if scenario == "distinct" else 1)  # colours that are neither the concept's nor a reference's
        size = Image.open(tmp_path / f"grid_{scenario}.png").size
        assert size == ((named + 2) * 64, (1 + len(toybench.METHODS)) * 64)


@pytest.mark.slow
def test_toybench_under_torchrun_writes_the_table_of_one_process(tmp_path):
    """Two ranks deal out the (scenario, concept, seed) jobs and write the same results, table and grid
    as one process (both single-threaded, where CPU runs repeat bit for bit)."""
    argv = ["--concepts", "1", "--seeds", "2", "--images", "2", "--steps", "2", "--stage2_steps", "1",
            "--sample_steps", "2", "--per_prompt", "1", "--open_images", "2", "--methods", "DreamBooth-LoRA"]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    outs = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2"])):
        outs[name] = tmp_path / name
        done = subprocess.run([sys.executable, *launcher, os.path.join("toy", "toybench.py"), "--out",
                               str(outs[name]), *argv], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    def results(out):
        return sorted(open(out / "results.jsonl").read().splitlines())

    assert len(results(outs["one"])) == 2 * 2 * 2  # scenarios x seeds x (words, DreamBooth-LoRA)
    assert results(outs["two"]) == results(outs["one"])
    # A resumed run deals out only what is left: drop seed 1's rows and run the two ranks again.
    kept = [line for line in results(outs["two"]) if json.loads(line)["seed"] == 0]
    (outs["two"] / "results.jsonl").write_text("".join(line + "\n" for line in kept))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           os.path.join("toy", "toybench.py"), "--out", str(outs["two"]), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert results(outs["two"]) == results(outs["one"])
    assert open(outs["two"] / "table.md").read() == open(outs["one"] / "table.md").read()
    for scenario in toybench.SCENARIOS:
        grids = [np.asarray(Image.open(outs[name] / f"grid_{scenario}.png")) for name in outs]
        assert np.array_equal(*grids)


def test_toybench_leakage_and_excess_by_hand():
    """measures() and summarise() on made-up classifier readings, against counts done by hand."""
    concept = ("heart", "purple", "dotted")
    refs = [{"background": "red", "position": "top left"}, {"background": "blue", "position": "top right"}]
    kinds = ["named", "named", "named", "open", "open", "open", "open"]
    grounds = ["green", "white", "black"]
    read = {"shape": ["heart", "heart", "star", "heart", "heart", "heart", "circle"],
            "colour": ["purple"] * 7,
            "pattern": ["plain"] * 7,
            "background": ["green", "red", "black", "red", "blue", "grey", "blue"],
            "position": ["center", "center", "top left", "top right", "center", "bottom left", "top left"]}
    got = toybench.measures(read, concept, kinds, grounds, refs)
    assert got["shape"] == pytest.approx(5 / 7) and got["colour"] == 1 and got["pattern"] == 0
    assert got["fidelity"] == pytest.approx((5 / 7 + 1 + 0) / 3)
    assert got["alignment"] == pytest.approx(2 / 3)  # green and black as asked, red instead of white
    assert got["leak_bg_named"] == pytest.approx(1 / 3) and got["leak_bg_open"] == pytest.approx(3 / 4)
    assert got["leak_pos_named"] == pytest.approx(1 / 3) and got["leak_pos_open"] == pytest.approx(2 / 4)

    def record(method, seed, bg_open, pos_open):
        r = {"scenario": "shared", "concept": "c", "seed": seed, "method": method, **got}
        r.update(leak_bg_open=bg_open, leak_pos_open=pos_open)
        return r

    records = [record("words", 0, 0.25, 0.5), record("words", 1, 0.0, 0.5),
               record("DreamBooth-LoRA", 0, 0.75, 0.5), record("DreamBooth-LoRA", 1, 0.5, 1.0)]
    summary = toybench.summarise(records, methods=["words", "DreamBooth-LoRA"])
    assert list(summary) == ["shared"]  # no distinct records, no distinct section
    control = summary["shared"]["DreamBooth-LoRA"]
    assert control["leak_bg_open"] == pytest.approx([0.625, 0.125])
    assert control["excess_bg_open"] == pytest.approx([0.5, 0.0])  # 0.75 - 0.25 and 0.5 - 0.0
    assert control["excess_pos_open"] == pytest.approx([0.25, 0.25])  # 0.0 and 0.5
    assert control["excess_bg_named"] == [0, 0]
    assert summary["shared"]["words"]["excess_bg_open"] == [0, 0]


def test_shared_reference_sets_share_one_background_and_one_corner():
    for c, concept in enumerate(world.HELD_OUT):
        for seed in range(3):
            _, captions, shared = world.reference_set(concept, 4, np.random.default_rng([seed, c]), "shared")
            _, _, distinct = world.reference_set(concept, 4, np.random.default_rng([seed, c]), "distinct")
            assert len({a["background"] for a in shared}) == 1 and shared[0]["background"] != concept[1]
            assert all(world.background_words(shared[0]["background"], a["background_style"]) in text
                       for a, text in zip(shared, captions))
            assert len({a["background"] for a in distinct}) == 4
            assert len({a["position"] for a in shared}) == 1 and shared[0]["position"] != "center"
            assert len({a["position"] for a in distinct}) == 4
            # the same draw otherwise: the shared colour and corner are the first distinct photo's
            assert shared[0]["background"] == distinct[0]["background"]
            assert shared[0]["position"] == distinct[0]["position"]
    with pytest.raises(ValueError, match="scenario"):
        world.reference_set(world.HELD_OUT[0], 4, np.random.default_rng(0), "mixed")


@pytest.mark.slow
def test_toy_scripts_run_from_the_repository_root():
    """Typed as the README has them (python toy/toybench.py), with nothing on PYTHONPATH: the scripts
    find `model` and the `toy` package themselves, and a refusal is one line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run_script(name, *args):
        return subprocess.run([sys.executable, os.path.join("toy", name), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True)

    for name in ("toybench.py", "pretrain_tiny.py", "train_classifier.py"):
        out = run_script(name, "--help")
        assert out.returncode == 0 and "(default:" in out.stdout, out.stderr
    assert_one_line_error(run_script("toybench.py", "--concepts", "9"), "--concepts")


def test_toybench_refuses_bad_settings(tmp_path):
    with pytest.raises(model.UserError, match="--concepts"):
        toybench.parse_args(["--concepts", "9"])
    with pytest.raises(model.UserError, match="classifier"):
        toybench.parse_args(["--classifier", str(tmp_path / "none.safetensors")])
    with pytest.raises(model.UserError, match="unknown --methods"):
        toybench.parse_args(["--methods", "DreamBooth"])
    assert toybench.parse_args(["--methods", "DreamBooth-LoRA"]).methods == ["words", "DreamBooth-LoRA"]
