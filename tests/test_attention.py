"""kernels.attention against the plain-torch reference, forward and backward: SD's head dims,
lengths that do not divide the tiles, cross-attention's 77 keys, and condition-indexed K/V."""
import pytest
import torch

from kernels.attention import attention, attention_ref
from tests.kernel_check import DEVICES, DTYPES, assert_close_as_torch

CASES = [  # rows, heads, queries, keys, head dim, condition index (None: K/V per row)
    (3, 2, 33, 33, 40, None), (2, 2, 77, 77, 80, None), (2, 1, 70, 130, 64, None), (2, 1, 20, 77, 160, None),
    (3, 2, 33, 77, 40, None), (7, 2, 17, 77, 40, [0, 1, 2, 2, 2, 3, 3]), (5, 1, 9, 77, 80, [0, 3, 3, 0, 1]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + ("-indexed" if c[5] else ""))
def test_attention_matches_reference(device, dtype, case):
    b, h, lq, lk, d, index = case
    torch.manual_seed(0)
    conditions = 4 if index else b  # with an index, condition 4 (if any) goes unused: its grads must be 0
    q = torch.randn(b, h, lq, d).to(device, dtype)
    k = torch.randn(conditions, h, lk, d).to(device, dtype)
    v = torch.randn(conditions, h, lk, d).to(device, dtype)
    g = torch.randn(b, h, lq, d).to(device, dtype)
    index = torch.tensor(index, device=device) if index else None

    def run(fn, q, k, v, g):
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        o = fn(q, k, v, kv_index=index)
        return (o,) + torch.autograd.grad(o, (q, k, v), g)

    ours = run(attention, q, k, v, g)
    same = run(attention_ref, q, k, v, g)
    ref = run(attention_ref, q.double(), k.double(), v.double(), g.double())
    for o, s, r, what in zip(ours, same, ref, ("out", "dq", "dk", "dv")):
        assert o.dtype == dtype and o.shape == r.shape
        assert_close_as_torch(o, s, r, dtype, what)
    if index is not None:
        unused = [c for c in range(conditions) if c not in index.tolist()]
        assert all(ours[2][c].abs().max() == 0 and ours[3][c].abs().max() == 0 for c in unused)


def test_custom_scale():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 40) for _ in range(3))
    assert torch.allclose(attention(q, k, v, scale=0.3), attention_ref(q, k, v, scale=0.3), atol=1e-5)


def test_mismatched_rows_need_an_index():
    with pytest.raises(ValueError, match="kv_index"):
        attention(torch.randn(3, 1, 8, 40), torch.randn(2, 1, 8, 40), torch.randn(2, 1, 8, 40))
