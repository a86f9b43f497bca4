"""The few operations that have fused Triton kernels, behind one switch.

The model calls these instead of torch directly. On CUDA with Triton installed they run the
kernels in `kernels/`; everywhere else (CPU, other GPUs, `SD_KERNELS=0`) they run the plain torch
definitions in kernels/reference.py, which the kernels are tested against. Which dtypes and shapes
a kernel takes is the kernel module's own rule: its entry point sends the rest to the reference.
"""
import importlib
import os

from kernels.reference import attention_ref, geglu_ref, group_norm_silu_ref

_enabled = None  # None: decide per call (CUDA tensor and Triton importable)


def use_kernels(flag):
    """Force the Triton path on (True), off (False), or back to automatic (None)."""
    global _enabled
    _enabled = flag


def _kernel(name, x):
    """The module kernels.<name> when x should go to the kernels, else None."""
    if os.environ.get("SD_KERNELS") == "0" or _enabled is False:
        return None
    if _enabled is None and not x.is_cuda:
        return None
    try:
        return importlib.import_module(f"kernels.{name}")
    except ImportError:  # no triton on this machine
        return None


def attention(q, k, v, kv_index=None):
    """softmax(q k^T / sqrt(D)) v over [B, H, L, D] tensors. With kv_index (int64 [B]), k and v
    are a table [C, H, S, D] of distinct conditions and row b attends to k[kv_index[b]]."""
    kern = _kernel("attention", q)
    if kern is not None:
        return kern.attention(q, k, v, kv_index=kv_index)
    return attention_ref(q, k, v, kv_index=kv_index)


def group_norm_silu(x, norm, silu=True):
    """GroupNorm with `norm`'s groups, eps and affine weights, then SiLU when asked."""
    kern = _kernel("group_norm_silu", x)
    fn = kern.group_norm_silu if kern is not None else group_norm_silu_ref
    return fn(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu)


def geglu(x):
    """GEGLU gate: x = [a, b] on the last dim -> a * gelu(b), exact erf GELU."""
    kern = _kernel("geglu", x)
    return kern.geglu(x) if kern is not None else geglu_ref(x)
