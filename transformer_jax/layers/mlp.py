"""Position-wise feed-forward network: plain (ReLU, GELU) or gated (SwiGLU, GeGLU; Shazeer 2020)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.layers import activations
from transformer_jax.layers.dense import Dense, LoRA

# jax.nn's values; each backward keeps only the activation's input (layers/activations.py)
ACTIVATIONS = {
    "relu": activations.relu,
    "gelu": activations.gelu,
    "gelu_tanh": activations.gelu_tanh,
    "swiglu": activations.silu,
    "geglu": activations.gelu_tanh,
}
GATED = ("swiglu", "geglu")


class MLP(nn.Module):
    d_ff: int
    activation: str = "gelu_tanh"
    use_bias: bool = False
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoRA | None = None  # adapters on wi/wi_0/wi_1/wo, as its targets name them

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
        d = x_BLD.shape[-1]
        dense = lambda feats, axes, name: Dense(  # noqa: E731
            (feats,), axes, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
            name=name)
        act = ACTIVATIONS[self.activation]
        if self.activation in GATED:
            h_BLF = act(dense(self.d_ff, ("embed", "mlp"), "wi_0")(x_BLD)) * dense(self.d_ff, ("embed", "mlp"), "wi_1")(x_BLD)
        else:
            h_BLF = act(dense(self.d_ff, ("embed", "mlp"), "wi")(x_BLD))
        h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "mlp"))
        h_BLF = nn.Dropout(self.dropout_rate)(h_BLF, deterministic=self.deterministic)
        return dense(d, ("mlp", "embed"), "wo")(h_BLF)
