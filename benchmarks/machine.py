"""What the machine can do: peak fp32 FLOP rate (measured and theoretical) and peak memory of a call."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable

import torch

# fp32 FLOP per cycle and core: 2 FMA pipes x vector lanes x 2 (multiply and add). Zen 4 runs
# AVX-512 on 256-bit halves, so its rate equals AVX2's; that is the assumption for AMD.
FP32_FLOP_PER_CYCLE = {"avx512f": 64, "avx2": 32, "avx": 16}
AMD_AVX512_FLOP_PER_CYCLE = 32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def square_matmul(device: torch.device, size: int = 2048) -> tuple[Callable[[], object], int]:
    """A large fp32 matmul and its FLOP count: the rate the BLAS reaches is the machine's practical peak."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    return (lambda: a @ b), 2 * size**3


def measured_peak_gflops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """The best rate of ``repeats`` square matmuls, after three untimed ones."""
    call, flops = square_matmul(device, size)
    for _ in range(3):
        call()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def theoretical_cpu_peak() -> dict | None:
    """cores x GHz x FLOP/cycle from lscpu (max MHz, else the TSC rate behind BogoMIPS / 2); None off Linux."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("Flags", "").split())
    vector = next((flag for flag in FP32_FLOP_PER_CYCLE if flag in flags), None)
    if vector is None:
        return None
    per_cycle = FP32_FLOP_PER_CYCLE[vector]
    if vector == "avx512f" and fields.get("Vendor ID") == "AuthenticAMD":
        per_cycle = AMD_AVX512_FLOP_PER_CYCLE
    if "CPU max MHz" in fields:
        ghz, clock = float(fields["CPU max MHz"]) / 1000, "CPU max MHz"
    elif "BogoMIPS" in fields:
        ghz, clock = float(fields["BogoMIPS"]) / 2000, "BogoMIPS / 2 (the TSC rate; boost clocks are higher)"
    else:
        return None
    cores = len(os.sched_getaffinity(0))
    return {
        "gflops": cores * ghz * per_cycle,
        "cores": cores,
        "ghz": ghz,
        "flop_per_cycle": per_cycle,
        "derivation": f"{cores} cores x {ghz:.2f} GHz ({clock}) x {per_cycle} fp32 FLOP/cycle ({vector})",
        "model": fields.get("Model name", ""),
    }


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for its dynamic threshold on 64-bit


@contextlib.contextmanager
def rss_tracks_live_memory():
    """Make freed tensors leave the resident set at once (glibc only; elsewhere a no-op).

    glibc serves a large block from the heap, where a free keeps the pages, once its dynamic mmap
    threshold has risen; the resident set then no longer falls when tensors die, and a second
    call's peak reads as ~0. A low fixed threshold puts every tensor of 64 KiB or more in its own
    mapping, returned on free. Afterwards both thresholds are set where glibc's own adjustment
    ends for large blocks (mmap 32 MiB, trim twice that): left at the fixed-threshold trim default
    (128 KiB), every step would hand its activations back to the kernel and fault them in again.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 2**10)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mb(call: Callable[[], object], device: torch.device) -> float:
    """Memory a call adds at its peak: CUDA's allocator high-water mark, or on a CPU the resident set
    size sampled every millisecond by a thread (tracemalloc does not see torch's allocations)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    with rss_tracks_live_memory():
        return _sampled_rss_peak_mb(call)


def _sampled_rss_peak_mb(call: Callable[[], object]) -> float:
    before = _rss_bytes()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], _rss_bytes()) - before) / 2**20


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read())
        return found.group(1) if found else ""
    except OSError:
        return ""
