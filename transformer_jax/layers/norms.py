"""LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019), computed in float32."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class LayerNorm(nn.Module):
    eps: float = 1e-6
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        d = x_BLD.shape[-1]
        x = x_BLD.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
                           self.param_dtype)
        y = y * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,),
                              self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        d = x_BLD.shape[-1]
        x = x_BLD.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
                           self.param_dtype)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def make_norm(kind: str, eps: float, use_bias: bool, dtype, param_dtype, name: str | None = None) -> nn.Module:
    """LayerNorm or RMSNorm by name ("layernorm" | "rmsnorm")."""
    if kind == "layernorm":
        return LayerNorm(eps=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"norm={kind!r} is unknown; choose 'layernorm' or 'rmsnorm'")
