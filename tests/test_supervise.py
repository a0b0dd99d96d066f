"""The trainer's parent (supervise.py): a child's own exit status passes through; a child ended
by a signal (JAX's abort) becomes one line naming it and status 1; SIGTERM is passed on; the
child dies with its parent. The children here are small Python programs (the real trainer:
tests/test_multiprocess.py)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

from transformer_jax import supervise

# A child as the trainer would be: tells the parent its place, then does what argv[1] says.
_CHILD = textwrap.dedent("""
    import os, resource, signal, sys, time
    from transformer_jax import supervise
    assert supervise.supervised()
    supervise.child_started()
    what = sys.argv[1]
    if what == "oom":                  # killed before jax.distributed.initialize: no place to tell
        os.kill(os.getpid(), signal.SIGKILL)
    supervise.tell_parent(1, 2)
    if what == "abort":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.abort()                     # what JAX's runtime does to a survivor
    if what == "exit":
        print("transformer-jax: error: its own line", file=sys.stderr)
        sys.exit(2)
    if what == "term":                 # waits for SIGTERM, then exits 0
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print("ready", flush=True)
        time.sleep(60)
        sys.exit(3)
    if what == "orphan":               # the parent is killed: this must not run on
        print(os.getpid(), flush=True)
        time.sleep(60)
""")

_PARENT = textwrap.dedent("""
    import sys
    from transformer_jax import supervise
    sys.exit(supervise.supervise([sys.executable, "-c", sys.argv[1], sys.argv[2]], "restart the job"))
""")


def _parent(what: str, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMER_JAX_PARENT")}
    return subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, what], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_child_ended_by_a_signal_becomes_one_line_and_status_1():
    p = _parent("abort")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("transformer-jax: error:")]
    assert errors == ["transformer-jax: error: process 1 of 2 ended by SIGABRT: JAX's runtime aborted it, as it does "
                      "when another process of the job dies or stops responding (its log above has the details); "
                      "restart the job"], err


def test_a_child_killed_before_it_knew_its_place():
    p = _parent("oom")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.strip() == ("transformer-jax: error: the trainer ended by SIGKILL: killed from "
                                                 "outside (out of memory?); restart the job"), err


def test_a_childs_own_exit_passes_through():
    p = _parent("exit")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.strip() == "transformer-jax: error: its own line", err


def test_sigterm_reaches_the_child():
    p = _parent("term")
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == 0


def test_the_child_dies_with_its_parent():
    p = _parent("orphan")
    child = int(p.stdout.readline())
    p.kill()
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its killed parent")


def test_not_supervised_here():
    assert not supervise.supervised()
    supervise.tell_parent(0, 1)  # no parent: nothing to tell, no error
