"""Timing for the kernel benchmarks: triton's do_bench (warm-up, cache flush between runs, CUDA
events), reporting the median."""
from triton.testing import do_bench


def time_ms(fn):
    return do_bench(fn, return_mode="median")
