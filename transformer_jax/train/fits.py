"""Does a compiled step fit the memory a device has free? Said in one line before the step runs.

The need is what the step allocates beyond the state the device already holds: XLA's
temporaries plus outputs that do not reuse a donated input (`plan`'s peak bytes less the
arguments). What is free comes from `hardware.free_device_bytes` (the runtime's counters on a
GPU or TPU, the host's MemAvailable on CPU). Without this check a step that cannot fit ends in
a RESOURCE_EXHAUSTED traceback at its first run.
"""
from __future__ import annotations

from transformer_jax.config import ConfigError
from transformer_jax.train.hardware import free_device_bytes


def check_fits(compiled, what: str, closing=()) -> None:
    """A ConfigError naming the settings that size the step, before it runs, when XLA's memory
    analysis of `compiled` needs more than a device has free (beyond the state it already holds:
    temporaries plus outputs that do not reuse a donated input). `closing` are closed first."""
    mem = compiled.memory_analysis()
    if mem is None:  # a backend without the analysis: the runtime's own error will have to do
        return
    need = mem.temp_size_in_bytes + max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0)
    free, source = free_device_bytes()
    if need <= free:
        return
    for c in closing:
        c.close()
    raise ConfigError(f"the {what} needs {need / 2**30:,.1f} GiB per device beyond the model state (XLA's memory "
                      f"analysis), more than the {free / 2**30:,.1f} GiB {source}; lower train.global_batch_size "
                      "or train.seq_len, set model.remat=full, or shard over more devices (mesh)")
