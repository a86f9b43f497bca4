"""LoRA on the UNet attention projections: base keys kept, only LoRA trains, file round trips in
both layouts, and diffusers' own load_lora_weights computing what we compute from each export."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from model import lora
from model import unet as U
from model.errors import UserError
from tests import helpers
from tests.helpers import rel_err

LAYOUTS = ["peft", "kohya"]
RANK_ALPHA = [pytest.param(4, 4.0, marks=pytest.mark.slow),  # scale 1
              (4, 8.0)]  # alpha != rank, which the peft layout keeps in metadata



def tiny_unet(seed=0, cfg=U.TINY):
    torch.manual_seed(seed)
    net = U.UNet(cfg).eval()
    helpers.randomize(net)
    return net


def randomize_lora(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def inputs(ctx_dim=U.TINY.context_dim):
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 700]), torch.randn(2, 77, ctx_dim, generator=g)


def test_base_keys_kept_and_only_lora_trains():
    net = tiny_unet()
    before = dict(net.named_parameters())
    x, t, c = inputs()
    with torch.no_grad():
        plain = net(x, t, c)

    params = lora.add_lora(net, rank=4, alpha=4.0)
    blocks = sum(isinstance(m, U.TransformerBlock) for m in net.modules())
    assert len(params) == blocks * 2 * 4 * 2  # attn1/attn2 x to_q,k,v,out.0 x down/up
    after = dict(net.named_parameters())
    assert {k for k in after if ".lora_" not in k} == set(before)
    assert all(after[k] is before[k] for k in before)  # the same frozen Parameters, not copies
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in net.state_dict()
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.lora_up" in net.state_dict()
    assert {id(p) for p in net.parameters() if p.requires_grad} == {id(p) for p in params}

    out = net(x, t, c)
    assert torch.equal(out, plain)  # lora_up starts at zero
    out.square().mean().backward()
    ups = [p for p in params if p.shape[1] == 4]
    assert all(p.grad is not None for p in params) and all(p.grad.abs().sum() > 0 for p in ups)

    randomize_lora(params)
    with torch.no_grad():
        assert rel_err(net(x, t, c), plain) > 1e-2


def test_lora_linear_formula_and_bf16_base():
    """fp32 factors on a frozen bf16 Linear: bf16 compute, fp32 gradients."""
    torch.manual_seed(0)
    base = nn.Linear(16, 24).to(torch.bfloat16).requires_grad_(False)
    m = lora.LoRALinear(base, rank=4, alpha=8.0)
    randomize_lora([m.lora_down, m.lora_up])
    x = torch.randn(3, 5, 16).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and m.lora_down.dtype == torch.float32
    xd = x.double()
    ref = xd @ base.weight.double().T + base.bias.double() + 2.0 * (xd @ m.lora_down.double().T) @ m.lora_up.double().T
    assert rel_err(y, ref) <= 1e-2
    y.float().square().sum().backward()
    assert m.lora_up.grad.dtype == torch.float32 and m.lora_up.grad.abs().sum() > 0
    assert base.weight.grad is None


@pytest.mark.parametrize("rank,alpha", RANK_ALPHA)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load_round_trip(tmp_path, layout, rank, alpha):
    net = tiny_unet()
    base_state = {k: v.clone() for k, v in net.state_dict().items()}
    randomize_lora(lora.add_lora(net, rank, alpha))
    x, t, c = inputs()
    with torch.no_grad():
        expected = net(x, t, c)
    path = str(tmp_path / f"lora.{layout}.safetensors")
    lora.save_lora(net, path, layout, {"note": "kept"})
    with safe_open(path, "pt") as f:
        assert f.metadata()["note"] == "kept"
        assert (lora.METADATA_KEY in f.metadata()) == (layout == "peft")  # diffusers refuses both alpha sources

    for existing_rank in (None, 2):  # into a plain UNet, and into one that has another LoRA
        fresh = tiny_unet(seed=5)
        fresh.load_state_dict(base_state)
        if existing_rank:
            randomize_lora(lora.add_lora(fresh, existing_rank, 1.0))
        params = lora.load_lora(fresh, path)
        assert len(params) == len(lora.lora_state_dict(net, "peft"))
        with torch.no_grad():
            assert torch.equal(fresh(x, t, c), expected)

    # An explicit alpha wins over the file's; a rank that does not match is refused.
    lora.load_lora(fresh, path, alpha=2 * alpha)
    with torch.no_grad():
        assert rel_err(fresh(x, t, c), expected) > 1e-3
    with pytest.raises(UserError, match="rank"):
        lora.load_lora(fresh, path, rank=rank + 1)

    # Merging folds the update into the base weights and leaves the original keys only.
    lora.merge_lora(net)
    assert set(net.state_dict()) == set(base_state)
    with torch.no_grad():
        assert rel_err(net(x, t, c), expected) <= 1e-5


def test_export_key_names():
    net = tiny_unet()
    lora.add_lora(net, rank=4, alpha=8.0)
    peft, kohya = lora.lora_state_dict(net, "peft"), lora.lora_state_dict(net, "kohya")
    down = peft["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert down.shape == (4, 32)
    assert peft["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight"].shape == (64, 4)
    assert kohya["lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (4, 32)
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"].item() == 8.0
    assert len(kohya) == 3 * len(peft) // 2


def test_bad_files_are_user_errors(tmp_path):
    net = tiny_unet()
    randomize_lora(lora.add_lora(net))
    with pytest.raises(UserError, match="does not exist"):
        lora.load_lora(net, str(tmp_path / "missing.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(UserError):
        lora.load_lora(net, str(garbage))

    base = tmp_path / "base.safetensors"  # a model file, not a LoRA
    save_file({k: v.contiguous() for k, v in tiny_unet().state_dict().items()}, str(base))
    with pytest.raises(UserError, match="not a UNet LoRA"):
        lora.load_lora(net, str(base))

    other = tiny_unet(cfg=U.UNetConfig(**{**vars(U.TINY), "context_dim": 48}))  # another text encoder width
    randomize_lora(lora.add_lora(other))
    for layout in LAYOUTS:
        path = str(tmp_path / f"other.{layout}.safetensors")
        lora.save_lora(other, path, layout)
        with pytest.raises(UserError, match="wrong shape"):
            lora.load_lora(net, path)

    # A LoRA that also trains the text encoder, or modules this UNet does not have.
    sd = lora.lora_state_dict(net, "kohya")
    extra = {**sd, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 32)}
    save_file(extra, str(tmp_path / "te.safetensors"))
    with pytest.raises(UserError, match="lora_te_text_model"):
        lora.load_lora(net, str(tmp_path / "te.safetensors"))
    sd = lora.lora_state_dict(net, "peft")
    sd["unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.randn(4, 32)
    save_file(sd, str(tmp_path / "far.safetensors"))
    with pytest.raises(UserError, match="down_blocks.7"):
        lora.load_lora(net, str(tmp_path / "far.safetensors"))


@pytest.mark.parametrize("rank,alpha", RANK_ALPHA)
def test_diffusers_load_lora_weights_matches(pipe, tmp_path, rank, alpha):
    cfg = U.config_from_diffusers(dict(pipe.unet.config))
    ours = U.UNet(cfg).eval()
    ours.load_state_dict({U.diffusers_name(k, cfg): v for k, v in pipe.unet.state_dict().items()})
    randomize_lora(lora.add_lora(ours, rank, alpha), seed=rank + int(alpha))
    x, t, c = inputs(cfg.context_dim)
    with torch.no_grad():
        expected = ours(x, t, c)
        plain = pipe.unet(x, t, c).sample
    assert rel_err(plain, expected) > 1e-2  # the LoRA matters, so a wrong scale would show
    for layout in LAYOUTS:
        path = str(tmp_path / f"lora.{layout}.safetensors")
        lora.save_lora(ours, path, layout)
        pipe.load_lora_weights(path)
        try:
            with torch.no_grad():
                assert rel_err(pipe.unet(x, t, c).sample, expected) <= 1e-5, layout
        finally:
            pipe.unload_lora_weights()
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, c).sample, plain)
    with safe_open(str(tmp_path / "lora.peft.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[lora.METADATA_KEY])["unet.lora_alpha"] == alpha


def test_default_init_is_the_authors_gaussian():
    """The ConceptPrism authors train with PEFT's init_lora_weights="gaussian": down ~ N(0, 1/rank^2),
    up zero. Checked against PEFT itself on an SD1.5-wide (320) projection; "kaiming" keeps PEFT's
    default, whose down is 8x smaller there."""
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(320, 320, bias=False)

    torch.manual_seed(0)
    peft_model = get_peft_model(One(), LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"],
                                                  init_lora_weights="gaussian"))
    theirs = peft_model.base_model.model.to_q.lora_A["default"].weight
    ours = {init: lora.LoRALinear(nn.Linear(320, 320, bias=False), 4, 4.0, init=init) for init in ("gaussian", "kaiming")}
    for m in ours.values():
        assert torch.equal(m.lora_up, torch.zeros_like(m.lora_up))
    assert abs(theirs.std().item() - 0.25) < 0.01 and abs(ours["gaussian"].lora_down.std().item() - 0.25) < 0.01
    kaiming_std = ours["kaiming"].lora_down.std().item()
    assert abs(kaiming_std - 1 / (3 * 320) ** 0.5) < 0.002  # 0.032: 8x smaller than 1/rank
    torch.manual_seed(1)
    net = tiny_unet()
    params = lora.add_lora(net, rank=8)
    downs = torch.cat([p.flatten() for p in params if p.shape[0] == 8])
    assert abs(downs.std().item() - 1 / 8) < 0.005
    with pytest.raises(ValueError):
        lora.LoRALinear(nn.Linear(4, 4), 2, 2.0, init="uniform")
