"""bench.py and gpu_report.py where a CPU can check them: the table writer, argument errors, the
phases skipped without CUDA, and the torch.compile ways of the step and sampling comparison (the
kernel ways are skipped on CPU). No speed is asserted."""
import pytest
import torch

import bench
import gpu_report
from kernels.bench_util import Table
from model.errors import UserError


def test_table_writes_markdown_row_by_row(tmp_path):
    path = tmp_path / "t.md"
    table = Table("GEGLU, bf16", ["shape", "ours GB/s"], notes=["a note"], path=str(path))
    assert path.read_text().startswith("### GEGLU, bf16\n\nMeasured on CPU, torch " + torch.__version__ + ", triton ")
    table.add("[10, 64, 10240]", "1.5x|2")
    text = path.read_text()
    assert "| shape | ours GB/s |" in text and "|---|---|" in text and "| [10, 64, 10240] | 1.5x\\|2 |" in text
    assert "a note" in text and table.text().splitlines()[-1] == "[10, 64, 10240]     1.5x|2"
    with pytest.raises(ValueError, match="2 columns"):
        table.add("one cell")


def test_gpu_report_without_cuda_skips_every_phase(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        gpu_report.main([str(tmp_path / "out")])
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"gpu_report.py: phase {name} skipped: no CUDA device" for name, _ in gpu_report.PHASES]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Measured on CPU, torch" in summary and summary.count("skipped: no CUDA device") == len(gpu_report.PHASES)
    with pytest.raises(UserError, match="unknown tests2"):
        gpu_report.main([str(tmp_path / "out"), "--phases", "tests,tests2"])


@pytest.mark.slow  # a subprocess: 1 s
def test_gpu_report_phase_failure_is_written_and_the_budget_kills(tmp_path, monkeypatch):
    """A phase that fails, and one that outlives its budget: each one's error is in its file."""
    monkeypatch.setattr(gpu_report, "phase_command", lambda name, out: [
        "python", "-c", "import sys, time; print('went wrong'); sys.exit(3)" if name == "tests"
        else "import time; time.sleep(30)"])
    assert "exit code 3" in gpu_report.finish("tests", 20, str(tmp_path), *gpu_report.start("tests", str(tmp_path)))
    assert "timed out after 1 s" in gpu_report.finish("geglu", 1, str(tmp_path), *gpu_report.start("geglu", str(tmp_path)))
    tests, geglu = (tmp_path / "tests.md").read_text(), (tmp_path / "geglu.md").read_text()
    assert "error: phase tests failed: exit code 3" in tests and "went wrong" in tests
    assert "error: phase geglu failed: timed out after 1 s" in geglu
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geglu.md", "tests.md"]  # the logs are gone


def test_bench_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--compare", "--kernel_ops", "attention,softmax"])
    args = bench.parse_args(["--compare", "--backends", "eager,jax"])
    args.size = "tiny"
    with pytest.raises(UserError, match="unknown jax"):
        bench.bench_compare(args, "cpu", torch.float32)


@pytest.mark.slow
def test_compare_runs_the_compile_ways_on_cpu(tmp_path, capsys):
    """eager and torch.compile run on CPU (inductor's C++ backend); the kernel ways are skipped with
    one line. Each row is measured (no 'failed'), and the markdown file holds the same table."""
    args = bench.parse_args(["--compare", "--backends", "eager,compile,kernels,kernels+compile", "--iters", "1",
                             "--warmup", "1", "--markdown", str(tmp_path / "step.md")])
    args.size = "tiny"
    table = bench.bench_compare(args, "cpu", torch.float32)
    out = capsys.readouterr().out
    assert "kernel ways skipped: the Triton kernels need CUDA" in out
    assert [row[0] for row in table.rows] == ["eager", "compile"]
    assert all("failed" not in row for row in table.rows)
    assert (tmp_path / "step.md").read_text() == table.markdown()
