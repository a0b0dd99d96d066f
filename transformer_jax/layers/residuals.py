"""Low-precision residuals of a custom VJP, kept as their bits.

A custom VJP's residuals that live inside `nn.scan` (a layer stack) are stacked over the
layers: each layer writes its residual into a [layers, ...] stack with a
dynamic-update-slice. XLA:CPU (jax 0.10.2) computes that update in float32 when the stack is
bfloat16 or float16: it converts the whole stack to float32, updates one layer's slice and
converts it all back, in every layer, so a step reads and writes every stack once per layer
instead of writing one slice. As unsigned integers of the same width the stacks are only
data, updated in place. `stash` and `unstash` are free bitcasts on every platform.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_BITS = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16}


def stash(x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(bits, marker): x as an unsigned integer array when it is bf16/f16, else x unchanged."""
    bits = _BITS.get(jnp.dtype(x.dtype))
    if bits is None:
        return x, None
    return jax.lax.bitcast_convert_type(x, bits), jnp.zeros((0,), x.dtype)


def unstash(kept: tuple[jax.Array, jax.Array | None]) -> jax.Array:
    """The array `stash` was given."""
    bits, marker = kept
    return bits if marker is None else jax.lax.bitcast_convert_type(bits, marker.dtype)
