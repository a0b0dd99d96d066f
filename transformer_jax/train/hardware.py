"""Chips: peak FLOP/s for MFU, and the figures `transformer-jax plan` predicts with.

Accelerators: published per-chip figures (dense bf16 matmul peak, HBM capacity and
bandwidth, interconnect). TPU figures are those of "How to Scale Your Model" (Austin et
al. 2025, ch. 2) and Google's Cloud TPU pages; GPU figures are NVIDIA's SXM datasheets
(dense, no sparsity). CPUs: measured once in this process (a jitted matmul, a jitted
copy), cached, and split evenly over the fake devices that share the host; the matmul
peak is measured once per host and kept on disk (`host_matmul_peak`).

`link_bandwidth` is the bytes per second one chip moves into a ring collective along one
mesh axis: on a TPU torus both neighbours at once (2 x the one-way ICI link figure, an
axis with wraparound); on an NVSwitch GPU node the one-way NVLink bandwidth. Axes that
cross hosts (DCN, InfiniBand) are slower; `plan` says so rather than guess.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 matmul FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s per chip along one mesh axis (see the module docstring)
    usable_fraction: float  # of HBM the runtime leaves to arrays
    source: str
    # Fraction of peak a training step's matmuls reach (plan's compute time). Accelerators: an
    # assumption (large bf16 GEMMs on cuBLAS / the MXU run at ~75-90% of peak), not a
    # measurement; CPU: CPU_MATMUL_EFFICIENCY.
    matmul_efficiency: float = 0.8
    overlaps_collectives: bool = True  # async weight gathers / gradient scatters hide behind compute


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", 275e12, 32 * GIB, 1.2e12, 2 * 4.5e10, 0.95, "TPU v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1.2 TB/s, ICI 45 GB/s/link one-way"),
    Chip("v5e", 197e12, 16 * GIB, 8.1e11, 2 * 4.5e10, 0.95, "TPU v5e: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, ICI 45 GB/s/link one-way"),
    Chip("v5p", 459e12, 95 * GIB, 2.76e12, 2 * 9e10, 0.95, "TPU v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2.76 TB/s, ICI 90 GB/s/link one-way"),
    Chip("v6e", 918e12, 32 * GIB, 1.64e12, 2 * 9e10, 0.95, "TPU v6e (Trillium): 918 TFLOP/s bf16, 32 GiB HBM at 1.64 TB/s, ICI 90 GB/s/link one-way"),
    # JAX preallocates 75% of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise;
    # launch/gpu_slurm.sbatch sets it to 0.90.
    Chip("a100", 312e12, 80 * GIB, 2.039e12, 300e9, 0.90, "A100 SXM4 80GB: 312 TFLOP/s bf16, 2.04 TB/s, NVLink3 300 GB/s one-way"),
    Chip("h100", 989e12, 80 * GIB, 3.35e12, 450e9, 0.90, "H100 SXM5: 989 TFLOP/s bf16 dense, 80 GiB HBM3 at 3.35 TB/s, NVLink4 450 GB/s one-way"),
    Chip("h200", 989e12, 140 * GIB, 4.8e12, 450e9, 0.90, "H200 SXM: 989 TFLOP/s bf16 dense, 141 GB HBM3e at 4.8 TB/s, NVLink4 450 GB/s one-way"),
)}

# `device_kind` substrings -> chip, most specific first ("TPU v5 lite" is a v5e, "TPU v5" a v5p).
_KINDS = (("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("tpu v5", "v5p"), ("v6 lite", "v6e"),
          ("v6e", "v6e"), ("tpu v4", "v4"), ("h200", "h200"), ("h100", "h100"), ("a100", "a100"))
# Dense bf16 peak per chip, keyed by substrings of `device_kind` (kept for callers of the old table).
CHIP_PEAK_FLOPS = {**{kind: CHIPS[name].peak_flops for kind, name in _KINDS}, "l4": 121e12}


def chip_for_device_kind(kind: str) -> Chip | None:
    kind = kind.lower()
    if "h100" in kind and "pcie" in kind:
        return dataclasses.replace(CHIPS["h100"], name="h100-pcie", peak_flops=756e12, hbm_bandwidth=2.0e12,
                                   source="H100 PCIe: 756 TFLOP/s bf16 dense, 2.0 TB/s")
    for key, name in _KINDS:
        if key in kind:
            return CHIPS[name]
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 1024, dtype: str = "float32", seconds: float = 0.5) -> float:
    """FLOP/s of a jitted n x n x n matmul on the default device (best of repeated runs)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


PEAK_CACHE = "host_peak.json"


@functools.lru_cache(maxsize=None)
def host_matmul_peak() -> float:
    """This host's f32 matmul FLOP/s, measured once (best of 2 s of runs) and kept in
    `<data cache>/host_peak.json` keyed by CPU, core count and jax version, so that MFU is
    always against the same figure, not one measured under whatever load a run starts with.
    Delete the file to measure again."""
    path = host_peak_cache_path()
    key = f"{_cpu_name()} | {os.cpu_count()} cores | jax {jax.__version__}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key])
    peak = measured_matmul_peak(seconds=2.0)
    cache[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measured again next time
    return peak


def host_peak_cache_path() -> Path:
    root = os.environ.get("TRANSFORMER_JAX_DATA_DIR") or "~/.cache/transformer_jax"
    return Path(root).expanduser() / PEAK_CACHE


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def measured_memory_bandwidth(mib: int = 64, seconds: float = 0.3) -> float:
    """Bytes/s read + written by a jitted elementwise op over `mib` MiB on the default device."""
    x = jnp.ones((mib * 2 ** 18,), jnp.float32)
    f = jax.jit(lambda x: x * 1.5 + 1.0)
    f(x).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def available_host_bytes() -> float:
    """Memory a new allocation can get now (MemAvailable; the total where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return host_memory_bytes()


def free_device_bytes() -> tuple[float, str]:
    """(bytes one local device can still allocate, where that figure comes from): the runtime's
    bytes_limit - bytes_in_use on a GPU or TPU; on CPU the host's available memory, which its
    local devices share."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"free on the {device.device_kind}"
    n = jax.local_device_count()
    return available_host_bytes() / n, "available on this host" + (f" per device ({n} devices)" if n > 1 else "")


# A guess, used only by plan.predict() on figures without timed parts: `plan --chip cpu`
# times the step's own matmuls, memory-bound ops and collectives instead (plan_cpu.py).
CPU_MATMUL_EFFICIENCY = 0.7


def cpu_chip(devices: int = 1) -> Chip:
    """This host measured, split over `devices` fake devices (they share its cores and RAM;
    XLA:CPU's collectives are synchronous copies: nothing overlaps)."""
    peak, bw = host_matmul_peak(), measured_memory_bandwidth()
    return Chip("cpu", peak / devices, host_memory_bytes() / devices, bw / devices, bw / devices, 0.9,
                f"this host, measured: {peak / 1e9:.0f} GFLOP/s f32 matmul, {bw / 1e9:.1f} GB/s memory, "
                f"{host_memory_bytes() / GIB:.0f} GiB RAM, shared by {devices} device(s)",
                matmul_efficiency=CPU_MATMUL_EFFICIENCY, overlaps_collectives=False)


def get_chip(name: str, devices: int = 1) -> Chip:
    """A chip of the table by name (v4, v5e, v5p, v6e, a100, h100, h200) or "cpu" (measured)."""
    name = name.lower()
    if name == "cpu":
        return cpu_chip(devices)
    if name not in CHIPS:
        raise ValueError(f"chip={name!r} is unknown; choose one of {', '.join([*CHIPS, 'cpu'])}")
    return CHIPS[name]


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    dev = jax.devices()[0]
    chip = chip_for_device_kind(dev.device_kind)
    if chip is not None:
        return chip.peak_flops, f"{dev.device_kind} published bf16 peak"
    for key, peak in CHIP_PEAK_FLOPS.items():
        if key in dev.device_kind.lower():
            return peak, f"{dev.device_kind} published bf16 peak"
    if dev.platform == "cpu":
        # Fake CPU devices share the host's cores: the whole host's peak is the budget.
        peak = host_matmul_peak()
        return peak / jax.local_device_count(), (f"the f32 matmul peak of this host, measured once "
                                                 f"(cached in {host_peak_cache_path()})")
    return float("nan"), f"unknown chip {dev.device_kind!r}"
