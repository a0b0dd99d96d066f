"""`PreemptionGuard`: turn SIGTERM/SIGINT into a flag so the trainer can stop cleanly.

    with PreemptionGuard() as guard:
        for step in range(start, total):
            state = train_step(state, batch)
            if guard.should_stop_all(step):          # every process, every step
                ckpt.save(step, state, data_state=it.get_state(), config_json=cfg.to_json())
                ckpt.wait_until_finished()
                break

The handlers only set a flag (nothing unsafe runs inside a signal handler); a second
SIGINT raises KeyboardInterrupt, for a person pressing Ctrl-C twice. On exit the
previous handlers are put back.

Multi-host: a signal reaches the hosts at different moments, so a host must not stop on
its own flag (the others would block in the next collective). `should_stop_all(step)` is a
collective that every process calls at the same step; it is true everywhere when any
process saw a signal, `request_stop()` was called on any process, or JAX's preemption
service (`jax.distributed` with preemption sync, e.g. Cloud TPU maintenance events)
reached its sync point for `step` (via orbax's `reached_preemption`; pass `step` only if
you call it at every step, as JAX's sync point requires). With one process it is just the
local flag. Its all-gather of one int is cheap, but the host waits there for the device:
call it every few steps, at the same steps on every host. (The trainer uses
`transformer_jax.train.stop.StopControl`, which also agrees on the wall-clock budget.) Note: installing the guard replaces any SIGTERM
handler installed outside Python (JAX's own preemption notifier among them); the flag
then carries the signal instead.
"""
from __future__ import annotations

import signal
import threading
from typing import Sequence

import jax

from transformer_jax.checkpoint import _sync


class PreemptionGuard:
    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self._old: dict[int, object] = {}
        self._stop = threading.Event()
        self.received: int | None = None  # the first signal number seen

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread (Python delivers signals there)")
        for sig in self.signals:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            # None: the old handler was installed outside Python (e.g. by a C++ library); it
            # cannot be put back, so the default action is restored instead.
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        self._old.clear()

    def reclaim(self) -> None:
        """Installs the handlers again after code that replaced them outside Python:
        `jax.distributed.initialize` puts JAX's preemption notifier on SIGTERM."""
        for sig in self._old:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the person means it
        if self.received is None:
            self.received = signum
        self._stop.set()

    def request_stop(self) -> None:
        """Sets the flag from code (e.g. a wall-clock budget ran out)."""
        self._stop.set()

    @property
    def should_stop(self) -> bool:
        """This process's flag: a signal arrived or `request_stop()` was called."""
        return self._stop.is_set()

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def should_stop_all(self, step: int | None = None) -> bool:
        """The flag agreed across processes (a collective; see the module docstring)."""
        local = self.should_stop
        if step is not None and jax.process_count() > 1:
            from orbax.checkpoint import multihost

            local = local or bool(multihost.reached_preemption(step))
        return _sync.any_process(local)
