"""The Triton kernels against their plain-torch references, forward and backward, on random
inputs at sizes that do not divide the tiles. Without a GPU they run under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so the CPU shapes are small. The judging rule is in
tests/helpers.py."""
import pytest
import torch
import triton

import kernels.attention as kattn
import kernels.geglu as kgeglu
import kernels.group_norm_silu as kgn
from kernels.attention import attention
from kernels.geglu import geglu
from kernels.group_norm_silu import group_norm_silu
from kernels.reference import attention_ref, geglu_ref, group_norm_silu_ref
from model import ops
from tests.helpers import CUDA, DEVICE, DTYPES, assert_close_as_torch, each_case_in_each_dtype, rel_err


def outputs_and_grads(fn, inputs, grad_out, **kwargs):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs, **kwargs)
    return [out, *torch.autograd.grad(out, inputs, grad_out)]


def compare(fn, ref_fn, inputs, grad_out, dtype, names, **kwargs):
    """ours vs torch in the same dtype vs torch in float64, output and every input gradient."""
    ours = outputs_and_grads(fn, inputs, grad_out, **kwargs)
    same = outputs_and_grads(ref_fn, inputs, grad_out, **kwargs)
    ref = outputs_and_grads(ref_fn, [t.double() for t in inputs], grad_out.double(), **kwargs)
    for o, s, r, name in zip(ours, same, ref, names):
        assert_close_as_torch(o, s, r, dtype, name)
    return ours


# ---------------------------------------------------------------------------------------------
# attention

ATTENTION_CASES = [  # rows, heads, queries, keys, head dim, condition per row (None: K/V per row), layout
    # the fast subset's five (the cheapest that cover several tiles, an index, a split head dim)
    (2, 1, 70, 130, 64, None, "bhld"),  # several key tiles, the last one partial
    (2, 1, 40, 150, 40, [1, 1], "bhld"),  # an index with several key tiles (the FA2 backward)
    (1, 1, 33, 140, 160, None, "bhld"),  # 160 = 128 + 32
    (2, 1, 9, 20, 8, None, "bhld"),  # a head dim below tl.dot's 16 (padded)
    (2, 1, 20, 77, 40, [1, 0], "blhd"),  # cross-attention, an index, q/k/v as the model makes them
    # the rest of the full suite
    (3, 2, 33, 33, 40, None, "bhld"),  # self-attention in one key tile, 40 = 32 + 16
    (2, 2, 77, 77, 80, None, "bhld"),  # 80 = 64 + 16
    (2, 1, 150, 150, 40, None, "blhd"),  # the same with a split head dim, q/k/v as the model makes them
    (2, 1, 20, 77, 160, None, "bhld"),  # cross-attention: 77 keys in one tile
    (3, 2, 130, 77, 40, None, "blhd"),  # cross-attention over several query chunks (partial dK, dV sums)
    (7, 2, 17, 77, 40, [0, 1, 2, 2, 2, 3, 3], "bhld"),  # conditions shared by rows; condition 4 unused
    (5, 1, 130, 77, 80, [0, 3, 3, 0, 1], "blhd"),  # shared conditions and query chunks; 2 and 4 unused
]


def attention_inputs(case, dtype, seed=0):
    b, h, lq, lk, d, index, layout = case
    gen = torch.Generator().manual_seed(seed)
    conditions = 5 if index else b

    def tensor(rows, length):  # "blhd": a [B, L, H, D] projection viewed as [B, H, L, D]
        shape = (rows, length, h, d) if layout == "blhd" else (rows, h, length, d)
        t = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        return t.transpose(1, 2) if layout == "blhd" else t

    q, k, v = tensor(b, lq), tensor(conditions, lk), tensor(conditions, lk)
    grad_out = torch.randn(q.shape, generator=gen).to(DEVICE, dtype)
    return q, k, v, grad_out, (torch.tensor(index, device=DEVICE) if index else None)


@pytest.mark.parametrize("case,dtype", each_case_in_each_dtype(
    ATTENTION_CASES, lambda c: "x".join(map(str, c[:5])) + ("-indexed" if c[5] else "") + "-" + c[6], fast=5))
def test_attention_matches_reference(case, dtype):
    q, k, v, grad_out, index = attention_inputs(case, dtype)
    out, dq, dk, dv = compare(attention, attention_ref, [q, k, v], grad_out, dtype, ("out", "dq", "dk", "dv"),
                              kv_index=index)
    assert out.stride() == q.stride()  # written in q's layout: the model's transpose back is a view
    if index is not None:  # a condition no row uses gets exactly no gradient
        for c in set(range(k.shape[0])) - set(index.tolist()):
            assert dk[c].abs().max() == 0 and dv[c].abs().max() == 0


LONG_CASES = [(1, 1, 1000, 1000, 16, None, "bhld"), (1, 1, 1000, 77, 16, None, "bhld")]  # tiny D for the interpreter
if CUDA:  # SD1.5's real sizes at 256 px, with fewer rows
    LONG_CASES += [(2, 8, 1024, 1024, 40, None, "blhd"), (2, 8, 256, 256, 80, None, "blhd"),
                   (2, 8, 64, 64, 160, None, "blhd"), (4, 8, 1024, 77, 40, [0, 1, 1, 1], "blhd"),
                   (4, 8, 256, 77, 80, [2, 0, 2, 0], "blhd"), (2, 8, 64, 77, 160, None, "blhd")]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_attention_long(case, dtype):
    q, k, v, grad_out, index = attention_inputs(case, dtype, seed=1)
    compare(attention, attention_ref, [q, k, v], grad_out, dtype, ("out", "dq", "dk", "dv"), kv_index=index)


def test_attention_custom_scale():
    q, k, v, grad_out, _ = attention_inputs((2, 2, 20, 30, 40, None, "bhld"), torch.float32)
    compare(attention, attention_ref, [q, k, v], grad_out, torch.float32, ("out", "dq", "dk", "dv"), scale=0.3)


def test_attention_wide_heads_go_to_torch():
    """Head dims above 256 (the VAE's 512) leave the kernel for SDPA, keeping scale and kv_index."""
    q, k, v, grad_out, index = attention_inputs((3, 1, 10, 12, 320, [1, 0, 1], "bhld"), torch.float32)
    compare(attention, attention_ref, [q, k, v], grad_out, torch.float32, ("out", "dq", "dk", "dv"),
            scale=0.05, kv_index=index)


def test_attention_refuses_mismatched_rows():
    q, k, v, _, _ = attention_inputs((3, 1, 8, 8, 40, None, "bhld"), torch.float32)
    with pytest.raises(ValueError, match="kv_index"):
        attention(q, k[:2], v[:2])
    with pytest.raises(ValueError, match="one entry per row"):
        attention(q, k, v, kv_index=torch.tensor([0, 1], device=DEVICE))


# ---------------------------------------------------------------------------------------------
# which inputs reach a kernel, and with what tiles

def refuse(*args):
    raise AssertionError("a kernel was launched")


@pytest.fixture
def no_launch(monkeypatch):
    """Every kernel's entry raises: whatever runs is the plain-torch path."""
    for fn in (kattn.Attention, kgeglu.GEGLU, kgn.GroupNormSiLU):
        monkeypatch.setattr(fn, "apply", refuse)


def test_float64_never_reaches_a_kernel(no_launch):
    """The tests' float64 references: tl.dot of fp64 tiles would not compile against fp32 accumulators."""
    q, k, v, _, index = attention_inputs((5, 1, 130, 77, 80, [0, 3, 3, 0, 1], "blhd"), torch.float64)
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64, device=DEVICE)
    norm = torch.nn.GroupNorm(32, 64).to(DEVICE, torch.float64)
    h = torch.randn(3, 10, 2 * 40, dtype=torch.float64, device=DEVICE)
    ops.use_kernels(True)
    try:
        assert torch.equal(ops.attention(q, k, v, kv_index=index), attention_ref(q, k, v, kv_index=index))
        assert torch.equal(ops.group_norm_silu(x, norm), group_norm_silu_ref(x, 32, norm.weight, norm.bias, norm.eps))
        assert torch.equal(ops.geglu(h), geglu_ref(h))
    finally:
        ops.use_kernels(None)


def test_fp32_head_dim_160_takes_sdpa(no_launch):
    """No one-tile backward fits fp32 at head dim 160 (237 KB at 32-row tiles), so SDPA runs it; the
    16-bit dtypes and fp32 up to 128 keep the kernels."""
    q, k, v, grad_out, _ = attention_inputs((2, 1, 20, 77, 160, None, "bhld"), torch.float32)
    out, *grads = outputs_and_grads(attention, [q, k, v], grad_out)
    ref, *ref_grads = outputs_and_grads(attention_ref, [q, k, v], grad_out)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert kattn.kernel_takes(q.bfloat16(), k.bfloat16()) and kattn.kernel_takes(q.half(), k.half())
    assert kattn.kernel_takes(q[..., :128], k[..., :128])
    assert not kattn.kernel_takes(q.double(), k.double())


# What the sm_90 compiler allocated for these configs (Triton 3.6, measured when the kernels were first
# compiled for Hopper): kernel, BLOCK_M, BLOCK_N, stages, head dim padded, bytes per element, bytes.
COMPILER_SHARED_BYTES = [("fwd", 128, 128, 3, 160, 2, 286_720), ("fwd", 64, 64, 2, 48, 2, 30_720),
                         ("dq", 128, 64, 3, 160, 2, 204_800), ("dkdv", 64, 128, 3, 160, 2, 238_592),
                         ("dkdv", 64, 64, 2, 48, 2, 53_760), ("one_tile", 128, 128, 1, 160, 2, 196_608),
                         ("one_tile", 32, 128, 1, 160, 4, 237_000)]


@pytest.mark.parametrize("case", COMPILER_SHARED_BYTES, ids=lambda c: "-".join(map(str, c[:6])))
def test_shared_memory_estimate_is_not_below_the_compiler(case):
    *config, compiled = case
    assert kattn._shared_bytes(*config) >= compiled


def test_autotune_prunes_configs_over_shared_memory():
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=st)
               for m, n in ((64, 64), (128, 64), (128, 128)) for st in (2, 3)]
    q = torch.empty(1, 1, 1, 160, dtype=torch.bfloat16)
    kept = kattn._prune("fwd", configs, {"Q": q}, C0=128, C1=32)
    assert 0 < len(kept) < len(configs)  # 128 x 128 tiles with 3 stages need 287 KB
    assert all(kattn._config_bytes("fwd", c, None, 160, 2) <= kattn.SHARED_MEMORY for c in kept)
    assert kattn._prune("fwd", configs, {"Q": q.float()}, C0=32, C1=16) == configs[:1]  # fp32: one config


def test_indexed_gradients_are_summed_without_atomics(monkeypatch):
    """Per-condition dK, dV sums in a fixed order: index_add_ would add with atomics on CUDA."""
    monkeypatch.setattr(torch.Tensor, "index_add_", refuse)
    inputs = attention_inputs((4, 1, 20, 40, 16, [0, 3, 3, 0], "blhd"), torch.float32)
    q, k, v, grad_out, index = inputs
    runs = [outputs_and_grads(attention, [q, k, v], grad_out, kv_index=index) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    ref = outputs_and_grads(attention_ref, [q.double(), k.double(), v.double()], grad_out.double(), kv_index=index)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(runs[0], ref))


# ---------------------------------------------------------------------------------------------
# GroupNorm + SiLU

GROUP_NORM_CASES = [  # shape, groups, silu, mean offset of x, memory layout
    ((3, 64, 5, 7), 32, True, 3.0, "nchw"),
    ((2, 96, 9, 9), 32, False, 3.0, "nchw"),
    ((1, 64, 33, 31), 32, True, 3.0, "nchw"),
    ((2, 32, 17), 8, True, 3.0, "nchw"),  # one spatial dim
    ((1, 32, 70, 70), 4, True, 3.0, "nchw"),  # 39200 per group: several blocks and a partial one
    ((2, 64, 6, 10), 32, True, 100.0, "nchw"),  # a mean 100 x the spread must not cancel the variance
    ((2, 64, 7, 5), 32, True, 3.0, "channels_last"),
]


# masked lanes past a group's end take sigmoid of a far-off value that is then discarded; numpy
# (the interpreter) warns about its exp overflowing to inf, which is harmless: sigmoid -> 0
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GROUP_NORM_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-g{c[1]}"
                         f"{'-silu' if c[2] else ''}-mean{c[3]:g}-{c[4]}")
@pytest.mark.slow  # the interpreter takes 1-6 s a case; the fast subset has test_group_norm_silu_without_affine
def test_group_norm_silu_matches_reference(case, dtype):
    shape, groups, silu, offset, layout = case
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2 + offset).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(shape[1], generator=gen) * 0.5 + 1).to(DEVICE, dtype)
    b = (torch.randn(shape[1], generator=gen) * 0.3).to(DEVICE, dtype)
    grad_out = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    compare(lambda x, w, b: group_norm_silu(x, groups, w, b, 1e-5, silu=silu),
            lambda x, w, b: group_norm_silu_ref(x, groups, w, b, 1e-5, silu=silu),
            [x, w, b], grad_out, dtype, ("y", "dx", "dw", "db"))


def test_group_norm_silu_without_affine():
    x = torch.randn(2, 12, 5, 5, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    g = torch.randn_like(x)
    ours = outputs_and_grads(lambda x: group_norm_silu(x, 3), [x], g)
    ref = outputs_and_grads(lambda x: group_norm_silu_ref(x, 3), [x.double()], g.double())
    for o, r in zip(ours, ref):
        assert rel_err(o, r) <= 1e-5


# ---------------------------------------------------------------------------------------------
# GEGLU


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 33, 2 * 40), (2, 77, 2 * 37), (5, 2 * 1), (20, 2 * 1280), (3, 2 * 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_geglu_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2).to(DEVICE, dtype)
    grad_out = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen).to(DEVICE, dtype)
    compare(geglu, geglu_ref, [x], grad_out, dtype, ("y", "dx"))


def test_geglu_refuses_odd_width():
    with pytest.raises(ValueError, match="even"):
        geglu(torch.randn(2, 5, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# model/ops.py: the switch reaches the kernels with the same arguments as its torch fallback


def test_ops_dispatch_matches_fallback():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=gen).to(DEVICE) for s in ((4, 2, 20, 40), (3, 2, 77, 40), (3, 2, 77, 40)))
    index = torch.tensor([2, 0, 2, 1], device=DEVICE)
    x = torch.randn(2, 16, 6, 6, generator=gen).to(DEVICE)
    norm = torch.nn.GroupNorm(4, 16).to(DEVICE)  # few groups: the interpreter runs one program per (sample, group)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3, generator=gen)
        norm.bias.normal_(0, 0.3, generator=gen)
    h = torch.randn(3, 10, 2 * 40, generator=gen).to(DEVICE)
    results = {}
    for on in (True, False):
        ops.use_kernels(on)
        try:
            results[on] = [ops.attention(q, k, v, kv_index=index), ops.group_norm_silu(x, norm),
                           ops.group_norm_silu(x, norm, silu=False), ops.geglu(h)]
        finally:
            ops.use_kernels(None)
    for kernel_result, torch_result in zip(results[True], results[False]):
        assert rel_err(kernel_result, torch_result.double()) <= 1e-5


def test_ops_switch_per_op(monkeypatch):
    """use_kernels({...}) and SD_KERNELS=a,b keep the kernels for the ops named only; the others run
    torch (so a faster torch.compile path can be chosen per op). What reached a kernel is recorded."""
    reached = []
    monkeypatch.setattr(ops, "_run_kernel", lambda name, *args, **kwargs: reached.append(name))
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    x, norm, h = torch.randn(1, 32, 2, 2, device=DEVICE), torch.nn.GroupNorm(32, 32).to(DEVICE), torch.randn(2, 8)

    def called():
        reached.clear()
        ops.attention(q, q, q), ops.group_norm_silu(x, norm), ops.geglu(h.to(DEVICE))
        return list(reached)
    try:
        ops.use_kernels({"geglu", "attention"})
        assert called() == ["attention", "geglu"]
        ops.use_kernels(True)
        monkeypatch.setenv("SD_KERNELS", "group_norm_silu")
        assert called() == ["group_norm_silu"]
        monkeypatch.setenv("SD_KERNELS", "0")
        assert called() == []
        with pytest.raises(ValueError, match="no kernel named"):
            ops.use_kernels({"softmax"})
    finally:
        ops.use_kernels(None)
