"""A seconds-long smoke run of the whole trainer (tests and CI use it).

    transformer-jax train --config tiny --workdir /tmp/tiny

Trains gpt2-tiny (byte tokenizer) for 20 steps of 8 x 64 tokens on the embedded corpus.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="tiny",
        model=model_config("gpt2-tiny", scan_layers=True),
        data=DataConfig(tokenizer="byte"),
        task=TaskConfig(task="lm"),
        train=TrainConfig(steps=20, seq_len=64, global_batch_size=8, eval_every=10, eval_batches=2, log_every=5,
                          sample_tokens=16),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=10, keep_last=2),
    )
