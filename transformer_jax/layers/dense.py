"""`Dense`: an einsum projection whose kernel carries logical axis names.

Written with `self.param` + `lax.dot_general` rather than `nn.DenseGeneral`, whose boxed
multi-dimensional kernels break under an active mesh (flax issue 3676, DESIGN.md).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Init = Callable[..., jax.Array]


def matmul(x: jax.Array, w: jax.Array, n_contract: int, dtype: Any) -> jax.Array:
    """Contracts the last `n_contract` dims of x with the first of w, in `dtype`.

    Accumulates in float32 (`preferred_element_type`) and returns `dtype`: the fast
    path for bf16 on CPUs and accelerators alike, and exact for float32.
    """
    x, w = x.astype(dtype), w.astype(dtype)
    dims = (tuple(range(x.ndim - n_contract, x.ndim)), tuple(range(n_contract)))
    y = jax.lax.dot_general(x, w, (dims, ((), ())), preferred_element_type=jnp.float32)
    return y.astype(dtype)


def fan_in_init(n_in: int, ndim: int, scale: float = 1.0) -> Init:
    """Truncated-normal init with variance scale/fan_in over the first `n_in` kernel dims."""
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, ndim)))


class Dense(nn.Module):
    """y = x . kernel (+ bias); kernel shape = x.shape[-in_dims:] + features.

    `axes` names every kernel dim (input dims then output dims), e.g. ("embed", "mlp").
    """
    features: Sequence[int]
    axes: Sequence[str | None]
    in_dims: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Init | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        shape = x.shape[x.ndim - self.in_dims:] + features
        if len(self.axes) != len(shape):
            raise ValueError(f"Dense {self.name}: {len(self.axes)} axis names for a kernel of shape {shape}")
        init = self.kernel_init or fan_in_init(self.in_dims, len(shape))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)), shape, self.param_dtype)
        y = matmul(x, kernel, self.in_dims, self.dtype)
        if self.use_bias:
            bias_axes = tuple(self.axes[self.in_dims:])
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes), features,
                           self.param_dtype)
            y = y + b.astype(self.dtype)
        return y
