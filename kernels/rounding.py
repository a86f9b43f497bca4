"""Round-to-nearest-even stores for the kernels' low-precision outputs.

GPUs convert fp32 to bf16 with round-to-nearest-even in hardware. Triton's CPU interpreter (how
the tests run without a GPU) truncates instead, which doubles the rounding error. Rounding the
fp32 bits first makes the conversion exact in both places, so the kernels give the same bits on
CPU and GPU; on a GPU it costs three integer ops per element.
"""
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
