"""Tasks and their losses: causal LM, masked LM, span corruption / seq2seq, classification.

Every loss consumes a batch exactly as `transformer_jax.data` builds it and returns SUMS
over real targets (weights > 0), never means, so that

- a step's loss is sum / total weight over the whole global batch (padding never counts),
- gradient accumulation over microbatches is exact (sum the sums, divide once),
- evaluation aggregates exactly over a whole split (bits per byte needs total nats).

    logits, targets, weights = forward(model, params, batch, "lm", deterministic=True)
    sums = cross_entropy_sums(logits, targets, weights, z_loss=1e-4, label_smoothing=0.0)
    # sums: loss (the objective), nll (plain cross-entropy, nats), correct, tokens, z_loss
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import Config, ConfigError

Task = Literal["lm", "mlm", "span", "seq2seq", "classify"]
FAMILY = {"lm": "decoder", "mlm": "encoder", "classify": "encoder", "span": "encoder_decoder",
          "seq2seq": "encoder_decoder"}
SUMS = ("loss", "nll", "correct", "tokens", "z_loss")
FUSED_TASKS = ("lm", "span", "seq2seq")  # heads whose logits are Embedder.logits (no bias after)


@dataclasses.dataclass(frozen=True)
class TaskConfig(Config):
    task: Task = "lm"
    z_loss: float = 0.0  # coefficient of log(Z)^2 per target (PaLM: 1e-4); keeps logits from drifting
    label_smoothing: float = 0.0  # mass spread uniformly over the vocabulary (or classes)
    on_nonfinite: Literal["skip", "halt"] = "skip"  # a non-finite loss or gradient: skip the update, or also halt
    # lm/span/seq2seq: output layer + loss fused, about this many tokens per device at a time
    # (whole positions of its rows), never the whole [B, L, V] logits (train/fused_loss.py); 0:
    # whole logits. Same numbers, less memory and time.
    loss_chunk: int = 1024
    # mlm: the head (transform + vocabulary logits) runs at this fraction of each row's positions,
    # those with weight > 0 first (the masked ones; BERT selects 15%); 0: every position. A batch
    # with more weighted positions in a row is an error (train step), never silently cut.
    mlm_predict_fraction: float = 0.25

    def validate(self) -> None:
        if self.z_loss < 0:
            raise ConfigError(f"task.z_loss={self.z_loss} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"task.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0.0 <= self.mlm_predict_fraction <= 1.0:
            raise ConfigError(f"task.mlm_predict_fraction={self.mlm_predict_fraction} must be in [0, 1] "
                              "(0: the MLM head at every position)")
        if self.loss_chunk < 0:
            raise ConfigError(f"task.loss_chunk={self.loss_chunk} must be >= 0 (0: whole logits)")

    def check_model(self, family: str) -> None:
        if FAMILY[self.task] != family:
            raise ConfigError(f"task={self.task!r} needs a model of family {FAMILY[self.task]!r}, got {family!r}; "
                              f"change task.task or the model")


def argmax_hits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """argmax(logits, -1) == targets, ties going to the first index as argmax's do, without
    argmax's (value, index) reduction: the row max (the one logsumexp takes already), then the
    first index holding it. On a fused-loss chunk of the bench model ([1024, 32768] f32 logits,
    logsumexp included) 108 ms instead of 132; argmax was the slowest-but-one memory-bound op
    of benchmarks/plan_check.py's 8-device llama step (33 ms per device of 1.2 s)."""
    v = logits.shape[-1]
    first = jnp.where(logits == jnp.max(logits, -1, keepdims=True),
                      jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1), v)
    return jnp.min(first, -1) == targets


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array, *, z_loss: float = 0.0,
                       label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """Weighted sums over all positions of logits [..., V] (float32) against int targets [...].

    loss = (1 - s) * nll + s * (logZ - mean(logits)) + z_loss * logZ^2 per target: cross-entropy
    against (1 - s) * one_hot + s * uniform. The target logit is picked with a one-hot product
    (not a gather), which XLA partitions cleanly when the vocabulary is split over `tensor`.
    """
    logits = logits.astype(jnp.float32)
    w = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    nll = log_z - target_logit
    loss = nll
    if label_smoothing:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (log_z - logits.mean(-1))
    zl = z_loss * jnp.square(log_z)
    if z_loss:
        loss = loss + zl
    correct = argmax_hits(logits, targets).astype(jnp.float32)
    return {"loss": jnp.sum(loss * w), "nll": jnp.sum(nll * w), "correct": jnp.sum(correct * w),
            "tokens": jnp.sum(w), "z_loss": jnp.sum(zl * w)}


def model_inputs(batch: dict[str, jax.Array], task: str) -> tuple[tuple, dict]:
    """(positional args, keyword args) of the model call for `task` on `batch`."""
    if task in ("lm", "mlm", "classify"):
        kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
        if task != "lm":
            kw["head"] = task  # the Encoder head: "mlm" or "classify"
        return (batch["inputs"],), kw
    if task in ("span", "seq2seq"):
        return (batch["inputs"], batch["decoder_inputs"]), dict(
            input_segment_ids=batch["input_segment_ids"], input_positions=batch["input_positions"],
            target_segment_ids=batch["target_segment_ids"], target_positions=batch["target_positions"])
    raise ConfigError(f"task={task!r} is unknown; choose one of {', '.join(FAMILY)}")


def labels(batch: dict[str, jax.Array], task: str) -> tuple[jax.Array, jax.Array]:
    """(targets, weights): [B, L] per token, or [B] per example for classify."""
    return (batch["label"] if task == "classify" else batch["targets"]), batch["weights"]


def forward(model: Any, params: Any, batch: dict[str, jax.Array], task: str, *, deterministic: bool = True,
            rngs: dict | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits, targets, weights) of `model` on `batch` for `task`."""
    args, kw = model_inputs(batch, task)
    logits = model.apply({"params": params}, *args, **kw, deterministic=deterministic, rngs=rngs)
    return (logits, *labels(batch, task))


def batch_loss_sums(model: Any, params: Any, batch: dict[str, jax.Array], cfg: TaskConfig, *,
                    deterministic: bool = True, rngs: dict | None = None) -> dict[str, jax.Array]:
    """The loss sums of the model's predictions on `batch` (see module docstring), with the
    output layer fused into the loss when `cfg.loss_chunk` applies to the task."""
    if cfg.loss_chunk and cfg.task in FUSED_TASKS:
        from transformer_jax.train.fused_loss import fused_cross_entropy_sums, hidden_and_output_weight
        args, kw = model_inputs(batch, cfg.task)
        h, w = hidden_and_output_weight(model, {"params": params}, *args, **kw, deterministic=deterministic,
                                        rngs=rngs)
        targets, weights = labels(batch, cfg.task)
        return fused_cross_entropy_sums(h, w, targets, weights, cfg.loss_chunk, cfg.z_loss, cfg.label_smoothing,
                                        jnp.dtype(model.config.dtype))
    k = mlm_predictions(cfg, batch["inputs"].shape[1]) if cfg.task == "mlm" else 0
    if k:
        return _masked_lm_sums(model, params, batch, cfg, k, deterministic=deterministic, rngs=rngs)
    logits, targets, weights = forward(model, params, batch, cfg.task, deterministic=deterministic, rngs=rngs)
    return cross_entropy_sums(logits, targets, weights, z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)


def mlm_predictions(cfg: TaskConfig, length: int) -> int:
    """How many positions per row the MLM head computes (0: all of them)."""
    k = math.ceil(cfg.mlm_predict_fraction * length)
    return k if 0 < k < length else 0


def check_mlm_batch(cfg: TaskConfig, weights: Any) -> None:
    """A ValueError when a row of host `weights` [B, L] has more targets than the MLM head computes."""
    k = mlm_predictions(cfg, weights.shape[1])
    most = int(np.max(np.sum(np.asarray(weights) > 0, axis=1), initial=0))
    if k and most > k:
        raise ValueError(f"a row has {most} MLM targets but task.mlm_predict_fraction={cfg.mlm_predict_fraction} "
                         f"computes {k} of {weights.shape[1]} positions; raise it to >= {most / weights.shape[1]:.3f} "
                         "(or lower data.mask_rate)")


def _masked_lm_sums(model, params, batch, cfg: TaskConfig, k: int, **kw) -> dict[str, jax.Array]:
    """MLM loss sums from the head at the k positions of each row with weight > 0 first (in order),
    padded with weight-0 positions: the same sums as the head at every position."""
    w_BL = batch["weights"]
    idx_BK = jnp.argsort(w_BL <= 0, axis=1, stable=True)[:, :k].astype(jnp.int32)
    args, kwargs = model_inputs(batch, "mlm")
    logits = model.apply({"params": params}, *args, **kwargs, predict_BK=idx_BK, **kw)
    pick = lambda x: jnp.take_along_axis(x, idx_BK, axis=1)  # noqa: E731
    return cross_entropy_sums(logits, pick(batch["targets"]), pick(w_BL), z_loss=cfg.z_loss,
                              label_smoothing=cfg.label_smoothing)


def init_inputs(task: str, batch: int, length: int) -> dict[str, jax.Array]:
    """A dummy batch (ones) with the keys `forward` reads, for `model.init` (shapes only matter)."""
    ones = lambda *s: jnp.ones(s, jnp.int32)  # noqa: E731
    if task in ("span", "seq2seq"):
        return {k: ones(batch, length) for k in ("inputs", "decoder_inputs", "input_segment_ids", "input_positions",
                                                 "target_segment_ids", "target_positions", "targets", "weights")}
    out = {k: ones(batch, length) for k in ("inputs", "segment_ids", "positions", "targets", "weights")}
    if task == "classify":
        out.update(label=ones(batch), weights=ones(batch))
    return out
