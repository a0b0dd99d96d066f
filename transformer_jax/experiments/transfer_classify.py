"""Transfer learning, step 2: fine-tune the MLM-pretrained Encoder of `transfer_pretrain.py`
to name the stdlib package a function comes from (python_functions, task "classify",
16 classes), against the same model and budget from random initialisation.

    # once, in the same directory: the backbone (init_from's default, runs/transfer_pretrain)
    transformer-jax train --config transfer_pretrain --workdir runs/transfer_pretrain
    # fine-tune from it: backbone restored, fresh classifier head (pooler + linear)
    transformer-jax train --config transfer_classify --workdir runs/transfer_classify
    # the baseline: same config and budget, random init
    transformer-jax train --config transfer_classify --workdir runs/transfer_scratch --set init_from=none
    # LoRA: rank-8 adapters on every attention/MLP kernel; backbone frozen, adapters + head train
    transformer-jax train --config transfer_classify --workdir runs/transfer_lora \\
        --set model.lora_rank=8 --set optimizer.learning_rate=2e-3
    # a backbone elsewhere: --set init_from=DIR
    # other seeds: --set train.seed=1 (head init and data order; the whole init from scratch)

The model (shape, tokenizer: bpe 8192 trained on python_source) is the pretraining run's,
read from transfer_pretrain.py, so every backbone parameter restores. Validation: the whole
validation split, 384 functions, 24 from each package (a constant answer scores 1/16), none
of which python_source (the pretraining text) contains; see data/functions.py.

Fine-tuning: 150 steps of 32 functions (128 tokens), AdamW peak lr 5e-4, cosine.

Learning curves (pretrained vs random init vs LoRA, 3 seeds, metric vs fine-tuning steps, with
the constant-answer baseline) on this split, for a smaller model pretrained in 15 minutes on 2 cores:
`python benchmarks/transfer_curves.py`, results in docs/transfer/. (The numbers this file
used to quote were measured on an earlier split by file, where one file held 37 of 106
validation functions and a constant answer beat every model; they no longer apply.)
"""
from pathlib import Path

from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig, load_experiment
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig

HERE = Path(__file__).resolve().parent
PRETRAIN_DIR = "runs/transfer_pretrain"  # under the working directory, where transfer_pretrain's command puts it


def get_config() -> ExperimentConfig:
    pretrain = load_experiment(HERE / "transfer_pretrain.py")
    return ExperimentConfig(
        name="transfer_classify",
        model=pretrain.model.replace(num_classes=16),
        data=pretrain.data.replace(source="python_functions", task="classify"),
        task=TaskConfig(task="classify"),
        train=TrainConfig(steps=150, seq_len=pretrain.train.seq_len, global_batch_size=32,
                          eval_every=25, eval_batches=None, log_every=10),
        optimizer=OptimizerConfig(learning_rate=5e-4, warmup_steps=15, weight_decay=0.01),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=1),
        init_from=PRETRAIN_DIR,
    )
