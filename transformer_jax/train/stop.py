"""Stop decisions that every process of a run agrees on, and a clean end when a process dies.

A run stops for one of four reasons: the step budget, a non-finite loss under
`task.on_nonfinite='halt'`, a signal (SIGTERM on preemption, Ctrl-C), or the wall-clock
budget. The first two are the same on every process by construction (the step count; the
halt flag is an output of the jitted step). The last two are not: a signal reaches one
host, and every host has its own clock. A host that stopped on its own would leave the
others waiting for it in the next step's collectives.

`StopControl.check()` therefore combines every process's signal flag with process 0's
clock in one all-gather of two ints per process, and every process gets the same answer.
It is a collective: call it at steps every process reaches. The trainer calls it at each
log boundary, right after fetching the step's metrics (where the host waits for the
device anyway), so steady-state steps carry no extra host sync. With one process it is
local and free, and the trainer checks every step.

`exit_if_peer_lost(err)`: a process that dies (killed, out of memory) makes the others'
next collective fail (gloo: "Connection reset by peer"). If a peer is gone, this prints one
line naming it and exits with status 1 at once, instead of a traceback followed by JAX's
shutdown barrier, which would wait for the dead process until the heartbeat timeout
(`mesh.heartbeat_timeout_s`) and then abort. JAX's runtime may abort this process first
(a dead coordinator, a missed heartbeat): then the trainer's parent says so in one line
(`transformer_jax/supervise.py`).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import jax
import numpy as np

from transformer_jax.checkpoint import PreemptionGuard


class StopControl:
    """`check()` -> None, or why the run stops, the same string on every process."""

    def __init__(self, guard: PreemptionGuard, deadline: float | None, budget_s: float | None):
        self.guard = guard
        self.deadline = deadline  # time.time() at which the wall-clock budget ends (process 0's clock decides)
        self.budget_s = budget_s
        self.multi = jax.process_count() > 1

    def due(self, step: int, log_every: int) -> bool:
        """Whether the trainer checks after `step`: every step with one process, else at log boundaries."""
        return not self.multi or step % log_every == 0

    def check(self, *, budget: bool = True) -> str | None:
        """Why to stop, agreed by all processes (a collective when there are several). `budget=False`:
        signals and requests only (the final report runs past the wall-clock budget that ended training)."""
        sig = self.guard.received or (-1 if self.guard.should_stop else 0)  # -1: request_stop()
        late = budget and jax.process_index() == 0 and self.deadline is not None and time.time() > self.deadline
        votes = np.asarray([[sig, int(late)]], np.int32)
        if self.multi:
            from jax.experimental import multihost_utils
            votes = np.asarray(multihost_utils.process_allgather(votes[0]))  # (processes, 2)
        for process, s in enumerate(votes[:, 0]):
            if s:
                name = signal.Signals(int(s)).name if s > 0 else "request"
                return f"stopped by {name}" + (f" on process {process}" if self.multi else "")
        if votes[0, 1]:
            return f"wall-clock budget of {self.budget_s:.0f} s reached"
        return None


def missing_processes(wait_s: float = 10.0) -> list[int] | None:
    """After a failed collective: the processes that do not say "alive" within `wait_s`
    (None: the coordinator, process 0, cannot be reached). Every process that hits the error
    writes its key to the coordination service's key-value store and waits for the others'.
    (`client.get_live_nodes` would block until JAX's heartbeat timeout, 100 s by default.)"""
    from jax._src import distributed  # the client jax.distributed.initialize made
    client, n = distributed.global_state.client, jax.process_count()
    if client is None or n == 1:
        return []
    key = "transformer_jax/alive_after_error"
    seen: set[int] = set()
    try:
        client.key_value_set(f"{key}/{jax.process_index()}", "1")
        deadline = time.time() + wait_s
        while len(seen) < n and time.time() < deadline:
            seen = {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(key)}
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the coordination service (on process 0) is gone
        return None
    return sorted(set(range(n)) - seen)


def exit_if_peer_lost(err: BaseException, what: str) -> None:
    """After a failed collective (`jax.errors.JaxRuntimeError`, orbax's barrier `TimeoutError`):
    if another process is gone, one line on stderr and exit status 1 now; else return (the
    caller re-raises `err`)."""
    if jax.process_count() == 1 or not isinstance(err, (jax.errors.JaxRuntimeError, TimeoutError)):
        return
    gone = missing_processes()
    if gone == []:
        return
    who = ("process 0 (the coordinator) is unreachable" if gone is None
           else f"process{'es' if len(gone) > 1 else ''} {', '.join(map(str, gone))} of {jax.process_count()} "
                f"stopped responding")
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    # the leading newline ends a progress bar's line
    print(f"\ntransformer-jax: error: {who} ({first}); process {jax.process_index()} stops too; {what}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: JAX's exit handler would wait in a shutdown barrier for the dead process.
    os._exit(1)
