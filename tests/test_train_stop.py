"""Stop decisions (train/stop.py): the reasons, their agreement across two processes, a dead
peer's one-line exit, and SIGTERM at any moment of a CLI run (set-up, compilation, final
report) -> exit 0, the newest state saved, and the next run resumes."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import pytest

from transformer_jax.checkpoint import PreemptionGuard
from transformer_jax.train.stop import StopControl, exit_if_peer_lost, missing_processes

REPO = Path(__file__).resolve().parents[1]


def test_reasons_on_one_process():
    with PreemptionGuard() as guard:
        assert StopControl(guard, deadline=time.time() + 3600, budget_s=60).check() is None
        assert StopControl(guard, deadline=time.time() - 1, budget_s=60).check() == "wall-clock budget of 60 s reached"
        guard.request_stop()
        assert StopControl(guard, deadline=None, budget_s=None).check() == "stopped by request"
        os.kill(os.getpid(), signal.SIGTERM)
        assert StopControl(guard, deadline=time.time() - 1, budget_s=60).check() == "stopped by SIGTERM"
    stop = StopControl(guard, None, None)
    assert [s for s in range(1, 8) if stop.due(s, log_every=3)] == list(range(1, 8))  # one process: every step
    assert missing_processes() == [] and exit_if_peer_lost(jax.errors.JaxRuntimeError("x"), "") is None


# -- two processes -----------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    from transformer_jax.checkpoint import PreemptionGuard
    from transformer_jax.train.stop import StopControl, exit_if_peer_lost
    out = {}
    with PreemptionGuard() as guard:
        guard.reclaim()
        # process 0's clock is past the budget, process 1's is not: process 0's decides
        stop = StopControl(guard, time.time() + (-1 if pid == 0 else 3600), budget_s=5)
        out["due"] = [s for s in range(1, 8) if stop.due(s, log_every=3)]
        out["budget"] = stop.check()
        stop.deadline = None
        out["none"] = stop.check()
        if pid == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only process 1 is signalled
        out["signal"] = stop.check()
        print(json.dumps(out), flush=True)
        if pid == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # dies; process 0's next collective fails
        try:
            while True:
                stop.check()
                time.sleep(0.05)
        except Exception as e:
            exit_if_peer_lost(e, "restart the job")
            raise
""")


def test_two_processes_agree_and_a_dead_peer_ends_the_other_with_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(port), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for out, _ in outs:
        assert json.loads(out.strip().splitlines()[-1]) == {
            "due": [3, 6], "budget": "wall-clock budget of 5 s reached", "none": None,
            "signal": "stopped by SIGTERM on process 1"}
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 1
    err = [line for line in outs[0][1].splitlines() if line.startswith("transformer-jax: error:")]
    assert len(err) == 1 and "process 1 of 2 stopped responding" in err[0] and "restart the job" in err[0], outs[0][1]
    assert "Traceback" not in outs[0][1]


# -- SIGTERM at any moment of a CLI run ---------------------------------------------------

FAST = ["--config", "tiny", "--set", "train.sample_tokens=0", "--set", "train.eval_every=0",
        "--set", "train.steps=4", "--set", "train.log_every=2", "--set", "checkpoint.every_steps=100"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, TRANSFORMER_JAX_DATA_DIR=str(tmp_path_factory.mktemp("data")), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", JAX_LOG_COMPILES="1")
    e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return e


class Cli:
    """`transformer-jax train` in a subprocess whose output is collected line by line."""

    def __init__(self, env, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "transformer_jax", "train", *args], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, cond, timeout=300):
        deadline = time.time() + timeout
        while not cond():
            assert self.proc.poll() is None, "ended early:\n" + "".join(self.lines[-40:])
            assert time.time() < deadline, "timed out:\n" + "".join(self.lines[-40:])
            time.sleep(0.02)

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def finish(self, timeout=300) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc, "".join(self.lines)


def steps_saved(wd: Path) -> list[int]:
    d = wd / "checkpoints"
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if d.is_dir() else []


@pytest.mark.slow
def test_sigterm_during_set_up_says_nothing_to_save_then_a_rerun_trains(env, tmp_path):
    wd = tmp_path / "run"
    run = Cli(env, *FAST, "--workdir", str(wd))
    run.wait_for(lambda: (wd / "tokenizer").is_dir())  # the tokenizer is the first thing set-up writes
    run.proc.send_signal(signal.SIGTERM)
    rc, out = run.finish()
    assert rc == 0, out
    assert "stopped by SIGTERM during set-up; nothing to save yet" in out and steps_saved(wd) == []
    rc, out = Cli(env, *FAST, "--workdir", str(wd)).finish()
    assert rc == 0 and "step 4: step budget reached; checkpoint saved" in out, out


@pytest.mark.slow
def test_sigterm_during_compilation_saves_step_1_and_the_rerun_resumes(env, tmp_path):
    wd = tmp_path / "run"
    run = Cli(env, *FAST, "--workdir", str(wd))
    run.wait_for(lambda: run.saw("Compiling jit(_train_step)"))  # JAX_LOG_COMPILES: XLA compiles now
    run.proc.send_signal(signal.SIGTERM)
    rc, out = run.finish()
    assert rc == 0, out
    assert "step 1: stopped by SIGTERM; checkpoint saved" in out and steps_saved(wd) == [1]
    rc, out = Cli(env, *FAST, "--workdir", str(wd)).finish()
    assert rc == 0 and "resumed from step 1" in out and "step 4: step budget reached" in out, out


@pytest.mark.slow
def test_sigterm_during_the_final_report_keeps_the_saved_state(env, tmp_path):
    wd = tmp_path / "run"
    run = Cli(env, *FAST, "--workdir", str(wd))
    run.wait_for(lambda: run.saw("step 4: step budget reached; checkpoint saved"))  # the report starts
    run.proc.send_signal(signal.SIGTERM)
    rc, out = run.finish()
    assert rc == 0, out
    assert "stopped by SIGTERM during the final report; the rest of it is skipped" in out
    assert "loss curve:" not in out.split("during the final report")[1] and steps_saved(wd) == [4]
    rc, out = Cli(env, *FAST, "--workdir", str(wd)).finish()
    assert rc == 0 and "resumed from step 4" in out and "validation: loss" in out, out
