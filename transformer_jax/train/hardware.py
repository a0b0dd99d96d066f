"""Peak FLOP/s of the chip a run is on, for MFU.

Accelerators: the published dense bf16 matmul peak per chip. CPUs: measured once, a jitted
f32 matmul in this process (the same way benchmarks/ measure it), cached for the process.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per chip (vendor figures), keyed by substrings of `device_kind`.
CHIP_PEAK_FLOPS = {
    "v4": 275e12,
    "v5 lite": 197e12,  # v5e
    "v5e": 197e12,
    "v5p": 459e12,
    "v6 lite": 918e12,  # Trillium
    "v6e": 918e12,
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l4": 121e12,
}


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


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    dev = jax.devices()[0]
    kind = dev.device_kind.lower()
    for key, peak in CHIP_PEAK_FLOPS.items():
        if key in kind:
            return peak, f"{dev.device_kind} published bf16 peak"
    if dev.platform == "cpu":
        # Fake CPU devices share the host's cores: the whole host's peak is the budget.
        return measured_matmul_peak() / jax.local_device_count(), "measured f32 matmul peak of this host"
    return float("nan"), f"unknown chip {dev.device_kind!r}"
