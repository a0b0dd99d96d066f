"""`Dense`: an einsum projection whose kernel carries logical axis names, with an optional
LoRA adapter (Hu et al. 2021).

Written with `self.param` + `lax.dot_general` rather than `nn.DenseGeneral`, whose boxed
multi-dimensional kernels break under an active mesh (flax issue 3676, docs/architecture.md).

LoRA: y = x . W + (alpha / r) * (x . A) . B, with A [*in, r] (fan-in init) and B [r, *out]
(zeros, so an adapted model starts equal to its base). A carries the kernel's input axis
names and B its output names (the rank axis is unsharded), so sharding rules apply as to W.
`lora_delta` gives (alpha / r) * A . B, the kernel-shaped update that merging adds to W.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.layers import platform
from transformer_jax.layers.residuals import stash, unstash

Init = Callable[..., jax.Array]
LORA_PARAMS = ("lora_a", "lora_b")  # the adapter leaves' names


def matmul(x: jax.Array, w: jax.Array, n_contract: int, dtype: Any) -> jax.Array:
    """Contracts the last `n_contract` dims of x with the first of w, in `dtype`.

    Accumulates in float32 and returns `dtype` (`platform.dot_general`: one bf16 x bf16 -> f32
    dot on accelerators; on a CPU whose float32 GEMM is the faster, the operands of a large
    enough dot upcast to f32). With weights stored wider than `dtype` (f32 master weights, bf16
    compute) the backward pass's two matmuls also take `dtype` operands with float32
    accumulation (`_mixed_matmul`).
    """
    if w.dtype != jnp.dtype(dtype):
        return _mixed_matmul(x, w, n_contract, jnp.dtype(dtype))
    x = x.astype(dtype)
    return platform.dot_general(x, w, _contract_last(x.ndim, n_contract)).astype(dtype)


def _contract_last(x_ndim: int, n: int):
    return (tuple(range(x_ndim - n, x_ndim)), tuple(range(n))), ((), ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mixed_matmul(x, w, n_contract, dtype):
    return _mixed_fwd(x, w, n_contract, dtype)[0]


def _mixed_fwd(x, w, n_contract, dtype):
    xc, wc = x.astype(dtype), w.astype(dtype)
    y = platform.dot_general(xc, wc, _contract_last(xc.ndim, n_contract))
    # the cast kernel is the residual: under FSDP its one gather serves the forward pass, the
    # recomputation of a rematerialised layer and the input gradient alike
    return y.astype(dtype), (stash(xc), wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _mixed_bwd(n_contract, dtype, res, g):
    """dx = g . w^T and dw = x^T . g from the `dtype` cotangent, accumulated in float32 (autodiff
    of the forward would run both in float32: its output cotangent is float32)."""
    xc, wc, x_dtype, w_dtype = res
    xc = unstash(xc)  # layers/residuals.py (the kernel stays as it is: FSDP gathers it once for both uses)
    g = g.astype(dtype)
    n_out, n_batch = wc.ndim - n_contract, xc.ndim - n_contract
    dx = platform.dot_general(g, wc, ((tuple(range(g.ndim - n_out, g.ndim)), tuple(range(n_contract, wc.ndim))),
                                      ((), ())))
    dw = platform.weight_gradient(xc, g, n_batch)
    return dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


_mixed_matmul.defvjp(_mixed_fwd, _mixed_bwd)


def fan_in_init(n_in: int, ndim: int, scale: float = 1.0) -> Init:
    """Truncated-normal init with variance scale/fan_in over the first `n_in` kernel dims."""
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, ndim)))


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Adapters of rank `rank` on the Dense modules named in `targets` (e.g. "query", "wo")."""
    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_delta(a: jax.Array, b: jax.Array, kernel_ndim: int, scale: float) -> jax.Array:
    """scale * A . B over the rank, float32: A [*lead, *in, r], B [*lead, r, *out] -> the
    kernel's shape [*lead, *in, *out] (`lead`: e.g. the "layers" axis nn.scan stacks)."""
    lead = a.ndim + b.ndim - 2 - kernel_ndim
    batch = tuple(range(lead))
    delta = jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32),
                                (((a.ndim - 1,), (lead,)), (batch, batch)))
    return scale * delta


class Dense(nn.Module):
    """y = x . kernel (+ bias); kernel shape = x.shape[-in_dims:] + features.

    `axes` names every kernel dim (input dims then output dims), e.g. ("embed", "mlp").
    With `lora` naming this module (by its `name`) in its targets, adds the adapter term.
    """
    features: Sequence[int]
    axes: Sequence[str | None]
    in_dims: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Init | None = None
    lora: LoRA | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weights(x.shape[x.ndim - self.in_dims:])
        return self.add_extras(matmul(x, w["kernel"], self.in_dims, self.dtype), x, w)

    @nn.compact
    def weights(self, in_shape: tuple[int, ...]) -> dict[str, jax.Array]:
        """The parameters for inputs whose last dims are `in_shape`: kernel [*in, *features], and
        bias [*features], lora_a [*in, r], lora_b [r, *features] when configured (in this order:
        the order of creation fixes the init values)."""
        features = tuple(self.features)
        shape = tuple(in_shape) + features
        if len(self.axes) != len(shape):
            raise ValueError(f"Dense {self.name}: {len(self.axes)} axis names for a kernel of shape {shape}")
        init = self.kernel_init or fan_in_init(self.in_dims, len(shape))
        w = {"kernel": self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)), shape,
                                  self.param_dtype)}
        if self.lora is not None and self.name in self.lora.targets:
            r, n_in = self.lora.rank, self.in_dims
            in_axes, out_axes = tuple(self.axes[:n_in]), tuple(self.axes[n_in:])
            w["lora_a"] = self.param("lora_a", nn.with_logical_partitioning(
                fan_in_init(n_in, n_in + 1), in_axes + (None,)), shape[:n_in] + (r,), self.param_dtype)
            w["lora_b"] = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_axes),
                                     (r,) + shape[n_in:], self.param_dtype)
        if self.use_bias:
            bias_axes = tuple(self.axes[self.in_dims:])
            w["bias"] = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes), features,
                                   self.param_dtype)
        return w

    def add_extras(self, y: jax.Array, x: jax.Array, w: dict[str, jax.Array], repeats: int = 1) -> jax.Array:
        """y (= x . kernel) plus the adapter term (alpha / r) * (x . A) . B, then the bias, when
        configured. Projections that share an input and fuse their matmuls (attention's
        query/key/value) pass their slice of the fused output; `repeats`: key/value heads
        repeated to match it (axis -2)."""
        rep = (lambda t: t) if repeats == 1 else functools.partial(jnp.repeat, repeats=repeats, axis=-2)
        if "lora_a" in w:
            h = matmul(x, w["lora_a"], self.in_dims, self.dtype)  # [..., r]
            y = y + rep(matmul(h, w["lora_b"], 1, self.dtype) * jnp.asarray(self.lora.scale, self.dtype))
        if "bias" in w:
            y = add_bias(y, rep(w["bias"]))
        return y


def add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
    """y + b, b broadcast over y's leading axes and cast to y's dtype. For a y narrower than
    float32 the bias gradient sums the cotangent in float32 (a custom VJP): autodiff would sum a
    bfloat16 cotangent in bfloat16, which XLA:CPU runs as a slow upcast tree reduction
    (reduce-window). A float32 y takes plain autodiff."""
    if y.dtype == jnp.float32:
        return y + b.astype(y.dtype)
    return _add_bias_f32_grad(y, b)


@jax.custom_vjp
def _add_bias_f32_grad(y, b):
    return y + b.astype(y.dtype)


def _add_bias_fwd(y, b):
    return _add_bias_f32_grad(y, b), jnp.zeros((0,) * b.ndim, b.dtype)  # b's rank and dtype


def _add_bias_bwd(b_like, g):
    lead = tuple(range(g.ndim - b_like.ndim))
    return g, jnp.sum(g, lead, dtype=jnp.float32).astype(b_like.dtype)


_add_bias_f32_grad.defvjp(_add_bias_fwd, _add_bias_bwd)
