"""kernels.geglu against the plain-torch reference, forward and backward."""
import pytest
import torch

from kernels.geglu import geglu, geglu_ref
from tests.kernel_check import DEVICES, DTYPES, assert_close_as_torch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 33, 2 * 40), (2, 77, 2 * 37), (5, 2 * 1)], ids=str)
def test_geglu_matches_reference(device, dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2).to(device, dtype)
    g = torch.randn(*shape[:-1], shape[-1] // 2).to(device, dtype)

    def run(fn, x, g):
        x = x.detach().requires_grad_(True)
        y = fn(x)
        return y, torch.autograd.grad(y, x, g)[0]

    ours = run(geglu, x, g)
    same = run(geglu_ref, x, g)
    ref = run(geglu_ref, x.double(), g.double())
    for o, s, r, what in zip(ours, same, ref, ("y", "dx")):
        assert o.dtype == dtype and o.shape == r.shape
        assert_close_as_torch(o, s, r, dtype, what)


def test_odd_width_is_refused():
    with pytest.raises(ValueError):
        geglu(torch.randn(2, 5))
