"""`ExperimentConfig`: everything one run needs, typed and validated, and how to load it.

An experiment file is a Python module with `get_config() -> ExperimentConfig`, whose
docstring gives the command and the result it should reach. `--set key.path=value`
overrides any field; an unknown key or a wrong type is a one-line `ConfigError`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Literal

from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.config import Config, ConfigError
from transformer_jax.data.config import DataConfig
from transformer_jax.models.config import ModelConfig
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"  # shipped in the package
DEFAULT_EXPERIMENT = EXPERIMENTS_DIR / "default.py"


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    steps: int = 1000  # the step budget (and the length of the LR schedule)
    time_budget_s: float | None = None  # wall-clock budget for the whole run, resumes included
    seq_len: int = 512
    target_seq_len: int | None = None  # seq2seq targets (None: the task's default)
    global_batch_size: int = 8
    eval_every: int = 200  # 0: only at the end
    eval_batches: int | None = None  # None: the whole validation split (bits per byte against the compressors)
    periodic_eval_batches: int | None = None  # evaluations during training: the first N batches (the same ones each
    #                                          time); None: as eval_batches
    log_every: int = 10
    seed: int = 0
    sample_tokens: int = 96  # a decoder LM prints a sample of this many tokens at the end (0: none)
    sample_prompt: str = "def "
    profile_steps: tuple[int, int] | None = None  # [start, stop]: a jax.profiler trace of these steps in tensorboard/
    tracker: Literal["none", "wandb"] = "none"  # besides TensorBoard; wandb runs offline unless WANDB_MODE=online

    def validate(self) -> None:
        for name in ("steps", "seq_len", "global_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be positive")
        if self.seq_len < 2:
            raise ConfigError(f"train.seq_len={self.seq_len} must be at least 2")
        for name in ("eval_batches", "periodic_eval_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be positive or none (none: whole split)")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every={self.eval_every} must be >= 0 (0: only at the end)")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"train.time_budget_s={self.time_budget_s} must be positive or none")
        if self.profile_steps is not None and not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
            raise ConfigError(f"train.profile_steps={list(self.profile_steps)} must be [start, stop] with "
                              "1 <= start <= stop (steps count from 1), e.g. [10, 12]")
        if self.tracker == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.tracker='wandb' needs the wandb package: pip install wandb "
                              "(or set train.tracker=none)")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Config):
    name: str = "experiment"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    task: TaskConfig = TaskConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    init_from: str | None = None  # a run dir or step dir to start the parameters from (fine-tuning)

    def validate(self) -> None:
        if self.data.task != self.task.task:
            raise ConfigError(f"data.task={self.data.task!r} and task.task={self.task.task!r} disagree; set both "
                              f"(--set data.task=X --set task.task=X)")
        need = {"lm": "decoder", "mlm": "encoder", "classify": "encoder", "span": "encoder_decoder",
                "seq2seq": "encoder_decoder"}[self.task.task]
        if self.model.family != need:
            raise ConfigError(f"task {self.task.task!r} needs model.family={need!r}, got {self.model.family!r}; "
                              "choose another model preset")
        f = self.task.mlm_predict_fraction
        if self.task.task == "mlm" and 0 < f < self.data.mask_rate:
            raise ConfigError(f"task.mlm_predict_fraction={f} is below data.mask_rate={self.data.mask_rate}: the "
                              "MLM head would not reach every masked position; raise it (or 0: every position)")
        if self.model.position == "learned" and self.train.seq_len > self.model.max_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_len={self.model.max_len}; "
                              "raise model.max_len or lower train.seq_len")


def load_experiment(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Imports the experiment file (a path, or the name of a shipped experiment; default:
    `default`) and applies overrides."""
    path = Path(path) if path else DEFAULT_EXPERIMENT
    if not path.exists() and not path.suffix and (EXPERIMENTS_DIR / f"{path}.py").exists():
        path = EXPERIMENTS_DIR / f"{path}.py"  # `--config bert_mlm`: the shipped bert_mlm.py
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py") if not p.stem.startswith("_")))
        raise ConfigError(f"config file {str(path)!r} not found; shipped experiments: {known}")
    if path.is_dir() or path.suffix != ".py":
        raise ConfigError(f"--config {str(path)!r} is not an experiment file; give a .py file with get_config() "
                          f"or an experiment name (e.g. --config tiny)")
    spec = importlib.util.spec_from_file_location(f"_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as e:  # a syntax error or a bad import in the user's file: say where
        raise ConfigError(f"config file {str(path)!r} failed to load: {type(e).__name__}: {_first_line(e)}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} has no get_config() function")
    try:
        cfg = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # the user's get_config() failed: say where
        raise ConfigError(f"get_config() in {str(path)!r} failed: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"get_config() in {str(path)!r} must return an ExperimentConfig, got {type(cfg).__name__}")
    return cfg.apply_overrides(list(overrides))


def load_run_config(workdir: str | Path) -> ExperimentConfig:
    """The effective config a run saved in `workdir/config.json` (a damaged file: one line naming it)."""
    path = Path(workdir) / "config.json"
    try:
        return ExperimentConfig.from_json(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is damaged ({type(e).__name__}: {_first_line(e)}); delete it and rerun with "
                          "the run's --config and --set options") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
