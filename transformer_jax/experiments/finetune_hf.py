"""Fine-tune a Hugging Face Llama / Mistral / Qwen2 checkpoint (causal LM) with its own
tokenizer, then export it back to a directory `transformers` loads.

    transformer-jax train --config finetune_hf --set init_from=hf:path/to/llama --workdir runs/finetune_hf
    transformer-jax export --workdir runs/finetune_hf --to runs/finetune_hf/hf
    # your own text instead of the embedded corpus:  --set data.source=text_files:path/to/texts
    # full fine-tune instead of LoRA:  --set model.lora_rank=0 --set optimizer.learning_rate=2e-5
    # on accelerators:  --set model.dtype=bfloat16 --set mesh.preset=fsdp

`path/to/llama` is a `save_pretrained` directory: config.json, model.safetensors (or shards
listed in model.safetensors.index.json; float32 or bfloat16) and tokenizer.json (+
tokenizer_config.json naming bos/eos). The model's shape comes from config.json; the
experiment sets only what does not change the weights (dtype, LoRA, remat, scan, attention
kernel). Documents are fed as `bos text eos` in the checkpoint's ids; padding is masked by
segment ids, so no pad token is needed. The `model` below only stands in until init_from
names a checkpoint (without one, this trains a tiny Llama from scratch on bytes).

LoRA rank 8 on every attention and MLP projection (the base weights stay frozen), lr 2e-4,
200 steps of 8 x 512 tokens. Export merges the adapters into the weights.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="finetune_hf",
        model=model_config("llama-tiny", lora_rank=8, lora_alpha=16.0),
        data=DataConfig(source="python_source", task="lm", tokenizer="byte"),
        task=TaskConfig(task="lm"),
        train=TrainConfig(steps=200, seq_len=512, global_batch_size=8, eval_every=100, eval_batches=16,
                          log_every=10, sample_tokens=64),
        optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=20, weight_decay=0.0, lora_train=()),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=2),
        init_from=None,
    )
