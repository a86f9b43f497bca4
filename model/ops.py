"""The few operations that have fused Triton kernels, behind one switch.

The model calls these instead of torch directly. On CUDA with Triton installed they run the
kernels in `kernels/`; everywhere else (CPU, other GPUs, `SD_KERNELS=0`) they run the plain torch
definitions in kernels/reference.py, which the kernels are tested against. Which dtypes and shapes
a kernel takes is the kernel module's own rule: its entry point sends the rest to the reference.

Per op: `SD_KERNELS=attention,geglu` (or `use_kernels({"attention", "geglu"})`) keeps the kernels
for the ops named and sends the others to torch, so that where torch.compile's own fused code beats
a hand kernel (bench.py's comparison says which), the faster path can be chosen without editing code.
"""
import importlib
import importlib.util
import os

import torch

from kernels.reference import attention_ref, geglu_ref, group_norm_silu_ref

OPS = ("attention", "group_norm_silu", "geglu")
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_enabled = None  # None: decide per call (CUDA tensor and Triton importable); True, False, or a set of OPS


def use_kernels(flag):
    """Force the Triton path on (True), off (False), on for some ops only (a set of names from OPS,
    the others off), or back to automatic (None)."""
    global _enabled
    if flag not in (None, True, False):
        flag = frozenset(flag)
        unknown = flag - set(OPS)
        if unknown:
            raise ValueError(f"no kernel named {sorted(unknown)}; the ops with kernels are {', '.join(OPS)}")
    _enabled = flag


def _wants_kernel(name, x):
    """Whether op `name` on x goes to its kernel."""
    env = os.environ.get("SD_KERNELS", "")
    if env == "0" or _enabled is False or not _HAS_TRITON:
        return False
    if env not in ("", "1") and name not in env.split(","):
        return False
    if isinstance(_enabled, frozenset):
        return name in _enabled
    return _enabled is True or x.is_cuda


# torch.compile does not trace into the launchers (Python-side autotuning with a pruning hook): a
# kernel runs between compiled graphs, which inductor compiles around it.
@torch.compiler.disable
def _run_kernel(name, *args, **kwargs):
    return getattr(importlib.import_module(f"kernels.{name}"), name)(*args, **kwargs)


def attention(q, k, v, kv_index=None):
    """softmax(q k^T / sqrt(D)) v over [B, H, L, D] tensors. With kv_index (int64 [B]), k and v
    are a table [C, H, S, D] of distinct conditions and row b attends to k[kv_index[b]]."""
    if _wants_kernel("attention", q):
        return _run_kernel("attention", q, k, v, kv_index=kv_index)
    return attention_ref(q, k, v, kv_index=kv_index)


def group_norm_silu(x, norm, silu=True):
    """GroupNorm with `norm`'s groups, eps and affine weights, then SiLU when asked."""
    args = (x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    if _wants_kernel("group_norm_silu", x):
        return _run_kernel("group_norm_silu", *args, silu=silu)
    return group_norm_silu_ref(*args, silu=silu)


def geglu(x):
    """GEGLU gate: x = [a, b] on the last dim -> a * gelu(b), exact erf GELU."""
    return _run_kernel("geglu", x) if _wants_kernel("geglu", x) else geglu_ref(x)
