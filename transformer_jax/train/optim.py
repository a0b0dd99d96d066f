"""AdamW (Loshchilov & Hutter 2019) with warmup + cosine/linear/constant schedules,
global-norm clipping and weight decay masked by parameter kind, from `OptimizerConfig`.

    tx = make_optimizer(cfg)                 # optax: clip -> Adam moments -> + wd * param
    lr = make_schedule(cfg, total_steps)     # step -> learning rate
    direction, opt_state = tx.update(grads, opt_state, params)
    params = params - lr(step) * direction

The learning rate is applied by the train step from the *train* step counter rather than
by optax from its own count, so a skipped (non-finite) step leaves Adam's moments and bias
correction untouched while the schedule still follows the step the trainer reports.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax

from transformer_jax.config import Config, ConfigError

# Parameter kinds weight decay can be masked off, by the leaf's name in the param tree.
DECAY_KINDS = {
    "norm": ("scale",),  # LayerNorm / RMSNorm gains
    "bias": ("bias",),  # dense, norm and output biases
    "embedding": ("embedding", "token_type", "rel_embedding"),  # token/position/type tables, T5 bias
}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Config):
    learning_rate: float = 3e-4  # peak
    warmup_steps: int = 100  # linear warmup: lr * (step + 1) / warmup_steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup, until total_steps
    end_ratio: float = 0.1  # final lr = end_ratio * learning_rate (cosine, linear)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW): p -= lr * weight_decay * p
    decay_exclude: tuple[str, ...] = ("norm", "bias", "embedding")  # kinds without weight decay
    clip_norm: float | None = 1.0  # global gradient norm; None: no clipping
    grad_accum_steps: int = 1  # microbatches per step (lax.scan); the global batch must divide it

    def validate(self) -> None:
        if not self.learning_rate >= 0:
            raise ConfigError(f"optim.learning_rate={self.learning_rate} must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.end_ratio <= 1.0:
            raise ConfigError(f"optim.end_ratio={self.end_ratio} must be in [0, 1]")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps={self.eps} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        unknown = [k for k in self.decay_exclude if k not in DECAY_KINDS]
        if unknown:
            raise ConfigError(f"optim.decay_exclude has unknown kind(s) {unknown}; choose from {sorted(DECAY_KINDS)}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"optim.clip_norm={self.clip_norm} must be > 0 (or none for no clipping)")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"optim.grad_accum_steps={self.grad_accum_steps} must be >= 1")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> Callable[[Any], jax.Array]:
    """step -> learning rate (float32): linear warmup to the peak, then decay to end_ratio
    at `total_steps` (and flat after it)."""
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps} must be >= 1")
    peak, end, warmup = cfg.learning_rate, cfg.end_ratio, cfg.warmup_steps
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / warmup) if warmup else 1.0
        t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if cfg.schedule == "cosine":
            frac = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        elif cfg.schedule == "linear":
            frac = 1.0 - (1.0 - end) * t
        else:
            frac = 1.0
        return jnp.asarray(peak * warm * frac, jnp.float32)

    return schedule


def decay_mask(params: Any, exclude: tuple[str, ...]) -> Any:
    """Tree of bools like `params` (its unboxed structure): True where weight decay applies."""
    names = {n for kind in exclude for n in DECAY_KINDS[kind]}

    def leaf_name(path) -> str:
        k = path[-1]
        return str(getattr(k, "key", getattr(k, "name", k)))

    import flax.linen as nn
    return jax.tree_util.tree_map_with_path(lambda p, _: leaf_name(p) not in names, nn.unbox(params))


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The update direction of AdamW, before the learning rate: clip -> Adam -> + wd * p."""
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.decay_exclude)))
    return optax.chain(*parts)
