"""GPT-2 XL (1.56B) causal LM on One Billion Word, sized for a TPU v5p-32 slice (16 chips, 4 hosts).

    bash launch/tpu_vm.sh --name gpt2-xl --type v5p-32 -- --config gpt2_xl
    transformer-jax plan --config gpt2_xl --chip v5p             # the prediction below

Hardware: TPU v5p-32 = 16 chips (95 GiB HBM each) on 4 hosts, one ICI domain. Mesh data=1 x
fsdp=16 x tensor=1, preset fsdp. Batch 512 x 1024 tokens (0.5M tokens/step) in 2 microbatches
of 16 rows per chip, remat "dots" (one microbatch: 93 GiB per chip, over the 90 usable);
bf16 compute, f32 master parameters; splash attention (head_dim 64, zero-padded to 128).

Expected -- a `plan` PREDICTION for 16 x v5p, not a measurement:
47.3 GiB of the 90.2 GiB usable per chip; step 1,829 ms, 17,918 tokens/s/chip, MFU 40%
(matmuls 917 ms at 80% of peak, memory-bound ops 910 ms, communication not hidden 2 ms of 192;
bounds: 733 ms with everything overlapped at full peak, 1,835 ms with nothing overlapped).

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
        name="gpt2_xl",
        model=model_config("gpt2-xl", dtype="bfloat16", param_dtype="float32", remat="dots"),
        data=DataConfig(source="tfds:lm1b", task="lm", tokenizer="bpe", vocab_size=50304, eval_split="test"),
        task=TaskConfig(task="lm"),
        train=TrainConfig(steps=40_000, seq_len=1024, global_batch_size=512, eval_every=1000, eval_batches=50,
                          log_every=50, sample_tokens=64, sample_prompt="The "),
        optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=1000, schedule="cosine", end_ratio=0.1,
                                  b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=2),
        mesh=MeshConfig(data=1, fsdp=16, tensor=1, preset="fsdp"),
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=3),
    )
