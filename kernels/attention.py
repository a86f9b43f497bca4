"""Fused attention, forward and backward, for Stable Diffusion's shapes.

    O = softmax(Q K^T * scale) V         Q [B, H, L, D], K and V [B or C, H, S, D], scale = D^-1/2

Flash-attention style: K/V stream through on-chip tiles with an online softmax, the [L, S] score
matrix never reaches memory, and the forward keeps only the log-sum-exp per query row. The
backward recomputes the probabilities P from it, with delta = rowsum(dO * O):

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = dS K * scale,   dK = dS^T Q * scale

What is particular to SD:
  - Head dims 40, 80, 160 are not powers of two, and tl.dot tiles must be. Flash backends pad them
    to 64, 96/128, 192/256; here D is split into a power-of-two chunk plus a small one (40 = 32 + 16
    with 8 of the 16 masked, 80 = 64 + 16, 160 = 128 + 32, 64 = 64), each chunk its own tl.dot,
    so D = 40 costs 48 columns of work instead of 64.
  - Cross-attention has 77 keys: one K/V tile (BLOCK_N = 128) holds them all, so the forward has
    no online-softmax rescaling and the grid is parallel over queries. Its backward is one kernel,
    parallel over chunks of queries: with every key in the tile, dQ is finished in one pass, and
    each chunk writes its dK, dV partial sums once (no atomics, deterministic); torch adds them.
    Any S <= 128 (the 8x8 self-attention too) takes this path.
  - Longer self-attention (S > 128) uses the FA2 backward: one kernel per query tile for dQ (which
    also writes delta), one per key tile for dK, dV.
  - Condition-indexed K/V (`kv_index`): K and V hold C distinct conditions and query row b reads
    condition kv_index[b] through the index, with no gathered copy. dK, dV are computed per row
    and summed per condition by torch in a fixed order (no atomics: the same bits every run).
  - Any strides with a unit last dim: the model's q, k, v are [B, L, H, D] projections viewed as
    [B, H, L, D], and reading them in place saves a copy of each (the output takes q's layout, so
    the model's transpose back is a view).
Where no kernel is worth it the call goes to SDPA (`kernel_takes`): fp64, head dims above 256 (the
VAE's single 512-wide head would not fit a tile in registers), fp32 above 128, and any shape for
which no config fits in shared memory. kv_index values must lie in [0, C) (unchecked, like an
index on the GPU).
"""

import functools
import inspect

import torch
import triton
import triton.language as tl

from kernels.reference import attention_ref
from kernels.rounding import INTERPRET, KERNEL_DTYPES, store_cast

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# fp64 (the tests' references) has no kernel: tl.dot of fp64 tiles returns fp64 and the fp32
# accumulators would not compile. fp32 stops at head dim 128: at 160 (SD1.5's deepest level) the
# one-tile backward needs 237 KB of shared memory even with 32-row tiles, and the split kernels
# spill registers; SDPA is the better path there.
MAX_HEAD_DIM_FP32 = 128


def _split(d):
    """Head dim -> widths of two power-of-two column chunks covering it (the second 0 or >= 16)."""
    c0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - min(d, c0)
    return c0, (max(16, triton.next_power_of_2(rest)) if rest else 0)


# -------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """stride, with the compiler told it is a multiple of ALIGN (the launcher checked), so that rows
    load as vectors even when the stride is D = 40 rather than a multiple of 16."""
    return (stride // ALIGN) * ALIGN


@triton.jit
def _bases(idx_ptr, bh, H, sq_b, sq_h, sk_b, sk_h, HAS_INDEX: tl.constexpr):
    """Offsets of query row b's Q matrix and of the K/V matrix it reads (its own, or its condition's)."""
    b, h = bh // H, bh % H
    kv_b = b
    if HAS_INDEX:
        kv_b = tl.load(idx_ptr + b)
    return b.to(tl.int64) * sq_b + h * sq_h, kv_b.to(tl.int64) * sk_b + h * sk_h


@triton.jit
def _load(ptr, rows, n_rows, row_stride, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr):
    """Tile [rows, COL0 : COL0 + WIDTH] of a matrix with D columns; zeros past its edges."""
    cols = COL0 + tl.arange(0, WIDTH)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store(ptr, x, rows, n_rows, row_stride, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], store_cast(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST (only under the interpreter, whose bf16 tl.dot is wrong)
    widens bf16 operands first: the same numbers, as bf16 products are exact in fp32."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


# A head-dim-wide tile travels as its two column chunks (x0 = columns [0, C0), x1 = [C0, C0 + C1)).
# Without a second chunk (C1 = 0) the first stands in for x1, which is then never read.

@triton.jit
def _load2(ptr, rows, n_rows, row_stride, D: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    """Tile [rows, :D] as its two column chunks."""
    x0 = _load(ptr, rows, n_rows, row_stride, 0, C0, D)
    x1 = x0
    if C1 > 0:
        x1 = _load(ptr, rows, n_rows, row_stride, C0, C1, D)
    return x0, x1


@triton.jit
def _store2(ptr, x0, x1, rows, n_rows, row_stride, D: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    _store(ptr, x0, rows, n_rows, row_stride, 0, C0, D)
    if C1 > 0:
        _store(ptr, x1, rows, n_rows, row_stride, C0, C1, D)


@triton.jit
def _zeros2(ROWS: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    """fp32 accumulators [ROWS, C0] and [ROWS, C1]."""
    x0 = tl.zeros([ROWS, C0], tl.float32)
    x1 = x0
    if C1 > 0:
        x1 = tl.zeros([ROWS, C1], tl.float32)
    return x0, x1


@triton.jit
def _dot_t2(a0, a1, b0, b1, C1: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a b^T over the head dim (scores Q K^T, dP = dO V^T): each chunk's product, summed."""
    s = _dot(a0, tl.trans(b0), PRECISION, UPCAST)
    if C1 > 0:
        s += _dot(a1, tl.trans(b1), PRECISION, UPCAST)
    return s


@triton.jit
def _dot2(a, b0, b1, C1: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(a b0, a b1): a product as wide as the head dim (O, dQ, dK, dV), chunk by chunk."""
    x0 = _dot(a, b0, PRECISION, UPCAST)
    x1 = x0
    if C1 > 0:
        x1 = _dot(a, b1, PRECISION, UPCAST)
    return x0, x1


@triton.jit
def _acc2(acc0, acc1, a, b0, b1, C1: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(acc0 + a b0, acc1 + a b1)."""
    x0, x1 = _dot2(a, b0, b1, C1, PRECISION, UPCAST)
    acc0 += x0
    if C1 > 0:
        acc1 += x1
    return acc0, acc1


@triton.jit
def _row_dot2(a0, a1, b0, b1, C1: tl.constexpr):
    """Per-row sum of a * b over the head dim in fp32 (delta = rowsum(dO * O))."""
    r = tl.sum(a0.to(tl.float32) * b0.to(tl.float32), axis=1)
    if C1 > 0:
        r += tl.sum(a1.to(tl.float32) * b1.to(tl.float32), axis=1)
    return r


# The kernels' common arguments (Liger-Kernel's style of saying what each one is):
#   Q, K, V, O, DO, DQ  pointers to [B, H, L, D] (Q-like) or [B or C, H, S, D] (K-like) tensors with a
#                       unit last stride; O, DO and DQ share Q's strides (the launcher makes it so)
#   DK, DV              pointers to per-row (or per-chunk) partial gradients, fp32 [B (x chunks), H, S, D]
#   LSE, DELTA          fp32 [B, H, L]: log2-sum-exp of each query's scores; rowsum(dO * O)
#   IDX                 int64 [B]: the K/V row (condition) each query row reads; unread without HAS_INDEX
#   sq_b, sq_h, sq_l    Q's strides (elements) over rows, heads, queries; sk_*: K's and V's; sd_*: DK's and DV's
#   H, L, S             heads, queries, keys
#   qk_scale, sm_scale  scale * log2(e) (scores in log2 units, for exp2), and scale
#   D, C0, C1           head dim and its two power-of-two column chunks (C1 = 0: one chunk)
#   ALIGN               largest power of two (<= 16) dividing every stride: lets rows load as vectors
#   BLOCK_M, BLOCK_N    query rows and keys per tile
#   ONE_TILE            every key fits in one BLOCK_N tile: a plain softmax, no running max
#   HAS_INDEX           K/V rows are read through IDX
#   PRECISION           tl.dot's input precision ("ieee" for fp32: no tf32), UPCAST: see _dot
# Programs: axis 0 over query tiles (key tiles for dK/dV, query chunks in the one-tile backward),
# axis 1 over (row, head) pairs bh = b * H + h.

@triton.jit
def _attn_fwd(Q, K, V, O, LSE, IDX, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, H, L, S, qk_scale,
              D: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, ALIGN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr, HAS_INDEX: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """O and LSE for one tile of BLOCK_M queries of one (row, head), streaming over key tiles."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    sq_l, sk_l = _aligned(sq_l, ALIGN), _aligned(sk_l, ALIGN)
    q_at, kv_at = _bases(IDX, bh, H, _aligned(sq_b, ALIGN), _aligned(sq_h, ALIGN),
                         _aligned(sk_b, ALIGN), _aligned(sk_h, ALIGN), HAS_INDEX)
    Q, O, K, V = Q + q_at, O + q_at, K + kv_at, V + kv_at
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load2(Q, rows, L, sq_l, D, C0, C1)
    acc0, acc1 = _zeros2(BLOCK_M, C0, C1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    for start in range(0, S, BLOCK_N):  # one iteration when ONE_TILE
        keys = start + tl.arange(0, BLOCK_N)
        k0, k1 = _load2(K, keys, S, sk_l, D, C0, C1)
        s = _dot_t2(q0, q1, k0, k1, C1, PRECISION, UPCAST)
        s = tl.where(keys[None, :] < S, s * qk_scale, float("-inf"))
        if ONE_TILE:  # all keys at once: a plain softmax
            m_i = tl.max(s, axis=1)
            p = tl.exp2(s - m_i[:, None])
            l_i = tl.sum(p, axis=1)
        else:  # rescale what earlier tiles accumulated to the new running max
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            acc0 *= alpha[:, None]
            if C1 > 0:
                acc1 *= alpha[:, None]
        v0, v1 = _load2(V, keys, S, sk_l, D, C0, C1)
        acc0, acc1 = _acc2(acc0, acc1, p.to(v0.dtype), v0, v1, C1, PRECISION, UPCAST)
    _store2(O, acc0 / l_i[:, None], acc1 / l_i[:, None], rows, L, sq_l, D, C0, C1)
    tl.store(LSE + bh.to(tl.int64) * L + rows, m_i + tl.log2(l_i), mask=rows < L)


@triton.jit
def _attn_bwd_one_tile(Q, K, V, O, DO, DQ, DK, DV, LSE, IDX, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
                       sd_b, sd_h, sd_l, H, L, S, CHUNK_ROWS, qk_scale, sm_scale,
                       D: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INDEX: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """S <= BLOCK_N: dQ for one chunk of CHUNK_ROWS queries, and that chunk's share of dK, dV for
    its row, written to DK, DV laid out [B * chunks, H, S, D] (the launcher sums the chunks)."""
    chunk, bh = tl.program_id(0), tl.program_id(1)
    sq_l, sk_l, sd_l = _aligned(sq_l, ALIGN), _aligned(sk_l, ALIGN), _aligned(sd_l, ALIGN)
    q_at, kv_at = _bases(IDX, bh, H, _aligned(sq_b, ALIGN), _aligned(sq_h, ALIGN),
                         _aligned(sk_b, ALIGN), _aligned(sk_h, ALIGN), HAS_INDEX)
    Q, O, DO, DQ, K, V = Q + q_at, O + q_at, DO + q_at, DQ + q_at, K + kv_at, V + kv_at
    d_at = ((bh // H) * tl.num_programs(0) + chunk).to(tl.int64) * _aligned(sd_b, ALIGN) \
        + (bh % H) * _aligned(sd_h, ALIGN)
    DK, DV = DK + d_at, DV + d_at
    keys = tl.arange(0, BLOCK_N)
    k0, k1 = _load2(K, keys, S, sk_l, D, C0, C1)
    v0, v1 = _load2(V, keys, S, sk_l, D, C0, C1)
    dk0, dk1 = _zeros2(BLOCK_N, C0, C1)
    dv0, dv1 = _zeros2(BLOCK_N, C0, C1)
    first = chunk * CHUNK_ROWS
    for start in range(first, tl.minimum(first + CHUNK_ROWS, L), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q0, q1 = _load2(Q, rows, L, sq_l, D, C0, C1)
        do0, do1 = _load2(DO, rows, L, sq_l, D, C0, C1)
        o0, o1 = _load2(O, rows, L, sq_l, D, C0, C1)
        delta = _row_dot2(do0, do1, o0, o1, C1)
        s = _dot_t2(q0, q1, k0, k1, C1, PRECISION, UPCAST)
        dp = _dot_t2(do0, do1, v0, v1, C1, PRECISION, UPCAST)
        lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
        valid = (rows[:, None] < L) & (keys[None, :] < S)
        p = tl.where(valid, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(q0.dtype)
        dv0, dv1 = _acc2(dv0, dv1, tl.trans(p.to(do0.dtype)), do0, do1, C1, PRECISION, UPCAST)
        dk0, dk1 = _acc2(dk0, dk1, tl.trans(ds), q0, q1, C1, PRECISION, UPCAST)
        dq0, dq1 = _dot2(ds, k0, k1, C1, PRECISION, UPCAST)  # every key is here: dQ is finished
        _store2(DQ, dq0 * sm_scale, dq1 * sm_scale, rows, L, sq_l, D, C0, C1)
    _store2(DK, dk0 * sm_scale, dk1 * sm_scale, keys, S, sd_l, D, C0, C1)
    _store2(DV, dv0, dv1, keys, S, sd_l, D, C0, C1)


@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, IDX, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, H, L, S,
                 qk_scale, sm_scale, D: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, ALIGN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INDEX: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dQ for one query tile, looping over key tiles; also writes delta for the dK, dV kernel."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    sq_l, sk_l = _aligned(sq_l, ALIGN), _aligned(sk_l, ALIGN)
    q_at, kv_at = _bases(IDX, bh, H, _aligned(sq_b, ALIGN), _aligned(sq_h, ALIGN),
                         _aligned(sk_b, ALIGN), _aligned(sk_h, ALIGN), HAS_INDEX)
    Q, O, DO, DQ, K, V = Q + q_at, O + q_at, DO + q_at, DQ + q_at, K + kv_at, V + kv_at
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load2(Q, rows, L, sq_l, D, C0, C1)
    do0, do1 = _load2(DO, rows, L, sq_l, D, C0, C1)
    o0, o1 = _load2(O, rows, L, sq_l, D, C0, C1)
    delta = _row_dot2(do0, do1, o0, o1, C1)
    dq0, dq1 = _zeros2(BLOCK_M, C0, C1)
    tl.store(DELTA + bh.to(tl.int64) * L + rows, delta, mask=rows < L)
    lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
    for start in range(0, S, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k0, k1 = _load2(K, keys, S, sk_l, D, C0, C1)
        v0, v1 = _load2(V, keys, S, sk_l, D, C0, C1)
        s = _dot_t2(q0, q1, k0, k1, C1, PRECISION, UPCAST)
        dp = _dot_t2(do0, do1, v0, v1, C1, PRECISION, UPCAST)
        p = tl.where(keys[None, :] < S, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0, dq1 = _acc2(dq0, dq1, ds, k0, k1, C1, PRECISION, UPCAST)
    _store2(DQ, dq0 * sm_scale, dq1 * sm_scale, rows, L, sq_l, D, C0, C1)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, IDX, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
                   sd_b, sd_h, sd_l, H, L, S, qk_scale, sm_scale,
                   D: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, ALIGN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INDEX: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV for one key tile as seen by query row b, looping over query tiles."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    sq_l, sk_l, sd_l = _aligned(sq_l, ALIGN), _aligned(sk_l, ALIGN), _aligned(sd_l, ALIGN)
    q_at, kv_at = _bases(IDX, bh, H, _aligned(sq_b, ALIGN), _aligned(sq_h, ALIGN),
                         _aligned(sk_b, ALIGN), _aligned(sk_h, ALIGN), HAS_INDEX)
    d_at = (bh // H).to(tl.int64) * _aligned(sd_b, ALIGN) + (bh % H) * _aligned(sd_h, ALIGN)
    Q, DO, K, V, DK, DV = Q + q_at, DO + q_at, K + kv_at, V + kv_at, DK + d_at, DV + d_at
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0, k1 = _load2(K, keys, S, sk_l, D, C0, C1)
    v0, v1 = _load2(V, keys, S, sk_l, D, C0, C1)
    dk0, dk1 = _zeros2(BLOCK_N, C0, C1)
    dv0, dv1 = _zeros2(BLOCK_N, C0, C1)
    for start in range(0, L, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q0, q1 = _load2(Q, rows, L, sq_l, D, C0, C1)
        do0, do1 = _load2(DO, rows, L, sq_l, D, C0, C1)
        s = _dot_t2(q0, q1, k0, k1, C1, PRECISION, UPCAST)
        dp = _dot_t2(do0, do1, v0, v1, C1, PRECISION, UPCAST)
        lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
        valid = (rows[:, None] < L) & (keys[None, :] < S)
        p = tl.where(valid, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = tl.trans((p * (dp - delta[:, None])).to(q0.dtype))
        dv0, dv1 = _acc2(dv0, dv1, tl.trans(p.to(do0.dtype)), do0, do1, C1, PRECISION, UPCAST)
        dk0, dk1 = _acc2(dk0, dk1, ds, q0, q1, C1, PRECISION, UPCAST)
    _store2(DK, dk0 * sm_scale, dk1 * sm_scale, keys, S, sd_l, D, C0, C1)
    _store2(DV, dv0, dv1, keys, S, sd_l, D, C0, C1)


# Tile sizes, warps and stages are measured per shape on the GPU (the first call of each shape tries
# the configs that fit, and triton keeps the timings on disk where it can: a new process re-tunes
# nothing); the interpreter gets the first config. No kernel accumulates into its outputs, so
# re-running one is safe. Fewer configs than every combination: 8 warps for the 128-row tiles
# (4 spill registers there), 4 for the smaller ones, and each compiled config costs seconds.
SHARED_MEMORY = 232_448  # bytes per block on sm_90 (H100/H200): no launched config may need more


def _shared_bytes(kernel, m, n, stages, dp, e):
    """Triton's shared memory for one config of `kernel` (m x n tiles, `stages` pipelined loads,
    head dim padded to dp, e bytes per element): the tiles each loop iteration loads, once per stage,
    plus those the kernel keeps. Equal to or above what the sm_90 compiler allocates at SD1.5's shapes
    (tests/test_kernel_compile.py checks every launched config against the compiler)."""
    if kernel == "fwd":  # Q kept; K, V streamed
        return stages * 2 * n * dp * e + m * dp * e
    if kernel == "dq":  # Q, dO kept; K, V streamed
        return stages * 2 * n * dp * e + 2 * m * dp * e
    streamed = 2 * m * dp * e if kernel == "dkdv" else 3 * m * dp * e  # Q, dO (and O) per query tile
    return stages * (streamed + 8 * m) + 2 * n * dp * e + 2 * m * n * e  # + LSE/delta; K, V; P, dS


def _prune(kernel, configs, named_args, **kwargs):
    """The configs whose tiles fit in shared memory (autotune's early_config_prune: nothing over
    the limit is compiled). fp32 keeps only the first that fits: its "ieee" dots compile slowly and
    spill, and it is the path for checking, not for speed."""
    q = named_args["Q"]
    fit = [c for c in configs if _config_bytes(kernel, c, kwargs.get("BLOCK_N"), kwargs["C0"] + kwargs["C1"],
                                               q.element_size()) <= SHARED_MEMORY]
    return fit[:1] if q.dtype == torch.float32 else fit


def _config_bytes(kernel, config, block_n, dp, e):
    """_shared_bytes of an autotune config (BLOCK_N from the launch when the config has none)."""
    tile = {"BLOCK_N": block_n, **config.kwargs}
    return _shared_bytes(kernel, tile["BLOCK_M"], tile["BLOCK_N"], config.num_stages, dp, e)


_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _autotune(kernel, fn, tiles, stages):
    """tiles: (BLOCK_M[, BLOCK_N], warps) tuples. The interpreter runs the first config alone;
    `gpu_configs` keeps the full list, which decides where the kernels are taken (kernel_takes)."""
    names = ("BLOCK_M", "BLOCK_N")[:len(tiles[0]) - 1]
    configs = [triton.Config(dict(zip(names, t[:-1])), num_warps=t[-1], num_stages=st)
               for t in tiles for st in stages]
    autotuner = triton.autotune(configs[:1] if INTERPRET else configs, key=["L", "S", "D", "HAS_INDEX"],
                                prune_configs_by={"early_config_prune": functools.partial(_prune, kernel)}, **_CACHE)(fn)
    autotuner.kernel_name, autotuner.gpu_configs = kernel, configs
    return autotuner


_fwd = _autotune("fwd", _attn_fwd, [(64, 64, 4), (128, 64, 8), (128, 128, 8)], stages=(2, 3))
# one K/V tile: nothing to pipeline, and more stages would only multiply its shared memory
_fwd_one_tile = _autotune("fwd", _attn_fwd, [(64, 4), (128, 8)], stages=(1,))
_bwd_one_tile = _autotune("one_tile", _attn_bwd_one_tile, [(64, 4), (32, 4), (128, 8)], stages=(1, 2))
_bwd_dq = _autotune("dq", _attn_bwd_dq, [(64, 64, 4), (128, 32, 8), (128, 64, 8)], stages=(2, 3))
_bwd_dkdv = _autotune("dkdv", _attn_bwd_dkdv, [(64, 64, 4), (32, 128, 8), (64, 128, 8)], stages=(2, 3))


# -------------------------------------------------------------------------------------------------
# launchers


def _alignment(*strides):
    """Largest power of two up to 16 dividing every stride."""
    align = 16
    while any(s % align for s in strides):
        align //= 2
    return align


def _sm_count(device):
    if device.type != "cuda":
        return 4  # the interpreter: a small number, so the tests see several query chunks
    return torch.cuda.get_device_properties(device).multi_processor_count


def _query_chunks(programs_per_chunk, L, device):
    """Chunks of queries for the one-tile backward: enough programs for ~4 per SM, each chunk a
    multiple of 128 rows (every BLOCK_M tried divides it). More chunks = more partial sums."""
    wanted = triton.cdiv(4 * _sm_count(device), programs_per_chunk)
    n = max(1, min(triton.cdiv(L, 128), wanted))
    rows = triton.cdiv(triton.cdiv(L, n), 128) * 128
    return triton.cdiv(L, rows), rows


def _meta(q, kv_index):
    c0, c1 = _split(q.shape[-1])
    return dict(D=q.shape[-1], C0=c0, C1=c1, HAS_INDEX=kv_index is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else None,  # fp32 stays fp32, no tf32
                UPCAST=INTERPRET and q.dtype == torch.bfloat16)


def _key_tile(S):
    """The one tile that holds every key when they fit in 128 (cross-attention's 77), else None."""
    return max(16, triton.next_power_of_2(S)) if S <= 128 else None


class Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, kv_index):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        o = torch.empty_like(q)  # q's layout when q is dense, which the kernels assume for o, dO, dQ
        if o.stride() != q.stride():
            q = q.contiguous()
            o = torch.empty_like(q)
        if k.stride() != v.stride():
            k, v = k.contiguous(), v.contiguous()
        B, H, L, _ = q.shape
        S = k.shape[2]
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        index = kv_index if kv_index is not None else lse  # unread without HAS_INDEX
        args = (q, k, v, o, lse, index, *q.stride()[:3], *k.stride()[:3], H, L, S, scale * LOG2E)
        meta = dict(_meta(q, kv_index), ALIGN=_alignment(*q.stride()[:3], *k.stride()[:3]))
        grid = lambda c: (triton.cdiv(L, c["BLOCK_M"]), B * H)
        key_tile = _key_tile(S)
        if key_tile:
            _fwd_one_tile[grid](*args, BLOCK_N=key_tile, ONE_TILE=True, **meta)
        else:
            _fwd[grid](*args, ONE_TILE=False, **meta)
        ctx.save_for_backward(q, k, v, o, lse, kv_index)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_index = ctx.saved_tensors
        if do.stride() != q.stride():
            do = torch.empty_like(q).copy_(do)
        B, H, L, D = q.shape
        S = k.shape[2]
        meta = _meta(q, kv_index)
        index = kv_index if kv_index is not None else lse
        dq = torch.empty_like(q)
        scales = (ctx.scale * LOG2E, ctx.scale)
        key_tile = _key_tile(S)
        if key_tile:
            n_chunks, chunk_rows = _query_chunks(B * H, L, q.device)
            dk_parts = torch.empty(B * n_chunks, H, S, D, device=q.device, dtype=torch.float32)
            dv_parts = torch.empty_like(dk_parts)
            align = _alignment(*q.stride()[:3], *k.stride()[:3], *dk_parts.stride()[:3])
            _bwd_one_tile[(n_chunks, B * H)](
                q, k, v, o, do, dq, dk_parts, dv_parts, lse, index, *q.stride()[:3], *k.stride()[:3],
                *dk_parts.stride()[:3], H, L, S, chunk_rows, *scales, ALIGN=align, BLOCK_N=key_tile, **meta)
            dk_rows = dk_parts.view(B, n_chunks, H, S, D).sum(1)
            dv_rows = dv_parts.view(B, n_chunks, H, S, D).sum(1)
        else:
            # per-row dK, dV in fp32 when rows share conditions (summed below), else straight into k's dtype
            dk_rows = torch.empty(B, H, S, D, device=q.device,
                                  dtype=torch.float32 if kv_index is not None else k.dtype)
            dv_rows = torch.empty_like(dk_rows)
            delta = torch.empty_like(lse)
            align = _alignment(*q.stride()[:3], *k.stride()[:3], *dk_rows.stride()[:3])
            _bwd_dq[lambda c: (triton.cdiv(L, c["BLOCK_M"]), B * H)](
                q, k, v, o, do, dq, lse, delta, index, *q.stride()[:3], *k.stride()[:3], H, L, S, *scales,
                ALIGN=align, **meta)
            _bwd_dkdv[lambda c: (triton.cdiv(S, c["BLOCK_N"]), B * H)](
                q, k, v, do, dk_rows, dv_rows, lse, delta, index, *q.stride()[:3], *k.stride()[:3],
                *dk_rows.stride()[:3], H, L, S, *scales, ALIGN=align, **meta)
        if kv_index is not None:  # rows that share a condition add their gradients
            dk, dv = _sum_by_condition(dk_rows, kv_index, k.shape[0]), _sum_by_condition(dv_rows, kv_index, k.shape[0])
        else:
            dk, dv = dk_rows, dv_rows
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def _sum_by_condition(rows, kv_index, conditions):
    """[C, ...] sums of per-row gradients [B, ...] over the rows of each condition, in fp32 and in
    a fixed order (a masked sum over B): index_add_ adds with atomics on CUDA, so the result, and
    with it a resumed run, would depend on the order the GPU happened to add in."""
    member = kv_index[None, :] == torch.arange(conditions, device=kv_index.device)[:, None]  # [C, B]
    member = member.view(conditions, -1, *[1] * (rows.dim() - 1))
    return torch.where(member, rows.float()[None], 0.0).sum(1)


def kernel_takes(q, k):
    """Whether the kernels take attention over these inputs (else the reference runs): fp16, bf16
    or fp32, a head dim up to MAX_HEAD_DIM (MAX_HEAD_DIM_FP32 in fp32), and for every kernel the
    call would launch, some config that fits in shared memory."""
    d, e = q.shape[-1], q.element_size()
    if q.dtype not in KERNEL_DTYPES or d > MAX_HEAD_DIM:
        return False
    if q.dtype == torch.float32 and d > MAX_HEAD_DIM_FP32:
        return False
    c0, c1 = _split(d)
    key_tile = _key_tile(k.shape[2])
    kernels = (_fwd_one_tile, _bwd_one_tile) if key_tile else (_fwd, _bwd_dq, _bwd_dkdv)
    return all(any(_config_bytes(t.kernel_name, c, key_tile, c0 + c1, e) <= SHARED_MEMORY for c in t.gpu_configs)
               for t in kernels)


def attention(q, k, v, scale=None, kv_index=None):
    """softmax(q k^T * scale) v over [B, H, L, D], like F.scaled_dot_product_attention (scale
    defaults to D^-1/2). With kv_index (int64 [B]), k and v are a table [C, H, S, D] and row b
    attends to k[kv_index[b]], v[kv_index[b]]. Differentiable in q, k and v."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention needs q [B, H, L, D] and k, v [B or C, H, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if kv_index is None and k.shape[0] != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} rows but k has {k.shape[0]}; pass kv_index to share K/V")
    if kv_index is not None and tuple(kv_index.shape) != (q.shape[0],):
        raise ValueError(f"kv_index must have one entry per row of q ({q.shape[0]}), got {tuple(kv_index.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not kernel_takes(q, k):
        return attention_ref(q, k, v, scale, kv_index)
    if q.numel() == 0:
        return q.new_empty(q.shape)
    if kv_index is not None:
        kv_index = kv_index.to(device=q.device, dtype=torch.int64).contiguous()
    return Attention.apply(q, k, v, scale, kv_index)


# -------------------------------------------------------------------------------------------------
# benchmark: python -m kernels.attention

SD15_SHAPES = [  # (name, rows, heads, queries, keys, head dim) at 512 px, 10 rows as in the stage-1 step
    ("self 64x64", 10, 8, 4096, 4096, 40), ("self 32x32", 10, 8, 1024, 1024, 80),
    ("self 16x16", 10, 8, 256, 256, 160), ("self 8x8", 10, 8, 64, 64, 160),
    ("cross 64x64", 10, 8, 4096, 77, 40), ("cross 32x32", 10, 8, 1024, 77, 80),
    ("cross 16x16", 10, 8, 256, 77, 160), ("cross 8x8", 10, 8, 64, 77, 160),
]
CONDITIONS = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]  # the stage-1 step: ten rows over four conditions


def benchmark(path=None, compiled=True):
    """TFLOP/s forward and forward+backward at every SD1.5 shape, bf16, ours beside each SDPA
    backend and torch.compile of the reference, q/k/v laid out as the model makes them ([B, L, H, D]
    viewed as [B, H, L, D]). Returns the table (also written to `path` as markdown, row by row)."""
    if not torch.cuda.is_available():
        print("kernels.attention benchmark: needs a CUDA device; nothing measured "
              "(correctness is tested on CPU under the Triton interpreter: tests/test_kernels.py)")
        return []
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from kernels.bench_util import Table, cell, time_ms
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    ways = [*backends, "eager", *(["compiled"] if compiled else [])]
    table = Table("attention, bf16, TFLOP/s", ["shape", "pass", "ours", *ways, "ours/best", "ours GB/s"], notes=[
        "TFLOP/s of 4 B H L S D per forward (fwd+bwd counts 3.5x that); 'indexed': 4 conditions for 10 rows "
        "(torch gathers them first); eager: SDPA's own choice; compiled: torch.compile of the same; "
        "'-': the backend refused the shape; GB/s: ours, of the minimum traffic (q, k, v, o; + dO, dQ, dK, dV)"],
        path=path)

    def made(rows, heads, length, d):  # as the model makes it: a projection viewed per head
        t = torch.randn(rows, length, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return t.requires_grad_(True)

    cases = [(name, shape, None) for name, *shape in SD15_SHAPES]
    cases += [(name + " indexed", shape, CONDITIONS) for name, *shape in SD15_SHAPES if name.startswith("cross")]
    for name, (b, h, lq, lk, d), conditions in cases:
        index = torch.tensor(conditions, device="cuda") if conditions else None
        kv_rows = len(set(conditions)) if conditions else b
        q, k, v = made(b, h, lq, d), made(kv_rows, h, lk, d), made(kv_rows, h, lk, d)
        g = torch.randn_like(q)
        flops = 4 * b * h * lq * lk * d
        traffic = 2 * (2 * q.numel() + 2 * k.numel())  # bytes: read q, k, v, write o
        for label, factor, bytes_factor in (("fwd", 1.0, 1), ("fwd+bwd", 3.5, 3)):
            def ms_of(fn):
                if label == "fwd":
                    with torch.no_grad():
                        return time_ms(lambda: fn(q, k, v))
                return time_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g))

            def rate(fn):
                return factor * flops / ms_of(fn) / 1e9
            ours_ms = ms_of(lambda q, k, v: attention(q, k, v, kv_index=index))
            ours_ms_rate, ours_gbs = factor * flops / ours_ms / 1e9, bytes_factor * traffic / ours_ms / 1e6
            reference = lambda q, k, v: attention_ref(q, k, v, kv_index=index)  # noqa: E731
            theirs = {}
            for way in ways:
                try:
                    if way in backends:
                        with sdpa_kernel(backends[way]):
                            theirs[way] = rate(reference)
                    else:
                        theirs[way] = rate(torch.compile(reference, dynamic=False) if way == "compiled" else reference)
                except Exception:  # noqa: BLE001  (a backend refusing the shape, or inductor failing: '-')
                    theirs[way] = None
            measured = [t for t in theirs.values() if t is not None]
            table.add(name, label, cell(ours_ms_rate), *(cell(t) for t in theirs.values()),
                      f"{ours_ms_rate / max(measured):.2f}x" if measured else "-", cell(ours_gbs))
    return [table]


if __name__ == "__main__":
    for t in benchmark():
        print(t.text())
