"""Stable Diffusion 2.x against diffusers/transformers with the same random weights: the OpenCLIP text
tower (23 of 24 blocks, GELU, fused q/k/v in the original file), the UNet with linear projections and
64-wide heads, the VAE, through both checkpoint layouts; what a checkpoint says about v prediction; the
three scripts on a tiny SD 2 with v prediction, and their exports in diffusers."""
import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import accord_losses
import model
import sample
import stage1_tokens
import stage2_lora
from model import clip, conditions, lora, run, unet, vae
from model.loader import SCHEDULE_KEYS, save_safetensors
from model.tokenizer import write_vocab_files
from tests import helpers
from tests.helpers import randomize, rel_err

# A tiny SD 2: 64-wide heads everywhere (so, as at full size, every config is read from the weights'
# shapes alone), linear proj_in/proj_out, GELU text tower read at its penultimate block.
UNET2 = dict(sample_size=8, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(1, 2),
             use_linear_projection=True)
TEXT2 = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
             max_position_embeddings=77, hidden_act="gelu", projection_dim=64, eos_token_id=2)
# SD 2.1's own configs (stabilityai/stable-diffusion-2-1: unet/ and text_encoder/config.json)
UNET21 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
              use_linear_projection=True, upcast_attention=True)
TEXT21 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
              eos_token_id=2)
PREFIX = "cond_stage_model.model."
PROMPTS = ["a photograph of an astronaut riding a horse", "", "a red striped star, on a blue background!"]


def openclip_original(text_model, extra_block_seed=1):
    """The original file's `cond_stage_model.model.` tensors for a transformers CLIPTextModel: q/k/v
    fused, OpenCLIP's names, plus what SD 2 does not use (the tower's last block, its projection
    and logit scale), random. Written from the layout, not from our map, so the map is tested."""
    w = text_model.config.hidden_size
    sd = {k.removeprefix("text_model."): v for k, v in text_model.state_dict().items() if "position_ids" not in k}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    layers = text_model.config.num_hidden_layers
    for i in range(layers):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"attn.in_proj_{kind}"] = torch.cat([sd[a + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[b + f"attn.out_proj.{kind}"] = sd[a + f"self_attn.out_proj.{kind}"]
            out[b + f"ln_1.{kind}"], out[b + f"ln_2.{kind}"] = sd[a + f"layer_norm1.{kind}"], sd[a + f"layer_norm2.{kind}"]
            out[b + f"mlp.c_fc.{kind}"], out[b + f"mlp.c_proj.{kind}"] = sd[a + f"mlp.fc1.{kind}"], sd[a + f"mlp.fc2.{kind}"]
    gen = torch.Generator().manual_seed(extra_block_seed)
    last = f"transformer.resblocks.{layers}."
    for key, value in list(out.items()):
        if key.startswith("transformer.resblocks.0."):
            out[last + key[len("transformer.resblocks.0."):]] = torch.randn(value.shape, generator=gen)
    out["text_projection"] = torch.randn(w, w, generator=gen)
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def original_file(pipe, global_step=None):
    """The whole pipeline in the original single-file layout, as SD 2's releases are (no configs)."""
    out = {PREFIX + k: v for k, v in openclip_original(pipe.text_encoder).items()}
    ucfg, vcfg = unet.config_from_diffusers(dict(pipe.unet.config)), vae.config_from_diffusers(dict(pipe.vae.config))
    for lib, module, cfg, prefix in ((unet, pipe.unet, ucfg, "model.diffusion_model."),
                                     (vae, pipe.vae, vcfg, "first_stage_model.")):
        with torch.device("meta"):
            shapes = (unet.UNet if lib is unet else vae.VAE)(cfg).state_dict()
        for key, value in module.state_dict().items():
            ours = lib.diffusers_name(key, cfg)
            out[prefix + ours] = value.reshape(shapes[ours].shape)
    for key in SCHEDULE_KEYS:
        out[key] = torch.rand(1000)
    if global_step is not None:
        out["global_step"] = torch.tensor(global_step)
    return out


def tiny_sd2(folder, upcast=False, seed=0):
    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "tokenizer_files")
    write_vocab_files(tok_dir)
    return StableDiffusionPipeline(
        vae=randomize(AutoencoderKL(**helpers.VAE)), text_encoder=randomize(CLIPTextModel(CLIPTextConfig(**TEXT2))),
        tokenizer=CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                                pad_token="!", model_max_length=77),
        unet=randomize(UNet2DConditionModel(**dict(UNET2, upcast_attention=upcast))),
        scheduler=DPMSolverMultistepScheduler.from_config(dict(helpers.SD_SCHEDULER, prediction_type="v_prediction")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def check_components(sd, pipe, tol):
    """Text encoder, UNet and VAE of `sd` against the pipeline's, within `tol`."""
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(sd.tokenizer(PROMPTS), ids)
    assert ids[1, 2:].eq(0).all()  # the empty prompt: BOS, EOS, then "!" (id 0) to 77
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(3, 4, 16, 16, generator=gen), torch.tensor([0, 517, 999])
    image = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        context = pipe.text_encoder(ids).last_hidden_state
        assert rel_err(sd.text_encoder(ids), context) <= tol
        assert rel_err(sd.text_encoder.pooled(ids), pipe.text_encoder(ids).pooler_output) <= tol
        assert rel_err(sd.unet(x, t, context), pipe.unet(x, t, context).sample) <= tol
        assert rel_err(sd.vae.encode(image)[0], pipe.vae.encode(image).latent_dist.mean) <= tol
        z = torch.randn(2, 4, 4, 4, generator=gen)
        assert rel_err(sd.vae.decode(z), pipe.vae.decode(z).sample) <= tol


@pytest.mark.parametrize("layout", ["single_file", pytest.param("diffusers_folder", marks=pytest.mark.slow)])
def test_tiny_sd2_parity_through_both_layouts(tmp_path, layout):
    pipe = tiny_sd2(str(tmp_path))
    if layout == "single_file":
        path = str(tmp_path / "sd2.safetensors")
        save_safetensors(original_file(pipe), path)
    else:
        path = helpers.write_diffusers_folder(pipe, str(tmp_path / "sd2"))
    sd = model.load(path)
    assert isinstance(sd.text_encoder, clip.OpenCLIPTextEncoder)
    assert sd.text_encoder.config == clip.CLIPConfig(width=64, layers=2, heads=1, mlp_dim=128, act="gelu",
                                                     layout="openclip")
    assert len(sd.text_encoder.transformer.resblocks) == 2  # the file's third (last) block is not kept
    assert sd.unet.config.linear_proj and sd.unet.config.num_heads == (1, 2) and sd.unet.config.context_dim == 64
    assert sd.tokenizer.pad_id == 0
    check_components(sd, pipe, 1e-5)
    # The folder's scheduler says v; the file says nothing (no global_step): unknown until told.
    if layout == "single_file":
        assert sd.prediction_type is None and sd.resolution is None
        sd.set_prediction_type("v_prediction")
        assert sd.prediction_type == "v_prediction" and sd.resolution == 768
    else:
        assert sd.prediction_type == "v_prediction" and sd.resolution == 32  # the VAE's sample_size
    # Saved by us and loaded again: the same model, its kind and tower kept (configs in the metadata).
    again = str(tmp_path / "again.safetensors")
    model.save(sd, again)
    sd2 = model.load(again)
    assert sd2.prediction_type == "v_prediction" and sd2.text_encoder.config == sd.text_encoder.config
    check_components(sd2, pipe, 1e-5)


def test_single_file_mapping_is_diffusers_own():
    """Our module paths are the original file's keys: diffusers' convert_open_clip_checkpoint maps the
    file to exactly transformers' 23-layer CLIPTextModel, and our loader-side map does the inverse."""
    torch.manual_seed(0)
    t = randomize(CLIPTextModel(CLIPTextConfig(**TEXT2)))
    original = {PREFIX + k: v for k, v in openclip_original(t).items()}
    back = convert_open_clip_checkpoint(t, original)  # which skips text_projection
    # diffusers names SD 2.1's unused block (resblocks.23); the tiny tower's last is number 2
    last = f"text_model.encoder.layers.{TEXT2['num_hidden_layers']}."
    back = {k.removeprefix("text_model."): v for k, v in back.items() if not k.startswith(last)}
    ref = {k: v for k, v in t.state_dict().items() if "position_ids" not in k}
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    cfg = clip.config_from_diffusers(t.config.to_dict())
    ours = clip.from_transformers(ref, cfg)
    with torch.device("meta"):
        expected = clip.build(cfg).state_dict()
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], original[PREFIX + k]) for k in ours)
    inferred = clip.openclip_config_from_state_dict({k.removeprefix(PREFIX): v for k, v in original.items()})
    assert inferred == cfg and all(clip.openclip_unused(k.removeprefix(PREFIX), cfg)
                                   for k in original if k.removeprefix(PREFIX) not in ours)


@pytest.mark.parametrize("global_step,expected", [pytest.param(None, None, marks=pytest.mark.slow),
                                                  pytest.param(875000, "epsilon", marks=pytest.mark.slow),
                                                  (110000, "v_prediction")])
def test_single_file_prediction_type_is_what_diffusers_detects(tmp_path, global_step, expected):
    """diffusers' single-file loader reads `global_step`: 875,000 (SD 2 base) is epsilon, any other v.
    Without it the file does not say: None, and the resolution waits for the user's answer."""
    pipe = tiny_sd2(str(tmp_path))
    path = str(tmp_path / "sd2.safetensors")
    save_safetensors(original_file(pipe, global_step), path)
    sd = model.load(path)
    assert sd.prediction_type == expected
    assert sd.resolution == {None: None, "epsilon": 512, "v_prediction": 768}[expected]
    assert sd.unet.config.upcast_attention  # SD 2's original code computes attention in fp32
    with pytest.raises(model.UserError):
        sd.set_prediction_type("sample")


@pytest.mark.slow  # 3 s
def test_folder_scheduler_says_the_prediction_type(tmp_path):
    pipe = tiny_sd2(str(tmp_path), upcast=True)
    path = helpers.write_diffusers_folder(pipe, str(tmp_path / "sd2"))
    assert model.load(path).unet.config.upcast_attention
    config_path = os.path.join(path, "scheduler", "scheduler_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({k: v for k, v in config.items() if k != "prediction_type"}, f)
    assert model.load(path).prediction_type == "epsilon"  # diffusers' default
    os.remove(config_path)
    assert model.load(path).prediction_type is None


def test_upcast_attention_runs_in_fp32():
    """With upcast, bf16 attention equals fp32 attention rounded once; without, it differs."""
    torch.manual_seed(0)
    attn = unet.Attention(64, 1, upcast=True).bfloat16()
    x = torch.randn(2, 256, 64).bfloat16() * 4
    q, k, v = (p(x).unflatten(-1, (1, -1)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    expected = attn.to_out[0](exact.transpose(1, 2).flatten(2))
    with torch.no_grad():
        assert torch.equal(attn(x), expected)
        attn.upcast = False
        assert not torch.equal(attn(x), expected)


@pytest.mark.slow  # 5 s; DPM-Solver++ parity on epsilon stays fast (test_schedule.py)
def test_tiny_sd2_v_prediction_dpm_sampling_equals_the_pipeline(tmp_path):
    """The authors' sampling (DPM-Solver++ from the SD 2 config, v prediction) on a loaded SD 2 file."""
    pipe = tiny_sd2(str(tmp_path))
    path = helpers.write_diffusers_folder(pipe, str(tmp_path / "sd2"))
    sd = model.load(path)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, latents=latents.clone(), num_inference_steps=10, guidance_scale=7.5,
                      height=32, width=32, output_type="latent").images
        cond, uncond = sd.text_encoder(sd.tokenizer(PROMPTS)), sd.text_encoder(sd.tokenizer([""] * 3))
        ours = model.schedule.dpm_sample(sd.unet, cond, uncond, latents.clone(), sd.alphas_cumprod, steps=10,
                                         prediction_type=sd.prediction_type)
    assert rel_err(ours, theirs) <= 1e-4


# -------------------------------------------------------------------------------------------------
# SD 2.1's real sizes

@pytest.mark.slow
def test_sd21_size_unet_parity():
    """SD 2.1's UNet: 865,910,724 parameters; config read back from the original keys' shapes."""
    torch.manual_seed(0)
    d = randomize(UNet2DConditionModel(**UNET21))
    cfg = unet.config_from_diffusers(dict(d.config))
    assert cfg == unet.UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, upcast_attention=True)
    with torch.device("meta"):
        ours = unet.UNet(cfg)
    ours.load_state_dict({unet.diffusers_name(k, cfg): v for k, v in d.state_dict().items()}, assign=True)
    ours.eval()
    state = ours.state_dict()
    assert sum(v.numel() for v in state.values()) == 865_910_724
    assert unet.config_from_state_dict(state) == cfg
    x, t, c = torch.randn(1, 4, 24, 24), torch.tensor([537]), torch.randn(1, 77, 1024)
    with torch.no_grad():
        expected = d(x, t, c).sample
        del d, state
        assert rel_err(ours(x, t, c), expected) <= 1e-4


@pytest.mark.slow
def test_sd21_size_text_encoder_parity():
    """SD 2.1's text tower, width 1024, 23 of 24 blocks used, through both layouts' maps."""
    torch.manual_seed(0)
    t = randomize(CLIPTextModel(CLIPTextConfig(**TEXT21)))
    cfg = clip.config_from_diffusers(t.config.to_dict())
    assert (cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.layout) == (1024, 23, 16, 4096, "gelu",
                                                                                    "openclip")
    ref = {k: v for k, v in t.state_dict().items() if "position_ids" not in k}
    tok = model.tokenizer.Tokenizer.from_clip_bpe(pad="!")
    ids = tok(PROMPTS)
    with torch.no_grad():
        expected = t(ids).last_hidden_state
    del t
    original = openclip_original_from_state(ref)
    assert clip.openclip_config_from_state_dict(original) == cfg  # 24 blocks in the file, 23 used
    for layout, state in (("folder", clip.from_transformers(ref, cfg)),
                          ("single_file", {k: v for k, v in original.items() if not clip.openclip_unused(k, cfg)})):
        with torch.device("meta"):
            ours = clip.build(cfg)
        ours.load_state_dict(state, assign=True)
        with torch.no_grad():
            assert rel_err(ours.eval()(ids), expected) <= 1e-4, layout
        del ours, state


def openclip_original_from_state(ref):
    """openclip_original for a state dict (the full-size model is freed before this is built)."""
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = CLIPTextConfig(**TEXT21)

        def state_dict(self):
            return ref
    return openclip_original(Holder())


# -------------------------------------------------------------------------------------------------
# the scripts on a tiny SD 2 file that does not say what it predicts (as SD 2's releases without
# global_step): stage 1 -> stage 2 -> sample with v prediction, and what other tools load

def test_v_prediction_losses_read_noise_and_learn_v():
    """A UNet whose every output is the true v_t of its rows: the reconstruction (against v_t) is
    zero, and the exclusion and DDLoss rows read exactly the noise that made their latents."""
    gen = torch.Generator().manual_seed(0)
    abar = model.schedule.alphas_cumprod()
    z, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([5, 500, 990])
    x = model.schedule.add_noise(z, t, noise, abar)
    rows = conditions.stage1_rows(x[:1], t[:1], x[1:], t[1:], with_dd=True)
    v = model.schedule.velocity(z, noise, t, abar)
    outputs = {"rec": v[:1], "p": v[:1], "g": v[:1], "null": v[:1], "anchor_g": v[1:], "anchor_null": v[1:]}
    eps, rec = conditions.for_losses(outputs, rows, z[:1], noise[:1], abar, "v_prediction")
    assert rec[0] is outputs["rec"] and torch.equal(rec[1], v[:1])
    for name, expected in (("rec", noise[:1]), ("g", noise[:1]), ("anchor_g", noise[1:])):
        assert rel_err(eps[name], expected) <= 1e-5, name
    terms = accord_losses.loss_terms(eps, noise[:1], t[:1], abar, rec=rec)
    assert terms["rec"] == 0
    # an epsilon model's predictions pass through untouched, and the reconstruction reads the noise
    same, none = conditions.for_losses(outputs, rows, z[:1], noise[:1], abar, "epsilon")
    assert same is outputs and none is None


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory):
    """(the tiny SD 2 pipeline, its weights as an original single file without global_step)."""
    root = tmp_path_factory.mktemp("sd2file")
    pipe = tiny_sd2(str(root))
    path = str(root / "sd2.safetensors")
    save_safetensors(original_file(pipe), path)
    return pipe, path


def test_a_file_that_does_not_say_needs_prediction_type(sd2_file, tmp_path):
    _, path = sd2_file
    images = helpers.photo_folder(tmp_path / "photos", n=2)
    message = helpers.user_error(stage1_tokens.main, "--images", images, "--model", path, "--out",
                                 tmp_path / "out", "--resolution", 32)
    assert "--prediction_type v_prediction" in message and "epsilon" in message
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow  # stage 1, stage 2, sampling and diffusers' loaders: 6 s
def test_sd2_v_prediction_end_to_end_and_exports_load_in_diffusers(sd2_file, tmp_path):
    pipe, path = sd2_file
    images, out = helpers.photo_folder(tmp_path / "photos", n=3), str(tmp_path / "run")
    helpers.run_main(stage1_tokens.main, "--images", images, "--model", path, "--out", out, "--steps", 3,
                     "--prediction_type", "v_prediction", "--resolution", 32, "--token", "<toy>", "--dd_weight", 0.1,
                     "--val_sampler", "dpm++", "--val_steps", 2)
    helpers.run_main(stage2_lora.main, "--out", out, "--steps", 2, "--dd_weight", 0.1, "--val_steps", 2)
    helpers.run_main(sample.main, "--out", out, "--n", 1, "--sampler", "dpm++", "--steps", 3,
                     "--prompt", "a photo of <toy> on the beach")
    target, _, meta = run.load_tokens(out)
    assert target.shape == (1, 64) and meta["target_token"] == "<toy>"
    assert meta["settings"]["prediction_type"] == "v_prediction" and meta["settings"]["resolution"] == 32
    with open(os.path.join(out, "stage1_log.jsonl")) as f:
        assert {"rec", "excl", "dd"} <= set(json.loads(f.readline()))
    for grid_file in ("stage1_grid.png", "stage2_grid.png", "samples/000/grid.png"):
        assert os.path.exists(os.path.join(out, grid_file)), grid_file
    with open(os.path.join(out, "samples", "000", "settings.json")) as f:
        settings = json.load(f)
    assert (settings["sampler"], settings["steps"], settings["prediction_type"], settings["token"], settings["lora"]) \
        == ("dpm++", 3, "v_prediction", "<toy>", True)

    # diffusers reads the token under its stored name (the export's key) and the LoRA, and computes what we do
    sd = model.load(path)
    sd.tokenizer.add_tokens(["<toy>"])
    prompt = "a photo of <toy> on the beach"
    pipe.load_textual_inversion(os.path.join(out, "v.diffusers.safetensors"))
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, sd.tokenizer([prompt])) and ids[0, 4] == 49408
    with torch.no_grad():
        assert rel_err(sd.text_encoder(ids, extra_embeddings=target), pipe.text_encoder(ids).last_hidden_state) <= 1e-5
    pipe.unload_textual_inversion()
    lora.load_lora(sd.unet, os.path.join(out, "lora.peft.safetensors"))
    gen = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([20, 700]), torch.randn(2, 77, 64, generator=gen)
    pipe.load_lora_weights(os.path.join(out, "lora.peft.safetensors"))
    with torch.no_grad():
        assert rel_err(sd.unet(x, t, c), pipe.unet(x, t, c).sample) <= 1e-5
    pipe.unload_lora_weights()
