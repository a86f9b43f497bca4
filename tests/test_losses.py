"""accord_losses against independent, loop-by-loop float64 computations of the formulas in docs/method.md."""
import math

import pytest
import torch

import accord_losses

T = 1000
LATENT = (4, 8, 8)


def sd_betas():
    # The SD1.5 "scaled linear" schedule, written from its definition rather than taken from the code.
    return [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / (T - 1)) ** 2 for i in range(T)]


def sd_alphas_cumprod():
    # float32, as the scripts hold it.
    abar, out = 1.0, []
    for b in sd_betas():
        abar *= 1 - b
        out.append(abar)
    return torch.tensor(out, dtype=torch.float32)


def sq(a, b):
    """Mean over elements of one sample, by hand in float64."""
    a, b = a.double().flatten().tolist(), b.double().flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def cos(a, b):
    a, b = a.double().flatten().tolist(), b.double().flatten().tolist()
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def randn(*shape, grad=False):
    return torch.randn(*shape, dtype=torch.float32).requires_grad_(grad)


def test_reconstruction_and_exclusion_match_formula():
    torch.manual_seed(0)
    pred, eps = randn(3, *LATENT), randn(3, *LATENT)
    assert accord_losses.reconstruction_loss(pred, eps).item() == pytest.approx(
        sum(sq(pred[b], eps[b]) for b in range(3)) / 3, rel=1e-5)
    residual, null = randn(3, *LATENT), randn(3, *LATENT)
    assert accord_losses.exclusion_loss(residual, null).item() == pytest.approx(
        sum(sq(residual[j], null[j]) for j in range(3)) / 3, rel=1e-5)


def test_exclusion_stops_gradient_into_null_branch():
    torch.manual_seed(1)
    residual, null = randn(2, *LATENT, grad=True), randn(2, *LATENT, grad=True)
    accord_losses.exclusion_loss(residual, null).backward()
    assert residual.grad is not None and residual.grad.abs().sum() > 0
    assert null.grad is None


def test_dd_weight_matches_betas_definition():
    w = accord_losses.dd_weight(sd_alphas_cumprod(), space="xprev")
    betas = sd_betas()
    abar = 1.0
    for t, beta in enumerate(betas):
        abar *= 1 - beta
        expected = beta / (2 * (1 - beta) * (1 - abar))
        # float32 abar loses a little of beta_t at small t; 1e-3 relative is far tighter than any mistake.
        assert w[t].item() == pytest.approx(expected, rel=1e-3), t
    # About 0.5 at t=0 and 0.006 at t=999, finite and positive everywhere.
    assert 0.49 < w[0].item() < 0.51
    assert 0.0055 < w[-1].item() < 0.0065
    assert torch.isfinite(w).all() and (w > 0).all()
    assert torch.equal(accord_losses.dd_weight(sd_alphas_cumprod(), space="eps"), torch.ones(T, dtype=torch.float64))


def dd_reference(eps_pg, eps_p, eps_g, eps_0, t, space):
    betas = sd_betas()
    total = 0.0
    for b in range(len(t)):
        step = int(t[b])
        beta = betas[step]
        abar = math.prod(1 - x for x in betas[:step + 1])
        w = beta / (2 * (1 - beta) * (1 - abar)) if space == "xprev" else 1.0
        inner = sq(eps_pg[b], eps_p[b]) + sq(eps_pg[b], eps_g[b]) - sq(eps_pg[b], eps_0[b])
        total += (step + 1) / T * abs(w * inner)
    return total / len(t)


@pytest.mark.parametrize("space", ["xprev", "eps"])
def test_dd_loss_matches_formula(space):
    torch.manual_seed(2)
    # Timesteps at both ends and the middle; eps_g/eps_0 scaled so A_p + A_g - A_0 takes both signs.
    t = torch.tensor([0, 999, 417, 3], dtype=torch.int64)
    eps_pg, eps_p = randn(4, *LATENT), randn(4, *LATENT)
    eps_g, eps_0 = randn(4, *LATENT) * 0.3, randn(4, *LATENT) * torch.tensor([3.0, 0.2, 3.0, 0.2]).view(4, 1, 1, 1)
    got = accord_losses.dd_loss(eps_pg, eps_p, eps_g, eps_0, t, sd_alphas_cumprod(), space=space)
    inner_signs = {math.copysign(1, sq(eps_pg[b], eps_p[b]) + sq(eps_pg[b], eps_g[b]) - sq(eps_pg[b], eps_0[b]))
                   for b in range(4)}
    assert inner_signs == {1.0, -1.0}, "the test should exercise the absolute value"
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(dd_reference(eps_pg, eps_p, eps_g, eps_0, t, space), rel=1e-3)


def test_dd_loss_stop_gradients():
    torch.manual_seed(3)
    eps_pg, eps_p, eps_g, eps_0 = (randn(2, *LATENT, grad=True) for _ in range(4))
    t = torch.tensor([10, 900])
    loss = accord_losses.dd_loss(eps_pg, eps_p, eps_g, eps_0, t, sd_alphas_cumprod())
    grads = torch.autograd.grad(loss, [eps_pg, eps_p, eps_g, eps_0], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is not None and grads[1].abs().sum() > 0
    assert grads[2] is None and grads[3] is None


def test_dd_loss_rejects_unknown_space():
    x = randn(1, *LATENT)
    with pytest.raises(ValueError, match="space"):
        accord_losses.dd_loss(x, x, x, x, torch.tensor([5]), sd_alphas_cumprod(), space="x0")


@pytest.mark.parametrize("shape", [(16,), (1, 16)])
def test_pd_loss_matches_formula_and_stops_gradients(shape):
    torch.manual_seed(4)
    f_p, f_s, f_g = randn(*shape, grad=True), randn(*shape, grad=True), randn(5, 16, grad=True)
    loss = accord_losses.pd_loss(f_p, f_s, f_g)
    expected = sum(abs(cos(f_p, f_g[g]) - cos(f_s, f_g[g])) for g in range(5)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    grads = torch.autograd.grad(loss, [f_p, f_s, f_g], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None and grads[2] is None


def test_mismatched_shapes_are_refused():
    # A silent broadcast of [4,8,8] against [1,4,8,8] would compute the wrong loss.
    with pytest.raises(ValueError, match="shapes differ"):
        accord_losses.reconstruction_loss(randn(1, *LATENT), randn(*LATENT))


def test_literal_xprev_weight_is_about_1_226_of_eps_space():
    """Why eps space is the default: over uniform t, with the (t+1)/T factor both share, the literal
    x_(t-1) weighting averages ~1/226 of epsilon space's."""
    abar = sd_alphas_cumprod()
    time_weight = torch.arange(1, T + 1, dtype=torch.float64) / T
    ratio = (time_weight * accord_losses.dd_weight(abar, "xprev")).mean() / (time_weight * accord_losses.dd_weight(abar)).mean()
    assert 1 / 240 < ratio.item() < 1 / 210


@pytest.mark.slow  # the toy model at 64 px: 4 s
def test_dd_default_matters_on_the_toy_model():
    """Stage 1's default DDLoss (eps space, weight 0.1) pulls on the tokens with ~1% of the
    reconstruction's gradient on the toy model at initialisation; the literal x_(t-1) form at the same
    weight with ~0.005%, i.e. nothing. Measured over 8 (t, noise) draws on the demo's first photo."""
    import model
    import stage1_tokens
    from model import conditions
    from model.data import load_images
    from model.schedule import add_noise

    assert stage1_tokens.parse_args(["--images", "x"]).dd_space == "eps"
    torch.manual_seed(0)
    sd = model.load(model.DEFAULT_MODEL)
    photo = load_images("examples/purple_dotted_heart", sd.resolution, None).images[:1]
    sd.tokenizer.add_multi_vector_token("<v>", 3)  # the README's first command: three vectors, 8 residuals
    residual = [f"<r0_{k}>" for k in range(8)]
    sd.tokenizer.add_tokens(residual)
    words = sd.text_encoder.embeddings.token_embedding.weight
    vectors = (words.mean(0) + words.std(0) * torch.randn(3 + 8, words.shape[1])).requires_grad_(True)
    with torch.no_grad():
        z = sd.vae.encode(photo)[0] * sd.vae.scaling_factor
        empty = sd.text_encoder(sd.tokenizer([""]))
    ids = sd.tokenizer([f"<v> {' '.join(residual)}", "<v>", " ".join(residual)])
    g = torch.Generator().manual_seed(1)
    norms = {"rec": 0.0, "eps": 0.0, "xprev": 0.0}
    for _ in range(8):
        t, noise = torch.randint(0, 1000, (1,), generator=g), torch.randn(z.shape, generator=g)
        x = add_noise(z, t, noise, sd.alphas_cumprod)
        for space in ("eps", "xprev"):
            table = torch.cat([sd.text_encoder(ids, extra_embeddings=vectors), empty])
            eps = conditions.predict(sd.unet, table, conditions.stage1_rows(x, t, x[:0], t[:0], with_dd=True))
            terms = accord_losses.loss_terms(eps, noise, t, sd.alphas_cumprod, space)
            if space == "eps":
                norms["rec"] += torch.autograd.grad(terms["rec"], vectors, retain_graph=True)[0].norm().item()
            norms[space] += torch.autograd.grad(0.1 * terms["dd"], vectors)[0].norm().item()
    assert norms["eps"] / norms["rec"] > 3e-3
    assert norms["eps"] / norms["xprev"] > 100
