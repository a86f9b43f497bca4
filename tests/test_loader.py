"""model.load: both checkpoint layouts, a hub cache, dtypes, and every way a path can be wrong."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)

import model
from model.errors import UserError
from model.loader import read_safetensors, save_safetensors
from tests import helpers
from tests.helpers import rel_err



@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"single": helpers.write_single_file(pipe, str(root / "tiny.safetensors")),
            "diffusers": helpers.write_diffusers_folder(pipe, str(root / "tiny_diffusers"))}


def check_outputs(sd, pipe):
    torch.manual_seed(3)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 801]), torch.randn(2, 77, 32)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 4, 4)
    ids = sd.tokenizer(["a photograph of an astronaut riding a horse", "a red star, top left"])
    with torch.no_grad():
        assert rel_err(sd.unet(x, t, c), pipe.unet(x, t, c).sample) <= 1e-5
        mean, logvar = sd.vae.encode(image)
        dist = pipe.vae.encode(image).latent_dist
        assert rel_err(mean, dist.mean) <= 1e-5 and rel_err(logvar, dist.logvar) <= 1e-5
        assert rel_err(sd.vae.decode(z), pipe.vae.decode(z).sample) <= 1e-5
        assert torch.equal(ids, pipe.tokenizer(["a photograph of an astronaut riding a horse", "a red star, top left"],
                                               padding="max_length", max_length=77, truncation=True,
                                               return_tensors="pt").input_ids)
        assert rel_err(sd.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state) <= 1e-5
    assert sd.alphas_cumprod.dtype == torch.float32 and sd.alphas_cumprod.shape == (1000,)
    assert torch.equal(sd.alphas_cumprod, pipe.scheduler.alphas_cumprod)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_both_layouts_match_diffusers(files, pipe, layout):
    sd = model.load(files[layout])
    check_outputs(sd, pipe)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        assert not any(p.is_meta or p.requires_grad for p in module.parameters())
        assert not any(b.is_meta for b in module.buffers())


def test_diffusers_converters_map_our_single_file_back(pipe):
    original = helpers.original_state_dict(pipe, with_extras=False)
    unet_back = convert_ldm_unet_checkpoint(original, dict(pipe.unet.config))
    vae_back = convert_ldm_vae_checkpoint(original, dict(pipe.vae.config))
    clip_back = convert_ldm_clip_checkpoint(original)
    for back, module in ((unet_back, pipe.unet), (vae_back, pipe.vae), (clip_back, pipe.text_encoder)):
        # transformers 5 names the text tower's keys without `text_model.`; the converter adds it
        ref = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()
               if not k.endswith("position_ids")}
        back = {k.removeprefix("text_model."): v for k, v in back.items() if not k.endswith("position_ids")}
        assert set(back) == set(ref)
        assert all(torch.equal(back[k], ref[k].reshape(back[k].shape)) and back[k].shape == ref[k].shape
                   for k in ref)


@pytest.mark.slow
def test_text_encoder_keys_without_text_model_prefix(pipe, tmp_path):
    folder = helpers.write_diffusers_folder(pipe, str(tmp_path / "m"))
    te = os.path.join(folder, "text_encoder", "model.safetensors")
    from safetensors.torch import load_file, save_file
    weights = load_file(te)
    save_file({k.removeprefix("text_model."): v for k, v in weights.items()}, te)
    check_outputs(model.load(folder), pipe)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(files, dtype):
    sd = model.load(files["single"], dtype=dtype)
    assert all(p.dtype == dtype for p in sd.unet.parameters())
    out = sd.unet(torch.randn(1, 4, 8, 8, dtype=dtype), torch.tensor([10]), torch.randn(1, 77, 32, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_hub_id_resolves_through_the_local_cache(files, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    snapshot = repo / "snapshots" / ("0" * 40)
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(files["diffusers"], snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sd = model.load("someone/tiny-sd")
    assert sd.unet.config.context_dim == 32


# ---------------------------------------------------------------------------------------------
# errors: one clear UserError each

def test_pickle_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(UserError, match="pickle"):
        model.load(str(path))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="neither"):
        model.load(str(tmp_path))


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist|no such"):
        model.load(str(tmp_path / "nope.safetensors"))


def test_truncated_file(files, tmp_path):
    data = open(files["single"], "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        model.load(str(path))


def test_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{this is not json}" + os.urandom(64))
    with pytest.raises(UserError, match="not a safetensors"):
        model.load(str(path))


def test_read_safetensors(tmp_path):
    """Every tensor in its stored dtype with the metadata; every failure a UserError naming the file."""
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "t.safetensors")
    save_safetensors(tensors, path, {"steps": "12"})
    read, metadata = read_safetensors(path)
    assert metadata == {"steps": "12"} and set(read) == set(tensors)
    assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in tensors.items())
    data = open(path, "rb").read()
    bad = {"missing": None, "cut": data[:-9], "junk": b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}",
           "bad_entry": data.replace(b'"F32"', b'"Q32"', 1)}
    for name, content in bad.items():
        file = tmp_path / f"{name}.safetensors"
        if content is not None:
            file.write_bytes(content)
        with pytest.raises(UserError, match=name):
            read_safetensors(file)


def test_missing_keys(pipe, tmp_path):
    weights = helpers.original_state_dict(pipe)
    for key in [k for k in weights if ".attn2." in k][:5]:
        del weights[key]
    path = tmp_path / "missing.safetensors"
    save_safetensors(weights, str(path))
    with pytest.raises(UserError, match="missing") as e:
        model.load(str(path))
    assert "attn2" in str(e.value) and "\n" not in str(e.value)


def test_unexpected_keys(pipe, tmp_path):
    weights = helpers.original_state_dict(pipe)
    weights["model.diffusion_model.extra_head.weight"] = torch.randn(3)
    weights["something_else"] = torch.randn(3)
    path = tmp_path / "unexpected.safetensors"
    save_safetensors(weights, str(path))
    with pytest.raises(UserError, match="something_else|extra_head"):
        model.load(str(path))


def test_save_round_trip(files, tmp_path):
    sd = model.load(files["single"])
    model.save(sd, str(tmp_path / "ours.safetensors"))
    again = model.load(str(tmp_path / "ours.safetensors"))
    for a, b in ((sd.unet, again.unet), (sd.vae, again.vae), (sd.text_encoder, again.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


PEAK = """
import resource, sys, torch, model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sd = model.load(sys.argv[1], dtype=torch.float16)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())
print(weights, (peak - base) * 1024)
"""


@pytest.mark.slow
def test_sd15_single_file_loads_with_one_copy_of_the_weights(tmp_path):
    """The full SD1.5 layout (fp16 file): peak memory while loading <= 1.3x the weight bytes."""
    from model.loader import COMPONENTS
    weights = {}
    gen = torch.Generator().manual_seed(0)
    for name, (lib, cls, prefix, _) in COMPONENTS.items():
        with torch.device("meta"):
            shapes = cls(type(lib.TINY)()).state_dict()
        assert len(shapes) == {"unet": 686, "vae": 248, "text_encoder": 196}[name]
        for k, v in shapes.items():
            weights[prefix + k] = torch.randn(v.shape, generator=gen, dtype=torch.float32).to(torch.float16)
    path = str(tmp_path / "sd15.safetensors")
    save_safetensors(weights, path)
    del weights
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", PEAK, path], capture_output=True, text=True, cwd=root, check=True)
    weight_bytes, peak = map(int, out.stdout.split())
    assert weight_bytes == 2 * (859_520_964 + 83_653_863 + 123_060_480)
    assert peak <= 1.3 * weight_bytes, (peak, weight_bytes)


def test_weights_that_fit_no_layout_name_the_file(files, tmp_path):
    """Shapes no SD1.x layout has fail with the file's name and what did not fit, not inside the UNet:
    a channel count GroupNorm cannot split, and a UNet reading wider text than the encoder writes."""
    tensors, metadata = read_safetensors(files["single"])
    metadata = {k: v for k, v in metadata.items() if not k.endswith("_config")}  # the shapes decide the layout
    odd = dict(tensors)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    odd[key] = torch.zeros(61, *tensors[key].shape[1:])
    save_safetensors(odd, str(tmp_path / "odd.safetensors"), metadata)
    with pytest.raises(UserError, match=r"odd\.safetensors: .*unet.*61"):
        model.load(str(tmp_path / "odd.safetensors"))
    wide = {k: torch.zeros(v.shape[0], 48) if ".attn2.to_k." in k or ".attn2.to_v." in k else v
            for k, v in tensors.items()}
    save_safetensors(wide, str(tmp_path / "wide.safetensors"), metadata)
    with pytest.raises(UserError, match=r"wide\.safetensors: the UNet reads 48-wide text but the text encoder "
                                        r"writes 32-wide"):
        model.load(str(tmp_path / "wide.safetensors"))
