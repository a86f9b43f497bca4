"""Concepts learned separately, sampled together: each run's token under the name stage 1 gave it
(--token), every LoRA merged into the UNet with its own scale, and the one-line refusals."""
import json
import os

import pytest
import torch

import model
import sample
import stage1_tokens
import stage2_lora
from model import lora, run
from model.loader import read_safetensors
from tests.helpers import photo_folder, run_main, tokens_folder, user_error


@pytest.fixture(scope="module")
def two_runs(tiny_model, tmp_path_factory):
    """<dog> and <cat>, each learned (stage 1 and stage 2) from its own photos, with its own seed."""
    root = tmp_path_factory.mktemp("compose")
    runs = []
    for k, token in enumerate(("<dog>", "<cat>")):
        images = photo_folder(root / f"photos{k}", n=2 + k)
        out = str(root / token.strip("<>"))
        run_main(stage1_tokens.main, "--images", images, "--model", tiny_model, "--out", out, "--steps", 2,
                 "--token", token, "--seed", k, "--val_steps", 0)
        run_main(stage2_lora.main, "--out", out, "--steps", 2, "--seed", k, "--val_steps", 0)
        runs.append(out)
    return runs


def lora_factors(path):
    """{file module path: (down, up, alpha / rank)} of a peft-layout LoRA file we wrote."""
    tensors, metadata = read_safetensors(path)
    alpha = json.loads(metadata[lora.METADATA_KEY])["unet.lora_alpha"]
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            out[name] = (down, tensors[name + ".lora_B.weight"], alpha / down.shape[0])
    return out


@pytest.mark.slow  # two stage-1 and stage-2 runs, then sampling: 5 s
def test_two_concepts_in_one_prompt(two_runs, tiny_model, monkeypatch):
    dog, cat = two_runs
    seen = {}
    real_generate = sample.generate

    def generate(sd, prompts, extra, **kwargs):
        seen.update(sd=sd, prompts=prompts, extra=extra)
        return real_generate(sd, prompts, extra, **kwargs)

    monkeypatch.setattr(sample, "generate", generate)
    prompt = "a <dog> next to a <cat>"
    run_main(sample.main, "--runs", dog, cat, "--prompt", prompt, "--lora_scale", 1.0, 0.8, "--n", 1, "--steps", 2)
    sd = seen["sd"]

    # both tokens resolve to their own ids, which read their own run's vectors
    vocab = 49408
    assert sd.tokenizer.token_ids(prompt) == sd.tokenizer.token_ids("a") + [vocab] + \
        sd.tokenizer.token_ids("next to a") + [vocab + 1]
    assert torch.equal(seen["extra"][0], run.load_tokens(dog)[0][0])
    assert torch.equal(seen["extra"][1], run.load_tokens(cat)[0][0])

    # the merged UNet: the base plus both low-rank updates, each with its scale
    base = model.load(tiny_model).unet.state_dict()
    merged = sd.unet.state_dict()
    updates = {}
    for path, scale in ((dog, 1.0), (cat, 0.8)):
        for name, (down, up, alpha_over_rank) in lora_factors(os.path.join(path, "lora.peft.safetensors")).items():
            updates.setdefault(name, []).append(scale * alpha_over_rank * (up @ down))
    ours = {model.unet.to_diffusers_name(k, sd.unet.config).removesuffix(".weight"): k for k in merged
            if k.endswith(".weight")}
    assert updates and set(updates) <= set(f"unet.{n}" for n in ours)
    touched = set()
    for name, deltas in updates.items():
        key = ours[name.removeprefix("unet.")]
        expected = base[key] + deltas[0] + deltas[1]
        assert torch.allclose(merged[key], expected, rtol=1e-6, atol=1e-6), key
        assert not torch.allclose(merged[key], base[key] + deltas[0], rtol=1e-6, atol=1e-6), key  # both count
        touched.add(key)
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in touched)

    # the pictures go to the first run's samples, saying which runs and scales made them
    folder = os.path.join(dog, "samples", "000")
    assert sorted(os.listdir(folder)) == ["00_00.png", "grid.png", "prompts.txt", "settings.json"]
    with open(os.path.join(folder, "settings.json")) as f:
        settings = json.load(f)
    assert (settings["runs"], settings["token"], settings["lora_scale"]) == (["dog", "cat"], ["<dog>", "<cat>"],
                                                                             [1.0, 0.8])


def test_clashing_token_names_are_refused(tmp_path):
    a = tokens_folder(tmp_path / "a", "<dog>")
    b = tokens_folder(tmp_path / "b", "<Dog>", seed=1)  # prompts match tokens case-insensitively
    message = user_error(sample.main, "--runs", a, b, "--prompt", "a <dog>")
    assert "<Dog>" in message and "--token" in message
    c = tokens_folder(tmp_path / "c", "<v>", vectors=3)  # its further vectors are named <v>_1, <v>_2
    d = tokens_folder(tmp_path / "d", "<v>_2")
    assert "both name" in user_error(sample.main, "--runs", c, d, "--prompt", "<v>")


def test_composition_flags_are_checked(tmp_path):
    a, b = tokens_folder(tmp_path / "a", "<dog>"), tokens_folder(tmp_path / "b", "<cat>")
    assert "one scale per run" in user_error(sample.main, "--runs", a, b, "--prompt", "x", "--lora_scale", 1)
    assert "--prompt" in user_error(sample.main, "--runs", a, b)
    assert "twice" in user_error(sample.main, "--runs", a, a, "--prompt", "x")


@pytest.mark.parametrize("name,words", [("a b", ["without spaces"]), ("", ["without spaces"]),
                                        ("<r0_1>", ["residual"]), ("dog", ["vocabulary"])])
def test_token_names_are_checked(tiny_model, tmp_path, name, words):
    images = photo_folder(tmp_path / "photos", n=2)
    message = user_error(stage1_tokens.main, "--images", images, "--model", tiny_model, "--out", tmp_path / "out",
                         "--token", name)
    assert all(word in message for word in words), message
    assert not os.path.exists(tmp_path / "out")
