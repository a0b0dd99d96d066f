"""GPT-2 small (124M) causal LM on One Billion Word, sized for one TPU v5e-8 host (8 chips).

    bash launch/tpu_vm.sh --name gpt2-small --type v5litepod-8 -- --config gpt2_small
    transformer-jax plan --config gpt2_small --chip v5e          # the prediction below

Hardware: TPU v5e-8 (8 chips, 16 GiB HBM each, one host). Mesh data=1 x fsdp=8 x tensor=1,
preset fsdp (parameters, gradients and Adam moments sharded 8 ways; all-gathered per layer).
Batch 512 x 1024 tokens (0.5M tokens/step, GPT-2/nanoGPT) in 2 microbatches of 32 rows per
chip, remat "dots" (without it: 23 GiB per chip); bf16 compute, f32 master parameters; splash
attention (head_dim 64, zero-padded to the 128 lanes).

Expected -- a `plan` PREDICTION for 8 x v5e, not a measurement:
12.5 GiB of the 15.2 GiB usable per chip; step 1,268 ms, 51,676 tokens/s/chip, MFU 22%
(matmuls 355 ms at 80% of peak, memory-bound ops 909 ms, communication not hidden 4 ms of 28;
bounds: 284 ms with everything overlapped at full peak, 1,268 ms with nothing overlapped).

Data: tfds:lm1b (One Billion Word, ~4 GB, downloaded and prepared on first use into
$TRANSFORMER_JAX_DATA_DIR; its eval split is "test"). OpenWebText is not in the TFDS catalog:
for GPT-2's own recipe use --set data.source=text_files:/path/to/openwebtext/*.txt.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gpt2_small",
        model=model_config("gpt2-small", dtype="bfloat16", param_dtype="float32", remat="dots"),
        data=DataConfig(source="tfds:lm1b", task="lm", tokenizer="bpe", vocab_size=50304, eval_split="test"),
        task=TaskConfig(task="lm"),
        train=TrainConfig(steps=20_000, seq_len=1024, global_batch_size=512, eval_every=1000, eval_batches=50,
                          log_every=50, sample_tokens=64, sample_prompt="The "),
        optimizer=OptimizerConfig(learning_rate=6e-4, warmup_steps=700, schedule="cosine", end_ratio=0.1,
                                  b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=2),
        mesh=MeshConfig(data=1, fsdp=8, tensor=1, preset="fsdp"),
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=3),
    )
