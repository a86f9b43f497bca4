"""Round-to-nearest-even stores for the kernels' low-precision outputs.

GPUs convert fp32 to bf16 with round-to-nearest-even in hardware. Triton's CPU interpreter (how
the tests run without a GPU) truncates instead, which doubles the rounding error. Rounding the
fp32 bits first makes the conversion exact in both places, so the kernels give the same bits on
CPU and GPU. `store_cast` applies it only under the interpreter: on a GPU the hardware rounds.
"""
import os

import torch
import triton
import triton.language as tl


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# What the kernels compute in; anything else (the tests' fp64 references) takes the plain-torch path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: the tests without a GPU
RNE = tl.constexpr(INTERPRET)


@triton.jit
def store_cast(x, dtype: tl.constexpr):
    """fp32 x -> dtype for a store: rounded like a GPU, also under the interpreter."""
    if RNE:
        x = to_dtype(x, dtype)
    else:
        x = x.to(dtype)
    return x
