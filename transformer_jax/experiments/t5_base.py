"""T5-base (223M) span corruption on PG-19 books, sized for a TPU v5e-16 slice (16 chips, 4 hosts).

    bash launch/tpu_vm.sh --name t5-base --type v5litepod-16 -- --config t5_base
    transformer-jax plan --config t5_base --chip v5e             # the prediction below

Hardware: TPU v5e-16 = 16 chips (16 GiB each) on 4 hosts, one ICI domain. Mesh data=16 x
fsdp=1 x tensor=1, preset dp: the least communication (plan: 19 ms per step, the split weight
update's gradient reduce-scatter and weight all-gather, against 27 ms for fsdp=16 and 25 ms for
data=4 x fsdp=4). plan assumes FSDP's per-layer gathers hide behind compute and so predicts
fsdp=16 faster (118 ms per step against 148, 3.6 GiB per chip against 5.5); try it with
`--set mesh.data=1 --set mesh.fsdp=16 --set mesh.preset=fsdp`. Batch 128 x 512 input tokens with 114-token targets (T5's
pre-training shape: 15% noise, mean span 3), relative position bias (so attention runs the
pure-JAX `chunked`/`xla` kernels: splash takes no bias); bf16 compute, f32 master parameters.

Expected -- a `plan` PREDICTION for 16 x v5e, not a measurement:
5.5 GiB of the 15.2 GiB usable per chip; step 148 ms, 27,611 input tokens/s/chip, MFU 12%
(matmuls 26 ms at 80% of peak, memory-bound ops 104 ms, communication not hidden 19 ms of 19;
bounds: 19 ms with everything overlapped at full peak, 148 ms with nothing overlapped).

Data: tfds:pg19 (Project Gutenberg books before 1919, ~11 GB; its text field is "book_text").
T5's C4 needs an Apache Beam preparation; with one, use --set data.source=tfds:c4/en.
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="t5_base",
        model=model_config("t5-base", dtype="bfloat16", param_dtype="float32", remat="none"),
        data=DataConfig(source="tfds:pg19", task="span", tokenizer="bpe", vocab_size=32128, text_field="book_text"),
        task=TaskConfig(task="span"),
        train=TrainConfig(steps=100_000, seq_len=512, target_seq_len=114, global_batch_size=128, eval_every=2000,
                          eval_batches=50, log_every=50),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=10_000, schedule="cosine", end_ratio=0.1,
                                  b1=0.9, b2=0.99, weight_decay=0.0, clip_norm=1.0),
        mesh=MeshConfig(data=16, fsdp=1, tensor=1, preset="dp"),
        checkpoint=CheckpointConfig(every_steps=2000, keep_last=3),
    )
