"""Every test sees 8 fake CPU devices, standing in for a pod slice.

The settings must be made before JAX initialises its backends, so they live here, at import.
XLA's CPU backend spends seconds in LLVM optimising every program (threefry RNG code most of
all); tests run tiny models, so they compile at optimisation level 0, about 10x faster to
compile. Subprocesses started by tests inherit it through XLA_FLAGS.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)
