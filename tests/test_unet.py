"""UNet parity with diffusers' UNet2DConditionModel, and the diffusers -> original name map."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from model import unet as U
from tests.helpers import randomize, rel_err

TINY_DIFFUSERS = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
# Three levels, the last without attention, two res blocks: every block kind and index pattern.
SMALL_DIFFUSERS = dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=48,
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                       attention_head_dim=4)


def ours_from(d):
    cfg = U.config_from_diffusers(dict(d.config))
    ours = U.UNet(cfg)
    ours.load_state_dict({U.diffusers_name(k, cfg): v for k, v in d.state_dict().items()})
    return ours.eval()


@pytest.mark.parametrize("layout", [TINY_DIFFUSERS, SMALL_DIFFUSERS], ids=["tiny", "small"])
def test_parity_and_round_trip(layout):
    torch.manual_seed(0)
    d = UNet2DConditionModel(**layout).eval()
    randomize(d)
    ours = ours_from(d)
    ctx_dim = layout["cross_attention_dim"]
    x, t, c = torch.randn(3, 4, 16, 16), torch.tensor([0, 417, 999]), torch.randn(3, 77, ctx_dim)
    with torch.no_grad():
        assert rel_err(ours(x, t, c), d(x, t, c).sample) <= 1e-5

    # Our names are the original checkpoint's: diffusers' own converter must map them back exactly.
    original = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    back = convert_ldm_unet_checkpoint(original, dict(d.config))
    ref = d.state_dict()
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)

    # And the inverse map (used for LoRA exports) gives back diffusers' own names.
    assert {U.to_diffusers_name(k, ours.config) for k in ours.state_dict()} == set(ref)
    assert all(U.diffusers_name(U.to_diffusers_name(k, ours.config), ours.config) == k for k in ours.state_dict())

    inferred = U.config_from_state_dict(ours.state_dict())
    assert inferred.channel_mult == ours.config.channel_mult
    assert inferred.attention_levels == ours.config.attention_levels
    assert inferred.num_res_blocks == ours.config.num_res_blocks
    assert inferred.context_dim == ctx_dim


def test_condition_table_equals_gathered_context():
    torch.manual_seed(1)
    model = U.UNet(U.TINY).eval()
    randomize(model)
    table = torch.randn(4, 77, U.TINY.context_dim)
    index = torch.tensor([0, 1, 2, 3, 2, 2, 3])  # the stage-1 pattern: shared conditions
    x, t = torch.randn(7, 4, 8, 8), torch.randint(0, 1000, (7,))
    table.requires_grad_(True)
    out = model(x, t, table, index)
    g_table, = torch.autograd.grad(out.square().sum(), table)
    gathered = table.detach().clone().requires_grad_(True)
    ref = model(x, t, gathered[index])
    g_ref, = torch.autograd.grad(ref.square().sum(), gathered)
    assert rel_err(out, ref) <= 1e-6
    assert rel_err(g_table, g_ref) <= 1e-5


def test_unknown_diffusers_key_is_refused():
    with pytest.raises(KeyError):
        U.diffusers_name("add_embedding.linear_1.weight", U.TINY)


@pytest.mark.slow  # SD1.5's full UNet twice: ~30 s
def test_sd15_size_parity():
    """The real SD1.5 configuration: 859,520,964 parameters in 686 tensors."""
    torch.manual_seed(0)
    d = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval()
    randomize(d)
    with torch.device("meta"):
        meta = U.UNet()
    sd = meta.state_dict()
    assert len(sd) == 686 and sum(v.numel() for v in sd.values()) == 859_520_964
    ours = ours_from(d)
    assert U.config_from_state_dict(ours.state_dict()) == U.UNetConfig()
    x, t, c = torch.randn(1, 4, 32, 32), torch.tensor([537]), torch.randn(1, 77, 768)
    with torch.no_grad():
        expected = d(x, t, c).sample
        del d
        assert rel_err(ours(x, t, c), expected) <= 1e-4
