"""GroupNorm followed by SiLU, fused, forward and backward.

For one sample n and group g (C/G channels x all spatial positions, contiguous in NCHW):

    mean, var = statistics of x over the group,      rstd = 1 / sqrt(var + eps)
    x_hat = (x - mean) * rstd,   z = x_hat * w[c] + b[c],   y = z * sigmoid(z)   (or y = z without SiLU)

Backward, with dz = dy * sigmoid(z) * (1 + z * (1 - sigmoid(z)))  (dz = dy without SiLU), d = dz * w[c]:

    dx = rstd * (d - mean_group(d) - x_hat * mean_group(d * x_hat))
    dw[c] = sum_{n, spatial} dz * x_hat,   db[c] = sum_{n, spatial} dz

Eager PyTorch runs GroupNorm and SiLU as two kernels with an intermediate tensor in between, and
its backward reads and writes that tensor again. Here the forward is one kernel per (n, g): the
statistics, then normalise + affine + SiLU, keeping only mean and rstd per group for the
backward, which recomputes z. A group is large (10 channels x 4096 positions in the UNet at
512 px, 4 x 262144 in the VAE), so both passes loop over it in blocks. The statistics are
Welford's, per lane of the block and in fp32 whatever the input dtype, combined once at the end:
no block-wide reduction inside the loop, and a large mean does not cancel the variance away.
The backward is one kernel per (n, g) too: per channel sums (for dw, db and the two group means),
then dx. Every resnet in the SD UNet and VAE starts with this pair.

Input [N, C, *spatial] in any memory layout; channels_last is read through a contiguous copy and
the output is contiguous NCHW.
"""
import torch
import triton
import triton.language as tl

from kernels.reference import group_norm_silu_ref
from kernels.rounding import KERNEL_DTYPES, store_cast


@triton.jit
def _gn_silu_fwd(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, group_size, spatial, channels_per_group,
                 num_groups, eps, SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # one (sample, group)
    base = pid.to(tl.int64) * group_size
    first_channel = (pid % num_groups) * channels_per_group
    lanes = tl.arange(0, BLOCK)
    # statistics: lane j runs Welford over elements j, j + BLOCK, j + 2 BLOCK, ...
    lane_mean = tl.zeros([BLOCK], tl.float32)
    lane_m2 = tl.zeros([BLOCK], tl.float32)
    n_blocks = tl.cdiv(group_size, BLOCK)
    for i in range(0, n_blocks):
        offs = i * BLOCK + lanes
        mask = offs < group_size
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        delta = x - lane_mean
        lane_mean += tl.where(mask, delta * (1.0 / (i + 1)), 0.0)
        lane_m2 += tl.where(mask, delta * (x - lane_mean), 0.0)
    # lanes past the end of the last block saw one element fewer (Chan's rule to combine lanes)
    lane_count = (n_blocks - (lanes >= group_size - (n_blocks - 1) * BLOCK).to(tl.int32)).to(tl.float32)
    mean = tl.sum(lane_count * lane_mean, axis=0) / group_size
    spread = lane_mean - mean
    var = (tl.sum(lane_m2, axis=0) + tl.sum(lane_count * spread * spread, axis=0)) / group_size
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    for start in range(0, group_size, BLOCK):
        offs = start + lanes
        mask = offs < group_size
        channel = first_channel + offs // spatial
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean) * rstd * w + b
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(y_ptr + base + offs, store_cast(z, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_silu_dz(x_ptr, dy_ptr, at, mask, mean, rstd, w, b, SILU: tl.constexpr):
    """x_hat and the gradient at z (before the affine) for one block of a channel."""
    x_hat = (tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    dz = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        z = x_hat * w + b
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return x_hat, tl.where(mask, dz, 0.0)


@triton.jit
def _gn_silu_bwd(x_ptr, w_ptr, b_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, group_size, spatial,
                 channels_per_group, num_groups, num_channels, SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # one (sample, group)
    n = pid // num_groups
    base = pid.to(tl.int64) * group_size
    first_channel = (pid % num_groups) * channels_per_group
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    lanes = tl.arange(0, BLOCK)
    # pass 1, channel by channel: per-(n, c) sums for dw, db, which also give the group means for dx
    sum_d = 0.0
    sum_d_xhat = 0.0
    for ch in range(0, channels_per_group):
        c = first_channel + ch
        w = tl.load(w_ptr + c).to(tl.float32)
        b = tl.load(b_ptr + c).to(tl.float32)
        dw_lanes = tl.zeros([BLOCK], tl.float32)
        db_lanes = tl.zeros([BLOCK], tl.float32)
        for start in range(0, spatial, BLOCK):
            offs = start + lanes
            x_hat, dz = _gn_silu_dz(x_ptr, dy_ptr, base + ch * spatial + offs, offs < spatial, mean, rstd, w, b, SILU)
            dw_lanes += dz * x_hat
            db_lanes += dz
        dw_c = tl.sum(dw_lanes, axis=0)
        db_c = tl.sum(db_lanes, axis=0)
        tl.store(dw_ptr + n * num_channels + c, dw_c)
        tl.store(db_ptr + n * num_channels + c, db_c)
        sum_d += db_c * w
        sum_d_xhat += dw_c * w
    mean_d = sum_d / group_size
    mean_d_xhat = sum_d_xhat / group_size
    # pass 2: dx
    for ch in range(0, channels_per_group):
        c = first_channel + ch
        w = tl.load(w_ptr + c).to(tl.float32)
        b = tl.load(b_ptr + c).to(tl.float32)
        for start in range(0, spatial, BLOCK):
            offs = start + lanes
            at = base + ch * spatial + offs
            x_hat, dz = _gn_silu_dz(x_ptr, dy_ptr, at, offs < spatial, mean, rstd, w, b, SILU)
            dx = rstd * (dz * w - mean_d - x_hat * mean_d_xhat)
            tl.store(dx_ptr + at, store_cast(dx, dx_ptr.dtype.element_ty), mask=offs < spatial)


def _launch(size):
    """Block (elements per step) and warps for a loop over `size` elements: ~8 per thread per step."""
    block = max(16, min(4096, triton.next_power_of_2(size)))
    return dict(BLOCK=block, num_warps=max(1, min(16, block // 256)))


class GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, silu):
        x = x.contiguous()
        n, c = x.shape[:2]
        spatial = x[0, 0].numel()
        group_size = c // num_groups * spatial
        y = torch.empty_like(x)
        mean = torch.empty(n * num_groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _gn_silu_fwd[(n * num_groups,)](x, weight, bias, y, mean, rstd, group_size, spatial, c // num_groups,
                                        num_groups, eps, SILU=silu, **_launch(group_size))
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        spatial = x[0, 0].numel()
        groups = ctx.num_groups
        dx = torch.empty_like(x)
        dw = torch.empty(n, c, device=x.device, dtype=torch.float32)  # per-sample sums, added below
        db = torch.empty_like(dw)
        _gn_silu_bwd[(n * groups,)](x, weight, bias, dy.contiguous(), mean, rstd, dx, dw, db, c // groups * spatial,
                                    spatial, c // groups, groups, c, SILU=ctx.silu, **_launch(spatial))
        return dx, None, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype), None, None


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True):
    """GroupNorm(num_groups, weight, bias, eps) of x [N, C, *spatial], then SiLU when `silu`.
    Differentiable in x, weight and bias (no weight/bias: the unit affine, as F.group_norm)."""
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_silu needs x [N, C, ...] with C divisible by {num_groups}, got {tuple(x.shape)}")
    if x.numel() == 0 or x.dtype not in KERNEL_DTYPES:
        return group_norm_silu_ref(x, num_groups, weight, bias, eps, silu)
    c = x.shape[1]
    weight = torch.ones(c, device=x.device, dtype=x.dtype) if weight is None else weight
    bias = torch.zeros(c, device=x.device, dtype=x.dtype) if bias is None else bias
    return GroupNormSiLU.apply(x, num_groups, weight, bias, eps, silu)


# -------------------------------------------------------------------------------------------------
# benchmark: python -m kernels.group_norm_silu

SD15_SHAPES = [  # [N, C, H, W] at 512 px: the UNet's resnets for the ten-row step, then the VAE decoder's
    (10, 320, 64, 64), (10, 640, 32, 32), (10, 1280, 16, 16), (10, 1280, 8, 8), (10, 2560, 8, 8),
    (1, 512, 64, 64), (1, 512, 128, 128), (1, 256, 256, 256), (1, 128, 512, 512),
]


def benchmark(path=None, compiled=True):
    """GB/s forward and forward+backward, bf16: ours beside eager F.group_norm + F.silu and
    torch.compile of it. Returns the table (also written to `path` as markdown, row by row)."""
    if not torch.cuda.is_available():
        print("kernels.group_norm_silu benchmark: needs a CUDA device; nothing measured "
              "(correctness is tested on CPU under the Triton interpreter: tests/test_kernels.py)")
        return []
    from kernels.bench_util import memory_bound_table

    def make(shape):
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(shape[1], device="cuda", dtype=torch.bfloat16)).requires_grad_(True)
        b = (0.1 * torch.randn(shape[1], device="cuda", dtype=torch.bfloat16)).requires_grad_(True)
        nbytes = x.numel() * x.element_size()
        return (x, 32, w, b, 1e-5), (x, w, b), torch.randn_like(x), 2 * nbytes, 5 * nbytes
    return memory_bound_table("GroupNorm(32)+SiLU, bf16", "shape [N, C, H, W]", SD15_SHAPES, make,
                              group_norm_silu, group_norm_silu_ref, path, compiled)


if __name__ == "__main__":
    for t in benchmark():
        print(t.text())
