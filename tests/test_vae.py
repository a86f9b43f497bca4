"""VAE parity with diffusers' AutoencoderKL, and the diffusers -> original name map."""
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from model import vae as V
from tests.helpers import randomize, rel_err

TINY_DIFFUSERS = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1)
SD15_DIFFUSERS = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                      sample_size=512)



def random_diffusers_vae(layout):
    return randomize(AutoencoderKL(**layout))


def original_layout(d, cfg):
    """diffusers' weights under our names, attention Linears reshaped to the original 1x1 convs.
    The tensors are views of d's, so building ours from them copies nothing."""
    with torch.device("meta"):
        shapes = V.VAE(cfg).state_dict()
    out = {}
    for k, v in d.state_dict().items():
        ours = V.diffusers_name(k, cfg)
        out[ours] = v.reshape(shapes[ours].shape)
    return out


def ours_from(original, cfg):
    with torch.device("meta"):
        ours = V.VAE(cfg)
    ours.load_state_dict(original, assign=True)  # strict: every name must match
    return ours.eval()


def reference_outputs(d, x, z):
    with torch.no_grad():
        dist = d.encode(x).latent_dist
        return dist.mean, dist.logvar, d.decode(z).sample


def check(ours, ref, x, z, tol):
    mean, logvar, image = ref
    with torch.no_grad():
        m, lv = ours.encode(x)
        assert rel_err(m, mean) <= tol
        assert rel_err(lv, logvar) <= tol
        assert rel_err(ours.decode(z), image) <= tol


def test_tiny_parity_round_trip_and_config():
    torch.manual_seed(0)
    d = random_diffusers_vae(TINY_DIFFUSERS)
    cfg = V.config_from_diffusers(dict(d.config))
    assert cfg == V.TINY
    x, z = torch.rand(2, 3, 32, 24) * 2 - 1, torch.randn(2, 4, 6, 5)  # non-square, odd latent size
    original = original_layout(d, cfg)
    check(ours_from(original, cfg), reference_outputs(d, x, z), x, z, 1e-5)

    # Our names are the original checkpoint's: diffusers' own converter must map them back exactly.
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in original.items()}, dict(d.config))
    ref = d.state_dict()
    assert set(back) == set(ref)
    assert all(back[k].shape == ref[k].shape and torch.equal(back[k], ref[k]) for k in ref)

    assert V.config_from_state_dict(original) == cfg


def test_logvar_is_clamped():
    torch.manual_seed(0)
    ours = V.VAE(V.TINY).eval()
    z = V.TINY.z_channels
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        for shift, bound in ((1e4, 20.0), (-1e4, -30.0)):
            ours.quant_conv.bias[z:] += shift
            assert torch.all(ours.encode(x)[1] == bound)
            ours.quant_conv.bias[z:] -= shift


def test_name_map_edges():
    cfg = V.TINY
    # Pre-0.14 diffusers attention names still appear in old VAE files.
    assert V.diffusers_name("encoder.mid_block.attentions.0.query.weight", cfg) == "encoder.mid.attn_1.q.weight"
    assert V.diffusers_name("decoder.mid_block.attentions.0.proj_attn.bias", cfg) == "decoder.mid.attn_1.proj_out.bias"
    assert V.diffusers_name("decoder.up_blocks.0.upsamplers.0.conv.weight", cfg) == "decoder.up.1.upsample.conv.weight"
    for bad in ("encoder.down_blocks.2.resnets.0.conv1.weight",  # level past the config
                "encoder.down_blocks.1.downsamplers.0.conv.weight",  # the innermost level has none
                "decoder.up_blocks.1.upsamplers.0.conv.weight",  # the outermost level has none
                "decoder.up_blocks.0.resnets.2.conv1.weight",  # only num_res_blocks + 1 per level
                "encoder.mid_block.attentions.0.to_q.scale", "text_model.final_layer_norm.weight"):
        with pytest.raises(KeyError):
            V.diffusers_name(bad, cfg)


@pytest.mark.slow  # full size: 4 s
def test_sd15_size_parity_and_counts():
    torch.manual_seed(0)
    d = random_diffusers_vae(SD15_DIFFUSERS)
    cfg = V.config_from_diffusers(dict(d.config))
    assert cfg == V.VAEConfig()
    x, z = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(1, 4, 8, 8)
    ref = reference_outputs(d, x, z)
    original = original_layout(d, cfg)
    del d  # ours shares its tensors; the diffusers modules are not needed any more
    assert len(original) == 248 and sum(v.numel() for v in original.values()) == 83_653_863
    assert V.config_from_state_dict(original) == cfg
    check(ours_from(original, cfg), ref, x, z, 1e-4)
