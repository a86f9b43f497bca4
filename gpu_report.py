"""Everything a first GPU session should measure, in one command, each table written to a folder.

    python gpu_report.py OUTDIR              # about 8 minutes on one H200

Phases, each in a process of its own with its own time budget, so that one slow or broken phase
cannot take the others' time or output with it (its error goes into its file, the next one runs):

  precompile  every kernel variant SD1.5's shapes launch, compiled into triton's cache by parallel
              processes (runs beside the tests: it needs CPU cores, they need the GPU)
  tests       the CUDA kernel tests: tests/test_kernels.py, tests/test_kernels_in_model.py
  attention   ours vs every SDPA backend, eager and torch.compile, fwd and fwd+bwd, TFLOP/s and GB/s
  group_norm_silu, geglu   ours vs eager and torch.compile, GB/s
  step        the stage-1 step and 50-step sampling: eager, torch.compile, our kernels, both

OUTDIR gets one markdown file per phase (device, torch and triton versions in each) and summary.md.
Without CUDA every phase is skipped with a line saying so, and the exit code is 1.
"""
import argparse
import os
import subprocess
import sys
import time

from model import run
from model.errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
PRECOMPILE_PROCESSES = 12  # of the machine's 16 cores: the tests beside them compile on their own
# (name, seconds): the budgets add up to about 8 minutes, precompile running beside the tests
# and the step last with the most: inductor compiles the SD1.5 UNet once per batch size and grad mode
PHASES = [("precompile", 150), ("tests", 150), ("attention", 90), ("group_norm_silu", 35), ("geglu", 25),
          ("step", 200)]


def phase_command(name, out):
    """The command of a phase (run from the repository root); its tables go to out/<name>.md."""
    python = sys.executable
    if name == "precompile":
        return [python, "-c", "import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-m', "
                "'kernels.compile_check', '--precompile', '--dtypes', 'bf16,fp32', '--shard', f'{i}/{n}']) "
                f"for n in [{PRECOMPILE_PROCESSES}] for i in range(n)]; "
                "sys.exit(max(p.wait() for p in ps))"]
    if name == "tests":
        return [python, "-m", "pytest", "-q", "tests/test_kernels.py", "tests/test_kernels_in_model.py"]
    if name in ("attention", "group_norm_silu", "geglu"):
        return [python, "-c", f"from kernels.{name} import benchmark; benchmark(path={os.path.join(out, name + '.md')!r})"]
    # the ways that compile least first: a step cut short by its budget keeps their rows
    return [python, "bench.py", "--compare", "--backends", "eager,kernels,compile,kernels+compile", "--iters", "5",
            "--warmup", "2", "--markdown", os.path.join(out, "step.md")]


def write_outcome(out, name, seconds, code, output, started):
    """Appends how the phase ended, and the tail of what it printed, to its file (made if need be)."""
    path = os.path.join(out, f"{name}.md")
    status = "ok" if code == 0 else f"timed out after {seconds} s" if code is None else f"exit code {code}"
    with open(path, "a") as f:
        if code != 0:
            f.write(f"\nerror: phase {name} failed: {status}\n")
        f.write(f"\n<details><summary>{name}: {status}, {time.time() - started:.0f} s, output (last 60 lines)"
                "</summary>\n\n```\n" + "\n".join(output.splitlines()[-60:]) + "\n```\n</details>\n")
    return status


def start(name, out):
    log = open(os.path.join(out, f".{name}.log"), "w+")
    proc = subprocess.Popen(phase_command(name, out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    return proc, log, time.time()


def finish(name, budget, out, proc, log, started):
    """Waits for the phase within its budget (from its start), kills it past that; its outcome line."""
    try:
        code = proc.wait(timeout=max(1, budget - (time.time() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    log.seek(0)
    output = log.read()
    log.close()
    os.remove(log.name)
    return f"| {name} | {budget} | {time.time() - started:.0f} | " \
           f"{write_outcome(out, name, budget, code, output, started)} |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for the tables (made if missing)")
    p.add_argument("--phases", default=",".join(n for n, _ in PHASES), help="which phases, in their order")
    args = p.parse_args(argv)
    budgets = dict(PHASES)
    phases = args.phases.split(",")
    unknown = [n for n in phases if n not in budgets]
    if unknown:
        raise UserError(f"--phases: unknown {', '.join(unknown)}; the phases are {', '.join(budgets)}")
    os.makedirs(args.out, exist_ok=True)
    import torch
    from kernels.bench_util import environment
    lines = ["# GPU report", "", f"Measured on {environment()}.", "", "| phase | budget s | took s | outcome |",
             "|---|---|---|---|"]
    if not torch.cuda.is_available():
        for name in phases:
            print(f"gpu_report.py: phase {name} skipped: no CUDA device")
            lines.append(f"| {name} | {budgets[name]} | 0 | skipped: no CUDA device |")
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        raise UserError("no CUDA device here: every phase skipped, nothing measured")
    background = start("precompile", args.out) if "precompile" in phases else None
    for name in phases:
        if name == "precompile":
            continue
        if name != "tests" and background:  # the tables want the compiled kernels and idle cores
            lines.append(finish("precompile", budgets["precompile"], args.out, *background))
            background = None
        lines.append(finish(name, budgets[name], args.out, *start(name, args.out)))
        print(lines[-1], flush=True)
    if background:
        lines.append(finish("precompile", budgets["precompile"], args.out, *background))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run.report_user_errors()
    main()
