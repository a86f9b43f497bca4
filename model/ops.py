"""The few operations that have fused Triton kernels, behind one switch.

The model calls these instead of torch directly. On CUDA with Triton installed they run the
kernels in `kernels/`; everywhere else (CPU, other GPUs, `SD_KERNELS=0`) they run the plain
torch code below, which is also the reference the kernels are tested against.
"""
import os

import torch
import torch.nn.functional as F

_enabled = None  # None: decide per call (CUDA tensor and Triton importable)
# The attention kernel keeps a query tile's whole head in registers: SD's UNet heads (40-160) fit,
# the VAE's single 512-wide head does not, and runs once per image anyway.
MAX_KERNEL_HEAD_DIM = 256


def use_kernels(flag):
    """Force the Triton path on (True), off (False), or back to automatic (None)."""
    global _enabled
    _enabled = flag


def _kernels_for(x):
    if os.environ.get("SD_KERNELS") == "0" or _enabled is False:
        return None
    if _enabled is None and not x.is_cuda:
        return None
    try:
        import kernels
    except ImportError:
        return None
    return kernels


def attention(q, k, v, kv_index=None):
    """softmax(q k^T / sqrt(D)) v over [B, H, L, D] tensors. With kv_index (int64 [B]), k and v
    are a table [C, H, S, D] of distinct conditions and row b attends to k[kv_index[b]]."""
    kern = _kernels_for(q)
    if kern is not None and q.shape[-1] <= MAX_KERNEL_HEAD_DIM:
        return kern.attention(q, k, v, kv_index=kv_index)
    if kv_index is not None:
        k, v = k[kv_index], v[kv_index]
    return F.scaled_dot_product_attention(q, k, v)


def group_norm_silu(x, norm, silu=True):
    """GroupNorm with `norm`'s groups, eps and affine weights, then SiLU when asked."""
    kern = _kernels_for(x)
    if kern is not None:
        return kern.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu)
    x = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(x) if silu else x


def geglu(x):
    """GEGLU gate: x = [a, b] on the last dim -> a * gelu(b), exact erf GELU."""
    kern = _kernels_for(x)
    if kern is not None:
        return kern.geglu(x)
    a, b = x.chunk(2, dim=-1)
    return a * F.gelu(b)
