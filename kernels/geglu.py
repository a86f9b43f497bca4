"""GEGLU gate, fused: x = [a, b] on the last dimension -> a * gelu(b), exact (erf) GELU.

    y       = a * gelu(b),            gelu(b)  = b * Phi(b),  Phi(b) = (1 + erf(b / sqrt 2)) / 2
    dL/da   = g * gelu(b)
    dL/db   = g * a * gelu'(b),       gelu'(b) = Phi(b) + b * exp(-b^2 / 2) / sqrt(2 pi)

Eager PyTorch slices x, writes gelu(b) to memory, reads it back for the product and keeps it for
the backward. Here one pass reads a and b and writes y; the backward reads x and g once and
writes dx = [da, db] in one pass, recomputing gelu(b) instead of storing it. In SD1.5 this is the
feed-forward gate of every transformer block: x is [B, L, 2 x 1280..5120].
"""
import torch
import triton
import triton.language as tl

from kernels.reference import geglu_ref
from kernels.rounding import KERNEL_DTYPES, store_cast

SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _geglu_fwd(x_ptr, y_ptr, n_rows, half, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < half)
    a_at = x_ptr + rows[:, None] * 2 * half + cols[None, :]
    a = tl.load(a_at, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(a_at + half, mask=mask, other=0.0).to(tl.float32)
    gelu_b = b * 0.5 * (1.0 + tl.math.erf(b * SQRT_HALF))
    tl.store(y_ptr + rows[:, None] * half + cols[None, :], store_cast(a * gelu_b, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd(x_ptr, g_ptr, dx_ptr, n_rows, half, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < half)
    a_at = rows[:, None] * 2 * half + cols[None, :]
    a = tl.load(x_ptr + a_at, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + a_at + half, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows[:, None] * half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    phi = 0.5 * (1.0 + tl.math.erf(b * SQRT_HALF))
    density = tl.exp(-0.5 * b * b) * INV_SQRT_2PI  # standard normal pdf
    tl.store(dx_ptr + a_at, store_cast(g * b * phi, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + a_at + half, store_cast(g * a * (phi + b * density), dx_ptr.dtype.element_ty), mask=mask)


def _launch(n_rows, half):
    """Grid over tiles of ROWS rows x BLOCK columns, 2048 elements each (8 per thread). SD's widths
    (1280, 2560, 5120) are 5 x a power of two: a block of that power of two wastes no lanes; other
    widths take masked blocks up to 1024 wide."""
    block = half & -half  # largest power of two dividing half
    if block < 128:
        block = min(1024, triton.next_power_of_2(half))
    block = min(block, 1024)
    rows = max(1, 2048 // block)
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(half, block))
    return grid, dict(ROWS=rows, BLOCK=block, num_warps=max(1, rows * block // 256))


class GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        half = x.shape[-1] // 2
        y = torch.empty(*x.shape[:-1], half, device=x.device, dtype=x.dtype)
        n_rows = y.numel() // half
        grid, meta = _launch(n_rows, half)
        _geglu_fwd[grid](x, y, n_rows, half, **meta)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        g = g.contiguous()
        half = x.shape[-1] // 2
        dx = torch.empty_like(x)
        n_rows = g.numel() // half
        grid, meta = _launch(n_rows, half)
        _geglu_bwd[grid](x, g, dx, n_rows, half, **meta)
        return dx


def geglu(x):
    """a * gelu(b) for x = [a, b] on the last dimension (even size), exact erf GELU.
    Differentiable in x."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"GEGLU needs an even last dimension, got shape {tuple(x.shape)}")
    if x.numel() == 0 or x.dtype not in KERNEL_DTYPES:
        return geglu_ref(x)
    return GEGLU.apply(x)


# -------------------------------------------------------------------------------------------------
# benchmark: python -m kernels.geglu

SD15_SHAPES = [  # [B, L, 2F] of the UNet's feed-forwards at 512 px, ten rows (F = 4 x channels)
    (10, 4096, 2 * 1280), (10, 1024, 2 * 2560), (10, 256, 2 * 5120), (10, 64, 2 * 5120),
]


def benchmark(path=None, compiled=True):
    """GB/s forward and forward+backward, bf16: ours beside eager chunk + F.gelu + multiply and
    torch.compile of it. Returns the table (also written to `path` as markdown, row by row)."""
    if not torch.cuda.is_available():
        print("kernels.geglu benchmark: needs a CUDA device; nothing measured "
              "(correctness is tested on CPU under the Triton interpreter: tests/test_kernels.py)")
        return []
    from kernels.bench_util import memory_bound_table

    def make(shape):
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda", dtype=torch.bfloat16)
        nbytes = x.numel() * x.element_size()
        return (x,), x, g, 1.5 * nbytes, 4 * nbytes  # fwd: x, y (half); bwd: + x, g (half), dx
    return memory_bound_table("GEGLU, bf16", "shape [B, L, 2F]", SD15_SHAPES, make, geglu, geglu_ref, path, compiled)


if __name__ == "__main__":
    for t in benchmark():
        print(t.text())
