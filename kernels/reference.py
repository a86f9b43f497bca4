"""Each fused op in plain torch: the definition the kernels are tested against, and what
model/ops.py runs wherever a kernel does not (CPU, other GPUs, `SD_KERNELS=0`, dtypes or shapes the
kernels do not take). No triton here: the model imports this where triton is not installed."""
import torch.nn.functional as F


def attention_ref(q, k, v, scale=None, kv_index=None):
    """softmax(q k^T * scale) v over [B, H, L, D] (scale defaults to D^-1/2). With kv_index
    (int64 [B]), k and v are a table [C, H, S, D]: gather each row's condition, then SDPA."""
    if kv_index is not None:
        k, v = k[kv_index], v[kv_index]
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def group_norm_silu_ref(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True):
    """GroupNorm of x [N, C, *spatial], then SiLU when `silu`."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def geglu_ref(x):
    """x = [a, b] on the last dim -> a * gelu(b), exact erf GELU."""
    a, b = x.chunk(2, dim=-1)
    return a * F.gelu(b)
