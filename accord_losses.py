"""The training losses, as plain functions of tensors (docs/method.md explains each).

Each function is one formula; its docstring gives the formula so it can be checked line by line
against the papers: ConceptPrism (reconstruction, exclusion; Algorithm 1) and ACCORD (DDLoss,
eq. 8 and 11; PDLoss, eq. 14). `loss_terms` reads the UNet's predictions by the names of their rows
(model/conditions.py) and `total` weighs the terms: a research fork changes a loss here and nowhere else.

Conventions: ||a - b||^2 is a mean over latent elements per sample, then a mean over the batch.
`sg[x]` (stop-gradient) is applied inside the functions, so callers cannot forget it.
"""
import torch
import torch.nn.functional as F


def squared_distance(a, b):
    """||a - b||^2 per sample: the mean over every element but the batch dimension. [B,...] -> [B]"""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a - b).pow(2).flatten(1).mean(dim=1)


def reconstruction_loss(eps_pred, eps):
    """L_rec = ||eps - U(z_t, t, c)||^2 (ConceptPrism Algorithm 1 line 8; the usual diffusion loss)."""
    return squared_distance(eps_pred, eps).mean()


def exclusion_loss(eps_residual, eps_null):
    """L_excl = mean_j ||U(z_t^j, t_j, E("<r_i>")) - sg[U(z_t^j, t_j, E(""))]||^2 (Algorithm 1 line 13).

    The rows are the anchor images j != i. The paper sums over j; we average, which only rescales beta
    when fewer than three anchors exist (and keeps beta's meaning when there are). The null prediction is a fixed target:
    the residual tokens should act like no condition, not the other way round.
    """
    return squared_distance(eps_residual, eps_null.detach()).mean()


def dd_weight(alphas_cumprod, space="eps"):
    """w_t for DDLoss, one per timestep index t = 0..T-1. [T] float64

    ACCORD writes each term in the space of the x_{t-1} posterior mean divided by 2 sigma_t^2. For
    an epsilon model mu_a - mu_b = -beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) * (eps_a - eps_b), so
    with sigma_t^2 = beta_t:  w_t = beta_t / (2 alpha_t (1 - abar_t)),
    where alpha_t = abar_t / abar_{t-1} (abar_{-1} = 1) and beta_t = 1 - alpha_t.
    space="eps" is the common simplification w_t = 1, and our default: averaged over uniform t the
    literal weight is ~1/226 of it with nearly the same profile over t, so at the paper's weights
    (0.1-0.3) the literal form is ~1e-4 of the reconstruction loss and does nothing. Facechain-SuDe,
    whose stop-gradient recipe ACCORD follows, rescales its x_(t-1)-space loss to undo that shrinkage.
    """
    if space not in ("xprev", "eps"):
        raise ValueError(f"space must be 'xprev' or 'eps', not {space!r}")
    # float64: beta_t is recovered from a ratio of numbers close to 1 at small t.
    abar = alphas_cumprod.double()
    if space == "eps":
        return torch.ones_like(abar)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    alpha = abar / abar_prev
    beta = 1 - alpha
    return beta / (2 * alpha * (1 - abar))


def dd_loss(eps_pg, eps_p, eps_g, eps_0, t, alphas_cumprod, space="eps"):
    """ACCORD's Denoising Decouple Loss (eq. 8, 11), all four predictions on the same z_t and t:

        A_p = ||eps_pg - eps_p||^2,  A_g = ||eps_pg - sg[eps_g]||^2,  A_0 = ||eps_pg - sg[eps_0]||^2
        L_DD = ((t+1)/T) * |w_t * (A_p + A_g - A_0)|      per sample, then the batch mean

    eps_pg is U(z_t, t, E("<v> <r_i>")), eps_p uses "<v>", eps_g "<r_i>", eps_0 "". t holds
    indices 0..T-1, so t+1 is the paper's 1..T. eps_g and eps_0 get stop-gradients as in the paper
    (after Facechain-SuDe), so the loss cannot drag the model's prior toward eps_pg.
    """
    a_p = squared_distance(eps_pg, eps_p)
    a_g = squared_distance(eps_pg, eps_g.detach())
    a_0 = squared_distance(eps_pg, eps_0.detach())
    num_steps = len(alphas_cumprod)
    w = dd_weight(alphas_cumprod, space).to(t.device)[t].to(a_p.dtype)
    time_weight = (t + 1).to(a_p.dtype) / num_steps
    return (time_weight * (w * (a_p + a_g - a_0)).abs()).mean()


def pd_loss(f_p, f_s, f_g):
    """ACCORD's Prior Decouple Loss (eq. 14):  L_PD = mean_g |cos(f_p, sg[f_g]) - cos(f_s, sg[f_g])|

    f_p: pooled text feature of "a photo of <v>" [D] or [1,D]; f_s: of "a photo of <superclass>",
    same shape, a fixed target (sg); f_g: the general conditions (the captions) [M,D], also fixed.
    """
    f_p, f_s, f_g = f_p.reshape(1, -1), f_s.detach().reshape(1, -1), f_g.detach()
    cos_p = F.cosine_similarity(f_p, f_g, dim=-1)
    cos_s = F.cosine_similarity(f_s, f_g, dim=-1)
    return (cos_p - cos_s).abs().mean()


def loss_terms(eps, noise, t, alphas_cumprod, dd_space="eps", pd_features=None, rec=None):
    """Every loss term a step has, from the named predictions of model/conditions.py (as noise):

        rec   reconstruction of the noise `noise` that made the `rec` rows (timesteps `t`), or of
              the pair rec = (output, target) when given: a v-prediction UNet's own output and
              target v_t (conditions.for_losses makes both arguments for either kind of model)
        excl  exclusion, when the anchor rows are there (anchor_g against sg[anchor_null])
        dd    DDLoss, when the `p`, `g` and `null` rows are there
        pd    PDLoss, when pd_features = (f_p, f_s, f_g) is given
    """
    output, target = rec if rec is not None else (eps["rec"], noise)
    terms = {"rec": reconstruction_loss(output, target.to(output))}
    if "anchor_g" in eps:
        terms["excl"] = exclusion_loss(eps["anchor_g"], eps["anchor_null"])
    if "p" in eps:
        device = eps["rec"].device
        terms["dd"] = dd_loss(eps["rec"], eps["p"], eps["g"], eps["null"], t.to(device), alphas_cumprod.to(device),
                              space=dd_space)
    if pd_features is not None:
        terms["pd"] = pd_loss(*pd_features)
    return terms


def total(terms, weights):
    """L = L_rec + sum of weights[name] * term, for the terms present (weights: {"excl": beta, ...})."""
    loss = terms["rec"]
    for name, value in terms.items():
        if name != "rec":
            loss = loss + weights[name] * value
    return loss
