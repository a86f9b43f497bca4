"""Timing for the kernel benchmarks: median of CUDA-event timings after warm-up."""
import statistics

import torch


def time_ms(fn, warmup=10, iters=50):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
