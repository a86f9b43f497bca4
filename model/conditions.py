"""The multi-condition UNet evaluation both training stages share, written once.

A training step asks the frozen UNet for several predictions on the same few noisy latents under
different text conditions (see docs/method.md for the ten rows of stage 1). Each group of rows has a
name (`rec`, `p`, `g`, `null`, `anchor_g`, `anchor_null`), and the loss formulas in accord_losses.py
read the predictions by those names, so a fork that changes a loss touches one formula, and a fork
that adds a condition adds one named group.

How the groups are evaluated is the point of this file: the distinct conditions are encoded once
into a small `table` [C, 77, D] and every row carries an index into it, so the UNet's
cross-attention projects K/V once per condition rather than once per row; the rows that carry a
gradient run in one UNet call, and the stop-gradient rows in a second call that records no graph.
"""
from dataclasses import dataclass

import torch

from model.schedule import epsilon_from, velocity

# Stage 1's table of conditions for the chosen photo i (stage 2 builds its own, for every photo).
STAGE1 = ("<v> <r_i>", "<v>", "<r_i>", "")
PG, P, G, NULL = range(len(STAGE1))


@dataclass
class Rows:
    """One named group of UNet rows: noisy latents [B,4,h,w], their timesteps [B], the condition each
    row reads (an index into the table: an int for the whole group or an int64 [B]), and whether the
    loss differentiates through them (False: the prediction is a fixed target, sg[.])."""
    x: torch.Tensor
    t: torch.Tensor
    condition: object
    grad: bool

    def index(self):
        if torch.is_tensor(self.condition):
            return self.condition
        return torch.full((len(self.t),), self.condition, device=self.x.device)


def unet_on(unet, table, groups):
    """One UNet call on the concatenated groups [(name, Rows)]: {name: prediction (float32)}."""
    x = torch.cat([rows.x for _, rows in groups])
    t = torch.cat([rows.t for _, rows in groups])
    index = torch.cat([rows.index() for _, rows in groups])
    eps = unet(x, t, table, index).float()
    return dict(zip([name for name, _ in groups], eps.split([len(rows.t) for _, rows in groups])))


def predict(unet, table, rows):
    """The predictions of every named group: gradient rows in one call, stop rows in one graph-free
    call (with the table detached), in the order `rows` lists them."""
    with_grad = [(name, r) for name, r in rows.items() if r.grad]
    stop = [(name, r) for name, r in rows.items() if not r.grad]
    eps = unet_on(unet, table, with_grad) if with_grad else {}
    if stop:
        with torch.no_grad():
            eps.update(unet_on(unet, table.detach(), stop))
    return {name: eps[name] for name in rows}


def for_losses(outputs, rows, latents, noise, alphas_cumprod, prediction_type="epsilon"):
    """What the losses read, whatever the UNet predicts: (eps, rec). `outputs` are predict()'s on
    `rows`; `latents` and `noise` made the `rec` rows (z_t = add_noise(latents, t, noise)).

    An epsilon model's outputs are the noise already: (outputs, None), and the reconstruction
    compares eps["rec"] with `noise` (accord_losses.loss_terms' default). A v-prediction model (SD 2's
    768-v) learns v_t, as its authors train it: rec = (outputs["rec"], velocity(latents, noise, t)),
    the pair the reconstruction compares; and every other term (exclusion, DDLoss) reads noise,
    so each group's output is converted with its own latents and timesteps (schedule.epsilon_from)."""
    if prediction_type == "epsilon":
        return outputs, None
    eps = {name: epsilon_from(out, rows[name].x, rows[name].t, alphas_cumprod, prediction_type)
           for name, out in outputs.items()}
    target = velocity(latents, noise, rows["rec"].t, alphas_cumprod).float()
    return eps, (outputs["rec"], target)


def stage1_rows(x_i, t_i, x_anchors, t_anchors, with_dd):
    """The rows of a stage-1 step on the table STAGE1. x_i [1,...]: photo i noised at t_i;
    x_anchors [K,...]: other photos, each at its own t (K = 0 turns the exclusion rows off).

      rec          z_t^i  "<v> <r_i>"  grad   reconstruction; DDLoss's eps_pg
      p            z_t^i  "<v>"        grad   DDLoss
      g, null      z_t^i  "<r_i>", ""  stop   DDLoss
      anchor_g     z_t^j  "<r_i>"      grad   exclusion
      anchor_null  z_t^j  ""           stop   exclusion
    """
    rows = {"rec": Rows(x_i, t_i, PG, True)}
    if with_dd:
        rows.update(p=Rows(x_i, t_i, P, True), g=Rows(x_i, t_i, G, False), null=Rows(x_i, t_i, NULL, False))
    if len(x_anchors):
        rows.update(anchor_g=Rows(x_anchors, t_anchors, G, True), anchor_null=Rows(x_anchors, t_anchors, NULL, False))
    return rows


def stage2_table_layout(n_images):
    """Stage 2's table: "<v> <r_i>" for every photo, then "<r_i>" for every photo, then "<v>" and ""."""
    return {"pg": 0, "g": n_images, "p": 2 * n_images, "null": 2 * n_images + 1}


def stage2_rows(x, t, image, n_images, with_dd):
    """The rows of a stage-2 step: a batch of photos `image` (int64 [B]) noised to x at t."""
    at = stage2_table_layout(n_images)
    rows = {"rec": Rows(x, t, at["pg"] + image, True)}
    if with_dd:
        rows.update(p=Rows(x, t, torch.full_like(image, at["p"]), True), g=Rows(x, t, at["g"] + image, False),
                    null=Rows(x, t, torch.full_like(image, at["null"]), False))
    return rows
