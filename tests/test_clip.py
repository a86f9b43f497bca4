"""CLIP text encoder parity with transformers' CLIPTextModel, added-token vectors, and the name map."""
from dataclasses import replace

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from model import clip as C
from tests.helpers import randomize, rel_err

TINY_TRANSFORMERS = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
SD15_TRANSFORMERS = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, eos_token_id=2)  # SD1.5's config.json really says 2
PREFIX = "cond_stage_model.transformer.text_model."



def random_text_model(layout):
    return randomize(CLIPTextModel(CLIPTextConfig(**layout)))


def ours_from(t, cfg):
    """Our encoder sharing t's tensors (no copy, but SD 2's fused q/k/v), through the name map: the
    OpenAI tower for quick_gelu, SD 2's OpenCLIP tower for gelu."""
    with torch.device("meta"):
        ours = C.build(cfg)
    ours.load_state_dict(C.from_transformers(t.state_dict(), cfg), assign=True)
    return ours.eval()


def prompt_ids(lengths, vocab=49406, extra=()):
    """Tokenizer-shaped ids: BOS, random words (plus any given added-token ids), EOS padding to 77."""
    rows = []
    for i, n in enumerate(lengths):
        words = torch.randint(0, vocab, (n,)).tolist()
        for j, token in enumerate(extra):
            words[(i + j) % n] = token
        rows.append([49406] + words + [49407] * (76 - n))
    return torch.tensor(rows)


# transformers pools at ids.argmax() when eos_token_id is 2 (SD1.5's config), else at the first EOS.
@pytest.mark.parametrize("eos_token_id,act", [(2, "quick_gelu"), (49407, "gelu")], ids=["sd15", "eos_gelu"])
def test_tiny_parity(eos_token_id, act):
    torch.manual_seed(0)
    t = random_text_model(dict(TINY_TRANSFORMERS, eos_token_id=eos_token_id, hidden_act=act))
    cfg = C.config_from_diffusers(t.config.to_dict())
    assert cfg == replace(C.TINY, act=act, layout="openclip" if act == "gelu" else "openai")
    ours = ours_from(t, cfg)
    assert isinstance(ours, C.OpenCLIPTextEncoder if act == "gelu" else C.CLIPTextEncoder)
    ids = prompt_ids([3, 20, 75, 1])
    with torch.no_grad():
        ref = t(ids, output_hidden_states=True)
        hidden = ours(ids)
        assert rel_err(hidden, ref.last_hidden_state) <= 1e-5
        assert rel_err(ours.pooled(ids), ref.pooler_output) <= 1e-5
        assert torch.equal(ours.pooled_from_hidden(hidden, ids), ours.pooled(ids))
        # Penultimate layer (SD2 / diffusers' clip_skip=1): the final LayerNorm still applies.
        assert rel_err(ours(ids, clip_skip=1), t.final_layer_norm(ref.hidden_states[-2])) <= 1e-5
        # Shorter sequences use the first positions, as transformers does.
        assert rel_err(ours(ids[:, :10]), t(ids[:, :10]).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"], ids=["sd15", "sd2_openclip"])
def test_added_tokens_match_a_resized_table_and_only_they_get_gradients(act):
    torch.manual_seed(0)
    t = random_text_model(dict(TINY_TRANSFORMERS, hidden_act=act))
    ours = ours_from(t, C.config_from_diffusers(t.config.to_dict())).requires_grad_(False)
    n = C.TINY.vocab_size
    extra = torch.randn(3, C.TINY.width, requires_grad=True)
    ids = prompt_ids([5, 8], extra=(n, n + 2))  # row 1 of extra is unused

    # Reference: transformers with the new vectors appended to its table.
    t.resize_token_embeddings(n + 3)
    with torch.no_grad():
        t.embeddings.token_embedding.weight[n:] = extra
    t.embeddings.token_embedding.weight.grad = None
    ref_hidden = t(ids).last_hidden_state
    weights = torch.randn_like(ref_hidden)
    (ref_hidden * weights).sum().backward()
    ref_grad = t.embeddings.token_embedding.weight.grad[n:]

    hidden = ours(ids, extra_embeddings=extra)
    assert rel_err(hidden, ref_hidden) <= 1e-5
    (hidden * weights).sum().backward()
    assert rel_err(extra.grad, ref_grad) <= 1e-5
    assert torch.all(extra.grad[1] == 0) and extra.grad[0].abs().sum() > 0
    # Pooling finds EOS even though added ids are larger than it (argmax would not).
    pooled = C.CLIPTextEncoder.pooled_from_hidden(hidden, ids)
    assert torch.equal(pooled, hidden[torch.arange(2), torch.tensor([6, 9])])


def test_round_trip_config_and_name_map():
    torch.manual_seed(0)
    t = random_text_model(TINY_TRANSFORMERS)
    cfg = C.TINY
    ref = {k: v for k, v in t.state_dict().items() if not k.endswith("position_ids")}
    # transformers 5 drops the `text_model.` level that files saved by transformers 4 (SD1.5's) have.
    for name in ref:
        assert C.diffusers_name(name, cfg) == C.diffusers_name("text_model." + name, cfg)
    original = {C.diffusers_name(k, cfg): v for k, v in ref.items()}
    # Head counts are not in the weights: inference assumes CLIP's 64-wide heads (one here).
    assert C.config_from_state_dict(original) == replace(cfg, heads=1)

    # Our names are the original checkpoint's: diffusers' converter maps them to transformers' names.
    back = convert_ldm_clip_checkpoint({PREFIX + k: v for k, v in original.items()})
    assert set(back) == {"text_model." + k for k in ref}
    assert all(torch.equal(back["text_model." + k], v) for k, v in ref.items())

    for bad in ("text_model.embeddings.position_ids", "encoder.layers.2.mlp.fc1.weight",
                "text_projection.weight", "encoder.layers.0.self_attn.qkv_proj.weight"):
        with pytest.raises(KeyError):
            C.diffusers_name(bad, cfg)


@pytest.mark.slow
def test_sd15_size_parity_and_counts():
    torch.manual_seed(0)
    t = random_text_model(SD15_TRANSFORMERS)
    cfg = C.config_from_diffusers(t.config.to_dict())
    assert cfg == C.CLIPConfig()
    ids = prompt_ids([4, 12, 30])
    with torch.no_grad():
        ref = t(ids)
    ours = ours_from(t, cfg)
    del t  # ours shares its tensors; the transformers modules are not needed any more
    sd = ours.state_dict()
    assert len(sd) == 196 and sum(v.numel() for v in sd.values()) == 123_060_480
    assert C.config_from_state_dict(sd) == cfg
    with torch.no_grad():
        hidden = ours(ids)
        assert rel_err(hidden, ref.last_hidden_state) <= 1e-4
        assert rel_err(ours.pooled_from_hidden(hidden, ids), ref.pooler_output) <= 1e-4
