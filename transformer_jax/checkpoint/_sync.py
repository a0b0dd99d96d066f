"""Tiny multi-process helpers: process 0 decides, everyone agrees. No-ops with one process."""
from __future__ import annotations

import jax
import numpy as np


def is_primary() -> bool:
    return jax.process_index() == 0


def broadcast_int(value: int) -> int:
    """Process 0's `value`, on every process (a collective: call it on all of them)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective: call it on all of them)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
    return bool(np.any(flags))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_text(text: str, size: int = 512) -> list[str]:
    """Every process's `text` (utf-8, cut to `size` bytes), on every process (a collective)."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    raw = np.zeros(size, np.uint8)
    data = text.encode()[:size]
    raw[:len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(raw))
    return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in rows]
