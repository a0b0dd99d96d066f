"""Malformed configs and command lines give one-line errors (exit status 2), never tracebacks."""
from pathlib import Path

import pytest

from transformer_jax import cli

CASES = [
    (["--set", "train.stepz=3"], "unknown key 'train.stepz'; valid keys: steps, time_budget_s"),
    (["--set", "train.steps=abc"], "train.steps='abc' must be an integer"),
    (["--set", "train.steps=-1"], "train.steps=-1 must be positive"),
    (["--set", "train.seq_len=1"], "train.seq_len=1 must be at least 2"),
    (["--set", "train.seq_len=512"], "train.seq_len=512 exceeds model.max_len=256"),
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
