"""T5-style span corruption on the embedded Python-source corpus, a few minutes on a 2-core CPU.

    transformer-jax train --config t5_span

A 3+3-layer encoder-decoder with T5's recipe (relative position bias, pre-RMSNorm, ReLU,
tied and scaled output) learns to reconstruct the 15% of tokens hidden in spans of mean
length 3, each span replaced by a sentinel. Reports target loss and accuracy on validation.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="t5_span",
        model=model_config("t5-small", vocab_size=8192, d_model=256, num_heads=4, head_dim=64, num_layers=3,
                           d_ff=1024),
        data=DataConfig(source="python_source", task="span", tokenizer="bpe", vocab_size=8192),
        task=TaskConfig(task="span"),
        train=TrainConfig(steps=400, time_budget_s=300, seq_len=256, global_batch_size=16, eval_every=100,
                          eval_batches=20, log_every=10),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=40),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=2),
    )
