"""Timing helpers shared by the GPU benchmarks.

Rules every benchmark here follows (see bench/README.md):
* time on the GPU with CUDA graphs (replays of a captured graph, timed by CUDA events);
* rotate among enough copies of the weights that together they exceed the L2 cache,
  so that each replay reads its weights from device memory, as serving does;
* report the median over many replays, never the mean of a few;
* never time on zeros (random inputs only).
"""
from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch

L2_BYTES_H100 = 50 * 2**20  # H100 SXM: 50 MiB of L2; H200 has 60 MiB


def copies_to_exceed_l2(bytes_per_copy: int, device: torch.device | None = None) -> int:
    """How many copies of a weight set make their sum at least 3x the L2 cache."""
    l2 = L2_BYTES_H100
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device or 0)
        l2 = getattr(props, "L2_cache_size", l2) or l2
    return max(2, -(-3 * l2 // max(bytes_per_copy, 1)))


def graph_median_us(calls: Sequence[Callable[[], object]], replays: int = 50, warmup: int = 3) -> float:
    """Median time in microseconds of one call, measured through CUDA graph replays.

    ``calls`` holds one closure per weight copy; the graph captures all of them back to back,
    so one replay touches every copy once and the reported time is the replay divided by the
    number of copies (the copies rotate, so no call finds its weights in L2).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph: compilation, autotuning, handles
        for _ in range(warmup):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()

    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / len(calls))
    return statistics.median(times)


def do_bench_median_us(fn: Callable[[], object]) -> float:
    """Median of ``triton.testing.do_bench`` in microseconds (for work that cannot be captured)."""
    import triton

    return triton.testing.do_bench(fn, return_mode="median") * 1000.0


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
