"""Fused attention, forward and backward, for Stable Diffusion's shapes.

    O = softmax(Q K^T * scale) V         Q [B, H, L, D], K and V [C, H, S, D], scale = D^-1/2

Flash-attention style: K/V stream through on-chip tiles with an online softmax, the [L, S] score
matrix never reaches memory, and the forward keeps only the log-sum-exp per query row. The
backward recomputes the probabilities P from it (FA2): one kernel per K/V tile for dK, dV, one
per query tile for dQ, with delta = rowsum(dO * O) precomputed.

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = dS K * scale,   dK = dS^T Q * scale

What is particular to SD:
  - Head dims 40, 80, 160 are not powers of two. Flash backends pad them to 64, 96/128, 192/256;
    here D is split into a power-of-two chunk plus a small one (40 = 32 + 16, 80 = 64 + 16,
    160 = 128 + 32, 64 = 64), each a tl.dot, so 40 costs 48 columns of work instead of 64.
  - Cross-attention has 77 keys: the K/V tile covers all of them (one pass, no online-softmax
    rescaling), and the grid is parallel over queries.
  - Condition-indexed K/V (`kv_index`): K and V hold C distinct conditions and query row b reads
    condition kv_index[b], so rows that share a condition share its K/V (the stage-1 step has ten
    rows and four conditions). dK and dV are computed per row and summed per condition.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.rounding import to_dtype

LOG2E = 1.4426950408889634


def _split(d):
    """Head dim -> (power-of-two chunk, second chunk width >= 16 or 0)."""
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest else 0)


@triton.jit
def _load_rows(ptr, rows, n_rows, col0, width, D_CHUNK: tl.constexpr, D: tl.constexpr):
    """A [len(rows), D_CHUNK] tile of a row-major [n_rows, D] matrix, columns col0.., masked."""
    cols = col0 + tl.arange(0, D_CHUNK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < col0 + width)
    return tl.load(ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, rows, n_rows, col0, width, D_CHUNK: tl.constexpr, D: tl.constexpr):
    cols = col0 + tl.arange(0, D_CHUNK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < col0 + width)
    tl.store(ptr + rows[:, None] * D + cols[None, :], to_dtype(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (set only under Triton's CPU interpreter, whose bf16
    tl.dot is wrong) widens bf16 operands to fp32 first: the same numbers, since products of bf16
    values are exact in fp32 and tensor cores accumulate in fp32 too."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _kv_base(idx_ptr, b, H, h, S, D: tl.constexpr, HAS_INDEX: tl.constexpr):
    """Offset of the K/V matrix query row b reads: its own, or its condition's."""
    kv_b = b
    if HAS_INDEX:
        kv_b = tl.load(idx_ptr + b)
    return (kv_b.to(tl.int64) * H + h) * S * D


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, H, L, S, qk_scale,
              D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_INDEX: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base = bh.to(tl.int64) * L * D
    kv_base = _kv_base(idx_ptr, b, H, h, S, D, HAS_INDEX)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0 = _load_rows(q_ptr + q_base, rows, L, 0, D0, D0, D)
    if D1 > 0:
        q1 = _load_rows(q_ptr + q_base, rows, L, D0, D - D0, D1, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
    for start in range(0, S, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k0 = _load_rows(k_ptr + kv_base, keys, S, 0, D0, D0, D)
        s = _dot(q0, tl.trans(k0), PRECISION, UPCAST)
        if D1 > 0:
            k1 = _load_rows(k_ptr + kv_base, keys, S, D0, D - D0, D1, D)
            s += _dot(q1, tl.trans(k1), PRECISION, UPCAST)
        s = tl.where(keys[None, :] < S, s * qk_scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v0 = _load_rows(v_ptr + kv_base, keys, S, 0, D0, D0, D)
        acc0 = acc0 * alpha[:, None] + _dot(p.to(v0.dtype), v0, PRECISION, UPCAST)
        if D1 > 0:
            v1 = _load_rows(v_ptr + kv_base, keys, S, D0, D - D0, D1, D)
            acc1 = acc1 * alpha[:, None] + _dot(p.to(v1.dtype), v1, PRECISION, UPCAST)
        m_i = m_new
    _store_rows(o_ptr + q_base, acc0 / l_i[:, None], rows, L, 0, D0, D0, D)
    if D1 > 0:
        _store_rows(o_ptr + q_base, acc1 / l_i[:, None], rows, L, D0, D - D0, D1, D)
    tl.store(lse_ptr + bh.to(tl.int64) * L + rows, m_i + tl.log2(l_i), mask=rows < L)


@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, idx_ptr, H, L, S, qk_scale,
                   sm_scale, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_INDEX: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV of one key tile for one query row b (per-row; summed per condition afterwards)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base = bh.to(tl.int64) * L * D
    kv_base = _kv_base(idx_ptr, b, H, h, S, D, HAS_INDEX)
    out_base = bh.to(tl.int64) * S * D
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = _load_rows(k_ptr + kv_base, keys, S, 0, D0, D0, D)
    v0 = _load_rows(v_ptr + kv_base, keys, S, 0, D0, D0, D)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    if D1 > 0:
        k1 = _load_rows(k_ptr + kv_base, keys, S, D0, D - D0, D1, D)
        v1 = _load_rows(v_ptr + kv_base, keys, S, D0, D - D0, D1, D)
    dk1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], tl.float32)
    for start in range(0, L, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q0 = _load_rows(q_ptr + q_base, rows, L, 0, D0, D0, D)
        do0 = _load_rows(do_ptr + q_base, rows, L, 0, D0, D0, D)
        s = _dot(q0, tl.trans(k0), PRECISION, UPCAST)
        if D1 > 0:
            q1 = _load_rows(q_ptr + q_base, rows, L, D0, D - D0, D1, D)
            do1 = _load_rows(do_ptr + q_base, rows, L, D0, D - D0, D1, D)
            s += _dot(q1, tl.trans(k1), PRECISION, UPCAST)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
        valid = (rows[:, None] < L) & (keys[None, :] < S)
        p = tl.where(valid, tl.exp2(s * qk_scale - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        delta = tl.load(delta_ptr + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
        dp = _dot(do0, tl.trans(v0), PRECISION, UPCAST)
        dv0 += _dot(tl.trans(p.to(do0.dtype)), do0, PRECISION, UPCAST)
        if D1 > 0:
            dp += _dot(do1, tl.trans(v1), PRECISION, UPCAST)
            dv1 += _dot(tl.trans(p.to(do1.dtype)), do1, PRECISION, UPCAST)
        ds = (p * (dp - delta[:, None])).to(q0.dtype)
        dk0 += _dot(tl.trans(ds), q0, PRECISION, UPCAST)
        if D1 > 0:
            dk1 += _dot(tl.trans(ds), q1, PRECISION, UPCAST)
    _store_rows(dk_ptr + out_base, dk0 * sm_scale, keys, S, 0, D0, D0, D)
    _store_rows(dv_ptr + out_base, dv0, keys, S, 0, D0, D0, D)
    if D1 > 0:
        _store_rows(dk_ptr + out_base, dk1 * sm_scale, keys, S, D0, D - D0, D1, D)
        _store_rows(dv_ptr + out_base, dv1, keys, S, D0, D - D0, D1, D)


@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, idx_ptr, H, L, S, qk_scale, sm_scale,
                 D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_INDEX: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base = bh.to(tl.int64) * L * D
    kv_base = _kv_base(idx_ptr, b, H, h, S, D, HAS_INDEX)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0 = _load_rows(q_ptr + q_base, rows, L, 0, D0, D0, D)
    do0 = _load_rows(do_ptr + q_base, rows, L, 0, D0, D0, D)
    if D1 > 0:
        q1 = _load_rows(q_ptr + q_base, rows, L, D0, D - D0, D1, D)
        do1 = _load_rows(do_ptr + q_base, rows, L, D0, D - D0, D1, D)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
    for start in range(0, S, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k0 = _load_rows(k_ptr + kv_base, keys, S, 0, D0, D0, D)
        v0 = _load_rows(v_ptr + kv_base, keys, S, 0, D0, D0, D)
        s = _dot(q0, tl.trans(k0), PRECISION, UPCAST)
        dp = _dot(do0, tl.trans(v0), PRECISION, UPCAST)
        if D1 > 0:
            k1 = _load_rows(k_ptr + kv_base, keys, S, D0, D - D0, D1, D)
            v1 = _load_rows(v_ptr + kv_base, keys, S, D0, D - D0, D1, D)
            s += _dot(q1, tl.trans(k1), PRECISION, UPCAST)
            dp += _dot(do1, tl.trans(v1), PRECISION, UPCAST)
        p = tl.where(keys[None, :] < S, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 += _dot(ds, k0, PRECISION, UPCAST)
        if D1 > 0:
            dq1 += _dot(ds, k1, PRECISION, UPCAST)
    _store_rows(dq_ptr + q_base, dq0 * sm_scale, rows, L, 0, D0, D0, D)
    if D1 > 0:
        _store_rows(dq_ptr + q_base, dq1 * sm_scale, rows, L, D0, D - D0, D1, D)


def _upcast(dtype):
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(L, S):
    """Query and key tile sizes: all keys in one tile when they fit in 128 (cross-attention)."""
    block_n = max(16, triton.next_power_of_2(S)) if S <= 128 else 64
    block_m = 64 if L >= 64 else max(16, triton.next_power_of_2(L))
    return block_m, block_n


class Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, kv_index):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, L, D = q.shape
        S = k.shape[2]
        d0, d1 = _split(D)
        block_m, block_n = _blocks(L, S)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        index = kv_index if kv_index is not None else q.new_zeros(1, dtype=torch.int64)
        precision = "ieee" if q.dtype == torch.float32 else None  # fp32 stays fp32 (no tf32)
        _attn_fwd[(triton.cdiv(L, block_m), B * H)](
            q, k, v, o, lse, index, H, L, S, scale * LOG2E, D=D, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_INDEX=kv_index is not None, PRECISION=precision, UPCAST=_upcast(q.dtype))
        ctx.save_for_backward(q, k, v, o, lse, index)
        ctx.scale, ctx.has_index, ctx.precision = scale, kv_index is not None, precision
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, index = ctx.saved_tensors
        do = do.contiguous()
        B, H, L, D = q.shape
        S = k.shape[2]
        d0, d1 = _split(D)
        block_m, block_n = _blocks(L, S)
        delta = (do.float() * o.float()).sum(-1)  # rowsum(dO * O) = sum_j P_ij dP_ij
        meta = dict(D=D, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n, HAS_INDEX=ctx.has_index,
                    PRECISION=ctx.precision, UPCAST=_upcast(q.dtype))
        dq = torch.empty_like(q)
        # dK, dV per query row first (rows sharing a condition would race), then summed per condition
        dk_rows = torch.empty(B, H, S, D, device=q.device, dtype=q.dtype if not ctx.has_index else torch.float32)
        dv_rows = torch.empty_like(dk_rows)
        _attn_bwd_dkdv[(triton.cdiv(S, block_n), B * H)](
            q, k, v, do, lse, delta, dk_rows, dv_rows, index, H, L, S, ctx.scale * LOG2E, ctx.scale, **meta)
        _attn_bwd_dq[(triton.cdiv(L, block_m), B * H)](
            q, k, v, do, lse, delta, dq, index, H, L, S, ctx.scale * LOG2E, ctx.scale, **meta)
        if ctx.has_index:
            dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32).index_add_(0, index, dk_rows).to(k.dtype)
            dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32).index_add_(0, index, dv_rows).to(v.dtype)
        else:
            dk, dv = dk_rows, dv_rows
        return dq, dk, dv, None, None


def attention(q, k, v, scale=None, kv_index=None):
    """softmax(q k^T * scale) v, [B, H, L, D] like F.scaled_dot_product_attention. With kv_index
    (int64 [B]), k and v are [C, H, S, D] and row b attends to condition kv_index[b]."""
    if kv_index is None and k.shape[0] != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but k has {k.shape[0]}; pass kv_index to share K/V")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    index = kv_index.to(device=q.device, dtype=torch.int64).contiguous() if kv_index is not None else None
    return Attention.apply(q, k, v, scale, index)


def attention_ref(q, k, v, scale=None, kv_index=None):
    if kv_index is not None:
        k, v = k[kv_index], v[kv_index]
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# -------------------------------------------------------------------------------------------------
# benchmark

SD15_SHAPES = [  # (name, rows, heads, queries, keys, head dim) at 512 px, 10 rows as in the stage-1 step
    ("self 64x64", 10, 8, 4096, 4096, 40), ("self 32x32", 10, 8, 1024, 1024, 80),
    ("self 16x16", 10, 8, 256, 256, 160), ("self 8x8", 10, 8, 64, 64, 160),
    ("cross 64x64", 10, 8, 4096, 77, 40), ("cross 32x32", 10, 8, 1024, 77, 80),
    ("cross 16x16", 10, 8, 256, 77, 160), ("cross 8x8", 10, 8, 64, 77, 160),
]


def benchmark():
    """TFLOP/s forward and forward+backward at every SD1.5 shape, ours vs each SDPA backend, bf16."""
    if not torch.cuda.is_available():
        print("kernels.attention benchmark: needs a CUDA device (correctness runs on CPU in tests/)")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from kernels.bench_util import time_ms
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    print(f"attention, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
          " (TFLOP/s; fwd+bwd counts 3.5x the forward's FLOPs)")
    print(f"{'shape':<13}{'pass':<9}{'ours':>7}" + "".join(f"{n:>10}" for n in backends) + f"{'ours/best':>11}")
    for name, b, h, lq, lk, d in SD15_SHAPES:
        q = torch.randn(b, h, lq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(q)
        flops = 4 * b * h * lq * lk * d
        for label, factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            def run(fn):
                if label == "fwd":
                    with torch.no_grad():
                        return time_ms(lambda: fn(q, k, v))
                return time_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g))
            ours = factor * flops / run(attention) / 1e9
            theirs = {}
            for bname, backend in backends.items():
                try:
                    with sdpa_kernel(backend):
                        theirs[bname] = factor * flops / run(F.scaled_dot_product_attention) / 1e9
                except RuntimeError:
                    theirs[bname] = float("nan")
            best = max((t for t in theirs.values() if t == t), default=float("nan"))
            print(f"{name:<13}{label:<9}{ours:>7.0f}" + "".join(f"{theirs[n]:>10.0f}" for n in backends)
                  + f"{ours / best:>10.2f}x")


if __name__ == "__main__":
    benchmark()
