"""GPT-2 medium (355M) causal LM on One Billion Word, sized for one node of 8 x H100 80GB.

    sbatch --nodes=1 launch/gpu_slurm.sbatch -- --config gpt2_medium
    transformer-jax plan --config gpt2_medium --chip h100        # the prediction below

Hardware: 8 x H100 SXM (NVLink/NVSwitch, one node). Mesh data=1 x fsdp=8 x tensor=1, preset
fsdp. Batch 512 x 1024 tokens (0.5M tokens/step) in 2 microbatches of 32 rows per GPU,
remat "dots"; bf16 compute, f32 master parameters; attention: cuDNN flash attention (`auto`).

Expected -- a `plan` PREDICTION for 8 x h100, not a measurement:
30.7 GiB of the 72.0 GiB usable per chip; step 710 ms, 92,322 tokens/s/chip, MFU 23%
(matmuls 201 ms at 80% of peak, memory-bound ops 508 ms, communication not hidden 1 ms of 16;
bounds: 161 ms with everything overlapped at full peak, 710 ms with nothing overlapped).

Data: tfds:lm1b (see gpt2_small.py).
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gpt2_medium",
        model=model_config("gpt2-medium", dtype="bfloat16", param_dtype="float32", remat="dots"),
        data=DataConfig(source="tfds:lm1b", task="lm", tokenizer="bpe", vocab_size=50304, eval_split="test"),
        task=TaskConfig(task="lm"),
        train=TrainConfig(steps=40_000, seq_len=1024, global_batch_size=512, eval_every=1000, eval_batches=50,
                          log_every=50, sample_tokens=64, sample_prompt="The "),
        optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=1000, schedule="cosine", end_ratio=0.1,
                                  b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=2),
        mesh=MeshConfig(data=1, fsdp=8, tensor=1, preset="fsdp"),
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=3),
    )
