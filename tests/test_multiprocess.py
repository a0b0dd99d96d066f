"""Two processes of 4 CPU devices each (gloo collectives) train on one 8-device mesh whose
`data` axis spans them, each feeding only its own rows, and get one process's losses. Then
the trainer through the CLI under SLURM variables and the JAX_* triple: SIGTERM to one
process, a wall-clock budget, resume on 1 process x 8 devices; a killed process, a killed
coordinator and a stopped (hung) process, each ending the other in one line, then a resume."""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest

from transformer_jax.checkpoint.items import decode_data_state
from transformer_jax.models import get_config
from transformer_jax.parallel import MeshConfig, get_rules, make_mesh
from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch

MODEL = dict(d_model=64, num_heads=8, d_ff=128, scan_layers=False)
OPTIM = dict(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1e-4)

_CHILD = textwrap.dedent("""
    import json, os, sys
    import jax
    import numpy as np
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from transformer_jax import data
    from transformer_jax.models import get_config
    from transformer_jax.parallel import MeshConfig, describe_mesh, get_rules, make_mesh, maybe_initialize_distributed
    from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch
    port, pid, model, optim = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    cfg = MeshConfig(data=2, fsdp=2, tensor=2, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                     process_id=pid)
    assert maybe_initialize_distributed(cfg) and jax.process_count() == 2 and jax.local_device_count() == 4
    mesh = make_mesh(cfg)
    setup = make_train_setup(get_config("gpt2-tiny", **model), OptimizerConfig(**optim), TaskConfig(task="lm"),
                             mesh, get_rules(cfg.preset), total_steps=10, seed=0)
    state = setup.init_state()
    data_coord = np.indices(mesh.devices.shape)[0].ravel()  # each device's position on `data`
    mine = {int(i) for i, d in zip(data_coord, mesh.devices.ravel()) if d.process_index == pid}
    out = {"mesh": describe_mesh(mesh), "losses": [], "grad_norms": [], "data_index": sorted(mine)}
    for i in range(3):
        full = synthetic_batch("lm", 8, 16, 256, seed=i)            # the global batch...
        local = {k: v[4 * pid:4 * pid + 4] for k, v in full.items()}  # ...of which this process reads its half
        state, m = setup.train_step(state, data.make_global_batch(local, setup.batch_sharding))
        out["losses"].append(float(m["loss"]))
        out["grad_norms"].append(float(m["grad_norm"]))
    print(json.dumps(out), flush=True)
    jax.distributed.shutdown()
""")


def test_two_processes_train_like_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(port), str(i), json.dumps(MODEL), json.dumps(OPTIM)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True) for i in (0, 1)]
    try:
        # Meanwhile, the same run in this one process (8 devices).
        setup = make_train_setup(get_config("gpt2-tiny", **MODEL), OptimizerConfig(**OPTIM), TaskConfig(task="lm"),
                                 make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), get_rules("fsdp_tp"), total_steps=10)
        state, want = setup.init_state(), []
        for i in range(3):
            state, m = setup.train_step(state, synthetic_batch("lm", 8, 16, 256, seed=i))
            want.append((float(m["loss"]), float(m["grad_norm"])))
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for pid, r in enumerate(results):
        assert r["mesh"] == "data=2 x fsdp=2 x tensor=2 over 8 cpu devices, 2 processes"
        assert r["data_index"] == [pid]  # `data` spans the processes: each holds one data slice
        # Bit for bit: every reduction here is over 2 devices (a + b is exact in either order;
        # over more, gloo's order differs from XLA's in-process one: docs/architecture.md).
        assert r["losses"] == [w[0] for w in want] and r["grad_norms"] == [w[1] for w in want], (r, want)
    assert jax.process_count() == 1


# -- the trainer through the CLI, 2 processes x 4 CPU devices --------------------------------
# Slow (minutes on 2 cores): every run compiles the step; the processes are started as srun
# (SLURM variables) or a launcher (JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID) would.

REPO = Path(__file__).resolve().parents[1]
RUN = ["--config", "tiny", "--set", "train.sample_tokens=0", "--set", "train.eval_every=0",
       "--set", "train.log_every=2", "--set", "checkpoint.every_steps=100"]
# data x fsdp x tensor = 2 x 2 x 2: every reduction is over 2 devices, so its order cannot differ
# between gloo across processes and XLA within one, and a layout change resumes bit-identically
# (over data=8 the two add in different orders: docs/architecture.md).
MESH_222 = ["--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2"]


def _free_port(lo: int = 1024, hi: int = 65535) -> int:
    """A port free now, drawn at random: two pytest workers starting runs at once must not share a coordinator."""
    for port in random.Random().sample(range(lo, hi + 1), hi + 1 - lo):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def _launch_env(how: str, base: dict, port: int, pid: int) -> dict:
    e = dict(base, JAX_NUM_CPU_DEVICES="4")
    if how == "explicit":
        e.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    else:  # what `srun --ntasks=2` sets on one node; jax's SlurmCluster derives the port from the job id
        job = str(4096 * 30 + port - 61440)
        e.update(SLURM_JOB_ID=job, SLURM_JOBID=job, SLURM_JOB_NAME="train", SLURM_NTASKS="2", SLURM_NPROCS="2",
                 SLURM_PROCID=str(pid), SLURM_LOCALID=str(pid), SLURM_NODEID="0", SLURM_NNODES="1",
                 SLURM_JOB_NUM_NODES="1", SLURM_STEP_NUM_NODES="1", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="0",
                 SLURM_STEPID="0", SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost",
                 SLURM_JOB_NODELIST="localhost", SLURM_TASKS_PER_NODE="2", SLURM_STEP_TASKS_PER_NODE="2",
                 SLURMD_NODENAME="localhost", SLURM_CPUS_ON_NODE="2", SLURM_TOPOLOGY_ADDR="localhost")
    return e


def _start_two(how: str, env: dict, *args, delay: float = 0.0) -> list[subprocess.Popen]:
    port = _free_port(61440) if how == "slurm" else _free_port(20000, 60999)
    procs = []
    for pid in (0, 1):
        procs.append(subprocess.Popen([sys.executable, "-m", "transformer_jax", "train", *args], cwd=REPO,
                                      env=_launch_env(how, env, port, pid), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
        time.sleep(delay)
    return procs


def _finish(procs, timeout=900) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o + e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _steps_logged(wd: Path) -> int:
    path = wd / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return max((r["step"] for r in lines if r["kind"] == "train"), default=0)


def _wait(cond, procs, timeout=600):
    deadline = time.time() + timeout
    while not cond():
        assert all(p.poll() is None for p in procs), "a process ended early"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _saved(wd: Path) -> list[int]:
    return sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())


def _rows(wd: Path, step: int) -> dict[str, int]:
    """Each process's own data position in its data_state file: proof of the step it saved."""
    d = wd / "checkpoints" / str(step) / "data_state"
    return {p.name: json.loads(decode_data_state(p.read_text()))["rows"] for p in sorted(d.glob("process_*"))}


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    e = dict(os.environ, TRANSFORMER_JAX_DATA_DIR=str(tmp_path_factory.mktemp("data")), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
    e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return e


def _losses(wd: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(cli_env, tmp_path_factory):
    """The uninterrupted run: 8 steps on 1 process x 8 devices; its logged losses."""
    wd = tmp_path_factory.mktemp("reference")
    proc = subprocess.run([sys.executable, "-m", "transformer_jax", "train", *RUN, *MESH_222, "--set",
                           "train.steps=8", "--workdir", str(wd)], cwd=REPO, env=dict(cli_env, JAX_NUM_CPU_DEVICES="8"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(wd)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["slurm", "explicit"])
def test_sigterm_to_one_process_both_save_then_resume_on_one_process(how, cli_env, reference, tmp_path):
    wd = tmp_path / "run"
    procs = _start_two(how, cli_env, *RUN, *MESH_222, "--set", "train.steps=8", "--workdir", str(wd))
    _wait(lambda: _steps_logged(wd) >= 2, procs)
    procs[1].send_signal(signal.SIGTERM)  # one process only: a preemption notice reaches hosts one by one
    (rc0, out0), (rc1, out1) = _finish(procs)
    assert rc0 == 0 and rc1 == 0, out0[-3000:] + out1[-3000:]
    [step] = _saved(wd)
    assert f"step {step}: stopped by SIGTERM on process 1; checkpoint saved" in out0 and step < 8
    assert "2 processes" in out0
    assert _rows(wd, step) == {"process_0-of-2.json": 8 * step, "process_1-of-2.json": 8 * step}
    resumed = subprocess.run([sys.executable, "-m", "transformer_jax", "train", "--workdir", str(wd)], cwd=REPO,
                             env=dict(cli_env, JAX_NUM_CPU_DEVICES="8"), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0 and f"resumed from step {step}" in resumed.stdout, resumed.stderr[-3000:]
    # The uninterrupted 1 x 8 run's losses at every logged step, bit for bit.
    losses = _losses(wd)
    assert sorted(losses) == sorted(reference) == [2, 4, 6, 8]
    assert [losses[s] for s in sorted(losses)] == [reference[s] for s in sorted(reference)]


@pytest.mark.slow
def test_wall_clock_budget_stops_both_processes_at_the_same_step(cli_env, tmp_path):
    wd = tmp_path / "run"
    # Process 1 starts 3 s later: on its own clock the budget would end 3 s after process 0's.
    procs = _start_two("explicit", cli_env, *RUN, "--set", "train.steps=100000", "--set", "train.time_budget_s=45",
                       "--workdir", str(wd), delay=3.0)
    (rc0, out0), (rc1, out1) = _finish(procs)
    assert rc0 == 0 and rc1 == 0, out0[-3000:] + out1[-3000:]
    step = _saved(wd)[-1]  # the stop's save (a fast host also saves step 100)
    assert f"step {step}: wall-clock budget of 45 s reached; checkpoint saved" in out0
    assert _rows(wd, step) == {"process_0-of-2.json": 8 * step, "process_1-of-2.json": 8 * step}


# A process killed (SIGKILL: a host lost), the coordinator killed, a process stopped (SIGSTOP:
# a hung host): the other ends within the heartbeat timeout with one line of ours and status 1,
# through the trainer's dead-peer handler (train/stop.py) or its parent (supervise.py) when JAX's
# runtime aborts it first (a race; both lines are tested on their own in test_supervise.py and
# test_train_stop.py). Killed while both train, at step 6, with checkpoint 4's commit behind them.
FAULTS = {("SIGKILL", 1): r"(process 1 of 2 stopped responding|process 0 of 2 ended by SIGABRT)",
          ("SIGKILL", 0): r"(process 0 \(the coordinator\) is unreachable|process 1 of 2 ended by SIGABRT)",
          ("SIGSTOP", 1): r"(process 1 of 2 stopped responding|process 0 of 2 ended by SIGABRT)"}
HEARTBEAT_S = 15


@pytest.mark.slow
@pytest.mark.parametrize("fault,victim", list(FAULTS))
def test_a_dead_or_hung_process_ends_the_other_with_one_line_and_a_restart_resumes(fault, victim, cli_env, tmp_path):
    wd = tmp_path / "run"
    args = [*RUN, "--set", "checkpoint.every_steps=4", "--set", f"mesh.heartbeat_timeout_s={HEARTBEAT_S}",
            "--workdir", str(wd)]
    procs = _start_two("explicit", cli_env, *args, "--set", "train.steps=100000")
    _wait(lambda: (wd / "checkpoints" / "4").is_dir() and (wd / "metrics.jsonl").exists()
          and max(_losses(wd), default=0) >= 6, procs)
    t0 = time.time()
    os.killpg(procs[victim].pid, getattr(signal, fault))  # the launched process and its trainer child
    try:
        [(rc, out)] = _finish([procs[1 - victim]], timeout=120)  # bounded: a hang fails here
        took = time.time() - t0
    finally:
        os.killpg(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait()
    errors = [line for line in out.splitlines() if line.startswith("transformer-jax: error:")]
    assert rc == 1 and len(errors) == 1 and re.match(r"transformer-jax: error: " + FAULTS[fault, victim], errors[0]), \
        out[-3000:]
    assert errors[0].endswith(f"restart the job to resume from {wd / 'checkpoints'}") and "Traceback" not in out
    assert took < 3 * HEARTBEAT_S, took
    steps = _saved(wd)
    procs = _start_two("explicit", cli_env, *args, "--set", f"train.steps={steps[-1] + 2}")
    (rc0, out0), (rc1, out1) = _finish(procs)
    assert rc0 == 0 and rc1 == 0 and f"resumed from step {steps[-1]}" in out0, out0[-3000:] + out1[-3000:]
