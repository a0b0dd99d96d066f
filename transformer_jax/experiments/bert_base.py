"""BERT-base (110M) masked LM on One Billion Word, sized for one TPU v5e-8 host (8 chips).

    bash launch/tpu_vm.sh --name bert-base --type v5litepod-8 -- --config bert_base
    transformer-jax plan --config bert_base --chip v5e           # the prediction below

Hardware: TPU v5e-8 (8 chips, 16 GiB each, one host). Mesh data=8 x fsdp=1 x tensor=1, preset
dp (110M parameters: the f32 weights, 0.4 GiB, replicated; Adam's moments and the update split
over data; each step reduce-scatters the gradients and all-gathers the weights once). Batch
256 x 512 tokens (BERT's long-sequence phase) in 2 microbatches of 16 rows per chip, remat
"dots" (one microbatch without remat: 32 GiB per chip); 15% masked (80/10/10), post-LayerNorm,
GELU; bf16 compute, f32 master parameters; splash attention (padded batches: segment ids).

Expected -- a `plan` PREDICTION for 8 x v5e, not a measurement:
8.5 GiB of the 15.2 GiB usable per chip; step 401 ms, 40,858 tokens/s/chip, MFU 12%
(matmuls 64 ms at 80% of peak, memory-bound ops 329 ms, communication not hidden 9 ms of 9;
bounds: 51 ms with everything overlapped at full peak, 401 ms with nothing overlapped).

Data: tfds:lm1b (sentences packed to 512 tokens). BERT's own corpus (Wikipedia + BooksCorpus)
is not in the TFDS catalog ready to use; point --set data.source=text_files:... at yours.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="bert_base",
        model=model_config("bert-base", dtype="bfloat16", param_dtype="float32", remat="dots"),
        data=DataConfig(source="tfds:lm1b", task="mlm", tokenizer="bpe", vocab_size=30592, eval_split="test"),
        task=TaskConfig(task="mlm"),
        train=TrainConfig(steps=100_000, seq_len=512, global_batch_size=256, eval_every=2000, eval_batches=50,
                          log_every=50),
        optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=10_000, schedule="linear", end_ratio=0.0,
                                  b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, clip_norm=1.0,
                                  grad_accum_steps=2),
        mesh=MeshConfig(data=8, fsdp=1, tensor=1, preset="dp"),
        checkpoint=CheckpointConfig(every_steps=2000, keep_last=3),
    )
