"""GEGLU gate, fused: x = [a, b] on the last dimension -> a * gelu(b), exact (erf) GELU.

    y       = a * gelu(b),            gelu(b)  = b * Phi(b),  Phi(b) = (1 + erf(b / sqrt 2)) / 2
    dL/da   = g * gelu(b)
    dL/db   = g * a * gelu'(b),       gelu'(b) = Phi(b) + b * exp(-b^2 / 2) / sqrt(2 pi)

Eager PyTorch reads x twice (chunk + gelu), writes gelu(b), reads it again for the product and
keeps both halves for backward. Here one pass reads a and b and writes y; the backward reads
x and g once and writes dx = [da, db] in one pass, recomputing gelu(b) instead of storing it.
In SD1.5 this is the feed-forward of every transformer block: [B, L, 2 x 1280..5120].
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.rounding import to_dtype

BLOCK = 1024


@triton.jit
def _geglu_fwd(x_ptr, y_ptr, n, half, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // half, offs % half
    a_offs = row * 2 * half + col
    a = tl.load(x_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + a_offs + half, mask=mask, other=0.0).to(tl.float32)
    gelu_b = b * 0.5 * (1.0 + tl.math.erf(b * 0.7071067811865476))
    tl.store(y_ptr + offs, to_dtype(a * gelu_b, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd(x_ptr, g_ptr, dx_ptr, n, half, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // half, offs % half
    a_offs = row * 2 * half + col
    a = tl.load(x_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + a_offs + half, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    phi = 0.5 * (1.0 + tl.math.erf(b * 0.7071067811865476))
    density = tl.exp(-0.5 * b * b) * 0.3989422804014327  # standard normal pdf
    tl.store(dx_ptr + a_offs, to_dtype(g * b * phi, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + a_offs + half, to_dtype(g * a * (phi + b * density), dx_ptr.dtype.element_ty), mask=mask)


class GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        half = x.shape[-1] // 2
        y = torch.empty(*x.shape[:-1], half, device=x.device, dtype=x.dtype)
        n = y.numel()
        if n:
            _geglu_fwd[(triton.cdiv(n, BLOCK),)](x, y, n, half, BLOCK=BLOCK)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        g = g.contiguous()
        dx = torch.empty_like(x)
        n = g.numel()
        if n:
            _geglu_bwd[(triton.cdiv(n, BLOCK),)](x, g, dx, n, x.shape[-1] // 2, BLOCK=BLOCK)
        return dx


def geglu(x):
    """a * gelu(b) for x = [a, b] on the last dimension (even size)."""
    if x.shape[-1] % 2:
        raise ValueError(f"GEGLU needs an even last dimension, got {x.shape[-1]}")
    return GEGLU.apply(x)


def geglu_ref(x):
    a, b = x.chunk(2, dim=-1)
    return a * F.gelu(b)


def benchmark():
    """GB/s of forward and forward+backward at SD1.5's feed-forward shapes, ours vs eager, bf16."""
    if not torch.cuda.is_available():
        print("kernels.geglu benchmark: needs a CUDA device (correctness runs on CPU in tests/)")
        return
    from kernels.bench_util import time_ms
    print(f"GEGLU, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape [B, L, 2F]':<22}{'fwd ours':>10}{'fwd eager':>10}{'f+b ours':>10}{'f+b eager':>10}"
          f"{'fwd x':>7}{'f+b x':>7}   (GB/s; x = ours / eager)")
    for rows, width in ((10 * 4096, 2560), (10 * 1024, 5120), (10 * 256, 10240), (10 * 64, 10240)):
        x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(rows, width // 2, device="cuda", dtype=torch.bfloat16)
        fwd_bytes = x.numel() * 2 * 1.5  # read x, write y
        bwd_bytes = x.numel() * 2 * 2.5 + fwd_bytes  # + read x, g, write dx
        results = []
        for fn in (geglu, geglu_ref):
            with torch.no_grad():
                results.append(fwd_bytes / time_ms(lambda: fn(x)) / 1e6)
            results.append(bwd_bytes / time_ms(lambda: torch.autograd.grad(fn(x), x, g)) / 1e6)
        ours_f, ours_b, ref_f, ref_b = results
        print(f"{str([10, rows // 10, width]):<22}{ours_f:>10.0f}{ref_f:>10.0f}{ours_b:>10.0f}{ref_b:>10.0f}"
              f"{ours_f / ref_f:>7.2f}{ours_b / ref_b:>7.2f}")


if __name__ == "__main__":
    benchmark()
