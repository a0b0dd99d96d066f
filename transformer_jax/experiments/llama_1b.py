"""A Llama-3.2-1B-shaped decoder (1.24B: GQA 32/8 heads, SwiGLU, RoPE, RMSNorm, 128k vocabulary)
on PG-19 at 4k context, sized for one TPU v6e-8 host (8 Trillium chips).

    bash launch/tpu_vm.sh --name llama-1b --type v6e-8 -- --config llama_1b
    transformer-jax plan --config llama_1b --chip v6e            # the prediction below

Hardware: TPU v6e-8 (8 chips, 32 GiB each, one host). Mesh data=1 x fsdp=8 x tensor=1, preset
fsdp. Batch 64 x 4096 tokens (262k tokens/step), 8 rows per chip, remat "full"; bf16 compute,
f32 master parameters; splash attention (head_dim 64, zero-padded to the 128 lanes).

Expected -- a `plan` PREDICTION for 8 x v6e, not a measurement:
13.0 GiB of the 30.4 GiB usable per chip; step 1,103 ms, 29,709 tokens/s/chip, MFU 29%
(matmuls 490 ms at 80% of peak, memory-bound ops 611 ms, communication not hidden 3 ms of 70;
bounds: 392 ms with everything overlapped at full peak, 1,103 ms with nothing overlapped).

Data: tfds:pg19 (books: long documents for a 4k context; text field "book_text"). The
tokenizer is a byte-level BPE trained here with the model's 128,256 ids, not Meta's.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llama_1b",
        model=model_config("llama-1b", max_len=4096, dtype="bfloat16", param_dtype="float32", remat="full"),
        data=DataConfig(source="tfds:pg19", task="lm", tokenizer="bpe", vocab_size=128256, text_field="book_text"),
        task=TaskConfig(task="lm", z_loss=1e-4),
        train=TrainConfig(steps=50_000, seq_len=4096, global_batch_size=64, eval_every=2000, eval_batches=20,
                          log_every=50, sample_tokens=64, sample_prompt="The "),
        optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=2000, schedule="cosine", end_ratio=0.1,
                                  b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=8, tensor=1, preset="fsdp"),
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=3),
    )
