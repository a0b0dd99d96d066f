"""Malformed configs and command lines give one-line errors (exit status 2), never tracebacks."""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from transformer_jax import cli
from transformer_jax.train import hardware

CASES = [
    (["--set", "train.stepz=3"], "unknown key 'train.stepz'; valid keys: steps, time_budget_s"),
    (["--set", "train.steps=abc"], "train.steps='abc' must be an integer"),
    (["--set", "train.steps=-1"], "train.steps=-1 must be positive"),
    (["--set", "train.seq_len=1"], "train.seq_len=1 must be at least 2"),
    (["--set", "model.position=learned", "--set", "train.seq_len=512"], "train.seq_len=512 exceeds model.max_len=256"),
    (["--set", "model.d_model=250"], "d_model=250 is not divisible by num_heads=4"),
    (["--set", "model.num_kv_heads=3"], "num_heads=4 is not a multiple of num_kv_heads=3"),
    (["--set", "model.norm=batchnorm"], "ModelConfig.norm='batchnorm' is not one of"),
    (["--set", "model.position=alibi"], "ModelConfig.position='alibi' is not one of"),
    (["--set", "model.dropout_rate=1.5"], "dropout_rate=1.5 must be in [0, 1)"),
    (["--set", "model.scan_layers=maybe"], "model.scan_layers='maybe' must be true or false"),
    (["--set", "data.task=mlm"], "data.task='mlm' and task.task='lm' disagree"),
    (["--set", "data.task=mlm", "--set", "task.task=mlm"], "task 'mlm' needs model.family='encoder'"),
    (["--config", "bert_mlm", "--set", "data.mask_rate=0.3"],
     "task.mlm_predict_fraction=0.25 is below data.mask_rate=0.3"),
    (["--set", "data.vocab_size=1000"], "DataConfig.vocab_size=1000 must be a multiple of 128"),
    (["--set", "data.source=nosuchsource"], "nosuchsource"),
    (["--set", "optimizer.learning_rate=-1"], "learning_rate=-1.0 must be >= 0"),
    (["--set", "optimizer.schedule=exponential"], "OptimizerConfig.schedule='exponential' is not one of"),
    (["--set", "optimizer.clip_norm=0"], "clip_norm=0.0 must be > 0"),
    (["--set", "task.label_smoothing=1"], "task.label_smoothing=1.0 must be in [0, 1)"),
    (["--set", "mesh.data=0"], "mesh.data=0 must be a positive size or -1"),
    (["--set", "mesh.preset=zero3"], "mesh.preset='zero3' is unknown"),
    (["--set", "mesh.data=4", "--set", "mesh.tensor=4"], "needs 16 devices, found 8"),
    (["--set", "mesh.data=8", "--set", "train.global_batch_size=12"], "global batch 12 is not divisible by"),
    (["--set", "checkpoint.keep_last=0"], "keep_last"),
    (["--set", "train.steps"], "override 'train.steps' must look like key.path=value"),
    (["--config", "experiments/nope.py"],
     "config file 'experiments/nope.py' not found; shipped experiments: bert_base,"),
    (["--config", "transfer_classify", "--set", "init_from=no/such/run"], "init_from='no/such/run' does not exist"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_settings_are_one_line_errors(args, message, capsys, tmp_path):
    code = cli.main(["train", "--workdir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("transformer-jax: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err


def test_a_bad_cpu_dots_environment_variable_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TRANSFORMER_JAX_CPU_DOTS", "fast")
    assert cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TRANSFORMER_JAX_CPU_DOTS='fast' is unknown; choose f32" in err, err
    assert not (tmp_path / "run").exists()


def test_a_broken_experiment_file_is_named(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("def get_config(:\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert f"config file '{bad}' failed to load: SyntaxError" in capsys.readouterr().err
    other = tmp_path / "other.py"
    other.write_text("def get_config():\n    return 3\n")
    assert cli.main(["train", "--config", str(other)]) == 2
    assert "must return an ExperimentConfig, got int" in capsys.readouterr().err


def test_generate_and_eval_need_a_run(tmp_path, capsys):
    assert cli.main(["generate", "--workdir", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_config_by_shipped_name_or_own_file(tmp_path, monkeypatch):
    from transformer_jax.experiment import EXPERIMENTS_DIR, load_experiment
    monkeypatch.chdir(tmp_path)  # names resolve inside the package, not against the working directory
    assert EXPERIMENTS_DIR.parent == Path(cli.__file__).parent and load_experiment("tiny").name == "tiny"
    own = tmp_path / "mine" / "exp.py"
    own.parent.mkdir()
    own.write_text("from transformer_jax.experiment import load_experiment\n\n\n"
                   "def get_config():\n    return load_experiment('tiny').replace(name='mine')\n")
    assert load_experiment("mine/exp.py").name == "mine"


# -- bad input that used to end in a traceback or be accepted (issue 16) --------------------

MORE_CASES = [
    (["--set", "model.num_kv_heads=0"], "model.num_kv_heads=0 must be >= 1 (1: MQA) or none"),
    (["--set", "model.num_kv_heads=-2"], "model.num_kv_heads=-2 must be >= 1"),
    (["--set", "model.attention=flashy"], "model.attention='flashy' is not a kernel; choose one of auto, xla"),
    (["--set", "optimizer.learning_rate=inf"], "optim.learning_rate=inf must be a finite number"),
    (["--set", "optimizer.learning_rate=nan"], "optim.learning_rate=nan must be a finite number"),
    (["--set", "optimizer.grad_accum_steps=3"], "global batch 16 is not divisible by optimizer.grad_accum_steps=3 x "
                                                "data*fsdp=8; use a train.global_batch_size that is a multiple of 24"),
    (["--config", "tiny", "--set", "init_from=/nonexistent/run"], "init_from='/nonexistent/run' does not exist"),
]


@pytest.mark.parametrize("args, message", MORE_CASES, ids=[" ".join(a) for a, _ in MORE_CASES])
def test_more_bad_settings_are_one_line_errors(args, message, capsys, tmp_path):
    test_bad_settings_are_one_line_errors(args, message, capsys, tmp_path)


def test_init_from_a_directory_without_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "pretrained").mkdir()
    assert cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "run"),
                     "--set", f"init_from={tmp_path / 'pretrained'}"]) == 2
    assert f"init_from='{tmp_path / 'pretrained'}' holds no checkpoint" in _one_error_line(capsys)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("transformer-jax: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_config_that_is_not_an_experiment_file_is_one_line(tmp_path, capsys):
    raises = tmp_path / "raises.py"
    raises.write_text("def get_config():\n    raise RuntimeError('no GPU here')\n")
    assert cli.main(["train", "--config", str(raises)]) == 2
    assert f"get_config() in '{raises}' failed: RuntimeError: no GPU here" in _one_error_line(capsys)
    for path in (tmp_path, tmp_path / "README.md"):  # a directory (`--config experiments`), a non-Python file
        (tmp_path / "README.md").write_text("# notes\n")
        assert cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
        assert "is not an experiment file; give a .py file with get_config()" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_an_unusable_workdir_is_one_line(tmp_path, capsys):
    regular = tmp_path / "file"
    regular.write_text("")
    for workdir, why in ((regular / "run", "Not a directory"), ("/proc/transformer_jax_test/run", "No such file")):
        assert cli.main(["train", "--config", "tiny", "--workdir", str(workdir)]) == 2
        line = _one_error_line(capsys)
        assert f"--workdir '{workdir}' cannot be used: {why}" in line and "choose a directory you can write to" in line


def test_eval_on_a_missing_workdir_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRANSFORMER_JAX_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(["eval", "--workdir", str(tmp_path / "nope")]) == 2
    assert f"--workdir '{tmp_path / 'nope'}' does not exist" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", "--workdir", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoints/; train first" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


@pytest.fixture
def run_config(tmp_path):
    """A workdir holding only a run's config.json (what generate reads first)."""
    from transformer_jax.experiment import load_experiment
    (tmp_path / "config.json").write_text(load_experiment("tiny").to_json())
    return tmp_path


GENERATE_CASES = [
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file '/nonexistent/prompt.txt' cannot be read: No such"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0 must be >= 0 (0: greedy)"),
    (["--prompt", "x", "--top-p", "0"], "--top-p 0.0 must be in (0, 1] (1: off)"),
    (["--prompt", "x", "--top-k", "-3"], "--top-k -3 must be >= 0 (0: off)"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--prompt", "x"], "no checkpoint in"),
]


@pytest.mark.parametrize("args, message", GENERATE_CASES, ids=[" ".join(a) for a, _ in GENERATE_CASES])
def test_generate_options_are_checked_before_loading(run_config, args, message, capsys):
    assert cli.main(["generate", "--workdir", str(run_config), *args]) == 2
    assert message in _one_error_line(capsys)


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "the training run's directory (required)" in out and "default: runs/" not in out
    sub = next(a for a in cli._parser()._actions if a.dest == "command")
    generate = sub.choices["generate"]
    undescribed = [a.dest for a in generate._actions if not a.help]
    assert undescribed == []


def test_info_needs_no_data_and_no_tokenizer(tmp_path, capsys, monkeypatch):
    """`info` compiles from abstract shapes: for a TFDS catalog dataset nothing is downloaded or prepared."""
    monkeypatch.setenv("TRANSFORMER_JAX_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(["info", "--config", "tiny", "--set", "data.source=tfds:lm1b", "--set", "data.tokenizer=bpe",
                     "--set", "data.vocab_size=512"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "per_device_temp_gib" in out
    assert not (tmp_path / "data").exists()


# -- a damaged run: checkpoints, config.json, tokenizer, metrics.jsonl (issue 16) ----------

def _run_args(corpus, *more):
    return ["--set", f"data.source=text_files:{corpus}", "--set", "train.sample_tokens=0", "--set",
            "train.eval_every=0", "--set", "train.eval_batches=1", "--set", "checkpoint.every_steps=2",
            "--set", "train.log_every=1", *more]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few stdlib files as a text_files corpus (prepared in a second, unlike the whole stdlib)."""
    d = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "shlex.py", "string.py", "bisect.py", "heapq.py", "colorsys.py"):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, d / f"{name}.txt")
    return str(d / "*.txt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """tiny trained for 4 steps (checkpoints 2 and 4), in its own data cache."""
    data_dir = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFORMER_JAX_DATA_DIR", str(data_dir))
        hardware.host_matmul_peak.cache_clear()  # an earlier test's peak (another data cache) is not this run's
        wd = tmp_path_factory.mktemp("runs") / "trained"
        assert cli.main(["train", "--config", "tiny", "--workdir", str(wd), "--set", "train.steps=4",
                         *_run_args(corpus)]) == 0
        yield wd, data_dir


@pytest.fixture
def run_copy(trained, tmp_path, monkeypatch):
    wd, data_dir = trained
    monkeypatch.setenv("TRANSFORMER_JAX_DATA_DIR", str(data_dir))
    shutil.copytree(wd, tmp_path / "run")
    return tmp_path / "run"


def _largest_state_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _records(wd: Path) -> list[dict]:
    return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # shares a 4-step training run (~1 min on a loaded 2-core machine)
def test_all_checkpoints_corrupt_is_one_line_that_names_the_way_to_start_fresh(run_copy, corpus, capsys):
    for step in ("2", "4"):
        victim = _largest_state_file(run_copy / "checkpoints" / step)
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    capsys.readouterr()
    for command in (["eval"], ["train"], ["generate", "--prompt", "def "]):
        assert cli.main([*command, "--workdir", str(run_copy)]) == 1
        line = _one_error_line(capsys)
        assert f"no intact checkpoint in {run_copy / 'checkpoints'}: step 4 is corrupt" in line
        assert "step 2 is corrupt" in line and "--set checkpoint.fresh_if_none_intact=true" in line
    assert cli.main(["train", "--workdir", str(run_copy), "--set", "checkpoint.fresh_if_none_intact=true"]) == 0
    assert "step 4: step budget reached" in capsys.readouterr().out
    assert sorted(p.name for p in (run_copy / "checkpoints" / "_quarantine").iterdir()) == ["2", "4"]
    assert [r["step"] for r in _records(run_copy) if r["kind"] == "train"] == [1, 2, 3, 4]  # the old run's dropped


@pytest.mark.slow  # shares a 4-step training run (~1 min on a loaded 2-core machine)
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_config_json_is_one_line_naming_it(run_copy, damage, capsys):
    path = run_copy / "config.json"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 3] = 0xFF  # not UTF-8
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    for command in (["eval"], ["train"], ["generate", "--prompt", "x"]):
        assert cli.main([*command, "--workdir", str(run_copy)]) == 2
        line = _one_error_line(capsys)
        assert f"{path} is damaged (" in line and "delete it and rerun with the run's --config" in line


@pytest.mark.slow  # shares a 4-step training run (~1 min on a loaded 2-core machine)
def test_a_truncated_tokenizer_meta_is_one_line_naming_it(run_copy, capsys):
    path = run_copy / "tokenizer" / "tokenizer_meta.json"
    path.write_bytes(path.read_bytes()[:10])
    assert cli.main(["eval", "--workdir", str(run_copy)]) == 2
    line = _one_error_line(capsys)
    assert f"{path} is damaged (JSONDecodeError" in line and "every checkpoint holds a copy" in line


@pytest.mark.slow  # shares a 4-step training run (~1 min on a loaded 2-core machine)
def test_a_torn_metrics_line_is_dropped_and_resumes_leave_no_duplicates(run_copy, capsys, caplog):
    """A kill mid-write tears the last line; a resume from step 2 trains steps 3 and 4 again."""
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "kind": "tr')
    shutil.rmtree(run_copy / "checkpoints" / "4")  # as if killed before step 4's checkpoint
    capsys.readouterr()
    assert cli.main(["train", "--workdir", str(run_copy), "--set", "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "step 5: step budget reached; checkpoint saved" in out
    assert "dropped 1 unreadable line(s)" in caplog.text
    assert "config differs from the one this workdir was started with (train.steps 4 -> 5)" in caplog.text
    assert [r["step"] for r in _records(run_copy) if r["kind"] == "train"] == [1, 2, 3, 4, 5]


@pytest.mark.slow  # shares a 4-step training run (~1 min on a loaded 2-core machine)
def test_max_new_tokens_beyond_max_len_is_said(run_copy, capsys):
    assert cli.main(["generate", "--workdir", str(run_copy), "--prompt", "def ", "--max-new-tokens", "300"]) == 0
    err = capsys.readouterr().err
    assert ("--max-new-tokens 300 cut to 59: the prompt's 5 tokens and the new ones must fit in model.max_len=64"
            in err)


@pytest.mark.slow  # shares a 4-step training run (~1 min on a loaded 2-core machine)
def test_progress_throughput_and_mfu_lines(trained):
    wd, data_dir = trained
    record = next(r for r in _records(wd) if r["kind"] == "train" and r["step"] == 4)
    # input tokens (8 x 64 a step) against loss targets (the non-padding ones): their ratio is exact
    assert record["tokens_per_s"] / record["targets_per_s"] == pytest.approx(8 * 64 / record["tokens"])
    assert json.loads((data_dir / "host_peak.json").read_text())  # the peak MFU divides by, measured once


@pytest.mark.slow  # compiles gpt2-small's train step (~20 s)
def test_info_on_gpt2_small_downloads_nothing(tmp_path, capsys, monkeypatch):
    """gpt2_small reads tfds:lm1b; `info` used to start a 4 GB download."""
    monkeypatch.setenv("TRANSFORMER_JAX_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(["info", "--config", "gpt2_small"]) == 0
    assert "124,475,904" in capsys.readouterr().out
    assert not (tmp_path / "data").exists()


def _subprocess(args, data_dir):
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRANSFORMER_JAX_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return subprocess.run([sys.executable, "-m", "transformer_jax", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_real_command_line_prints_one_error_line(tmp_path):
    proc = _subprocess(["train", "--workdir", str(tmp_path / "run"), "--set", "model.num_kv_heads=0"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("transformer-jax: error: model.num_kv_heads=0") and proc.stderr.count("\n") == 1


@pytest.mark.slow  # a real first run: corpus preparation, compiles, evaluation (~1 min)
def test_a_first_run_shows_its_phases_without_library_noise(tmp_path, corpus):
    args = ["--config", "tiny", "--workdir", str(tmp_path / "run"), *_run_args(corpus), "--set", "train.steps=4",
            "--set", "train.eval_every=2"]
    proc = _subprocess(["train", *args], tmp_path / "data")
    assert proc.returncode == 0, proc.stderr[-3000:]
    everything = proc.stdout + proc.stderr
    assert "Downloading and preparing" not in everything and "dataset_info.json" not in everything
    assert "preparing dataset text_files/" in proc.stderr
    assert "compiling the train step" in proc.stderr and "evaluating" in proc.stderr
    assert "MFU is of " in proc.stdout and "measured once (cached in" in proc.stdout
    assert "validation: loss " in proc.stdout and " nats/token, accuracy" in proc.stdout
    ev = _subprocess(["eval", "--workdir", str(tmp_path / "run")], tmp_path / "data")
    assert ev.returncode == 0 and "step 4: validation loss" in ev.stdout
    assert "compiling the eval step" in ev.stderr


def test_a_step_too_big_for_memory_is_one_line_before_it_runs(tmp_path, capsys):
    # xla attention's [B, H, L, L] scores at L = 2^18 need ~15 TB: XLA compiles the step (seconds),
    # the check against free memory stops it before the runtime's allocation fails with a traceback
    wd = tmp_path / "run"
    assert cli.main(["train", "--config", "tiny", "--workdir", str(wd), "--set", "train.seq_len=262144",
                     "--set", "model.max_len=262144", "--set", "model.attention=xla", "--set",
                     "train.global_batch_size=8", "--set", "train.steps=1", "--set", "train.sample_tokens=0"]) == 2
    err = capsys.readouterr().err  # the progress bar ("compiling the train step"), then the error line
    assert "Traceback" not in err and err.count("transformer-jax: error: ") == 1, err
    err = err.strip().splitlines()[-1]
    assert err.startswith("transformer-jax: error: the train step needs") and "train.seq_len" in err and "model.remat=full" in err
    assert not list((wd / "checkpoints").glob("[0-9]*"))  # no step ran, nothing saved
