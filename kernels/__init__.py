"""Triton kernels, one op per file (`kernels.attention`, `kernels.group_norm_silu`, `kernels.geglu`),
each with a benchmark (`python -m kernels.<name>`); their plain-torch definitions are in
`kernels.reference`, which needs no triton. The model reaches them through model/ops.py."""
