"""With kernels on, the UNet forward and a stage-1 backward agree with kernels off."""
import pytest
import torch

import accord_losses
from model import conditions, ops, unet
from model.schedule import add_noise, alphas_cumprod
from tests.helpers import DEVICE, assert_close_as_torch, randomize, rel_err

pytestmark = pytest.mark.slow  # the whole UNet under the Triton interpreter: minutes on 2 cores


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 on CUDA means fp32: cuDNN convolutions default to TF32 (10-bit mantissas), which
    would miss the 1e-5 bound with kernels on or off alike."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def random_unet(device, dtype):
    torch.manual_seed(0)
    model = randomize(unet.UNet(unet.TINY))
    return model.to(device, dtype).eval().requires_grad_(False)


def stage1_step(model, device, dtype, kernels_on):
    """Loss terms and the gradient on the condition vectors of one ten-row step."""
    ops.use_kernels(kernels_on)
    try:
        gen = torch.Generator().manual_seed(1)
        ctx = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)
        prompts = ctx(3, 77, unet.TINY.context_dim).requires_grad_(True)
        table = torch.cat([prompts, ctx(1, 77, unet.TINY.context_dim)])
        z, noise = ctx(4, 4, 8, 8), ctx(4, 4, 8, 8)
        t = torch.tensor([3, 500, 800, 999], device=device)
        abar = alphas_cumprod().to(device)
        x = add_noise(z, t, noise, abar)
        eps = conditions.predict(model, table, conditions.stage1_rows(x[:1], t[:1], x[1:], t[1:], with_dd=True))
        terms = accord_losses.loss_terms(eps, noise[:1], t[:1], abar)
        loss = accord_losses.total(terms, {"excl": 0.05, "dd": 0.1})
        grad, = torch.autograd.grad(loss, prompts)
        return loss.detach(), grad
    finally:
        ops.use_kernels(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet_forward_with_kernels(dtype, device=DEVICE):
    model = random_unet(device, dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen).to(device, dtype)
    c = torch.randn(2, 77, unet.TINY.context_dim, generator=gen).to(device, dtype)
    t = torch.tensor([10, 900], device=device)
    outs = {}
    for flag in (True, False):
        ops.use_kernels(flag)
        outs[flag] = model(x, t, c)
    ops.use_kernels(False)  # the float64 reference runs in plain torch: no kernel takes fp64
    ref = random_unet(device, torch.float64)(x.double(), t, c.double())
    ops.use_kernels(None)
    assert_close_as_torch(outs[True], outs[False], ref, dtype, "unet")


def test_stage1_backward_with_kernels(device=DEVICE):
    model = random_unet(device, torch.float32)
    loss_on, grad_on = stage1_step(model, device, torch.float32, True)
    loss_off, grad_off = stage1_step(model, device, torch.float32, False)
    assert rel_err(loss_on, loss_off.double()) <= 1e-5
    assert rel_err(grad_on, grad_off.double()) <= 1e-5
