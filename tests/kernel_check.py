"""How the kernel tests judge a result (the flash-attention rule): errors are relative Frobenius
norms against a float64 reference (they do not hinge on one element's rounding, as a max would).
fp32 must be within 1e-5. fp16/bf16 must be within twice the error of PyTorch's own computation in
the same dtype, plus 1e-5 (the fp32 bound: both results round from fp32 arithmetic whose own
differences are of that order, which matters only when torch's result happens to round exactly)."""
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # without CUDA, "cpu" means Triton's interpreter (conftest.py)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def assert_close_as_torch(ours, torch_same_dtype, ref64, dtype, what=""):
    assert ours.dtype == dtype and ours.shape == ref64.shape, what
    err = rel_err(ours, ref64)
    if dtype == torch.float32:
        assert err <= 1e-5, f"{what}: {err:.2e}"
    else:
        limit = 2 * rel_err(torch_same_dtype, ref64) + 1e-5
        assert err <= limit, f"{what}: ours {err:.2e} > 2 x torch's + 1e-5 = {limit:.2e}"
