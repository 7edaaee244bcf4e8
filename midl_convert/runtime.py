"""A model's runtime, measured: time per forward and peak memory, on the device its weights are on.

Time comes from rounds of interleaved calls (``interleaved_rounds``), shared with the per-layer
timings of ``latency.py``, so drift on a shared machine hits the dense and the converted model
alike. Memory is the weights' bytes (``weight_bytes``, each storage once) plus the peak of the
tensors one forward allocates.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .data import Batch
from .running import run_model

WARMUP_S, WARMUP_MAX = 0.25, 100  # warm each model this long (thread pools, caches, cuDNN plans), in at most so many runs


def interleaved_rounds(fns: Sequence[Callable[[], Any]], repeats: int, calls: int = 1,
                       sync: Callable[[], None] = lambda: None, advance: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Seconds per call of each function in each of ``repeats`` rounds. In a round the functions run
    in turn (order reversed every other round), so drift hits all of them; each sample is ``calls``
    calls between two ``sync``s; ``advance`` runs after each round (a progress bar)."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for j in (range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))):
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fns[j]()
            sync()
            times[j].append((time.perf_counter() - start) / calls)
        advance()
    return times


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each stretch of storage once: a tied weight, or a
    buffer that is a view of a parameter, is memory the model holds (and a call reads) once."""
    spans: dict[Any, list[tuple[int, int]]] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.numel() == 0:
            continue
        size = t.element_size()
        start = t.storage_offset() * size
        end = start + size * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))
        ptr = t.untyped_storage().data_ptr()
        spans.setdefault((t.device, ptr) if ptr else id(t), []).append((start, end))  # meta tensors have no storage
    total = 0
    for stretch in spans.values():
        reach = 0
        for start, end in sorted(stretch):
            total += max(0, end - max(start, reach))
            reach = max(reach, end)
    return total


def measure(student: nn.Module, teacher: nn.Module, batch: Batch, sizes: Sequence[int], repeats: int, device: torch.device,
            advance: Callable[[], None] = lambda: None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latency (interleaved teacher/student runs) and peak memory at each batch size."""
    lat, mem = [], []
    for size in sizes:
        b = batch.resized(size)
        warm = _warm_up((teacher, student), b, device)
        times = _interleaved(teacher, student, b, repeats, device, advance)
        t, s = _timing(times[0]), _timing(times[1])
        lat.append({"batch_size": size, "warmup_runs": warm, "teacher": t, "student": s,
                    "speedup": t["median_ms"] / s["median_ms"] if s["median_ms"] else None})
        mem.append({"batch_size": size, "teacher": _peak_memory(teacher, b, device), "student": _peak_memory(student, b, device)})
    name = device_name(device)
    timer = "time.perf_counter" + (" with torch.cuda.synchronize" if device.type == "cuda" else "")
    method = (
        "torch.cuda.max_memory_allocated minus memory allocated before the forward, plus parameter and buffer bytes"
        if device.type == "cuda" else
        "torch.profiler (profile_memory=True): peak of the running sum of CPU tensor allocations during one forward, "
        "plus parameter and buffer bytes"
    )
    return ({"device": name, "timer": timer, "repeats": repeats, "results": lat},
            {"device": name, "method": method, "results": mem})


def device_name(device: torch.device) -> str:
    """The device as a report names it: the GPU's model, or the CPU and its thread count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@torch.no_grad()
def _interleaved(teacher: nn.Module, student: nn.Module, batch: Batch, repeats: int, device: torch.device,
                 advance: Callable[[], None]) -> list[list[float]]:
    """Milliseconds per forward of teacher and student, one forward per sample."""
    times = interleaved_rounds([lambda: run_model(teacher, batch), lambda: run_model(student, batch)], repeats,
                               sync=lambda: _sync(device), advance=advance)
    return [[t * 1e3 for t in ts] for ts in times]


@torch.no_grad()
def _warm_up(models: Sequence[nn.Module], batch: Batch, device: torch.device) -> int:
    """Run the models in turn for ``WARMUP_S`` seconds (at least twice each): the first calls are slow."""
    start, runs = time.perf_counter(), 0
    while runs < 2 or (time.perf_counter() - start < WARMUP_S and runs < WARMUP_MAX):
        for m in models:
            run_model(m, batch)
        _sync(device)
        runs += 1
    return runs


def _timing(ms: list[float]) -> dict[str, float]:
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": min(ms)}


@torch.no_grad()
def _peak_memory(model: nn.Module, batch: Batch, device: torch.device) -> dict[str, int | None]:
    weights = weight_bytes(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_model(model, batch)
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        extra = _cpu_forward_peak(model, batch)
    return {"weights_bytes": weights, "forward_peak_bytes": extra, "peak_bytes": weights + extra}


def _cpu_forward_peak(model: nn.Module, batch: Batch) -> int:
    """Peak bytes of CPU tensors alive at once during one forward, from the profiler's allocation events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_model(model, batch)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler library's own C++ log lines (profiler_start, gpuGetDeviceCount) on fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["device_name", "interleaved_rounds", "measure", "weight_bytes"]
