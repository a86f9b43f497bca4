"""The three scripts on a tiny random model: the batched step equals the plain one, stage 1 ->
stage 2 -> sample end to end, exports other tools load, exact resume, and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import model
import stage1_tokens
from model import lora, run
from tests import helpers
from tests.helpers import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTION = 32



def script(name, *args, check=True):
    out = subprocess.run([sys.executable, os.path.join(ROOT, name), *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    if check and out.returncode != 0:
        raise AssertionError(f"{name} failed:\n{out.stderr[-3000:]}")
    return out


def assert_one_line_error(out, *words):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    for word in words:
        assert word.lower() in errors[0].lower(), errors[0]


def random_photo(seed, size=48):
    """A smooth random picture (never blank): low-resolution noise upsampled."""
    rng = np.random.default_rng(seed)
    small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def photo_folder(path, n=3, captions=True):
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        random_photo(i).save(os.path.join(path, f"{i:02d}.jpg"), quality=95)
        if captions:
            with open(os.path.join(path, f"{i:02d}.txt"), "w") as f:
                f.write(f"a toy on a {['red', 'green', 'blue', 'white'][i % 4]} table")
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(pipe, tmp_path_factory):
    """The tiny pipeline's weights as one of our single files (configs in its metadata)."""
    root = tmp_path_factory.mktemp("model")
    sd = model.load(helpers.write_diffusers_folder(pipe, str(root / "diffusers")))
    path = str(root / "tiny.safetensors")
    model.save(sd, path, resolution=RESOLUTION)
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """stage 1 (with DDLoss and PDLoss) -> stage 2 (with DDLoss) -> sample, as a user runs them."""
    root = tmp_path_factory.mktemp("run")
    images = photo_folder(root / "photos")
    out = str(root / "out")
    script("stage1_tokens.py", "--images", images, "--model", tiny_model, "--out", out, "--steps", 4,
           "--dd_weight", 0.1, "--pd_weight", 0.002, "--superclass", "toy", "--val_steps", 2, "--save_every", 2)
    script("stage2_lora.py", "--out", out, "--steps", 3, "--dd_weight", 0.1, "--val_steps", 2)
    script("sample.py", "--out", out, "--prompt", "a photo of * on the beach", "--prompt", "{V} in the snow",
           "--n", 2, "--steps", 3)
    return out


# -------------------------------------------------------------------------------------------------
# the batched step

def test_batched_step_equals_one_call_per_condition(tiny_model):
    sd = model.load(tiny_model)
    torch.manual_seed(0)
    width = sd.unet.config.context_dim
    vectors = torch.randn(1 + 8, width) * 0.5
    sd.tokenizer.add_tokens(["<v>"] + [f"<r0_{k}>" for k in range(8)])
    residual = " ".join(f"<r0_{k}>" for k in range(8))
    ids = sd.tokenizer([f"<v> {residual}", "<v>", residual])
    empty = sd.text_encoder(sd.tokenizer([""]))
    z = torch.randn(4, 4, 16, 16)
    t = torch.tensor([5, 999, 310, 641])
    noise = torch.randn(4, 4, 16, 16)

    def terms_and_grads(mode):
        v = vectors.clone().requires_grad_(True)
        conditions = sd.text_encoder(ids, extra_embeddings=v)
        terms = stage1_tokens.stage1_losses(sd.unet, conditions, empty, z[:1], z[1:], t, noise, sd.alphas_cumprod,
                                            with_dd=True, mode=mode)
        loss = terms["rec"] + 0.05 * terms["excl"] + 0.1 * terms["dd"]
        grad, = torch.autograd.grad(loss, v)
        return terms, grad

    ref_terms, ref_grad = terms_and_grads("per_condition")
    assert ref_grad.abs().sum() > 0
    for mode in ("ours", "one_graph"):
        terms, grad = terms_and_grads(mode)
        assert set(terms) == {"rec", "excl", "dd"}
        for name in terms:
            assert rel_err(terms[name], ref_terms[name]) <= 1e-5, (mode, name)
        assert rel_err(grad, ref_grad) <= 1e-5, mode


def test_stop_rows_keep_no_graph(tiny_model):
    """The stop-gradient rows go through a graph-free call: its output has no grad_fn."""
    sd = model.load(tiny_model)
    seen = []
    hook = sd.unet.register_forward_hook(lambda m, i, o: seen.append((o.shape[0], o.grad_fn is not None)))
    conditions = torch.randn(3, 77, sd.unet.config.context_dim, requires_grad=True)
    empty = torch.randn(1, 77, sd.unet.config.context_dim)
    z = torch.randn(4, 4, 16, 16)
    stage1_tokens.stage1_losses(sd.unet, conditions, empty, z[:1], z[1:], torch.tensor([1, 2, 3, 4]),
                                torch.randn(4, 4, 16, 16), sd.alphas_cumprod, with_dd=True)
    hook.remove()
    assert seen == [(5, True), (5, False)]  # rows 1, 2, 5-7 with a graph; rows 3, 4, 8-10 without


# -------------------------------------------------------------------------------------------------
# end to end, and what other tools load

def test_every_output_exists_and_loads(finished_run):
    out = finished_run
    target, residual, meta = run.load_tokens(out)
    assert target.shape == (1, 32) and residual.shape == (3, 8, 32)
    assert meta["images"] == ["00.jpg", "01.jpg", "02.jpg"] and meta["captions"][0] == "a toy on a red table"
    assert torch.equal(load_file(os.path.join(out, "v.diffusers.safetensors"))["<v>"], target)
    assert torch.equal(load_file(os.path.join(out, "v.a1111.safetensors"))["emb_params"], target)
    for stage, steps in (("stage1", 4), ("stage2", 3)):
        with open(os.path.join(out, f"{stage}_log.jsonl")) as f:
            records = [json.loads(line) for line in f]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        assert all(np.isfinite(r["loss"]) and r["ms"] > 0 for r in records)
        assert Image.open(os.path.join(out, f"{stage}_grid.png")).size == (4 * RESOLUTION, RESOLUTION)
    assert {"rec", "excl", "dd", "pd"} <= set(records[0]) | set(json.loads(open(
        os.path.join(out, "stage1_log.jsonl")).readline()))
    peft = load_file(os.path.join(out, "lora.peft.safetensors"))
    kohya = load_file(os.path.join(out, "lora.kohya.safetensors"))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in peft
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    samples = os.path.join(out, "samples")
    assert sorted(os.listdir(samples)) == ["00_00.png", "00_01.png", "01_00.png", "01_01.png", "grid.png",
                                           "prompts.txt"]
    assert "a photo of <v> on the beach" in open(os.path.join(samples, "prompts.txt")).read()


def test_diffusers_loads_our_token_and_lora(finished_run, tiny_model, pipe):
    """diffusers' own loaders accept the exports, and compute what we compute."""
    out = finished_run
    sd = model.load(tiny_model)
    target, _, _ = run.load_tokens(out)
    sd.tokenizer.add_tokens(["<v>"])
    lora.load_lora(sd.unet, os.path.join(out, "lora.peft.safetensors"))
    prompt = "a photo of <v> on the beach"
    for export in ("v.diffusers.safetensors", "v.a1111.safetensors"):
        pipe.load_textual_inversion(os.path.join(out, export), token="<v>")
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(ids, sd.tokenizer([prompt]))
        with torch.no_grad():
            theirs = pipe.text_encoder(ids).last_hidden_state
            ours = sd.text_encoder(ids, extra_embeddings=target)
        assert rel_err(ours, theirs) <= 1e-5
        pipe.unload_textual_inversion()
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([20, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ours = sd.unet(x, t, c)
    for export in ("lora.peft.safetensors", "lora.kohya.safetensors"):
        pipe.load_lora_weights(os.path.join(out, export))
        with torch.no_grad():
            assert rel_err(ours, pipe.unet(x, t, c).sample) <= 1e-5, export
        pipe.unload_lora_weights()


def test_multi_vector_target_runs_and_loads_in_diffusers(tiny_model, pipe, tmp_path):
    """--target_vectors 3: <v> in a prompt stands for three learned vectors, through stage 2 and
    sampling, and diffusers' load_textual_inversion reads the [3, D] export the same way."""
    out, images = str(tmp_path / "out"), photo_folder(tmp_path / "photos")
    script("stage1_tokens.py", "--images", images, "--model", tiny_model, "--out", out,
           "--steps", 3, "--target_vectors", 3, "--dd_weight", 0.1, "--val_steps", 2)
    script("stage2_lora.py", "--out", out, "--steps", 2, "--val_steps", 0)
    script("sample.py", "--out", out, "--n", 1, "--steps", 2, "--prompt", "a photo of <v> on the beach")
    target, residual, meta = run.load_tokens(out)
    assert target.shape == (3, 32) and residual.shape == (3, 8, 32) and meta["target_vectors"] == 3
    assert not torch.equal(target[0], target[1])  # three vectors of their own, each trained
    sd = model.load(tiny_model)
    assert sd.tokenizer.add_multi_vector_token("<v>", 3) == [49408, 49409, 49410]
    prompt = "a photo of <v> on the beach"
    assert sd.tokenizer([prompt])[0, 4:7].tolist() == [49408, 49409, 49410]
    pipe.load_textual_inversion(os.path.join(out, "v.diffusers.safetensors"), token="<v>")
    ids = pipe.tokenizer([pipe.maybe_convert_prompt(prompt, pipe.tokenizer)], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    assert torch.equal(ids, sd.tokenizer([prompt]))
    with torch.no_grad():
        assert rel_err(sd.text_encoder(ids, extra_embeddings=target), pipe.text_encoder(ids).last_hidden_state) <= 1e-5
    pipe.unload_textual_inversion()
    assert_one_line_error(script("stage1_tokens.py", "--images", images, "--model", tiny_model, "--out",
                                 str(tmp_path / "bad"), "--target_vectors", 0, check=False), "--target_vectors")


def test_resume_is_exact(tiny_model, tmp_path):
    """4 steps in one run == 2 steps, a stop (here: an injected NaN), --resume, 2 more."""
    images = photo_folder(tmp_path / "photos")
    common = ["--images", images, "--model", tiny_model, "--steps", 4, "--val_steps", 0, "--dd_weight", 0.1]
    script("stage1_tokens.py", *common, "--out", tmp_path / "whole")
    stopped = script("stage1_tokens.py", *common, "--out", tmp_path / "parts", "--nan_at_step", 2, check=False)
    assert_one_line_error(stopped, "step 2")
    script("stage1_tokens.py", *common, "--out", tmp_path / "parts", "--resume")
    whole = load_file(str(tmp_path / "whole" / "tokens.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "tokens.safetensors"))
    assert torch.equal(whole["target"], parts["target"]) and torch.equal(whole["residual"], parts["residual"])
    logs = [[json.loads(line)["loss"] for line in open(tmp_path / name / "stage1_log.jsonl")]
            for name in ("whole", "parts")]
    assert logs[0] == logs[1]


# -------------------------------------------------------------------------------------------------
# bad input (SPEC section 6): works, or one clear line and a non-zero exit

def stage1(tiny_model, images, out, *extra):
    return script("stage1_tokens.py", "--images", images, "--model", tiny_model, "--out", out, "--steps", 1,
                  "--val_steps", 0, *extra, check=False)


def test_missing_folder(tiny_model, tmp_path):
    assert_one_line_error(stage1(tiny_model, tmp_path / "nope", tmp_path / "out"), "nope")


def test_empty_folder(tiny_model, tmp_path):
    os.makedirs(tmp_path / "empty")
    assert_one_line_error(stage1(tiny_model, tmp_path / "empty", tmp_path / "out"), "empty")


def test_one_image_runs_without_exclusion(tiny_model, tmp_path):
    out = stage1(tiny_model, photo_folder(tmp_path / "one", n=1), tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert "beta = 0" in out.stderr
    assert os.path.exists(tmp_path / "out" / "tokens.safetensors")


def _odd_image(kind, folder):
    image = random_photo(7)
    path = os.path.join(folder, "03.png")
    if kind == "cmyk":
        image.convert("CMYK").save(path := os.path.join(folder, "03.jpg"))
    elif kind == "palette":
        image.convert("P", palette=Image.ADAPTIVE).save(path)
    elif kind == "16bit":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(path)
    elif kind == "rgba":
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.fromarray((np.random.default_rng(1).random((48, 48)) * 255).astype(np.uint8)))
        rgba.save(path)
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        image.resize((48, 64)).save(path := os.path.join(folder, "03.jpg"), exif=exif)
    elif kind == "small":
        image.resize((16, 16)).save(path)
    with open(os.path.join(folder, "03.txt"), "w") as f:
        f.write("a toy")
    return path


@pytest.mark.parametrize("kind", ["cmyk", "palette", "16bit", "rgba", "exif", "small"])
def test_unusual_images_work(tiny_model, tmp_path, kind):
    folder = photo_folder(tmp_path / "photos", n=2)
    _odd_image(kind, folder)
    out = stage1(tiny_model, folder, tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert len(run.load_tokens(str(tmp_path / "out"))[2]["images"]) == 3


@pytest.mark.parametrize("kind", ["not_an_image", "truncated"])
def test_broken_files_are_named(tiny_model, tmp_path, kind):
    folder = photo_folder(tmp_path / "photos", n=2)
    if kind == "not_an_image":
        with open(os.path.join(folder, "bad.jpg"), "w") as f:
            f.write("this is a text file")
    else:
        data = open(os.path.join(folder, "01.jpg"), "rb").read()
        with open(os.path.join(folder, "bad.jpg"), "wb") as f:
            f.write(data[: len(data) // 2])
    with open(os.path.join(folder, "bad.txt"), "w") as f:
        f.write("a toy")
    assert_one_line_error(stage1(tiny_model, folder, tmp_path / "out"), "bad.jpg")


def test_caption_count_mismatch(tiny_model, tmp_path):
    folder = photo_folder(tmp_path / "photos", n=3)
    os.remove(os.path.join(folder, "01.txt"))
    assert_one_line_error(stage1(tiny_model, folder, tmp_path / "out"), "01.jpg")


def test_wrong_model_path(tmp_path):
    folder = photo_folder(tmp_path / "photos", n=2)
    assert_one_line_error(stage1(str(tmp_path / "sd15.safetensors"), folder, tmp_path / "out"), "sd15.safetensors")


def test_finished_run_is_not_overwritten(tiny_model, tmp_path):
    folder = photo_folder(tmp_path / "photos", n=2)
    assert stage1(tiny_model, folder, tmp_path / "out").returncode == 0
    before = {name: open(tmp_path / "out" / name, "rb").read() for name in os.listdir(tmp_path / "out")}
    assert_one_line_error(stage1(tiny_model, folder, tmp_path / "out"), "finished")
    after = {name: open(tmp_path / "out" / name, "rb").read() for name in os.listdir(tmp_path / "out")}
    assert before == after


def test_nan_loss_stops_and_keeps_the_last_good_state(tiny_model, tmp_path):
    folder = photo_folder(tmp_path / "photos", n=2)
    out = script("stage1_tokens.py", "--images", folder, "--model", tiny_model, "--out", tmp_path / "out",
                 "--steps", 5, "--val_steps", 0, "--nan_at_step", 3, check=False)
    assert_one_line_error(out, "step 3")
    saved = load_file(str(tmp_path / "out" / "stage1_checkpoint.safetensors"))
    assert torch.isfinite(saved["param.target"]).all() and torch.isfinite(saved["param.residual"]).all()
    assert not os.path.exists(tmp_path / "out" / "DONE_stage1")
