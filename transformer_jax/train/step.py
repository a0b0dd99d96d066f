"""The sharded training engine: abstract state, sharded init, jitted train and eval steps.

    setup = make_train_setup(model_cfg, optim_cfg, task_cfg, mesh, rules, total_steps=1000, seed=0)
    state = setup.init_state()                   # sharded from birth (jit with out_shardings)
    batch = make_global_batch(local, setup.batch_sharding)
    state, metrics = setup.train_step(state, batch)   # state is donated
    sums = setup.eval_step(state, batch)         # nll_sum, correct, tokens

Data flow: jax.eval_shape(init) gives the state boxed with logical axis names -> rules ->
NamedShardings (the optimizer state's also split over data: parallel/partition.py:
split_update) -> `abstract_state` (ShapeDtypeStructs with shardings, what a checkpoint
restore wants) -> jit(init, out_shardings) and jit(step, in/out_shardings, donate).
Everything is traced under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`. Steps
are compiled ahead of time once per batch shape; `compiled_train_step(batch)` hands out
that executable (its HLO, memory and cost analyses are the ones of the program that runs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transformer_jax.config import ConfigError
from transformer_jax.models import ModelConfig, build_model
from transformer_jax.parallel.partition import check_divisible, logical_shardings, split_update
from transformer_jax.parallel.rules import Rules
from transformer_jax.train.flops import train_flops
from transformer_jax.train.losses import (SUMS, TaskConfig, batch_loss_sums, check_mlm_batch, init_inputs,
                                         mlm_predictions, model_inputs)
from transformer_jax.train.optim import OptimizerConfig, frozen_mask, make_optimizer, make_schedule
from transformer_jax.train.state import TrainState


@dataclasses.dataclass
class TrainSetup:
    """What `make_train_setup` builds; see the module docstring."""
    model_cfg: ModelConfig
    optim_cfg: OptimizerConfig
    task_cfg: TaskConfig
    mesh: Mesh
    rules: Rules
    total_steps: int
    seed: int

    def __post_init__(self):
        self.task_cfg.check_model(self.model_cfg.family)
        self.model = build_model(self.model_cfg)
        lora = self.model_cfg.lora_rank > 0  # adapters train, the rest is frozen
        self.tx = make_optimizer(self.optim_cfg, lora=lora)
        self.schedule = make_schedule(self.optim_cfg, self.total_steps)
        batch_axes = nn.logical_to_mesh_axes(("batch",), self.rules)[0]
        self.batch_spec = P(batch_axes)
        self.batch_sharding = NamedSharding(self.mesh, self.batch_spec)  # every batch array: rows split
        self._replicated = NamedSharding(self.mesh, P())
        with self.context():
            boxed = jax.eval_shape(self._boxed_init)
            check_divisible(boxed, self.mesh, self.rules)
            shardings: TrainState = logical_shardings(boxed, self.mesh, self.rules)
        # The weight update runs split over data (parallel/partition.py: split_update): gradients
        # and the optimizer state in `update_shardings`, the weights themselves replicated.
        unboxed = nn.unbox(boxed)
        split = lambda ss, xs: jax.tree.map(lambda s, x: split_update(s, x.shape), ss, xs)  # noqa: E731
        self.update_shardings = split(shardings.params, unboxed.params)
        self.state_shardings = shardings.replace(opt_state=split(shardings.opt_state, unboxed.opt_state))
        self.abstract_state: TrainState = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, self.state_shardings)
        self.param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_state.params))
        self.frozen = frozen_mask(self.abstract_state.params, self.optim_cfg, lora)  # True: never updated
        self.trainable_count = sum(math.prod(x.shape) for x, f in zip(
            jax.tree.leaves(self.abstract_state.params), jax.tree.leaves(self.frozen)) if not f)
        self._init = jax.jit(lambda: nn.unbox(self._boxed_init()), out_shardings=self.state_shardings)
        self._train = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, self._replicated), donate_argnums=0)
        self._eval = jax.jit(self._eval_step, in_shardings=(self.state_shardings, self.batch_sharding),
                             out_shardings=self._replicated)
        self._executables: dict = {}  # (train?, batch structure, shapes) -> Compiled

    # -- public ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def context(self):
        """The mesh and logical rules that tracing needs."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def init_state(self) -> TrainState:
        """A fresh state, each array created directly in its shards."""
        with self.context():
            return self._init()

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a global batch. `state` is donated (unusable afterwards).

        metrics (f32 scalars): loss (objective: smoothed CE + z-loss, per real target), nll,
        accuracy, z_loss, grad_norm (before clipping), learning_rate (of this step), tokens
        (real targets: sum of weights), skipped (1.0 when the loss or gradients were not
        finite: params and optimizer state are kept, `step` still advances, so data and
        dropout keys stay aligned with the step count), halt (1.0 when skipped and
        task.on_nonfinite="halt": the trainer should stop)."""
        batch = self._place(batch)
        return self.compiled_train_step(batch)(state, batch)

    def eval_step(self, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """SUMS over the batch's real targets, to add up over a split: nll_sum (nats),
        correct (argmax hits), tokens (sum of weights). Dropout off."""
        batch = self._place(batch)
        return self.compiled_eval_step(batch)(state, batch)

    def compiled_train_step(self, batch: Any) -> jax.stages.Compiled:
        """The executable for batches shaped like `batch` (arrays or ShapeDtypeStructs),
        compiled once per shape: `.as_text()`, `.memory_analysis()`, `.cost_analysis()`."""
        return self._compiled(self._train, batch)

    def compiled_eval_step(self, batch: Any) -> jax.stages.Compiled:
        return self._compiled(self._eval, batch)

    def _compiled(self, fn, batch) -> jax.stages.Compiled:
        key = (fn is self._train, jax.tree.structure(batch),
               tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in jax.tree.leaves(batch)))
        if key not in self._executables:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_sharding), batch)
            with self.context():
                self._executables[key] = fn.lower(self.abstract_state, abstract).compile()
        return self._executables[key]

    def _place(self, batch: dict) -> dict:
        """Host arrays (one process) go to the batch sharding; global jax.Arrays pass as they are."""
        if self.task_cfg.task == "mlm" and not isinstance(batch["weights"], jax.Array):
            check_mlm_batch(self.task_cfg, batch["weights"])
        if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)):
            return batch
        if jax.process_count() > 1:
            raise ValueError("with several processes, build the global batch with "
                             "data.make_global_batch(local_batch, setup.batch_sharding)")
        return jax.device_put(batch, self.batch_sharding)

    def flops_per_step(self, batch: Any) -> float:
        """Model training FLOPs of one step on `batch` (see train/flops.py for the convention)."""
        length = batch["inputs"].shape[1]
        head = mlm_predictions(self.task_cfg, length) if self.task_cfg.task == "mlm" else 0
        return train_flops(self.model_cfg, self.task_cfg.task, batch, head or None)

    # -- traced ---------------------------------------------------------------------------
    def _boxed_init(self) -> TrainState:
        """The state with parameters (and Adam moments) boxed with their logical names."""
        params_key, dropout_key, base_key = jax.random.split(jax.random.key(self.seed), 3)
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        args, kw = model_inputs(init_inputs(self.task_cfg.task, rows, min(8, self.model_cfg.max_len)),
                                self.task_cfg.task)
        params = self.model.init({"params": params_key, "dropout": dropout_key}, *args, **kw)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          rng=jax.random.key_data(base_key))

    def _sums(self, params, batch, key) -> dict[str, jax.Array]:
        train = key is not None and self.model_cfg.dropout_rate > 0
        return batch_loss_sums(self.model, params, batch, self.task_cfg, deterministic=not train,
                               rngs={"dropout": key} if train else None)

    def _grads(self, params, batch, key) -> tuple[Any, dict[str, jax.Array]]:
        """Gradients of the summed loss and the sums, over `grad_accum_steps` microbatches.

        Data parallelism is written out (`jax.shard_map`, manual over the `data` axis; fsdp and
        tensor stay with GSPMD): each data replica sums its own rows' gradients over all its
        microbatches and the output layer's chunks, and the replicas then add them up once per
        step, reduce-scattered into `update_shardings`: the textbook single reduction of the
        gradients. Left to GSPMD, the partial sums are reduced inside every loop (per
        microbatch, per loss chunk) and the tied embedding's two uses separately. With dropout
        on, masks are drawn for the global batch shape (the same on any mesh), so that path
        stays with GSPMD (its gradients are sliced into `update_shardings` by `_train_step`)."""
        k = self.optim_cfg.grad_accum_steps
        rows = next(iter(batch.values())).shape[0]
        n = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if k > 1 and rows % (k * n):
            raise ConfigError(f"global batch {rows} is not divisible by optim.grad_accum_steps={k} x data*fsdp={n}; "
                              f"use a multiple of {k * n}")
        if self.mesh.shape["data"] == 1 or key is not None:
            return self._local_grads(params, batch, key, self.rules)
        rules = tuple((name, _without(axes, "data")) for name, axes in self.rules)

        # The dimension each gradient is reduce-scattered along, or -1: psum. psum_scatter under a
        # partly manual shard_map gathers the array over the other (GSPMD) axes first, so with
        # fsdp or tensor the psum's all-reduce is sliced into update_shardings instead.
        scatter_ok = self.mesh.shape["fsdp"] * self.mesh.shape["tensor"] == 1
        dims = jax.tree.map(lambda s: s.spec.index("data") if scatter_ok and "data" in s.spec else -1,
                            self.update_shardings)
        grad_specs = jax.tree.map(lambda i: P() if i < 0 else P(*[None] * i, "data"), dims)

        def replica(params, batch):
            with nn.logical_axis_rules(rules):
                grads, sums = self._local_grads(params, batch, None, rules)
            scatter = lambda g, i: (jax.lax.psum(g, "data") if i < 0  # noqa: E731
                                    else jax.lax.psum_scatter(g, "data", scatter_dimension=i, tiled=True))
            return jax.tree.map(scatter, grads, dims), jax.lax.psum(sums, "data")

        return jax.shard_map(replica, mesh=self.mesh, in_specs=(P(), P("data")), out_specs=(grad_specs, P()),
                             axis_names={"data"}, check_vma=False)(params, batch)

    def _local_grads(self, params, batch, key, rules: Rules) -> tuple[Any, dict[str, jax.Array]]:
        """`_grads` over the rows given, sharded by `rules` (GSPMD reduces over their batch axes)."""
        # Frozen parameters get a zero gradient (their dW matmuls are dropped); the optimizer zeroes their update.
        stop = lambda p: jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, self.frozen)  # noqa: E731
        grad_fn = jax.grad(lambda p, b, k: (lambda s: (s["loss"], s))(self._sums(stop(p), b, k)), has_aux=True)
        k = self.optim_cfg.grad_accum_steps
        if k == 1:
            return grad_fn(params, batch, key)
        rows = next(iter(batch.values())).shape[0]
        # Microbatch i holds rows i, i+k, i+2k...: each device keeps its own rows (no reshuffle).
        micro = jax.tree.map(lambda x: jnp.moveaxis(x.reshape(rows // k, k, *x.shape[1:]), 1, 0), batch)
        micro = jax.lax.with_sharding_constraint(micro, P(None, nn.logical_to_mesh_axes(("batch",), rules)[0]))
        grad_specs = jax.tree.map(lambda s: s.spec, self.state_shardings.params)

        def body(acc, xs):
            i, mb = xs
            g, s = grad_fn(params, mb, None if key is None else jax.random.fold_in(key, i))
            g = jax.lax.with_sharding_constraint(g, grad_specs)
            return jax.tree.map(jnp.add, acc, (g, s)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), {name: jnp.zeros((), jnp.float32) for name in SUMS})
        (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
        return grads, sums

    def _train_step(self, state: TrainState, batch):
        key = state.step_key() if self.model_cfg.dropout_rate > 0 else None  # threefry only when used
        grads, sums = self._grads(state.params, batch, key)
        grads = jax.lax.with_sharding_constraint(grads, self.update_shardings)
        denom = jnp.maximum(sums["tokens"], 1.0)  # the mean is over real targets of the whole global batch
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        loss = sums["loss"] / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        direction, opt_state = self.tx.update(grads, state.opt_state, state.params)
        lr = self.schedule(state.step)
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, direction)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params, opt_state = jax.tree.map(keep, (params, opt_state), (state.params, state.opt_state))
        params = jax.lax.with_sharding_constraint(params, self.update_shardings)  # then all-gathered
        skipped = 1.0 - finite.astype(jnp.float32)
        metrics = dict(loss=loss, nll=sums["nll"] / denom, accuracy=sums["correct"] / denom,
                       z_loss=sums["z_loss"] / denom, grad_norm=grad_norm, learning_rate=lr, tokens=sums["tokens"],
                       skipped=skipped, halt=skipped if self.task_cfg.on_nonfinite == "halt" else 0.0 * skipped)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_step(self, state: TrainState, batch):
        s = self._sums(state.params, batch, None)
        return {"nll_sum": s["nll"], "correct": s["correct"], "tokens": s["tokens"]}


def _without(axes, drop: str):
    """A rule's mesh axes with `drop` removed (None when nothing is left)."""
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = tuple(a for a in axes if a != drop)
    return kept[0] if len(kept) == 1 else (kept or None)


def make_train_setup(model_cfg: ModelConfig, optim_cfg: OptimizerConfig, task_cfg: TaskConfig, mesh: Mesh,
                     rules: Rules, total_steps: int, seed: int = 0) -> TrainSetup:
    """Builds the abstract state; compiles nothing yet (each step compiles on its first batch shape)."""
    return TrainSetup(model_cfg, optim_cfg, task_cfg, mesh, rules, total_steps, seed)
