"""Compile every kernel configuration the code can launch at Stable Diffusion 1.5's shapes for a
GPU that is not here (sm_90: H100/H200), and check each one's shared memory against the target's.

    python -m kernels.compile_check [--arch 90] [--dtypes bf16,fp16,fp32]

The Triton interpreter (how the tests run without a GPU) compiles nothing, so it cannot see a
config that needs more shared memory than a block may have, or a dtype that does not compile.
Here the launchers run as in training and sampling, through a stand-in driver that reports the
target GPU: every launch compiles instead of running, every config autotune would try (after its
pruning) is compiled, and compilation stops after Triton's own passes, where shared memory is
known; ptxas (registers, spills) is skipped, which keeps the whole check to about a minute.
Run it in a process of its own: it replaces triton's driver. Exits 1 on any failure.
"""
import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner, jit  # noqa: E402

LIMITS = {90: 232_448, 80: 166_912, 89: 101_376}  # shared memory per block, bytes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


class TargetDriver:
    """What triton asks a driver while launching, answered for a GPU that is not here."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _compile_to_llir(self, key, signature, device, constexprs, options, attrs, warmup):
    """JITFunction._do_compile up to LLVM IR: Triton's passes allocate shared memory there."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend
    target = triton.runtime.driver.active.get_current_target()
    backend = make_backend(target)
    source = self.ASTSource(self, signature, constexprs, attrs)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    name = self.fn.__name__
    row = dict(kernel=name, dtypes=",".join(sorted({str(t) for t in signature.values() if "fp" in str(t)})),
               warps=options.num_warps, stages=options.num_stages, meta=_describe(self, constexprs))
    start = time.perf_counter()
    try:
        module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                                backend.get_module_map(), context)
        stages = {}
        backend.add_stages(stages, options, source.language)
        metadata = {"hash": "check", "target": target, **options.__dict__}
        for stage in ("ttir", "ttgir", "llir"):
            module = stages[stage](module, metadata)
        row.update(shared=metadata["shared"], error="")
    except Exception as e:  # noqa: BLE001  (reported, and fails the check)
        row.update(shared=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    row["seconds"] = time.perf_counter() - start
    ROWS.append(row)
    return None  # nothing to launch


def _describe(fn, constexprs):
    names = [p.name for p in fn.params]
    keep = ("D", "C0", "C1", "ALIGN", "BLOCK_M", "BLOCK_N", "ONE_TILE", "HAS_INDEX", "PRECISION", "SILU", "BLOCK",
            "ROWS")
    pairs = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
    return " ".join(f"{k}={pairs[k]}" for k in keep if k in pairs)


def _run_every_config(self, *args, **kwargs):
    """Autotuner.run, trying every config its pruning keeps (where a GPU would time them)."""
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):
        self.fn.run(*args, **kwargs, **config.all_kwargs())


ROWS = []


def sd15_calls(dtype):
    """What training (fwd + bwd) and sampling (fwd) launch at 512 px: the UNet's attention as the
    model lays it out, conditions shared through an index (the stage-1 step), GroupNorm+SiLU of the
    UNet and VAE, GEGLU of every feed-forward."""
    from kernels.attention import CONDITIONS, SD15_SHAPES, attention
    from kernels.geglu import SD15_SHAPES as GEGLU_SHAPES
    from kernels.geglu import geglu
    from kernels.group_norm_silu import SD15_SHAPES as GN_SHAPES
    from kernels.group_norm_silu import group_norm_silu

    def made(rows, heads, length, d):  # a [B, L, H*D] projection viewed as [B, H, L, D]
        return torch.empty(rows, length, heads, d, dtype=dtype).transpose(1, 2).requires_grad_(True)

    for name, b, h, lq, lk, d in SD15_SHAPES:
        for index in ([None, CONDITIONS] if name.startswith("cross") else [None]):
            rows = len(set(index)) if index else b
            q, k, v = made(b, h, lq, d), made(rows, h, lk, d), made(rows, h, lk, d)
            o = attention(q, k, v, kv_index=torch.tensor(index) if index else None)
            torch.autograd.grad(o, (q, k, v), torch.empty_like(o))
    for shape in GN_SHAPES:
        x = torch.empty(shape, dtype=dtype, requires_grad=True)
        w, bias = (torch.empty(shape[1], dtype=dtype, requires_grad=True) for _ in range(2))
        for silu in (True, False):
            y = group_norm_silu(x, 32, w, bias, 1e-5, silu=silu)
            torch.autograd.grad(y, (x, w, bias), torch.empty_like(y))
    for shape in GEGLU_SHAPES:
        x = torch.empty(shape, dtype=dtype, requires_grad=True)
        y = geglu(x)
        torch.autograd.grad(y, x, torch.empty_like(y))


def check(arch=90, dtypes=("bf16", "fp16", "fp32", "fp64"), out=sys.stdout):
    """Compile everything; returns the list of failures (empty when all is well)."""
    triton.runtime.driver.set_active(TargetDriver(arch))
    jit.JITFunction._do_compile = _compile_to_llir
    autotuner.Autotuner.run = _run_every_config
    limit = LIMITS[arch]
    failures = []
    start = time.perf_counter()
    for name in dtypes:
        before = len(ROWS)
        sd15_calls(DTYPES[name])
        rows = ROWS[before:]
        if name == "fp64" and rows:  # the dispatcher must keep fp64 away from the kernels
            failures.append(f"fp64 reached {len(rows)} kernel launches: {rows[0]['kernel']}")
        for row in rows:
            over = row["shared"] is not None and row["shared"] > limit
            if row["error"] or over:
                failures.append(f"{name} {row['kernel']} {row['meta']} warps={row['warps']} stages={row['stages']}: "
                                + (row["error"] or f"{row['shared']} B of shared memory > {limit}"))
            print(f"{name:<5}{row['kernel']:<20}{row['meta']:<70}{row['warps']:>3}{row['stages']:>3}"
                  f"{row['shared'] if row['shared'] is not None else '-':>8}{row['seconds']:>6.2f}"
                  + (f"  {row['error']}" if row["error"] else "  OVER" if over else ""), file=out)
    print(f"sm_{arch}, triton {triton.__version__}: {len(ROWS)} variants compiled to LLVM IR in "
          f"{time.perf_counter() - start:.0f} s, largest shared memory "
          f"{max((r['shared'] or 0) for r in ROWS)} B (limit {limit}), {len(failures)} failures", file=out)
    return failures


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(LIMITS))
    p.add_argument("--dtypes", default="bf16,fp16,fp32,fp64")
    args = p.parse_args()
    problems = check(args.arch, args.dtypes.split(","))
    for problem in problems:
        print("FAIL", problem)
    sys.exit(1 if problems else 0)
