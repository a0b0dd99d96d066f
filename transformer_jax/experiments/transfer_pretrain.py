"""Transfer learning, step 1: masked-LM pretraining of a BERT-style Encoder on the embedded
Python-source corpus; its checkpoint is the backbone `transfer_classify.py` fine-tunes.

    transformer-jax train --config transfer_pretrain --workdir runs/transfer_pretrain

A 4-layer, 128-wide BERT (post-norm, learned positions, embedding LayerNorm, GELU, MLM head
tied to the embeddings; 1.88M parameters, bpe 8192) fills in 15% of the tokens of
32 x 128-token rows for 520 steps (2.1M tokens), peak lr 2e-3, cosine.

Result on this 2-core CPU (measured, the run above, on python_source 1.0.0, which still held
the functions python_functions now validates on): 7 min 51 s; validation masked-token loss
5.660 nats, accuracy 0.144 (20 batches). Fine-tuning from it: see transfer_classify.py.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig

SEQ_LEN = 128


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="transfer_pretrain",
        model=model_config("bert-base", vocab_size=8192, d_model=128, num_heads=4, num_layers=4, d_ff=512,
                           max_len=SEQ_LEN, num_classes=16),
        data=DataConfig(source="python_source", task="mlm", tokenizer="bpe", vocab_size=8192),
        task=TaskConfig(task="mlm"),
        train=TrainConfig(steps=520, time_budget_s=480, seq_len=SEQ_LEN, global_batch_size=32, eval_every=260,
                          eval_batches=20, log_every=10),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=50),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=260, keep_last=1),
    )
