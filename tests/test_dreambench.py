"""dreambench.py and model/metrics.py: the preprocessing pixel for pixel against transformers' image
processor (where it implements the same transform) and torchvision's crop rule written out by hand,
the scores against plain loops over the tiny models' own outputs, the prompt file, resume, and
torchrun with two CPU ranks giving the same table as one process.

The scoring models are tiny random CLIP and DINO-shaped ViT models saved to a temporary folder; the
benchmark folder is in DreamBench's layout (dataset/<subject>/NN.jpg, prompts_and_classes.txt)
with toy-world photos, so nothing is downloaded."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dreambench
import model
from model import metrics
from model.data import read_rgb
from model.tokenizer import write_vocab_files
from tests import helpers
from toy import world

# A file in the layout Google publishes: class table, then the two prompt lists as Python lines.
PROMPT_FILE = """Classes

subject_name,class
purple_heart,toy
orange_star,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on a red background'.format(unique_token, class_token),
'a shiny {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a blue hat'.format(unique_token, class_token),
'a shiny {0} {1}'.format(unique_token, class_token)
]
"""


@pytest.fixture(scope="module")
def scoring_models(tmp_path_factory):
    """(CLIP folder, DINO folder): tiny random models with the real CLIP tokenizer files."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel
    root = tmp_path_factory.mktemp("scorers")
    torch.manual_seed(0)
    clip_dir, dino_dir = str(root / "clip"), str(root / "dino")
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77),
                        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
    helpers.randomize(CLIPModel(config)).save_pretrained(clip_dir)
    write_vocab_files(clip_dir)
    CLIPTokenizer(os.path.join(clip_dir, "vocab.json"), os.path.join(clip_dir, "merges.txt")).save_pretrained(clip_dir)
    vit = ViTConfig(image_size=224, patch_size=16, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4)
    helpers.randomize(ViTModel(vit, add_pooling_layer=True)).save_pretrained(dino_dir)  # a pooler, as the hub's
    return clip_dir, dino_dir


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A DreamBench-layout folder: two subjects of toy-world photos (3 JPEGs each, no captions)."""
    folder = tmp_path_factory.mktemp("dreambooth") / "dataset"
    rng = np.random.default_rng(0)
    for subject, concept in (("purple_heart", world.HELD_OUT[0]), ("orange_star", world.HELD_OUT[1])):
        images, _, _ = world.reference_set(concept, 3, rng)
        os.makedirs(folder / subject)
        for k, image in enumerate(images):
            Image.fromarray(image).save(folder / subject / f"{k:02d}.jpg", quality=95)
    (folder / dreambench.PROMPTS_FILE).write_text(PROMPT_FILE)
    return str(folder)


def photo(w, h, seed=0):
    return helpers.random_photo(seed, size=max(w, h)).resize((w, h), Image.BICUBIC)


# -------------------------------------------------------------------------------------------------
# metrics

def processor(resize, crop, mean, std, center_crop=True):
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop},
                              resample=Image.BICUBIC, image_mean=list(mean), image_std=list(std),
                              do_center_crop=center_crop, do_convert_rgb=True)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (640, 480), (70, 100), (500, 333)])
def test_preprocessing_matches_transformers_processor(size):
    """Where both crop rules give the same offset (any margin but 3 mod 4), transformers' CLIPImageProcessor (short
    side resize, bicubic, centre crop, normalise) is an independent reference, for CLIP's numbers and
    for DINO's (256 then 224, ImageNet mean/std)."""
    image = photo(*size)
    for ours, resize, mean, std in ((metrics.preprocess_clip, 224, metrics.CLIP_MEAN, metrics.CLIP_STD),
                                    (metrics.preprocess_dino, 256, metrics.IMAGENET_MEAN, metrics.IMAGENET_STD)):
        margin = int(resize * max(size) / min(size)) - 224
        assert margin % 4 != 3, "this test's sizes must be ones where both crop rules agree"
        reference = processor(resize, 224, mean, std)(image, return_tensors="pt")["pixel_values"][0]
        got = ours(image)
        assert got.shape == (3, 224, 224)
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)


def test_crop_rounds_as_torchvision():
    """An odd margin: torchvision crops at int(round(margin / 2)) (round half to even), transformers
    at margin // 2. 200x303 -> short side 224 gives 224x339, margin 115: torchvision's top is
    round(57.5) = 58, transformers' 57. The reference is the processor's uncropped output sliced there."""
    image = photo(200, 303)
    full = processor(224, 224, metrics.CLIP_MEAN, metrics.CLIP_STD, center_crop=False)(
        image, return_tensors="pt")["pixel_values"][0]
    assert full.shape == (3, 339, 224)
    got = metrics.preprocess_clip(image)
    torch.testing.assert_close(got, full[:, 58:58 + 224], rtol=0, atol=1e-5)
    assert not torch.allclose(got, full[:, 57:57 + 224], atol=1e-3)


def test_mean_cosine_against_a_loop():
    a = torch.nn.functional.normalize(torch.randn(5, 7), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 7), dim=-1)
    cos = lambda x, y: sum(float(p) * float(q) for p, q in zip(x, y))  # noqa: E731
    pairs = [cos(x, y) for x in a for y in b]
    assert math.isclose(metrics.mean_cosine(a, b), sum(pairs) / len(pairs), rel_tol=1e-9)
    others = [cos(a[i], a[j]) for i in range(5) for j in range(5) if i != j]
    assert math.isclose(metrics.mean_cosine(a, a, exclude_self=True), sum(others) / len(others), rel_tol=1e-9)
    with pytest.raises(model.UserError):
        metrics.mean_cosine(a[:1], a[:1], exclude_self=True)


@pytest.mark.slow  # 3 s
def test_scores_against_the_models_and_plain_loops(scoring_models):
    """Embeddings: DINO is the CLS token of last_hidden_state (not the pooler), CLIP the projected
    image/text features transformers' get_*_features give; score_subject's five numbers against
    loops over those embeddings."""
    from transformers import CLIPModel, CLIPTokenizer, ViTModel
    clip_dir, dino_dir = scoring_models
    scorer = metrics.Scorer(clip_dir, dino_dir)
    real = [photo(300, 200, seed) for seed in range(3)]
    generated = [[photo(64, 64, 10 + seed) for seed in range(2)], [photo(64, 64, 20 + seed) for seed in range(2)]]
    texts = ["a dog in the jungle", "a shiny dog"]

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    def features(output):  # transformers 5 returns a model output, earlier versions the tensor
        return output if torch.is_tensor(output) else output.pooler_output

    vit = ViTModel.from_pretrained(dino_dir).eval()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        pix = lambda ims, p: torch.stack([p(im) for im in ims])  # noqa: E731
        hidden = vit(pixel_values=pix(real, metrics.preprocess_dino))
        torch.testing.assert_close(scorer.dino(real), unit(hidden.last_hidden_state[:, 0]))
        assert not torch.allclose(scorer.dino(real), unit(hidden.pooler_output), atol=1e-2)
        image_ref = lambda ims: unit(features(clip.get_image_features(pixel_values=pix(ims, metrics.preprocess_clip))))  # noqa: E731
        torch.testing.assert_close(scorer.clip_image(real), image_ref(real))
        text_ref = unit(features(clip.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))))
        torch.testing.assert_close(scorer.clip_text(texts), text_ref)

    got = dreambench.score_subject(scorer, real, generated, texts)
    flat = [im for group in generated for im in group]
    gen_dino, real_dino = scorer.dino(flat).tolist(), scorer.dino(real).tolist()
    gen_clip, real_clip = scorer.clip_image(flat).tolist(), scorer.clip_image(real).tolist()
    text = scorer.clip_text(texts).tolist()
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    expected = {"dino": mean([dot(g, r) for g in gen_dino for r in real_dino]),
                "clip_i": mean([dot(g, r) for g in gen_clip for r in real_clip]),
                "clip_t": mean([dot(gen_clip[k], text[k // 2]) for k in range(4)]),
                "real_dino": mean([dot(real_dino[i], real_dino[j]) for i in range(3) for j in range(3) if i != j]),
                "real_clip_i": mean([dot(real_clip[i], real_clip[j]) for i in range(3) for j in range(3) if i != j])}
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6), key
    assert got["images"] == 4 and got["references"] == 3


def test_missing_or_wrong_model_is_one_clear_error(scoring_models, tmp_path):
    clip_dir, dino_dir = scoring_models
    with pytest.raises(model.UserError, match="hf download facebook/dino-vits16"):
        metrics.Scorer(clip_dir, str(tmp_path / "nothing"))
    with pytest.raises(model.UserError, match="hf download someone/not-cached"):
        metrics.Scorer("someone/not-cached", dino_dir)  # local_files_only: never a download
    with pytest.raises(model.UserError, match="'vit' model, not 'clip'"):
        metrics.Scorer(dino_dir, dino_dir)


# -------------------------------------------------------------------------------------------------
# the prompt file and the prompts

def test_prompt_file_and_prompts(bench, tmp_path):
    folder, classes, templates = dreambench.read_benchmark(os.path.dirname(bench))  # the repository folder works
    assert folder == bench
    assert classes == {"purple_heart": "toy", "orange_star": "dog"}
    assert templates["object"][1] == "a {0} {1} on a red background"
    assert templates["live"][1] == "a {0} {1} wearing a blue hat"
    assert dreambench.prompt_text(templates["live"][1], "dog", False) == ("a <v> wearing a blue hat",
                                                                          "a dog wearing a blue hat")
    assert dreambench.prompt_text(templates["object"][2], "toy", True) == ("a shiny <v> toy", "a shiny toy")
    assert dreambench.parse_numbers("0-2,1", 3, "--prompts") == [0, 1, 2]
    with pytest.raises(model.UserError, match="0 to 2"):
        dreambench.parse_numbers("3", 3, "--prompts")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / dreambench.PROMPTS_FILE).write_text(PROMPT_FILE.split("Live Subject Prompts")[0])
    with pytest.raises(model.UserError, match="Live Subject Prompts"):
        dreambench.read_benchmark(str(broken))
    with pytest.raises(model.UserError, match="google/dreambooth"):
        dreambench.read_benchmark(str(tmp_path))


def test_finished_stage_skipped_unfinished_resumed(tmp_path):
    calls = []
    dreambench.run_stage(calls.append, "stage1", str(tmp_path), ["--out", "x"])
    (tmp_path / "stage1_checkpoint.safetensors").write_bytes(b"")
    dreambench.run_stage(calls.append, "stage1", str(tmp_path), ["--out", "x"])
    (tmp_path / "DONE_stage1").write_text("finished\n")
    dreambench.run_stage(calls.append, "stage1", str(tmp_path), ["--out", "x"])
    assert calls == [["--out", "x"], ["--out", "x", "--resume"]]


# -------------------------------------------------------------------------------------------------
# end to end

def bench_args(bench, scoring_models, out, *extra):
    return ["--data", bench, "--out", str(out), "--clip", scoring_models[0], "--dino", scoring_models[1],
            "--stage1", "--steps 2 --val_steps 0", "--stage2", "--steps 2", "--images_per_prompt", "2", "--prompts", "0,2",
            "--sample_steps", "3", *extra]


def clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")} | {"PYTHONPATH": helpers.ROOT,
                                                                                "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """Two torch threads on two cores that other processes also use spin against each other (10x
    slower steps measured here); the subprocess tests get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_named_token_and_dpm_solver(bench, scoring_models, tmp_path, one_thread):
    """Stage-1 flags pass through (--token renames <v> in the prompts too); --sampler reaches sampling."""
    out = tmp_path / "out"
    argv = bench_args(bench, scoring_models, out, "--subjects", "purple_heart", "--no_stage2", "--sampler", "dpm++")
    argv[argv.index("--stage1") + 1] += " --token <toy>"
    helpers.run_main(dreambench.main, *argv)
    prompt_dir = out / "images" / "purple_heart" / "00_a_in_the_jungle"
    assert (prompt_dir / "prompt.txt").read_text().splitlines()[0] == "a <toy> in the jungle"
    assert "dpm++ 3 steps" in (out / "table.md").read_text()


@pytest.mark.slow
def test_end_to_end_and_resume(bench, scoring_models, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "out"
    helpers.run_main(dreambench.main, *bench_args(bench, scoring_models, out))
    results = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert [r["subject"] for r in results["subjects"]] == ["purple_heart", "orange_star"]
    assert [r["live"] for r in results["subjects"]] == [False, True]
    assert results["mean_objects"]["subjects"] == 1 and results["mean_live"]["subjects"] == 1
    assert "no class word after the token" in table and "'a <v> in the jungle'" in table
    assert "real images (oracle" in table
    prompt_dir = out / "images" / "orange_star" / "02_a_shiny"
    assert sorted(os.listdir(prompt_dir)) == ["00.png", "01.png", "prompt.txt"]
    assert (prompt_dir / "prompt.txt").read_text().splitlines()[0] == "a shiny <v>"
    assert (out / "sheets" / "purple_heart.png").exists()

    # The rows are the scores of the images on disk.
    scorer = metrics.Scorer(*scoring_models)
    row = results["subjects"][1]
    generated = [[read_rgb(out / "images" / "orange_star" / name / f"{k}.png") for k in ("00", "01")]
                 for name in ("00_a_in_the_jungle", "02_a_shiny")]
    real = [read_rgb(os.path.join(bench, "orange_star", f"{k:02d}.jpg")) for k in range(3)]
    again = dreambench.score_subject(scorer, real, generated, ["a dog in the jungle", "a shiny dog"])
    assert all(math.isclose(row[k], again[k], rel_tol=1e-6) for k in again)
    mean = (results["subjects"][0]["dino"] + results["subjects"][1]["dino"]) / 2
    assert math.isclose(results["mean"]["dino"], mean, rel_tol=1e-9)

    # A second run touches nothing: no stage, no sampling.
    def fail(*_):
        raise AssertionError("should have been skipped")
    monkeypatch.setattr(dreambench.stage1_tokens, "main", fail)
    monkeypatch.setattr(dreambench.stage2_lora, "main", fail)
    monkeypatch.setattr(dreambench, "generate", fail)
    helpers.run_main(dreambench.main, *bench_args(bench, scoring_models, out))
    assert (out / "table.md").read_text() == table

    # A subject killed after its stages: the stages are skipped, the missing prompt sampled again
    # from the same seed, the same images and table come out.
    monkeypatch.undo()
    monkeypatch.setattr(dreambench.stage1_tokens, "main", fail)
    monkeypatch.setattr(dreambench.stage2_lora, "main", fail)
    before = (prompt_dir / "01.png").read_bytes()
    shutil.rmtree(prompt_dir)
    os.remove(out / "scores" / "orange_star.json")
    helpers.run_main(dreambench.main, *bench_args(bench, scoring_models, out))
    assert (prompt_dir / "01.png").read_bytes() == before
    assert (out / "table.md").read_text() == table

    # Other image settings on the same folder would mix two methods' images: refused.
    with pytest.raises(model.UserError, match="class_word"):
        dreambench.main(bench_args(bench, scoring_models, out, "--class_word"))


@pytest.mark.slow
def test_torchrun_two_ranks_same_table_as_one_process(bench, scoring_models, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for command in ([sys.executable, "dreambench.py"],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "dreambench.py"]):
        out = one if len(command) == 2 else two
        done = subprocess.run(command + bench_args(bench, scoring_models, out), capture_output=True, text=True,
                              cwd=helpers.ROOT, env=clean_env())
        assert done.returncode == 0, done.stderr[-3000:]
    assert (two / "table.md").read_text() == (one / "table.md").read_text()
    rows_one = json.loads((one / "results.json").read_text())["subjects"]
    rows_two = json.loads((two / "results.json").read_text())["subjects"]
    assert rows_one == rows_two
    # each rank did one subject: both run folders exist, made by different processes
    assert sorted(os.listdir(two / "runs")) == ["orange_star", "purple_heart"]


@pytest.mark.slow
def test_user_errors_are_one_line(bench, scoring_models, tmp_path):
    out = subprocess.run([sys.executable, "dreambench.py", "--data", bench, "--out", str(tmp_path / "o"),
                          "--clip", scoring_models[0], "--dino", str(tmp_path / "no_dino")],
                         capture_output=True, text=True, cwd=helpers.ROOT, env=clean_env())
    helpers.assert_one_line_error(out, "--dino", "hf download facebook/dino-vits16")
    for flags, words in ((["--subjects", "cat"], ["cat", "purple_heart"]), (["--stage1", "--out x"], ["--out"]),
                         (["--prompts", "7"], ["0 to 2"])):
        with pytest.raises(model.UserError) as e:
            dreambench.main(bench_args(bench, scoring_models, tmp_path / "p") + flags)
        assert all(w in str(e.value) for w in words), str(e.value)
