"""GroupNorm followed by SiLU, fused, forward and backward.

For one sample n and group g (C/G channels x all spatial positions, contiguous in NCHW):

    mean, var = statistics of x over the group,      rstd = 1 / sqrt(var + eps)
    x_hat = (x - mean) * rstd,   z = x_hat * w[c] + b[c],   y = z * sigmoid(z)   (or y = z without SiLU)

Backward, with dz = dy * sigmoid(z) * (1 + z * (1 - sigmoid(z))) and d = dz * w[c]:

    dx = rstd * (d - mean_group(d) - x_hat * mean_group(d * x_hat))
    dw[c] = sum_{n, spatial} dz * x_hat,   db[c] = sum_{n, spatial} dz

Eager PyTorch runs GroupNorm and SiLU as two kernels with an intermediate tensor in between, and
its backward reads and writes that tensor again. Here the forward is one kernel per (n, g): the
statistics by chunks (Chan's pairwise combination, in fp32, so a large mean does not cancel the
variance away), then normalise + affine + SiLU, keeping only mean and rstd per group for the
backward, which recomputes z. Every resnet in the SD UNet and VAE starts with this pair.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.rounding import to_dtype


@triton.jit
def _gn_silu_fwd(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, group_size, spatial, channels_per_group,
                 num_groups, eps, SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # one (sample, group)
    base = pid.to(tl.int64) * group_size
    first_channel = (pid % num_groups) * channels_per_group
    # statistics: chunk means and squared deviations, combined pairwise
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for start in range(0, group_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < group_size
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        n_chunk = tl.minimum(group_size - start, BLOCK).to(tl.float32)
        chunk_mean = tl.sum(x, axis=0) / n_chunk
        chunk_m2 = tl.sum(tl.where(mask, (x - chunk_mean) * (x - chunk_mean), 0.0), axis=0)
        total = count + n_chunk
        delta = chunk_mean - mean
        mean += delta * n_chunk / total
        m2 += chunk_m2 + delta * delta * count * n_chunk / total
        count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    for start in range(0, group_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < group_size
        channel = first_channel + offs // spatial
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean) * rstd * w + b
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(y_ptr + base + offs, to_dtype(z, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_silu_bwd(x_ptr, w_ptr, b_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, group_size, spatial,
                 channels_per_group, num_groups, num_channels, SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // num_groups
    base = pid.to(tl.int64) * group_size
    first_channel = (pid % num_groups) * channels_per_group
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    # pass 1, channel by channel: the group sums for dx and per-(n, c) partial sums for dw, db
    sum_d = 0.0
    sum_d_xhat = 0.0
    for ch in range(0, channels_per_group):
        c = first_channel + ch
        w = tl.load(w_ptr + c).to(tl.float32)
        b = tl.load(b_ptr + c).to(tl.float32)
        dw_c = 0.0
        db_c = 0.0
        for start in range(0, spatial, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < spatial
            at = base + ch * spatial + offs
            x_hat = (tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            dz = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
            if SILU:
                z = x_hat * w + b
                sig = tl.sigmoid(z)
                dz = dz * sig * (1.0 + z * (1.0 - sig))
            dz = tl.where(mask, dz, 0.0)
            dw_c += tl.sum(dz * x_hat, axis=0)
            db_c += tl.sum(dz, axis=0)
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
            offs = start + tl.arange(0, BLOCK)
            mask = offs < spatial
            at = base + ch * spatial + offs
            x_hat = (tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            dz = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
            if SILU:
                z = x_hat * w + b
                sig = tl.sigmoid(z)
                dz = dz * sig * (1.0 + z * (1.0 - sig))
            dx = rstd * (dz * w - mean_d - x_hat * mean_d_xhat)
            tl.store(dx_ptr + at, to_dtype(dx, dx_ptr.dtype.element_ty), mask=mask)


def _block(size):
    return max(16, min(1024, triton.next_power_of_2(size)))


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
                                        num_groups, eps, SILU=silu, BLOCK=_block(group_size))
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
        dw = torch.empty(n, c, device=x.device, dtype=torch.float32)
        db = torch.empty_like(dw)
        _gn_silu_bwd[(n * groups,)](x, weight, bias, dy.contiguous(), mean, rstd, dx, dw, db, c // groups * spatial,
                                    spatial, c // groups, groups, c, SILU=ctx.silu, BLOCK=_block(spatial))
        # per-sample partial sums -> per-channel gradients (tiny: [N, C])
        return dx, None, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype), None, None


def group_norm_silu(x, num_groups, weight, bias, eps=1e-5, silu=True):
    """GroupNorm(num_groups, weight, bias, eps) of x [N, C, *spatial], then SiLU when `silu`."""
    if x.shape[1] % num_groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {num_groups} groups")
    return GroupNormSiLU.apply(x, num_groups, weight, bias, eps, silu)


def group_norm_silu_ref(x, num_groups, weight, bias, eps=1e-5, silu=True):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def benchmark():
    """GB/s of forward and forward+backward at SD1.5's resnet shapes (512 px), ours vs eager, bf16."""
    if not torch.cuda.is_available():
        print("kernels.group_norm_silu benchmark: needs a CUDA device (correctness runs on CPU in tests/)")
        return
    from kernels.bench_util import time_ms
    print(f"GroupNorm(32)+SiLU, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print(f"{'shape [N, C, H, W]':<24}{'fwd ours':>10}{'fwd eager':>10}{'f+b ours':>10}{'f+b eager':>10}"
          f"{'fwd x':>7}{'f+b x':>7}   (GB/s; x = ours / eager)")
    for c, hw in ((320, 64), (640, 32), (1280, 16), (1280, 8), (128, 512), (256, 256)):
        x = torch.randn(10 if hw <= 64 else 1, c, hw, hw, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        fwd_bytes = 2 * x.numel() * 2  # read x, write y
        bwd_bytes = fwd_bytes + 3 * x.numel() * 2  # + read x, dy, write dx
        results = []
        for fn in (group_norm_silu, group_norm_silu_ref):
            with torch.no_grad():
                results.append(fwd_bytes / time_ms(lambda: fn(x, 32, w, b, 1e-5)) / 1e6)
            results.append(bwd_bytes / time_ms(lambda: torch.autograd.grad(fn(x, 32, w, b, 1e-5), (x, w, b), g)) / 1e6)
        ours_f, ours_b, ref_f, ref_b = results
        print(f"{str(list(x.shape)):<24}{ours_f:>10.0f}{ref_f:>10.0f}{ours_b:>10.0f}{ref_b:>10.0f}"
              f"{ours_f / ref_f:>7.2f}{ours_b / ref_b:>7.2f}")


if __name__ == "__main__":
    benchmark()
