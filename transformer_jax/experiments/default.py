"""The default experiment: a small GPT-style decoder LM on the Python standard library's own
source (the embedded corpus: no download), 15 minutes on a 2-core CPU.

    transformer-jax train                      # = --config default, workdir runs/default

It trains a byte-level BPE tokenizer (8192 ids) on the train split, then the model until the
step budget or the wall-clock budget (whichever comes first), evaluates on the first 8
validation batches every 60 steps and on the whole validation split at the end, and reports
bits per byte next to gzip -9, xz -9e, brotli 11, zstd 22 and PPMd (order 6 and 16) on the same
text, as one stream and per document, with the step and second at which validation first beat
each (summary.json, and loss.png in bits per byte with the compressors as lines).

The recipe (transformer_jax/experiments/speedrun_ablation.md): RoPE, RMSNorm, no biases, and
Muon (peak lr 0.02) for the layers' kernels with AdamW (3e-3) for embeddings and norms, cosine
from the peak to 0.3x of it over 360 steps (the 840 s budget ends it ~10 steps early).

Measured alone on 2026-12-03 on a 2-core Intel Xeon VM (kernel THP mode madvise, so the
command line ran with huge pages: hugepages.py), from a fresh data directory (corpus
preparation and tokenizer training included): 347 steps in the 840 s budget (~1,700 tokens/s),
14:36 wall clock in all. Validation on the whole split (592,450 bytes): 3.741 nats/token,
accuracy 0.371, **1.504 bits/byte**, below gzip -9 (1.939; first at step 120, 309 s), zstd 22
(1.626; step 240, 594 s), xz -9e (1.571; step 300, 733 s) and brotli 11 (1.521; step 347, 843
s); not PPMd order 6 (1.489) or order 16 (1.391). Per document (as the model reads the text) it
is below all six: gzip -9 2.045, xz -9e 1.910, brotli 11 1.711, zstd 22 1.905, PPMd order 6
1.679, order 16 1.621. See RESULTS; the step and time figures vary with the CPU.

The recipe scales (speedrun_ablation.md): at 2x and 4x those steps (`--set train.steps=694
--set train.time_budget_s=none`, and 1388; ~2x and ~4x the 15 minutes alone) it reaches 1.209
and 1.048 bits/byte, below PPMd order 16 (1.391) from step 480 on.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import ModelConfig
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig

RESULTS = {"date": "2026-12-03", "step": 347, "tokens": 1_421_312, "val_loss": 3.7409, "bits_per_byte": 1.504,
           "gzip -9": 1.939, "zstd 22": 1.626, "xz -9e": 1.571, "brotli 11": 1.521, "ppmd o6": 1.489,
           "ppmd o16": 1.391, "elapsed_s": 876}


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="default",
        model=ModelConfig(family="decoder", vocab_size=8192, d_model=256, num_heads=4, num_layers=4, d_ff=1024,
                          max_len=256, position="rope", norm="rmsnorm", norm_position="pre",
                          activation="gelu_tanh", use_bias=False, tie_embeddings=True, scan_layers=True),
        data=DataConfig(source="python_source", task="lm", tokenizer="bpe", vocab_size=8192),
        task=TaskConfig(task="lm"),
        train=TrainConfig(steps=360, time_budget_s=840, seq_len=256, global_batch_size=16, eval_every=60,
                          periodic_eval_batches=8, eval_batches=None, log_every=10, sample_tokens=96, sample_prompt="def "),
        optimizer=OptimizerConfig(optimizer="muon", muon_learning_rate=0.02, learning_rate=3e-3, warmup_steps=30,
                                  schedule="cosine", end_ratio=0.3, weight_decay=0.1, clip_norm=1.0),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=2),
    )
