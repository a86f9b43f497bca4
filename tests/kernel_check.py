"""How the kernel tests judge a low-precision result (the flash-attention rule): our error against
a float64 reference may be at most twice PyTorch's own error in the same dtype. Errors are
relative Frobenius norms, which do not hinge on one element's rounding as a max would."""
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # cpu: the Triton interpreter
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def assert_close_as_torch(ours, torch_same_dtype, ref64, dtype, what=""):
    """fp32: 1e-5 relative. fp16/bf16: within 2x of PyTorch's own error (plus fp32's 1e-5 floor)."""
    err = rel_err(ours, ref64)
    if dtype == torch.float32:
        assert err <= 1e-5, f"{what}: {err:.2e}"
    else:
        limit = 2 * rel_err(torch_same_dtype, ref64) + 1e-5
        assert err <= limit, f"{what}: ours {err:.2e} > 2 x torch's {limit:.2e}"
