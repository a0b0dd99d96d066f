"""BERT-style masked LM on the embedded Python-source corpus, a few minutes on a 2-core CPU.

    transformer-jax train --config bert_mlm

A 4-layer, 256-wide post-norm encoder (BERT's recipe: learned positions, embedding LayerNorm,
GELU, MLM head tied to the embeddings) learns to fill in 15% of the tokens (80% [MASK],
10% random, 10% kept). Reports masked-token loss and accuracy on the validation split.
The checkpoint is the backbone the transfer experiment fine-tunes.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="bert_mlm",
        model=model_config("bert-base", vocab_size=8192, d_model=256, num_heads=4, num_layers=4, d_ff=1024,
                           max_len=128),
        data=DataConfig(source="python_source", task="mlm", tokenizer="bpe", vocab_size=8192),
        task=TaskConfig(task="mlm"),
        train=TrainConfig(steps=400, time_budget_s=300, seq_len=128, global_batch_size=32, eval_every=100,
                          eval_batches=20, log_every=10),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=40),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=2),
    )
