"""The embedded default: the shipped toy model, classifier and demo folder, the README's main command
(shortened) with no --model, textual-inversion mode, the tiny model following prompts, and ToyBench."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import model
import toybench
from model import run, toyworld
from model.generate import generate
from tests.test_scripts import assert_one_line_error, script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "purple_dotted_heart")
CLASSIFIER = os.path.join(model.TINY_DIR, "classifier.safetensors")


def test_shipped_files_are_small_and_described():
    card = os.path.splitext(model.DEFAULT_MODEL)[0] + ".md"
    assert os.path.getsize(model.DEFAULT_MODEL) + os.path.getsize(CLASSIFIER) <= 20e6
    with safe_open(model.DEFAULT_MODEL, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    text = open(card).read()
    for needed in ("python pretrain_tiny.py", "Prompt following", "min on", "Final losses", "tiny_sd_samples.png"):
        assert needed in text, needed
    assert os.path.exists(os.path.join(model.TINY_DIR, "tiny_sd_samples.png"))
    sd = model.load(model.DEFAULT_MODEL)
    assert sd.resolution == toyworld.SIZE and all("<v>" in p for p in sd.prompts) and sd.guidance > 1


def test_demo_folder_is_toybench_first_reference_set():
    """The shipped photos are reproducible: concept 0, seed 0 of toyworld.reference_set."""
    images, captions, _ = toyworld.reference_set(toyworld.HELD_OUT[0], 4, np.random.default_rng([0, 0]))
    for k, (image, text) in enumerate(zip(images, captions), 1):
        assert np.array_equal(np.asarray(Image.open(os.path.join(DEMO, f"{k:02d}.png"))), image)
        assert open(os.path.join(DEMO, f"{k:02d}.txt")).read().strip() == text
    assert len(os.listdir(DEMO)) == 8


def readme_main_command():
    """The stage-1 arguments of the README's first set-up command, as written there."""
    line = next(line for line in open(os.path.join(ROOT, "README.md")) if "python stage1_tokens.py" in line)
    return line.split("python stage1_tokens.py", 1)[1].split()


def test_main_command_runs_on_the_default_model(tmp_path):
    """README's first command, with few steps, then stage 2 and sample.py: no --model anywhere."""
    out = str(tmp_path / "demo")
    argv = readme_main_command()
    assert argv[:2] == ["--images", "examples/purple_dotted_heart"] and "--model" not in argv
    script("stage1_tokens.py", *argv, "--out", out, "--steps", 4, "--val_steps", 2)
    script("stage2_lora.py", "--out", out, "--steps", 2, "--val_steps", 2)
    script("sample.py", "--out", out, "--n", 1, "--steps", 2)
    target, residual, meta = run.load_tokens(out)
    width = model.load(model.DEFAULT_MODEL).text_encoder.config.width
    vectors = int(argv[argv.index("--target_vectors") + 1]) if "--target_vectors" in argv else 1
    assert target.shape == (vectors, width) and residual.shape == (4, 8, width)
    assert meta["settings"]["model"] == model.DEFAULT_MODEL
    for name in ("stage1_grid.png", "stage2_grid.png", "lora.peft.safetensors", "samples/grid.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert Image.open(os.path.join(out, "samples", "grid.png")).size == (64, 4 * 64)  # the model's 4 prompts


def test_textual_inversion_mode(tmp_path):
    out = str(tmp_path / "ti")
    result = script("stage1_tokens.py", "--images", DEMO, "--out", out, "--steps", 3, "--val_steps", 0,
                    "--residuals", 0)
    assert "beta = 0" in result.stdout
    _, residual, meta = run.load_tokens(out)
    assert residual.shape[:2] == (4, 0) and meta["settings"]["beta"] == 0
    log = [json.loads(line) for line in open(os.path.join(out, "stage1_log.jsonl"))]
    assert len(log) == 3 and all("excl" not in r for r in log)
    assert_one_line_error(script("stage1_tokens.py", "--images", DEMO, "--out", str(tmp_path / "x"),
                                 "--residuals", 0, "--dd_weight", 0.1, check=False), "residual")


def test_tiny_model_follows_prompts():
    """A short check of the shipped weights (the card has the full measurement): colour and background
    asked for in fresh captions are drawn far above chance (1/6 and 1/9)."""
    torch.manual_seed(0)
    sd = model.load(model.DEFAULT_MODEL)
    classifier = toyworld.load_classifier(CLASSIFIER)
    rng = np.random.default_rng(123)
    attrs = [toyworld.sample_attributes(rng) for _ in range(32)]
    images = generate(sd, [toyworld.caption(a) for a in attrs], seed=1, steps=20, guidance=sd.guidance,
                      resolution=sd.resolution, batch=32)
    read = classifier.predict(images * 2 - 1)
    for name in ("colour", "background"):
        agree = np.mean([p == a[name] for p, a in zip(read[name], attrs)])
        assert agree >= 0.6, (name, agree)


def test_toybench_smoke_and_resume(tmp_path):
    argv = ["--out", str(tmp_path), "--concepts", "1", "--seeds", "1", "--steps", "2", "--stage2_steps", "2",
            "--sample_steps", "2", "--per_prompt", "1"]
    toybench.main(argv)
    results = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert [r["method"] for r in results] == list(toybench.METHODS)
    for r in results:
        assert all(0 <= r[m] <= 1 for m in ("fidelity", "alignment", "leak bg", "leak pos"))
    table = open(tmp_path / "table.md").read()
    assert all(f"| {method} |" in table for method in toybench.METHODS)
    assert Image.open(tmp_path / "grid.png").size == (4 * 64, (1 + len(toybench.METHODS)) * 64)
    toybench.main(argv)  # everything finished is reused, nothing is added twice
    assert len(open(tmp_path / "results.jsonl").readlines()) == len(results)


def test_toybench_refuses_bad_settings(tmp_path):
    with pytest.raises(model.UserError, match="--concepts"):
        toybench.parse_args(["--concepts", "9"])
    with pytest.raises(model.UserError, match="classifier"):
        toybench.parse_args(["--classifier", str(tmp_path / "none.safetensors")])
