"""AdamW (Loshchilov & Hutter 2019), or Muon (Jordan et al. 2024) for the hidden matrices
with AdamW for the rest, with warmup + cosine/linear/constant schedules, global-norm clipping,
weight decay masked by parameter kind and frozen parameters, from `OptimizerConfig`.

    tx = make_optimizer(cfg)                 # optax: clip -> Adam moments -> + wd * param
    tx = make_optimizer(cfg, lora=True)      # only LoRA adapters (+ cfg.lora_train) update
    lr = make_schedule(cfg, total_steps)     # step -> learning rate
    direction, opt_state = tx.update(grads, opt_state, params)
    params = params - lr(step) * direction

The learning rate is applied by the train step from the *train* step counter rather than
by optax from its own count, so a skipped (non-finite) step leaves Adam's moments and bias
correction untouched while the schedule still follows the step the trainer reports.

Muon (`optimizer="muon"`): the kernels of the Transformer layers (paths through `layers` or
`layer_N`: attention and MLP projections) get Nesterov momentum orthogonalized by 5
Newton-Schulz steps (`optax.contrib.scale_by_muon`), each projection as one matrix of its
input axes by its output axes (query/key/value: embed x heads*head_dim; out: heads*head_dim x
embed; the scanned `layers` axis is a batch of matrices), scaled by sqrt(max(1, fan_out/fan_in))
and by muon_learning_rate / learning_rate, so that the train step's one schedule gives them a
peak of muon_learning_rate. Embeddings, the output head, norms and biases keep AdamW. Weight
decay is the same decoupled lr * weight_decay * p for both.

Freezing (fine-tuning): parameters whose '/'-joined path ('encoder/layers/mlp/wi/kernel')
matches a regex of `cfg.freeze` (re.search), and with `lora=True` every parameter that is
neither a LoRA adapter nor matched by `cfg.lora_train`, get an update of exactly zero: no
Adam moments, no clipping share, no weight decay (optax.partition with set_to_zero).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape

from transformer_jax.config import Config, ConfigError
from transformer_jax.layers.dense import LORA_PARAMS

# Parameter kinds weight decay can be masked off, by the leaf's name in the param tree.
DECAY_KINDS = {
    "norm": ("scale",),  # LayerNorm / RMSNorm gains
    "bias": ("bias",),  # dense, norm and output biases
    "embedding": ("embedding", "token_type", "rel_embedding"),  # token/position/type tables, T5 bias
}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Config):
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the layers' kernels, AdamW for the rest
    muon_learning_rate: float = 0.02  # peak lr of the Muon-updated kernels (same schedule)
    muon_momentum: float = 0.95
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
    freeze: tuple[str, ...] = ()  # regexes on param paths ('encoder/layers/mlp/wi/kernel'): no update
    lora_train: tuple[str, ...] = ("^classifier/",)  # with model.lora_rank > 0: what trains besides adapters

    def validate(self) -> None:
        if not math.isfinite(self.learning_rate):
            raise ConfigError(f"optim.learning_rate={self.learning_rate} must be a finite number, e.g. 3e-4")
        if self.learning_rate < 0:
            raise ConfigError(f"optim.learning_rate={self.learning_rate} must be >= 0")
        if not (math.isfinite(self.muon_learning_rate) and self.muon_learning_rate >= 0):
            raise ConfigError(f"optim.muon_learning_rate={self.muon_learning_rate} must be a finite number >= 0, "
                              "e.g. 0.02")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"optim.muon_momentum={self.muon_momentum} must be in [0, 1)")
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
        for name in ("freeze", "lora_train"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"optim.{name} pattern {pattern!r} is not a regex: {e}") from None


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


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def _path(path) -> str:
    return "/".join(_key(k) for k in path)


def decay_mask(params: Any, exclude: tuple[str, ...]) -> Any:
    """Tree of bools like `params` (its unboxed structure): True where weight decay applies."""
    names = {n for kind in exclude for n in DECAY_KINDS[kind]}
    return jax.tree_util.tree_map_with_path(lambda p, _: _key(p[-1]) not in names, nn.unbox(params))


def frozen_mask(params: Any, cfg: OptimizerConfig, lora: bool = False) -> Any:
    """Tree of bools like `params` (its unboxed structure): True where the update is zero.
    A `cfg.freeze` pattern that matches no parameter is a ConfigError."""
    params = nn.unbox(params)
    paths = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern in cfg.freeze:
        if not any(re.search(pattern, p) for p in paths):
            raise ConfigError(f"optim.freeze pattern {pattern!r} matches no parameter; paths look like {paths[:3]}")

    def frozen(path) -> bool:
        name = _path(path)
        if any(re.search(p, name) for p in cfg.freeze):
            return True
        return lora and _key(path[-1]) not in LORA_PARAMS and not any(re.search(p, name) for p in cfg.lora_train)

    return jax.tree_util.tree_map_with_path(lambda p, _: frozen(p), params)


_LAYER = re.compile(r"^(layers|layer_\d+)$")


def muon_dims(params: Any) -> Any:
    """Tree like `params`: the kernel's MuonDimensionNumbers for the Transformer layers'
    kernels (paths through `layers` (scanned: its leading axis is a batch of matrices) or
    `layer_N`), None for everything else (embeddings, head, norms, biases)."""
    def dims(path, x):
        keys = [_key(k) for k in path]
        if keys[-1] != "kernel" or not any(_LAYER.match(k) for k in keys[:-1]):
            return None
        lead = 1 if "layers" in keys[:-1] else 0
        n_in = 2 if keys[-2] == "out" else 1  # attention out: [heads, head_dim] -> embed
        n = x.ndim - lead
        if n < 2:
            return None
        return MuonDimensionNumbers(reduction_axis=tuple(range(lead, lead + n_in)),
                                    output_axis=tuple(range(lead + n_in, x.ndim)))
    return jax.tree_util.tree_map_with_path(dims, params)


def _muon(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Muon for the layers' kernels (scaled to muon_learning_rate), Adam for the rest."""
    def dims(tree):  # the kernels' dimension numbers; the Adam leaves are masked out already
        return jax.tree.map(lambda d, x: d if d is not None else optax.MaskedNode(), muon_dims(tree), tree,
                            is_leaf=lambda d: d is None or isinstance(d, MuonDimensionNumbers))
    ratio = cfg.muon_learning_rate / cfg.learning_rate if cfg.learning_rate else 0.0
    muon = optax.chain(scale_by_muon(beta=cfg.muon_momentum, weight_dimension_numbers=dims),
                       scale_by_shape(weight_dimension_numbers=dims), optax.scale(ratio))
    labels = lambda p: jax.tree.map(lambda d: "adam" if d is None else "muon", muon_dims(nn.unbox(p)),  # noqa: E731
                                    is_leaf=lambda d: d is None or isinstance(d, MuonDimensionNumbers))
    return optax.partition({"muon": muon, "adam": optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)}, labels)


def make_optimizer(cfg: OptimizerConfig, lora: bool = False) -> optax.GradientTransformation:
    """The update direction of AdamW (or Muon + AdamW), before the learning rate:
    clip -> Adam (Muon) -> + wd * p, and zero for frozen parameters (see the module
    docstring; `lora`: the model has adapters)."""
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.optimizer == "muon":
        parts.append(_muon(cfg))
    else:
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.decay_exclude)))
    adamw = optax.chain(*parts)
    if not cfg.freeze and not lora:
        return adamw
    labels = lambda p: jax.tree.map(lambda f: "frozen" if f else "train", frozen_mask(p, cfg, lora))  # noqa: E731
    return optax.partition({"train": adamw, "frozen": optax.set_to_zero()}, labels)
