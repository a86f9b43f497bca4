"""The kernels compiled for a Hopper GPU (sm_90) with no GPU here: every config the launchers can
launch at SD1.5's shapes, in every dtype the dispatcher sends, must compile and fit the 232,448 B
of shared memory a block may have; fp64 must reach no kernel (kernels/compile_check.py). Two
processes side by side, each compiling half of the distinct variants (about 2 minutes on 2 cores).
A positive control shows the check names both problems when they are there. Also: autotune results
survive the process (the disk cache)."""
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run(*args, env=None):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**ENV, "PYTHONPATH": ROOT, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_every_launched_config_compiles_for_sm90_and_fits():
    procs = {shard: run("-m", "kernels.compile_check", "--arch", "90", "--dtypes", "bf16,fp16,fp32,fp64",
                        "--shard", shard) for shard in ("0/2", "1/2")}
    reports = {shard: p.communicate(timeout=900)[0] for shard, p in procs.items()}
    for shard, p in procs.items():
        summary = [line for line in reports[shard].splitlines() if line.startswith(("sm_90", "FAIL"))]
        assert p.returncode == 0, f"{shard}:\n" + "\n".join(summary or reports[shard].splitlines()[-20:])
        assert " 0 failures" in summary[0] and "variants compiled" in summary[0], summary


CONTROL = """
import io
import torch
import kernels.compile_check as check
import kernels.attention, kernels.geglu, kernels.group_norm_silu
kernels.attention.SD15_SHAPES[:] = []
kernels.group_norm_silu.SD15_SHAPES[:] = []
kernels.geglu.SD15_SHAPES[:] = [(1, 7, 2 * 40)]
kernels.geglu.KERNEL_DTYPES = (*kernels.geglu.KERNEL_DTYPES, torch.float64)  # a dispatcher that lets fp64 through
check.LIMITS[90] = 0  # every config that allocates shared memory is over this limit
for failure in check.check(90, ["bf16", "fp64"], out=io.StringIO()):
    print(failure)
"""


def test_the_compile_check_sees_what_it_checks_for():
    """Positive control: with a shared-memory limit of 0 B and a GEGLU dispatcher that lets fp64
    through, the check must name both problems (3 s: one small shape)."""
    out, _ = run("-c", CONTROL).communicate(timeout=300)
    failures = [line for line in out.splitlines() if line.startswith(("bf16", "fp64"))]
    assert any(line.startswith("fp64 reached") and "_geglu_fwd" in line for line in failures), out
    assert any(line.startswith("bf16 _geglu_fwd") and "B of shared memory > 0" in line for line in failures), out
    assert any(line.startswith("bf16 _geglu_bwd") and "B of shared memory > 0" in line for line in failures), out


TUNE_TWICE = """
import os, sys, json
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.runtime import autotuner, jit
import kernels.compile_check as check
triton.runtime.driver.set_active(check.TargetDriver(90))
jit.JITFunction._do_compile = lambda *a, **k: None  # nothing compiled or launched: the tuning itself is under test
timed = []
def fake_bench(self, *args, config, **kwargs):  # a timing per config, as a GPU would measure
    timed.append(str(config))
    return [float(len(timed))] * 3
autotuner.Autotuner._bench = fake_bench
from kernels.attention import attention
q = torch.empty(2, 1024, 8, 40, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
o = attention(q, q.detach().clone().requires_grad_(True), q.detach().clone().requires_grad_(True))
torch.autograd.grad(o, (q,), torch.empty_like(o))
print(json.dumps(timed))
"""


@pytest.mark.slow
def test_autotune_results_are_reused_by_a_new_process(tmp_path):
    """The first process times every config (here a stand-in timing: no GPU) and triton writes the
    results to its cache folder; a second process with the same folder times nothing. This checks
    our autotuners are set up for triton's disk cache and that its key is stable across processes;
    it does not time anything on a GPU."""
    import json
    import triton
    from kernels.attention import _CACHE
    if not _CACHE:
        pytest.skip(f"triton {triton.__version__}'s autotune has no cache_results")
    env = {"TRITON_CACHE_DIR": str(tmp_path / "cache")}
    first, second = (run("-c", TUNE_TWICE, env=env).communicate(timeout=300)[0] for _ in range(2))
    timed = [json.loads(out.strip().splitlines()[-1]) for out in (first, second)]
    assert len(timed[0]) >= 6, first  # forward, dQ, dK/dV: several configs each
    assert timed[1] == [], second
