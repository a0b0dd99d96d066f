"""DataConfig: defaults, per-source fields, one-line validation errors, overrides."""
import pytest

from transformer_jax.config import ConfigError
from transformer_jax.data import config as dc
from transformer_jax.data.config import DataConfig


def test_defaults_are_the_embedded_lm():
    cfg = DataConfig()
    assert (cfg.source, cfg.task, cfg.tokenizer, cfg.vocab_size) == ("python_source", "lm", "bpe", 8192)
    assert dc.fields(cfg)["text"] == "text"
    assert dc.tokenizer_source(cfg) == "python_source"


def test_python_functions_defaults_and_shared_tokenizer():
    cfg = DataConfig(source="python_functions", task="seq2seq")
    f = dc.fields(cfg)
    assert (f["input"], f["target"], f["label"], f["text"]) == ("masked", "name", "package", "function")
    assert dc.tokenizer_source(cfg) == "python_source"


@pytest.mark.parametrize("source, kind, arg", [
    ("python_source", "python_source", ""), ("text_files:/a/b", "text_files", "/a/b"),
    ("tfds:wmt14_translate/de-en:1.0.0", "tfds", "wmt14_translate/de-en:1.0.0")])
def test_parse_source(source, kind, arg):
    assert dc.parse_source(source) == (kind, arg)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(source="lm1b"), "DataConfig.source='lm1b'"),
    (dict(source="text_files:"), "text_files:<dir or glob>"),
    (dict(vocab_size=1000), "vocab_size=1000"),
    (dict(vocab_size=256), "vocab_size=256"),
    (dict(worker_count=-1), "worker_count"),
    (dict(mask_rate=1.5), "mask_rate"),
    (dict(task="classify"), "task='classify'"),
    (dict(source="tfds:wmt14_translate/de-en", task="seq2seq"), "input_field"),
    (dict(tokenizer="sentencepiece"), "tokenizer"),
])
def test_bad_settings_raise_one_line(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        DataConfig(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_string_overrides_and_json_round_trip():
    cfg = DataConfig().apply_overrides(["source=tfds:lm1b", "eval_split=test", "vocab_size=16384", "worker_count=2"])
    assert (cfg.source, cfg.eval_split, cfg.vocab_size, cfg.worker_count) == ("tfds:lm1b", "test", 16384, 2)
    assert DataConfig.from_json(cfg.to_json()) == cfg


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMER_JAX_DATA_DIR", str(tmp_path / "env"))
    assert dc.data_dir(DataConfig()) == str(tmp_path / "env")
    assert dc.data_dir(DataConfig(data_dir=str(tmp_path / "cfg"))) == str(tmp_path / "cfg")
    monkeypatch.delenv("TRANSFORMER_JAX_DATA_DIR")
    assert dc.data_dir(DataConfig()).endswith(".cache/transformer_jax")
