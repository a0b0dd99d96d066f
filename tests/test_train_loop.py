"""End to end through the CLI, in subprocesses (the trainer is what users run): train ->
checkpoint -> resume -> eval, SIGTERM, kill -9 resume bit-identical, corrupted checkpoints,
a different mesh, and the README's main command with a short budget."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny"  # the shipped experiment, by name
FAST = ["--set", "train.sample_tokens=0", "--set", "train.eval_every=0", "--set", "checkpoint.every_steps=5"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: a private data cache, one CPU device, tests' XLA flags."""
    e = dict(os.environ, TRANSFORMER_JAX_DATA_DIR=str(tmp_path_factory.mktemp("data")), JAX_PLATFORMS="cpu")
    e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return e


def cli(env, *args, devices=1, timeout=600, check=True):
    e = dict(env)
    if devices > 1:
        e["XLA_FLAGS"] = f"{e['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    proc = subprocess.run([sys.executable, "-m", "transformer_jax", *args], env=e, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start(env, *args):
    return subprocess.Popen([sys.executable, "-m", "transformer_jax", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def steps_logged(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((r["step"] for r in lines if r["kind"] == "train"), default=0)


def wait_for(cond, timeout=300, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def params_of(workdir: Path, step: int):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")["params"]


def test_train_checkpoint_resume_eval(env, tmp_path):
    wd = tmp_path / "run"
    out = cli(env, "train", "--config", TINY, "--workdir", str(wd), "--set", "train.steps=10", *FAST)
    assert "step 10: step budget reached; checkpoint saved" in out.stdout
    assert sorted(os.listdir(wd / "checkpoints")) == ["10", "5"]
    for name in ("config.json", "metrics.jsonl", "loss.png", "summary.json", "tokenizer/tokenizer_meta.json"):
        assert (wd / name).exists(), name
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["step"] == 10 and summary["tokens_seen"] > 0
    # Resume: a longer budget continues from step 10.
    out = cli(env, "train", "--workdir", str(wd), "--set", "train.steps=15", *FAST)
    assert "resumed from step 10" in out.stdout and "step 15: step budget reached" in out.stdout
    records = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10, 15]
    ev = cli(env, "eval", "--workdir", str(wd))
    final = json.loads((wd / "summary.json").read_text())["eval"]["loss"]
    assert f"step 15: validation loss {final:.4f}" in ev.stdout


@pytest.mark.slow
def test_profile_trace_hparams_and_sample_reach_tensorboard(env, tmp_path):
    from test_metrics import hparams_of, texts_of
    wd = tmp_path / "run"
    cli(env, "train", "--config", TINY, "--workdir", str(wd), "--set", "train.steps=4", "--set", "train.eval_every=0",
        "--set", "train.eval_batches=1", "--set", "train.sample_tokens=8", "--set", "train.profile_steps=[2,3]")
    (trace,) = (wd / "tensorboard").glob("plugins/profile/*/*.xplane.pb")  # `tensorboard --logdir <workdir>/tensorboard`
    assert b"_train_step" in trace.read_bytes()
    hparams = hparams_of(wd / "tensorboard")
    assert hparams["name"] == "tiny" and hparams["train.steps"] == 4 and hparams["train.profile_steps"] == "[2, 3]"
    step, sample = texts_of(wd / "tensorboard")["sample/text_summary"]
    assert step == 4 and sample == "def " + json.loads((wd / "summary.json").read_text())["eval"]["sample"]


def test_sigterm_saves_and_exits_cleanly(env, tmp_path):
    wd = tmp_path / "run"
    proc = start(env, "train", "--config", TINY, "--workdir", str(wd), "--set", "train.steps=100000",
                 "--set", "checkpoint.every_steps=100000", "--set", "train.log_every=1", *FAST[:4])
    wait_for(lambda: steps_logged(wd) >= 3, proc=proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM; checkpoint saved" in out
    steps = [int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3
    assert f"step {steps[0]}: validation loss" in cli(env, "eval", "--workdir", str(wd)).stdout


@pytest.mark.slow
def test_kill_9_at_any_moment_resumes_bit_identical(env, tmp_path):
    args = ["--config", TINY, "--set", "train.steps=30", "--set", "train.log_every=1", *FAST]
    ref = tmp_path / "ref"
    cli(env, "train", "--workdir", str(ref), *args)
    wd = tmp_path / "killed"
    rng = random.Random(0)
    # Kill points: mid-step before any checkpoint, just as a save starts, and later at random.
    for kill_after in (3, 10, 17 + rng.randint(0, 8)):
        proc = start(env, "train", "--workdir", str(wd), *args)
        wait_for(lambda: steps_logged(wd) >= kill_after, proc=proc)
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.wait()
    cli(env, "train", "--workdir", str(wd), *args)
    a, b = params_of(ref, 30), params_of(wd, 30)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_checkpoint_is_detected_and_falls_back(env, tmp_path, damage):
    wd = tmp_path / "run"
    cli(env, "train", "--config", TINY, "--workdir", str(wd), "--set", "train.steps=10", *FAST)
    victim = _largest_file(wd / "checkpoints" / "10")
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    else:
        victim.write_bytes(bytes(raw[: len(raw) // 2]))
    out = cli(env, "eval", "--workdir", str(wd))
    logs = out.stdout + out.stderr
    assert "checkpoint step 10 is corrupt" in logs and victim.name in logs and "falling back to step 5" in logs
    assert "step 5: validation loss" in out.stdout


def test_restore_onto_another_mesh_gives_the_same_eval_loss(env, tmp_path):
    wd = tmp_path / "run"
    cli(env, "train", "--config", TINY, "--workdir", str(wd), "--set", "train.steps=5", *FAST)
    one = cli(env, "eval", "--workdir", str(wd)).stdout
    eight = cli(env, "eval", "--workdir", str(wd), "--set", "mesh.data=2", "--set", "mesh.fsdp=2",
                "--set", "mesh.tensor=2", "--set", "mesh.preset=fsdp_tp", devices=8).stdout
    loss = lambda s: float(s.split("validation loss ")[1].split(",")[0])  # noqa: E731
    assert loss(one) == pytest.approx(loss(eight), rel=1e-5)


@pytest.mark.slow
def test_readme_main_command_with_a_short_budget(env, tmp_path):
    """`transformer-jax train` (the default experiment, BPE tokenizer trained on the spot) under a 60 s budget."""
    wd = tmp_path / "default"
    out = cli(env, "train", "--workdir", str(wd), "--set", "train.time_budget_s=60", "--set", "train.eval_every=0",
              "--set", "train.sample_tokens=8")
    assert "wall-clock budget of 60 s reached" in out.stdout
    assert "validation bits per byte: model" in out.stdout
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["eval"]["bits_per_byte"] < 8.0 and summary["elapsed_s"] < 240
    for way in ("stream", "per_document"):  # every compressor, both ways, in the report and summary.json
        assert set(summary["eval"]["baselines"][way]) == {"gzip -9", "xz -9e", "brotli 11", "zstd 22", "ppmd o6",
                                                          "ppmd o16"}
        assert f"{way.replace('_', ' ')} " in out.stdout and "ppmd o16" in out.stdout


@pytest.mark.slow
def test_bits_per_byte_on_a_subset_and_time_to_beat_each_compressor(env, tmp_path):
    """Periodic evaluations on the first batches report bits per byte over the bytes their targets stand
    for; over every batch that equals the whole split's (UTF-8 bytes of the text); the final report says
    when validation first beat each compressor."""
    texts = tmp_path / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        (texts / f"t{i}.txt").write_text(" ".join(rng.choice(["def", "return", "x", "é", "λ", "\n"], 200)))
    wd = tmp_path / "run"
    data = ["--set", f"data.source=text_files:{texts}", "--set", "train.eval_batches=none"]
    out = cli(env, "train", "--config", TINY, "--workdir", str(wd), "--set", "train.steps=10", "--set",
              "train.eval_every=5", "--set", "train.periodic_eval_batches=1", "--set", "train.sample_tokens=0", *data)
    evals = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    periodic, final = evals[0], evals[-1]
    assert periodic["step"] == 5 and periodic["eval_batches"] == 1 and 0 < periodic["eval_bytes"] < 8 * 64 * 4
    assert 0 < periodic["bits_per_byte"] < 20 and periodic["elapsed_s"] < final["elapsed_s"]
    summary = json.loads((wd / "summary.json").read_text())
    beat = summary["eval"]["time_to_beat"]
    assert set(beat) == set(summary["eval"]["baselines"]["stream"]) and "time to beat" in out.stdout
    for name, bar in summary["eval"]["baselines"]["stream"].items():  # random words: a compressor's game
        first = next((e for e in evals if e["bits_per_byte"] < bar), None)
        assert beat[name] == (first and {k: first[k] for k in ("step", "elapsed_s", "bits_per_byte")})
    whole = cli(env, "eval", "--workdir", str(wd)).stdout
    every_batch = cli(env, "eval", "--workdir", str(wd), "--set", "train.eval_batches=100000").stdout
    bpb = lambda s: float(s.split("bits per byte ")[1].split()[0])  # noqa: E731
    assert bpb(every_batch) == pytest.approx(bpb(whole), rel=1e-6)  # target bytes == the split's UTF-8 bytes
