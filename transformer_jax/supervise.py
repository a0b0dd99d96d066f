"""A multi-process run's trainer runs in a child process, so that every way it can die ends in one line.

When another process of a job dies or hangs, JAX's runtime often ends this one by itself,
from a C++ thread, with `abort()` (exit by SIGABRT and a multi-line log): its coordination
service at once when the coordinator (process 0) is gone (the error poll fails) and after
`mesh.heartbeat_timeout_s` when a process stops sending heartbeats (killed, or stopped: a
hung host); gloo (CPU collectives) when a peer's socket closes mid-message. No Python
code runs then (the client's hook `missed_heartbeat_callback` cannot even be called from
Python in jaxlib 0.10: the status it passes has no Python type, std::bad_cast), and no
heartbeat setting helps for a dead coordinator or gloo. So `transformer-jax train` in a
multi-process job runs the trainer as a child and waits:

- the child exits by itself (0; 2 with its one line for bad input; 1 with the trainer's
  own line when a collective failed on a dead peer, `train/stop.py`): that status;
- the child ends by a signal (JAX's abort, the out-of-memory killer): one line naming it,
  the process and where the run resumes, and status 1.

SIGTERM reaching the parent is passed on (a second one reaching the child too, e.g. from
a launcher that signals every process, only sets the same flag); SIGINT is not, since a
terminal's Ctrl-C reaches the child itself. The child dies with the parent (Linux
`PR_SET_PDEATHSIG`): killing the process the launcher started kills the trainer.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys

_FD = "TRANSFORMER_JAX_SUPERVISOR_FD"  # set in the child: the pipe to tell the parent who it is


def supervised() -> bool:
    """Whether this process is the trainer child of a supervising parent."""
    return "TRANSFORMER_JAX_PARENT_PID" in os.environ


def supervise(cmd: list[str], what: str) -> int:
    """Runs `cmd` (the same command line, as the child) and returns the exit status to end with."""
    read, write = os.pipe()
    env = dict(os.environ, **{_FD: str(write), "TRANSFORMER_JAX_PARENT_PID": str(os.getpid())})
    child = subprocess.Popen(cmd, env=env, pass_fds=(write,))
    os.close(write)
    old_term = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = child.wait()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    os.set_blocking(read, False)  # what the child wrote is in the pipe; a process it forked may hold it open
    try:
        told = os.read(read, 1 << 16).decode()
    except BlockingIOError:
        told = ""
    os.close(read)
    if rc >= 0:
        return rc
    me = json.loads(told) if told.strip() else None
    who = f"process {me['process']} of {me['processes']}" if me else "the trainer"
    try:
        name = signal.Signals(-rc).name
    except ValueError:  # a real-time signal
        name = f"signal {-rc}"
    why = {signal.SIGABRT: "JAX's runtime aborted it, as it does when another process of the job dies or stops "
                           "responding (its log above has the details)",
           signal.SIGKILL: "killed from outside (out of memory?)"}.get(-rc, "killed")
    print(f"\ntransformer-jax: error: {who} ended by {name}: {why}; {what}", file=sys.stderr, flush=True)
    return 1


def child_started() -> None:
    """In the child, first thing: die with the parent (Linux), and not run on if it is gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a killed parent
        pass
    if str(os.getppid()) != os.environ.get("TRANSFORMER_JAX_PARENT_PID"):
        os._exit(1)  # the parent died before prctl


def tell_parent(process: int, processes: int) -> None:
    """The child's place in the job, for the parent's line (no-op without a parent)."""
    fd = os.environ.pop(_FD, None)
    if fd is not None:
        with os.fdopen(int(fd), "w") as pipe:
            pipe.write(json.dumps({"process": process, "processes": processes}))
