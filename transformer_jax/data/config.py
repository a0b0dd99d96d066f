"""`DataConfig`: which corpus, which tokenizer, which task; plus where data is cached.

Sources (`DataConfig.source`):
  "python_source"              the running interpreter's stdlib `.py` files (the default)
  "python_functions"           functions extracted from those files, for fine-tuning:
                               task="classify" (which package) or task="seq2seq" (its name)
  "text_files:<dir or glob>"   a user's own text files
  "tfds:<name>[/config][:ver]" any TFDS catalog dataset (needs the network the first time)

Field names default per source (see `fields`); the cache lives in `data_dir`, else
$TRANSFORMER_JAX_DATA_DIR, else ~/.cache/transformer_jax.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

from transformer_jax.config import Config, ConfigError

Task = Literal["lm", "mlm", "span", "seq2seq", "classify"]
TASKS = ("lm", "mlm", "span", "seq2seq", "classify")
_LOCAL_TASKS = {"python_source": ("lm", "mlm", "span"), "text_files": ("lm", "mlm", "span"),
                "python_functions": ("classify", "seq2seq", "lm", "mlm", "span")}
# Default field names per source kind: text (lm/mlm/span/classify), input/target (seq2seq), label.
_DEFAULT_FIELDS = {
    "python_source": dict(text="text"),
    "text_files": dict(text="text"),
    "python_functions": dict(text="function", input="masked", target="name", label="package"),
    "tfds": dict(text="text", label="label"),
}


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Data settings. Fields left None take the source's default (see `fields`)."""
    source: str = "python_source"
    task: Task = "lm"
    data_dir: str | None = None
    tokenizer: Literal["bpe", "byte"] = "bpe"
    vocab_size: int = 8192          # bpe only; the byte tokenizer always has 384 ids
    tokenizer_source: str | None = None  # corpus the bpe tokenizer is trained on (default: source;
    #                                      python_functions uses python_source, so fine-tuning shares it)
    text_field: str | None = None
    input_field: str | None = None
    target_field: str | None = None
    label_field: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"  # e.g. "test" for tfds:lm1b
    worker_count: int = 0           # grain worker processes; 0 = threads in this process
    seed: int = 0
    mask_rate: float = 0.15         # mlm: fraction of tokens selected (80% mask, 10% random, 10% kept)
    noise_density: float = 0.15     # span corruption (T5)
    mean_noise_span_length: float = 3.0

    def validate(self) -> None:
        kind, _ = parse_source(self.source)
        if self.tokenizer_source is not None:
            parse_source(self.tokenizer_source, key="tokenizer_source")
        if self.vocab_size % 128 or self.vocab_size < 384:
            raise ConfigError(f"DataConfig.vocab_size={self.vocab_size} must be a multiple of 128 and >= 384; "
                              "try 8192 or 16384")
        if self.worker_count < 0:
            raise ConfigError(f"DataConfig.worker_count={self.worker_count} must be >= 0")
        for name in ("mask_rate", "noise_density"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"DataConfig.{name}={getattr(self, name)} must be in (0, 1)")
        if self.mean_noise_span_length < 1.0:
            raise ConfigError(f"DataConfig.mean_noise_span_length={self.mean_noise_span_length} must be >= 1")
        allowed = _LOCAL_TASKS.get(kind, TASKS)
        if self.task not in allowed:
            raise ConfigError(f"DataConfig.task={self.task!r} does not fit source {self.source!r}; "
                              f"use one of {', '.join(allowed)}")
        fields(self)  # raises if a needed field has no default


def parse_source(source: str, key: str = "source") -> tuple[str, str]:
    """'tfds:lm1b' -> ('tfds', 'lm1b'); 'python_source' -> ('python_source', '')."""
    kind, sep, arg = source.partition(":")
    if kind in ("python_source", "python_functions") and not sep:
        return kind, ""
    if kind in ("text_files", "tfds") and sep and arg:
        return kind, arg
    raise ConfigError(f"DataConfig.{key}={source!r} is not a source; use python_source, python_functions, "
                      "text_files:<dir or glob> or tfds:<name>[/config][:version]")


def fields(cfg: DataConfig) -> dict[str, str | None]:
    """The record fields this config reads: {'text', 'input', 'target', 'label'} -> name or None."""
    kind, _ = parse_source(cfg.source)
    default = _DEFAULT_FIELDS[kind]
    out = {"text": cfg.text_field or default.get("text"),
           "input": cfg.input_field or default.get("input"),
           "target": cfg.target_field or default.get("target"),
           "label": cfg.label_field or default.get("label")}
    if cfg.task == "seq2seq" and not (out["input"] and out["target"]):
        raise ConfigError(f"DataConfig.input_field and target_field must be set for task='seq2seq' with "
                          f"source {cfg.source!r} (e.g. input_field=de target_field=en)")
    return out


def tokenizer_source(cfg: DataConfig) -> str:
    """The source whose train split the bpe tokenizer is trained on."""
    if cfg.tokenizer_source:
        return cfg.tokenizer_source
    return "python_source" if cfg.source == "python_functions" else cfg.source


def data_dir(cfg: DataConfig) -> str:
    """Where builders, tokenizers and token caches live."""
    path = cfg.data_dir or os.environ.get("TRANSFORMER_JAX_DATA_DIR") or "~/.cache/transformer_jax"
    return os.path.abspath(os.path.expanduser(path))
