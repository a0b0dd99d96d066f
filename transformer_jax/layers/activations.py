"""MLP activations whose backward pass keeps only their input.

Autodiff of `jax.nn.gelu(x, approximate=True)` saves five tensors the size of x for the
backward pass (x^3 terms, tanh, 1 - tanh^2, ...), exact GELU four, SiLU three, ReLU a mask
and two more: each as large as the MLP's widest activation [B, L, d_ff], written in the
forward pass, read in the backward, and under `nn.scan` stacked over the layers. Each
activation here is a custom VJP that saves x alone and recomputes its derivative in
float32 in the backward pass (a few elementwise operations), so an MLP keeps x and the
activation's output (the next matmul's input) instead of up to seven such tensors.
The forward values are `jax.nn`'s own. Reverse mode only, as for any custom VJP: for
forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) through an MLP, put `jax.nn`'s functions
in `layers.mlp.ACTIVATIONS`.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from transformer_jax.layers.residuals import stash, unstash

F32 = jnp.float32
_C = math.sqrt(2.0 / math.pi)  # tanh approximation of GELU (Hendrycks & Gimpel 2016)
_A = 0.044715


def _saving_input(forward: Callable, derivative: Callable) -> Callable:
    """forward(x) with a VJP g * derivative(x), x the only residual."""
    @jax.custom_vjp
    def act(x):
        return forward(x)

    def fwd(x):
        return forward(x), stash(x)

    def bwd(kept, g):
        x = unstash(kept)
        return ((g.astype(F32) * derivative(x.astype(F32))).astype(x.dtype),)

    act.defvjp(fwd, bwd)
    return act


def _d_gelu_tanh(x):
    t = jnp.tanh(_C * (x + _A * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * x * x)


def _d_gelu(x):
    cdf = 0.5 * jax.lax.erfc(-x / math.sqrt(2.0))
    return cdf + x * jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _d_silu(x):
    s = jax.nn.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


relu = _saving_input(jax.nn.relu, lambda x: (x > 0).astype(F32))
gelu = _saving_input(lambda x: jax.nn.gelu(x, approximate=False), _d_gelu)
gelu_tanh = _saving_input(lambda x: jax.nn.gelu(x, approximate=True), _d_gelu_tanh)
silu = _saving_input(jax.nn.silu, _d_silu)
