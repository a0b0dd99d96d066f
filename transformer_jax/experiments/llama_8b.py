"""A Llama-3-8B-shaped decoder (8.0B: GQA 32/8 heads, SwiGLU, RoPE, untied 128k vocabulary) on
PG-19 at 8k context, sized for a TPU v5p-64 slice (32 chips, 8 hosts).

    bash launch/tpu_vm.sh --name llama-8b --type v5p-64 -- --config llama_8b
    transformer-jax plan --config llama_8b --chip v5p            # the prediction below

Hardware: TPU v5p-64 = 32 chips (95 GiB HBM each) on 8 hosts, one ICI domain. Mesh data=1 x
fsdp=32 x tensor=1, preset fsdp (the f32 state, 16 bytes per parameter = 120 GiB, is split 32
ways). Batch 64 x 8192 tokens (0.5M tokens/step), 2 rows per chip, remat "full"; bf16
compute, f32 master parameters; splash attention. On 8 x H100 the same model needs
--mesh data=1,fsdp=8 and more remat/accumulation: run `plan --chip h100` first.

Expected -- a `plan` PREDICTION for 32 x v5p (`--layers 2`), not a measurement:
12.5 GiB of the 90.2 GiB usable per chip; step 3,894 ms, MFU 53.1%, 4,208 tokens/s/chip
(matmuls 3,231 ms at 80% of peak, memory-bound ops 660 ms, FSDP gathers and scatters hidden:
54.0 GiB all-gathered and 28.0 GiB reduce-scattered per chip, each 1.00x its textbook bytes,
and the token lookup's 0.5 GiB all-to-all, 3 ms, not hidden); hardware FLOPs 1.25x the model's
(full remat recomputes the layers' forward but the MLP down projection; the unembedding is not
recomputed). Footnote range 2,585 ms (all at peak, all overlapped, MFU 80%) .. 3,894 ms.

Data: tfds:pg19 (text field "book_text"); the tokenizer is trained here, not Meta's.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llama_8b",
        model=model_config("llama-8b", dtype="bfloat16", param_dtype="float32", remat="full"),
        data=DataConfig(source="tfds:pg19", task="lm", tokenizer="bpe", vocab_size=128256, text_field="book_text"),
        task=TaskConfig(task="lm", z_loss=1e-4),
        train=TrainConfig(steps=50_000, seq_len=8192, global_batch_size=64, eval_every=2000, eval_batches=20,
                          log_every=20, sample_tokens=64, sample_prompt="The "),
        optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=2000, schedule="cosine", end_ratio=0.1,
                                  b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=32, tensor=1, preset="fsdp"),
        checkpoint=CheckpointConfig(every_steps=500, keep_last=3),
    )
