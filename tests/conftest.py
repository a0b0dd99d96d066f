"""Every test sees 8 fake CPU devices, standing in for a pod slice.

The flag must be set before JAX initialises its backends, so it lives here, at import.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)
