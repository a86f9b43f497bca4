"""kernels.group_norm_silu against the plain-torch reference, forward and backward."""
import pytest
import torch

from kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref
from tests.kernel_check import DEVICES, DTYPES, assert_close_as_torch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,silu", [((3, 64, 5, 7), 32, True), ((2, 96, 9, 9), 32, False),
                                               ((1, 64, 33, 31), 32, True), ((2, 32, 17), 8, True)], ids=str)
def test_group_norm_silu_matches_reference(device, dtype, shape, groups, silu):
    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape) * 2 + 3).to(device, dtype)  # an offset mean: the statistics must not cancel
    w = (torch.randn(c) * 0.5 + 1).to(device, dtype)
    b = (torch.randn(c) * 0.3).to(device, dtype)
    g = torch.randn(shape).to(device, dtype)

    def run(fn, x, w, b, g):
        x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))
        y = fn(x, groups, w, b, 1e-5, silu=silu)
        return (y,) + torch.autograd.grad(y, (x, w, b), g)

    ours = run(group_norm_silu, x, w, b, g)
    same = run(group_norm_silu_ref, x, w, b, g)
    ref = run(group_norm_silu_ref, x.double(), w.double(), b.double(), g.double())
    for o, s, r, what in zip(ours, same, ref, ("y", "dx", "dw", "db")):
        assert o.dtype == dtype and o.shape == r.shape
        assert_close_as_torch(o, s, r, dtype, what)
