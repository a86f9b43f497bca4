"""The three scripts on a tiny random model: stage 1 -> stage 2 -> sample end to end, exports other
tools load, exact resume, and bad input. Runs that should succeed call the scripts' main() in this
process; the ones that should fail run as a user runs them, to see the exit code and the one line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import accord_losses
import model
import sample
import stage1_tokens
import stage2_lora
from model import lora, run
from tests.helpers import photo_folder, random_photo, rel_err, run_main, user_error

RESOLUTION = 32  # the tiny_model fixture's (conftest.py)


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """stage 1 (with DDLoss and PDLoss) -> stage 2 (with DDLoss) -> sample, as a user runs them."""
    root = tmp_path_factory.mktemp("run")
    images = photo_folder(root / "photos")
    out = str(root / "out")
    run_main(stage1_tokens.main, "--images", images, "--model", tiny_model, "--out", out, "--steps", 4,
             "--dd_weight", 0.1, "--pd_weight", 0.002, "--superclass", "toy", "--val_steps", 2, "--save_every", 2)
    run_main(stage2_lora.main, "--out", out, "--steps", 3, "--dd_weight", 0.1, "--val_steps", 2)
    run_main(sample.main, "--out", out, "--prompt", "a photo of * on the beach", "--prompt", "{V} in the snow",
           "--n", 2, "--steps", 3)
    return out


# -------------------------------------------------------------------------------------------------
# end to end, and what other tools load

@pytest.mark.slow  # stage 1, stage 2 and sampling: 6 s with the next test
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
    samples = os.path.join(out, "samples", "000")
    assert sorted(os.listdir(samples)) == ["00_00.png", "00_01.png", "01_00.png", "01_01.png", "grid.png",
                                           "prompts.txt", "settings.json"]
    assert "a photo of <v> on the beach" in open(os.path.join(samples, "prompts.txt")).read()


@pytest.mark.slow  # 3 s on top of the run above
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


@pytest.mark.slow  # stage 1, 2 and sampling: 4 s
def test_multi_vector_target_runs_and_loads_in_diffusers(tiny_model, pipe, tmp_path):
    """--target_vectors 3: <v> in a prompt stands for three learned vectors, through stage 2 and
    sampling, and diffusers' load_textual_inversion reads the [3, D] export the same way."""
    out, images = str(tmp_path / "out"), photo_folder(tmp_path / "photos")
    run_main(stage1_tokens.main, "--images", images, "--model", tiny_model, "--out", out,
             "--steps", 3, "--target_vectors", 3, "--dd_weight", 0.1, "--val_steps", 2)
    run_main(stage2_lora.main, "--out", out, "--steps", 2, "--val_steps", 0)
    run_main(sample.main, "--out", out, "--n", 1, "--steps", 2, "--prompt", "a photo of <v> on the beach")
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
    assert "--target_vectors" in stage1_error(tiny_model, images, tmp_path / "bad", "--target_vectors", 0)


def nan_loss_at(monkeypatch, step):
    """Make the loss of training step `step` (0-based, counted in this process) NaN."""
    real, calls = accord_losses.total, []

    def total(terms, weights):
        calls.append(1)
        loss = real(terms, weights)
        return loss * float("nan") if len(calls) == step + 1 else loss

    monkeypatch.setattr(accord_losses, "total", total)


@pytest.mark.slow  # two runs of 4 steps: 4 s
def test_resume_is_exact(tiny_model, tmp_path, monkeypatch):
    """4 steps in one run == 2 steps, a stop (here: a NaN loss), --resume, 2 more."""
    images = photo_folder(tmp_path / "photos")
    common = ["--images", images, "--model", tiny_model, "--steps", 4, "--val_steps", 0, "--dd_weight", 0.1]
    run_main(stage1_tokens.main, *common, "--out", tmp_path / "whole")
    with monkeypatch.context() as patch:
        nan_loss_at(patch, 2)
        with pytest.raises(model.UserError, match="step 2"):
            run_main(stage1_tokens.main, *common, "--out", tmp_path / "parts")
    run_main(stage1_tokens.main, *common, "--out", tmp_path / "parts", "--resume")
    whole = load_file(str(tmp_path / "whole" / "tokens.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "tokens.safetensors"))
    assert torch.equal(whole["target"], parts["target"]) and torch.equal(whole["residual"], parts["residual"])
    logs = [[json.loads(line)["loss"] for line in open(tmp_path / name / "stage1_log.jsonl")]
            for name in ("whole", "parts")]
    assert logs[0] == logs[1]


# -------------------------------------------------------------------------------------------------
# bad input: works, or one clear line and a non-zero exit

def stage1_ok(tiny_model, images, out, *extra):
    """One stage-1 step in this process; it must succeed."""
    return run_main(stage1_tokens.main, "--images", images, "--model", tiny_model, "--out", out, "--steps", 1,
                    "--val_steps", 0, *extra)


def stage1_error(tiny_model, images, out, *extra):
    """One stage-1 step in this process that must stop with a one-line error; returns the line."""
    return user_error(stage1_tokens.main, "--images", images, "--model", tiny_model, "--out", out, "--steps", 1,
                      "--val_steps", 0, *extra).lower()


def test_missing_folder(tiny_model, tmp_path):
    # As a user sees such an error (stderr, exit code): test_user_paths.test_a_failed_run_as_the_user_sees_it.
    assert "nope" in stage1_error(tiny_model, tmp_path / "nope", tmp_path / "out")


def test_empty_folder(tiny_model, tmp_path):
    os.makedirs(tmp_path / "empty")
    assert "empty" in stage1_error(tiny_model, tmp_path / "empty", tmp_path / "out")


def test_one_image_runs_without_exclusion(tiny_model, tmp_path, capsys):
    stage1_ok(tiny_model, photo_folder(tmp_path / "one", n=1), tmp_path / "out")
    assert "beta = 0" in capsys.readouterr().err
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


@pytest.mark.parametrize("kind", ["cmyk", "exif", *[pytest.param(k, marks=pytest.mark.slow)
                                                   for k in ("palette", "16bit", "rgba", "small")]])
def test_unusual_images_work(tiny_model, tmp_path, kind):
    folder = photo_folder(tmp_path / "photos", n=2)
    _odd_image(kind, folder)
    stage1_ok(tiny_model, folder, tmp_path / "out")
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
    assert "bad.jpg" in stage1_error(tiny_model, folder, tmp_path / "out")


def test_caption_count_mismatch(tiny_model, tmp_path):
    folder = photo_folder(tmp_path / "photos", n=3)
    os.remove(os.path.join(folder, "01.txt"))
    assert "01.jpg" in stage1_error(tiny_model, folder, tmp_path / "out")


def test_wrong_model_path(tmp_path):
    folder = photo_folder(tmp_path / "photos", n=2)
    assert "sd15.safetensors" in stage1_error(str(tmp_path / "sd15.safetensors"), folder, tmp_path / "out")


def test_finished_run_is_not_overwritten(tiny_model, tmp_path):
    folder = photo_folder(tmp_path / "photos", n=2)
    stage1_ok(tiny_model, folder, tmp_path / "out")
    before = {name: open(tmp_path / "out" / name, "rb").read() for name in os.listdir(tmp_path / "out")}
    assert "finished" in stage1_error(tiny_model, folder, tmp_path / "out")
    after = {name: open(tmp_path / "out" / name, "rb").read() for name in os.listdir(tmp_path / "out")}
    assert before == after


def test_nan_loss_stops_and_keeps_the_last_good_state(tiny_model, tmp_path, monkeypatch):
    folder = photo_folder(tmp_path / "photos", n=2)
    nan_loss_at(monkeypatch, 3)
    with pytest.raises(model.UserError, match="step 3"):
        run_main(stage1_tokens.main, "--images", folder, "--model", tiny_model, "--out", tmp_path / "out",
                 "--steps", 5, "--val_steps", 0)
    saved = load_file(str(tmp_path / "out" / "stage1_checkpoint.safetensors"))
    assert torch.isfinite(saved["param.target"]).all() and torch.isfinite(saved["param.residual"]).all()
    assert not os.path.exists(tmp_path / "out" / "DONE_stage1")


@pytest.mark.slow  # bf16 on a CPU: 5 s
def test_stage1_keeps_the_text_encoder_in_fp32(tiny_model, tmp_path, monkeypatch):
    """--precision bf16: the UNet computes in bf16, the text encoder the vectors train through in fp32
    (and the validation grid, which feeds its fp32 context to the bf16 UNet, still runs)."""
    loaded, real_load = [], model.load
    monkeypatch.setattr(model, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    run_main(stage1_tokens.main, "--images", photo_folder(tmp_path / "photos"), "--model", tiny_model,
             "--out", tmp_path / "out", "--steps", 1, "--precision", "bf16", "--val_steps", 1)
    sd = loaded[0]
    assert {p.dtype for p in sd.text_encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in sd.unet.parameters()} == {torch.bfloat16}
    assert os.path.exists(tmp_path / "out" / "stage1_grid.png")


@pytest.mark.parametrize("init", [pytest.param("context", marks=pytest.mark.slow), "words"])
def test_residuals_start_where_residual_init_says(tiny_model, tmp_path, init):
    """Each photo's residuals start at the mean over its caption's tokens of the text encoder's outputs
    (context) or of the word embeddings (words); one step at lr 1e-7 leaves them there."""
    folder = photo_folder(tmp_path / "photos", n=2)
    stage1_ok(tiny_model, folder, tmp_path / "out", "--residual_init", init, "--residuals", 2, "--lr", 1e-7)
    _, residual, meta = run.load_tokens(str(tmp_path / "out"))
    sd = model.load(tiny_model)
    expected = []
    for caption in meta["captions"]:
        words = sd.tokenizer.token_ids(caption)  # the caption's tokens, without start and end
        ids = sd.tokenizer([caption])
        with torch.no_grad():
            vectors = sd.text_encoder(ids)[0, 1:1 + len(words)] if init == "context" else \
                sd.text_encoder.embeddings.token_embedding.weight[torch.tensor(words)]
        expected += [vectors.float().mean(0)] * 2
    assert rel_err(residual.float().flatten(0, -2), torch.stack(expected)) <= 1e-4
