"""Triton kernels, one op per file, each with its plain-torch reference and a benchmark
(`python -m kernels.<name>`). The model reaches them through model/ops.py."""
from kernels.geglu import geglu, geglu_ref
from kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref
from kernels.attention import attention, attention_ref
