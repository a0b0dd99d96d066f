"""The original Transformer (base, 63M) on WMT'14 English-German, sized for one node of 8 x H100.

    sbatch --nodes=1 launch/gpu_slurm.sbatch -- --config transformer_base_wmt14
    transformer-jax plan --config transformer_base_wmt14 --chip h100   # the prediction below

Vaswani et al. (2017): 6+6 layers, d_model 512, 8 heads, d_ff 2048, post-LayerNorm, ReLU,
sinusoidal positions, shared 32k BPE vocabulary and tied embeddings, dropout 0.1, label
smoothing 0.1, Adam b2=0.98, 100k steps. Hardware: 8 x H100 SXM (one node); mesh data=8,
preset dp. Batch 256 pairs x 256 tokens each side (~50k source + target tokens with
packing, about twice the paper's 25k+25k); bf16 compute, f32 master parameters.

Expected -- a `plan` PREDICTION for 8 x h100, not a measurement:
6.3 GiB of the 72.0 GiB usable per chip; step 59 ms, 138,114 input tokens/s/chip, MFU 5%
(matmuls 8 ms at 80% of peak, memory-bound ops 51 ms, communication not hidden 1 ms of 1;
bounds: 4 ms with everything overlapped at full peak, 59 ms with nothing overlapped).

Data: tfds:wmt14_translate/de-en (~4.5M sentence pairs; downloaded and prepared on first
use), English source -> German target; eval on newstest2013 ("validation").
"""
from transformer_jax.checkpoint import CheckpointConfig
from transformer_jax.data import DataConfig
from transformer_jax.experiment import ExperimentConfig, TrainConfig
from transformer_jax.models import get_config as model_config
from transformer_jax.parallel import MeshConfig
from transformer_jax.train import OptimizerConfig, TaskConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="transformer_base_wmt14",
        model=model_config("transformer-base", vocab_size=32768, dtype="bfloat16", param_dtype="float32"),
        data=DataConfig(source="tfds:wmt14_translate/de-en", task="seq2seq", tokenizer="bpe", vocab_size=32768,
                        input_field="en", target_field="de"),
        task=TaskConfig(task="seq2seq", label_smoothing=0.1),
        train=TrainConfig(steps=100_000, seq_len=256, target_seq_len=256, global_batch_size=256, eval_every=5000,
                          eval_batches=None, log_every=100, sample_tokens=0),
        optimizer=OptimizerConfig(learning_rate=7e-4, warmup_steps=4000, schedule="cosine", end_ratio=0.05,
                                  b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0, clip_norm=None),
        mesh=MeshConfig(data=8, fsdp=1, tensor=1, preset="dp"),
        checkpoint=CheckpointConfig(every_steps=5000, keep_last=3),
    )
