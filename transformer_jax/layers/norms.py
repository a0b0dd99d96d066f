"""LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019), computed in float32.

Both are one function, `normalize`, with a custom VJP that keeps the input x and the two
per-row statistics (mean, 1/std) for the backward pass. Autodiff of the same float32
arithmetic keeps three float32 tensors the size of x (x, x - mean, the normalised x) per
norm; under `nn.scan` each is stacked over the layers, and in a bfloat16 model they are
twice the size of x. The gradients are the closed forms (for LayerNorm, with
x^ = (x - mean) / std and g' = g * scale):

    dx = (g' - mean(g') - x^ * mean(g' * x^)) / std,   dscale = sum(g * x^),   dbias = sum(g)

RMSNorm drops the centring (mean = 0 and no mean(g') term). Reverse mode only, as for any
custom VJP.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.layers.residuals import stash, unstash

F32 = jnp.float32


def _normalized(x, eps: float, center: bool):
    """(x^, mean or None, 1/std) in float32, statistics over the last axis."""
    x = x.astype(F32)
    mean = x.mean(-1, keepdims=True) if center else None
    xc = x - mean if center else x
    rstd = jax.lax.rsqrt(jnp.square(xc).mean(-1, keepdims=True) + eps)
    return xc * rstd, mean, rstd


def _forward(x, scale, bias, eps, center, dtype):
    xhat, mean, rstd = _normalized(x, eps, center)
    y = xhat * scale.astype(F32)
    if bias is not None:
        y = y + bias.astype(F32)
    return y.astype(dtype), (stash(x), mean, rstd, scale, bias)


def _backward(eps, center, dtype, saved, g):
    x, mean, rstd, scale, bias = saved
    x = unstash(x)
    xhat = ((x.astype(F32) - mean) if center else x.astype(F32)) * rstd
    g = g.astype(F32)
    rows = tuple(range(g.ndim - 1))
    d_scale = jnp.sum(g * xhat, rows).astype(scale.dtype)
    d_bias = None if bias is None else jnp.sum(g, rows).astype(bias.dtype)
    gs = g * scale.astype(F32)
    dx = gs - xhat * jnp.mean(gs * xhat, -1, keepdims=True)
    if center:
        dx = dx - jnp.mean(gs, -1, keepdims=True)
    return (dx * rstd).astype(x.dtype), d_scale, d_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize(x, scale, bias, eps: float, center: bool, dtype):
    """LayerNorm (center=True) or RMSNorm (center=False, bias None) of x over its last axis,
    in float32, returned in `dtype`; the backward pass keeps x and two [..., 1] statistics."""
    return _forward(x, scale, bias, eps, center, dtype)[0]


normalize.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
    eps: float = 1e-6
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        d = x_BLD.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
                           self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,),
                              self.param_dtype)
        return normalize(x_BLD, scale, bias, self.eps, True, jnp.dtype(self.dtype))


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        d = x_BLD.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
                           self.param_dtype)
        return normalize(x_BLD, scale, None, self.eps, False, jnp.dtype(self.dtype))


def make_norm(kind: str, eps: float, use_bias: bool, dtype, param_dtype, name: str | None = None) -> nn.Module:
    """LayerNorm or RMSNorm by name ("layernorm" | "rmsnorm")."""
    if kind == "layernorm":
        return LayerNorm(eps=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"norm={kind!r} is unknown; choose 'layernorm' or 'rmsnorm'")
