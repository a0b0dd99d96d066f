"""The training engine: optimizer, tasks and losses, the sharded train/eval steps, FLOPs.

How a trainer uses it::

    from transformer_jax.parallel import MeshConfig, make_mesh, maybe_initialize_distributed, get_rules
    from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup

    maybe_initialize_distributed(mesh_cfg)          # first: jax.distributed on pods / SLURM / explicit
    mesh = make_mesh(mesh_cfg)                       # (data, fsdp, tensor); -1 fills
    setup = make_train_setup(model_cfg, optim_cfg, task_cfg, mesh, get_rules(mesh_cfg.preset),
                             total_steps=10_000, seed=0)
    restored = ckpt.restore(setup.abstract_state)    # ShapeDtypeStructs with shardings
    state = restored.state if restored else setup.init_state()   # sharded init, never whole on one device
    for local in data_iterator:
        batch = data.make_global_batch(local, setup.batch_sharding)
        state, m = setup.train_step(state, batch)    # state donated; m: loss nll accuracy z_loss grad_norm
                                                     #   learning_rate tokens skipped halt (f32 scalars)
        if m["halt"]: stop
    sums = setup.eval_step(state, batch)             # nll_sum (nats) correct tokens: add up over a split
    mfu = setup.flops_per_step(batch) / step_seconds / peak_flops

Contract:
- `TrainState(step, params, opt_state, rng)` (flax struct dataclass): plain pytrees of
  jax.Arrays, saved whole by the checkpointer (`init_from(..., subtree="params")`).
- Randomness: dropout keys are fold_in(key(rng), step) (and the microbatch index), so a
  resumed run is bit-identical to an uninterrupted one; `seed` sets params and `rng`.
- Loss: mean over real targets (weights) of the whole global batch, padding excluded;
  with `grad_accum_steps=k` the batch is split into k microbatches (rows i, i+k, ...)
  inside one `lax.scan` and the result equals one step on the full batch.
- Non-finite loss or gradient norm: params and optimizer state are not updated,
  `step` advances (data and keys stay aligned), `skipped`=1; with
  task.on_nonfinite="halt" also `halt`=1 and the trainer should stop.
- Learning rate of step s is `schedule(s)` (warmup then cosine/linear/constant), applied
  by the step, not by optax's own counter.
- bf16 compute: `ModelConfig(dtype="bfloat16", param_dtype="float32")`: f32 master
  params, optimizer state and gradients; bf16 matmul inputs. On CPUs without bf16
  hardware f32 is the faster choice (benchmarks/train_step.py).
- Output layer + loss: with task.loss_chunk > 0 (tokens per device, default 1024) lm/span/seq2seq never
  materialise the [B, L, V] logits (train/fused_loss.py): same numbers, -1.5 GiB temp and
  ~-20% step time on the bench model. task.loss_chunk=0 computes whole logits.
- Steps compile ahead of time once per batch shape: `setup.compiled_train_step(batch)`
  is that executable (`.as_text()`, `.memory_analysis()`, `.cost_analysis()`).
"""
from transformer_jax.train.flops import train_flops
from transformer_jax.train.losses import TaskConfig, cross_entropy_sums, forward, model_inputs
from transformer_jax.train.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from transformer_jax.train.state import TrainState
from transformer_jax.train.step import TrainSetup, make_train_setup
from transformer_jax.train.synthetic import synthetic_batch

__all__ = ["OptimizerConfig", "TaskConfig", "TrainState", "TrainSetup", "make_train_setup", "make_optimizer",
           "make_schedule", "decay_mask", "cross_entropy_sums", "forward", "model_inputs", "train_flops",
           "synthetic_batch"]
