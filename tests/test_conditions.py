"""The multi-condition evaluation of model/conditions.py against the plain way (one UNet call per
group of rows, each row's condition copied out of the table), for both stages' rows: same predictions, same loss terms, same
gradients, and the stop rows in a call that keeps no graph."""
import pytest
import torch

import accord_losses
import model
from model import conditions
from model.schedule import add_noise
from tests import helpers
from tests.helpers import rel_err


@pytest.fixture(scope="module")
def sd(pipe, tmp_path_factory):
    sd = model.load(helpers.write_single_file(pipe, str(tmp_path_factory.mktemp("m") / "tiny.safetensors")))
    sd.tokenizer.add_tokens(["<v>"] + [f"<r0_{k}>" for k in range(8)])
    return sd


def one_call_per_group(unet, table, rows):
    """The reference: one call per named group with its conditions gathered into a plain context,
    with or without a graph as asked."""
    eps = {}
    for name, r in rows.items():
        with torch.set_grad_enabled(r.grad):
            eps[name] = unet(r.x, r.t, table[r.index()]).float()
    return eps


def stage1_table(sd, vectors):
    residual = " ".join(f"<r0_{k}>" for k in range(8))
    prompts = sd.text_encoder(sd.tokenizer([f"<v> {residual}", "<v>", residual]), extra_embeddings=vectors)
    return torch.cat([prompts, sd.text_encoder(sd.tokenizer([""]))])


@pytest.mark.parametrize("with_dd,anchors", [(True, 3), (False, 3), (True, 0)])
def test_stage1_rows_equal_one_call_per_group(sd, with_dd, anchors):
    torch.manual_seed(0)
    vectors0 = torch.randn(1 + 8, sd.unet.config.context_dim) * 0.5
    z, noise = torch.randn(1 + anchors, 4, 16, 16), torch.randn(1 + anchors, 4, 16, 16)
    t = torch.tensor([5, 999, 310, 641])[:1 + anchors]
    x = add_noise(z, t, noise, sd.alphas_cumprod)

    def run(predict):
        vectors = vectors0.clone().requires_grad_(True)
        rows = conditions.stage1_rows(x[:1], t[:1], x[1:], t[1:], with_dd)
        eps = predict(sd.unet, stage1_table(sd, vectors), rows)
        terms = accord_losses.loss_terms(eps, noise[:1], t[:1], sd.alphas_cumprod)
        grad, = torch.autograd.grad(accord_losses.total(terms, {"excl": 0.05, "dd": 0.1}), vectors)
        return eps, terms, grad

    ref_eps, ref_terms, ref_grad = run(one_call_per_group)
    eps, terms, grad = run(conditions.predict)
    assert list(eps) == list(ref_eps)
    for name in eps:
        assert rel_err(eps[name], ref_eps[name]) <= 1e-5, name
    assert set(terms) == {"rec"} | ({"dd"} if with_dd else set()) | ({"excl"} if anchors else set())
    for name in terms.keys() - {"dd"}:
        assert rel_err(terms[name], ref_terms[name]) <= 1e-5, name
    if with_dd:
        # A_p + A_g - A_0 nearly cancels, so judge DDLoss's error against the size of its parts
        w = accord_losses.dd_weight(sd.alphas_cumprod)[t[0]] * (t[0] + 1) / len(sd.alphas_cumprod)
        parts = sum(accord_losses.squared_distance(ref_eps["rec"], ref_eps[k]) for k in ("p", "g", "null"))
        assert abs(terms["dd"] - ref_terms["dd"]).item() <= 1e-5 * (w * parts).item()
    assert ref_grad.abs().sum() > 0
    assert rel_err(grad, ref_grad) <= 1e-5


def test_stop_rows_keep_no_graph(sd):
    """Two UNet calls a step: rec, p, anchor_g with a graph; g, null, anchor_null without."""
    seen = []
    hook = sd.unet.register_forward_hook(lambda m, i, o: seen.append((o.shape[0], o.grad_fn is not None)))
    table = torch.randn(4, 77, sd.unet.config.context_dim, requires_grad=True)
    x, t = torch.randn(4, 4, 16, 16), torch.tensor([1, 2, 3, 4])
    eps = conditions.predict(sd.unet, table, conditions.stage1_rows(x[:1], t[:1], x[1:], t[1:], with_dd=True))
    hook.remove()
    assert seen == [(5, True), (5, False)]
    assert list(eps) == ["rec", "p", "g", "null", "anchor_g", "anchor_null"]
    assert [eps[k].requires_grad for k in eps] == [True, True, False, False, True, False]


@pytest.mark.parametrize("with_dd", [True, False])
def test_stage2_rows_read_each_photos_condition(sd, with_dd):
    n = 3
    torch.manual_seed(1)
    layout = conditions.stage2_table_layout(n)
    table = torch.randn(2 * n + 2, 77, sd.unet.config.context_dim)
    image = torch.tensor([2, 0, 2, 1])
    x, t = torch.randn(4, 4, 16, 16), torch.tensor([10, 500, 999, 3])
    rows = conditions.stage2_rows(x, t, image, n, with_dd)
    assert torch.equal(rows["rec"].index(), layout["pg"] + image)
    if with_dd:
        assert torch.equal(rows["g"].index(), layout["g"] + image)
        assert rows["p"].index().tolist() == [layout["p"]] * 4 and rows["null"].index().tolist() == [layout["null"]] * 4
    got, ref = conditions.predict(sd.unet, table, rows), one_call_per_group(sd.unet, table, rows)
    assert list(got) == list(ref)
    for name in got:
        assert rel_err(got[name], ref[name]) <= 1e-5, name
