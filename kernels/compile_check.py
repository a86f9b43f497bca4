"""Compile every kernel configuration the code can launch at Stable Diffusion 1.5's shapes for a
GPU that is not here (sm_90: H100/H200), and check each one's shared memory against the target's.

    python -m kernels.compile_check [--arch 90] [--dtypes bf16,fp16,fp32]

The Triton interpreter (how the tests run without a GPU) compiles nothing, so it cannot see a
config that needs more shared memory than a block may have, or a dtype that does not compile.
Here the launchers run as in training and sampling, through a stand-in driver that reports the
target GPU: every launch compiles instead of running, and every config autotune would try (after its
pruning) is compiled. The tensors are on the meta device, so where the dispatcher sends a call to
torch (fp64, the routes to SDPA) nothing is computed. Each distinct variant (triton's specialisation
key: dtypes, constexprs, integer divisibility, options) is compiled once, however many shapes share
it; compilation stops where Triton has allocated shared memory, before the LLVM module, its -O3 and
ptxas (registers and spills are not checked); fp16 goes through the front end only (see
_compile_to_llir). `--shard i/n` splits the variants between n processes.
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


class _MLIRDone(Exception):
    """Raised where Triton turns its MLIR into an LLVM module: shared memory is decided by then."""


def _stop_before_llvm(*args, **kwargs):
    raise _MLIRDone


SEEN = set()  # specialisation keys compiled in this process
SHARD = (0, 1)  # (i, n): this process compiles the i-th of every n new variants


def _compile_to_llir(self, key, signature, device, constexprs, options, attrs, warmup):
    """JITFunction._do_compile up to Triton's lowering to the LLVM dialect, where shared memory is
    allocated. Each variant is compiled once per process, by its specialisation key (what triton
    caches a compiled kernel under: the dtypes, constexprs, integer divisibility, options), so shape
    classes that share a variant share its compile. fp16 stops after the front end (ttir): its tiles
    are the same size as bf16's, which compiles the whole way, so what fp16 can add is a type error."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend
    dtypes = sorted({str(t) for t in signature.values() if "fp" in str(t)})
    variant = (self.fn.__name__, key, str(sorted(options.__dict__.items(), key=str)))
    if "fp64" not in dtypes:  # every fp64 launch is recorded: none may happen
        if variant in SEEN:
            return None
        SEEN.add(variant)
        if (len(SEEN) - 1) % SHARD[1] != SHARD[0]:
            return None  # another process compiles this one
    target = triton.runtime.driver.active.get_current_target()
    backend = make_backend(target)
    source = self.ASTSource(self, signature, constexprs, attrs)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    name = self.fn.__name__
    row = dict(kernel=name, dtypes=",".join(dtypes), warps=options.num_warps, stages=options.num_stages,
               meta=_describe(self, constexprs))
    last = "ttir" if "fp16" in dtypes else "llir"
    start = time.perf_counter()
    try:
        module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                                backend.get_module_map(), context)
        stages = {}
        backend.add_stages(stages, options, source.language)
        metadata = {"hash": "check", "target": target, **options.__dict__}
        for stage in ("ttir", "ttgir", "llir")[:("ttir", "ttgir", "llir").index(last) + 1]:
            try:
                module = stages[stage](module, metadata)
            except _MLIRDone:  # the LLVM module and its -O3 would only optimise code: skipped
                pass
        row.update(shared=module.get_int_attr("ttg.shared") if last == "llir" else None, error="")
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


def sd15_calls(dtype, device):
    """What training (fwd + bwd) and sampling (fwd) launch at 512 px: the UNet's attention as the
    model lays it out, conditions shared through an index (the stage-1 step), GroupNorm+SiLU of the
    UNet and VAE, GEGLU of every feed-forward."""
    from kernels.attention import CONDITIONS, SD15_SHAPES, attention
    from kernels.geglu import SD15_SHAPES as GEGLU_SHAPES
    from kernels.geglu import geglu
    from kernels.group_norm_silu import SD15_SHAPES as GN_SHAPES
    from kernels.group_norm_silu import group_norm_silu

    def made(rows, heads, length, d):  # a [B, L, H*D] projection viewed as [B, H, L, D]
        return torch.empty(rows, length, heads, d, dtype=dtype, device=device).transpose(1, 2).requires_grad_(True)

    for name, b, h, lq, lk, d in SD15_SHAPES:
        for index in ([None, CONDITIONS] if name.startswith("cross") else [None]):
            rows = len(set(index)) if index else b
            q, k, v = made(b, h, lq, d), made(rows, h, lk, d), made(rows, h, lk, d)
            o = attention(q, k, v, kv_index=torch.tensor(index, device=device) if index else None)
            torch.autograd.grad(o, (q, k, v), torch.empty_like(o))
    for shape in GN_SHAPES:
        x = torch.empty(shape, dtype=dtype, device=device, requires_grad=True)
        w, bias = (torch.empty(shape[1], dtype=dtype, device=device, requires_grad=True) for _ in range(2))
        for silu in (True, False):
            y = group_norm_silu(x, 32, w, bias, 1e-5, silu=silu)
            torch.autograd.grad(y, (x, w, bias), torch.empty_like(y))
    for shape in GEGLU_SHAPES:
        x = torch.empty(shape, dtype=dtype, device=device, requires_grad=True)
        y = geglu(x)
        torch.autograd.grad(y, x, torch.empty_like(y))


def check(arch=90, dtypes=("bf16", "fp16", "fp32", "fp64"), out=sys.stdout, shard=(0, 1)):
    """Compile everything (shard (i, n): the i-th of every n distinct variants, so that n processes
    share the work); returns the list of failures (empty when all is well)."""
    global SHARD
    SHARD = shard
    import triton.backends.nvidia.compiler as nvidia_compiler
    triton.runtime.driver.set_active(TargetDriver(arch))
    nvidia_compiler.llvm.to_module = _stop_before_llvm  # this process only: the MLIR is all it needs
    jit.JITFunction._do_compile = _compile_to_llir
    autotuner.Autotuner.run = _run_every_config
    limit = LIMITS[arch]
    failures = []
    start = time.perf_counter()
    for name in dtypes:
        before = len(ROWS)
        sd15_calls(DTYPES[name], device="meta")  # no data: kernels compile, torch's paths compute nothing
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
    print(f"sm_{arch}, triton {triton.__version__}, shard {shard[0]}/{shard[1]}: {len(ROWS)} variants compiled in "
          f"{time.perf_counter() - start:.0f} s, largest shared memory "
          f"{max((r['shared'] or 0 for r in ROWS), default=0)} B (limit {limit}), {len(failures)} failures", file=out)
    return failures


def precompile(dtypes, shard):
    """On a machine with the GPU: compile (ptxas included) this shard of every variant the SD1.5
    shapes launch, into triton's cache on disk, launching and timing nothing; n such processes side by
    side fill the cache in about 1/n of the time, and the first real launch of each then only loads it
    (autotuning still times the configs then, on an idle GPU)."""
    global SHARD
    SHARD = shard
    real_compile = jit.JITFunction._do_compile

    def compile_shard(self, key, signature, device, constexprs, options, attrs, warmup):
        variant = (self.fn.__name__, key, str(sorted(options.__dict__.items(), key=str)))
        if variant not in SEEN:
            SEEN.add(variant)
            if (len(SEEN) - 1) % SHARD[1] == SHARD[0]:
                real_compile(self, key, signature, device, constexprs, options, attrs, True)
                ROWS.append(variant)
        return None

    def warm_every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **{**kwargs, "warmup": True}, **config.all_kwargs())

    jit.JITFunction._do_compile = compile_shard
    autotuner.Autotuner.run = warm_every_config
    start = time.perf_counter()
    for name in dtypes:
        sd15_calls(DTYPES[name], device="cuda")
    print(f"precompiled {len(ROWS)} variants (shard {shard[0]}/{shard[1]}) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(LIMITS))
    p.add_argument("--dtypes", default="bf16,fp16,fp32,fp64")
    p.add_argument("--shard", default="0/1", help="i/n: compile the i-th of every n distinct variants")
    p.add_argument("--precompile", action="store_true",
                   help="on the GPU's machine: fill triton's cache for the real device instead of checking")
    args = p.parse_args()
    i, n = (int(v) for v in args.shard.split("/"))
    if args.precompile:
        precompile([d for d in args.dtypes.split(",") if d != "fp64"], (i, n))
        sys.exit(0)
    problems = check(args.arch, args.dtypes.split(","), shard=(i, n))
    for problem in problems:
        print("FAIL", problem)
    sys.exit(1 if problems else 0)
