"""Output layer + cross-entropy fused, a chunk of tokens at a time (`task.loss_chunk` per device).

The [B, L, V] logits are never materialised. For each chunk of positions the logits,
their log-sum-exp, the loss sums and, when differentiating, the closed-form gradient
dlogits = w * (softmax * (1 + 2 z logZ) - (1 - s) onehot - s / V) with its two matmuls
(dh = dlogits . W, dW^T += h^T . dlogits) run in one pass; the backward only scales the
saved dh, dW by the incoming cotangent. Same matmul FLOPs as the unfused loss, ~3 x B x L
x V x 4 bytes less temp memory (1.5 GiB for the bench model of docs/architecture.md) and cache-sized
blocks (benchmarks/train_step.py measures it).

The hidden states come from the model itself: `hidden_and_output_weight` runs it with
`Embedder.logits` intercepted (flax `nn.intercept_methods`), so models need no second
code path. Decoder LM and encoder-decoder heads only (the MLM head adds a bias after
the logits and uses the unfused loss).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.layers import platform
from transformer_jax.parallel.partition import logical_shards
from transformer_jax.train.losses import argmax_hits

F32 = jnp.float32


def hidden_and_output_weight(model: Any, variables: dict, *args, **kwargs) -> tuple[jax.Array, jax.Array]:
    """(h [..., D], W) with logits = h . W^T, from `model.apply(variables, *args, **kwargs)`.

    W is [V, D], or for a tied table [g, V, D]: one copy of the table per group of batch rows
    (g = `batch_shards`, 1 off a mesh), read by both the input lookup and the output layer.
    The copies' gradients add up in place, and summing them over g (the broadcast's transpose)
    is the table's one reduction per step; with the [V, D] table itself, GSPMD reduces the two
    uses' partial gradients separately. A table split along embed (FSDP) is read directly: its
    lookup's gradient then needs no reduction at all (layers/embeddings.py)."""
    tables: dict = {}  # Embedder path -> [g, V, D] copies of its tied table

    def shared(path, table, rows):
        """The copies, or None with one batch group (nothing to gain)."""
        g = batch_shards(rows)
        if g == 1 or logical_shards("embed") > 1:  # (split along embed, the lookup's gradient
            return None  # needs no reduction: layers/embeddings.py)
        if path not in tables:
            table_g = jnp.broadcast_to(table[None], (g, *table.shape))
            tables[path] = nn.with_logical_constraint(table_g, ("batch", "vocab", None))
        return tables[path]

    def interceptor(next_fun, fargs, fkwargs, context):
        module = context.module
        name = type(module).__name__
        if name == "Embed" and context.method_name == "__call__" and getattr(
                getattr(module.parent, "cfg", None), "tie_embeddings", False):
            tokens = fargs[0]
            table_g = shared(module.parent.path, module.embedding, tokens.shape[0])
            if table_g is None:
                return next_fun(*fargs, **fkwargs)
            g = table_g.shape[0]
            tokens_g = tokens.reshape(g, tokens.shape[0] // g, *tokens.shape[1:])
            # Each vocabulary shard looks up the tokens it holds (zeros for the others) and the
            # shards add up: Megatron's vocab-parallel embedding, written with the shard axis in
            # the array (a gather from [g, V, D] split over V crashes XLA's partitioner: jax 0.10.2).
            t = logical_shards("vocab")
            g, v, d = table_g.shape
            table_gt = nn.with_logical_constraint(table_g.reshape(g, t, v // t, d), ("batch", "vocab", None, None))
            local = tokens_g[:, None] - (jnp.arange(t) * (v // t)).reshape(1, t, *[1] * tokens.ndim)
            valid = (local >= 0) & (local < v // t)
            take = jax.vmap(jax.vmap(lambda tab, i: jnp.take(tab, i, axis=0)))
            x = take(table_gt, jnp.where(valid, local, 0)) * valid[..., None].astype(table_g.dtype)
            x = x.sum(1)  # [g, B/g, ..., D]: over the vocabulary's shards
            return x.reshape(*tokens.shape, -1).astype(module.dtype)
        if context.method_name != "logits" or name != "Embedder":
            return next_fun(*fargs, **fkwargs)
        cfg, x = module.cfg, fargs[0]
        params = nn.unbox(module.variables["params"])
        if cfg.tie_embeddings:
            if cfg.scale_tied_logits:
                x = x * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
            table_g = shared(module.path, params["token"]["embedding"], x.shape[0])
            return x, params["token"]["embedding"] if table_g is None else table_g
        return x, params["unembed"]["kernel"].T

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, *args, **kwargs)
    if not isinstance(out, tuple):
        raise ValueError(f"{type(model).__name__} did not compute its logits with Embedder.logits; "
                         "set task.loss_chunk=0")
    return out


def _chunks(x: jax.Array, c: int) -> jax.Array:
    """[B, L, ...] -> [L/c, B, c, ...], zero-padded along L (padding has weight 0)."""
    b, length = x.shape[:2]
    n = -(-length // c)
    x = jnp.pad(x, [(0, 0), (0, n * c - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)


def chunk_positions(loss_chunk: int, rows_per_device: int, length: int) -> int:
    """Positions per chunk: `loss_chunk` counts tokens per device, so the positions follow from
    the rows each device holds. Each chunk also adds a whole [D, V] partial into dW, so fewer
    rows per device (more devices on the batch) must not mean more, smaller chunks."""
    return max(1, min(loss_chunk // max(rows_per_device, 1), length))


def batch_shards(rows: int) -> int:
    """How many devices split the batch rows under the current mesh and logical rules (1 when
    none is set or the rows do not divide)."""
    n = logical_shards("batch")
    return n if rows % n == 0 else 1


def _run(h, w, targets, weights, chunk, z_loss, smoothing, dtype, grad: bool):
    """w: [V, D] or [gw, V, D] (gw copies, one per group of batch rows); dW comes back shaped like w."""
    w_g = w if w.ndim == 3 else w[None]
    gw, v = w_g.shape[:2]
    wc = w_g.astype(dtype)
    # W^T for the logits, made once outside the loop: with W inside it, XLA:CPU transposed W for
    # the logits dot at every chunk (a [D, V] copy each). W is whole along D first (FSDP's one
    # gather), so that W and W^T are not gathered separately.
    wc = nn.with_logical_constraint(wc, ("batch" if gw > 1 else None, "vocab", None))
    wc_t = jnp.swapaxes(wc, 1, 2)
    # dW is a sum over the batch, whose rows are split over g devices. Each device adds up its
    # own rows' share in its slice of a [g, D, V] carry (sharded like the batch: no collective
    # inside the loop); the g shares are summed once after it (one all-reduce / reduce-scatter
    # per step instead of one per chunk), or, with per-group copies of W, by the caller.
    g = batch_shards(h.shape[0])
    split = lambda x, n: x.reshape(n, x.shape[0] // n, *x.shape[1:])  # noqa: E731  [B, ...] -> [n, B/n, ...]
    merge = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  [n, B/n, ...] -> [B, ...]

    def body(acc, xs):
        h_c, t_c, w_c = xs  # [B, c, D], [B, c], [B, c]
        logits = merge(platform.einsum("gbcd,gdv->gbcv", split(h_c.astype(dtype), gw), wc_t))
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        log_z = jax.nn.logsumexp(logits, axis=-1)
        onehot = jax.nn.one_hot(t_c, v, dtype=F32)
        nll = log_z - jnp.sum(logits * onehot, -1)
        loss = nll if not smoothing else (1.0 - smoothing) * nll + smoothing * (log_z - logits.mean(-1))
        zl = z_loss * jnp.square(log_z)
        loss = loss + zl if z_loss else loss
        correct = argmax_hits(logits, t_c).astype(F32)
        w32 = w_c.astype(F32)
        sums = {"loss": jnp.sum(loss * w32), "nll": jnp.sum(nll * w32), "correct": jnp.sum(correct * w32),
                "tokens": jnp.sum(w32), "z_loss": jnp.sum(zl * w32)}
        acc_sums, dw = acc
        acc_sums = jax.tree.map(jnp.add, acc_sums, sums)
        if not grad:
            return (acc_sums, dw), None
        p = jnp.exp(logits - log_z[..., None])
        dlogits = p * (1.0 + 2.0 * z_loss * log_z)[..., None] - (1.0 - smoothing) * onehot - smoothing / v
        dlogits = (dlogits * w32[..., None]).astype(dtype)
        dh = merge(platform.einsum("gbcv,gvd->gbcd", split(dlogits, gw), wc))
        # Accumulated as dW^T [D, V]: XLA:CPU then reads dlogits in place instead of first
        # transposing each [B*c, V] block (measured: the head's time -17% on the bench model).
        dw = dw + platform.einsum("gbcd,gbcv->gdv", split(h_c.astype(dtype), g), split(dlogits, g))
        dw = nn.with_logical_constraint(dw, ("batch", None, "vocab"))
        return (acc_sums, dw), nn.with_logical_constraint(dh, ("batch", "length", "embed"))

    chunk = chunk_positions(chunk, h.shape[0] // g, h.shape[1])
    zeros = {k: jnp.zeros((), F32) for k in ("loss", "nll", "correct", "tokens", "z_loss")}
    # whole along length (sequence parallelism splits it over tensor): one gather for the loop
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    xs = (_chunks(h, chunk), _chunks(targets, chunk), _chunks(weights, chunk))
    d = w_g.shape[-1]
    (sums, dw_t), dh = jax.lax.scan(body, (zeros, jnp.zeros((g, d, v), F32) if grad else None), xs)
    if not grad:
        return sums, None, None
    dh = jnp.moveaxis(dh, 0, 1).reshape(h.shape[0], -1, h.shape[-1])[:, :h.shape[1]]
    dw_g = jnp.swapaxes(dw_t.reshape(gw, g // gw, d, v).sum(1), 1, 2)  # [gw, V, D]
    return sums, dh, dw_g.reshape(w.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def fused_cross_entropy_sums(h, w, targets, weights, chunk: int, z_loss: float, smoothing: float, dtype) -> dict:
    """`cross_entropy_sums(h . W^T, targets, weights, ...)` about `chunk` tokens per device at a
    time (whole positions of every row the device holds). Differentiable in h and W through the
    "loss" sum (the others are metrics)."""
    return _run(h, w, targets, weights, chunk, z_loss, smoothing, dtype, grad=False)[0]


def _fwd(h, w, targets, weights, chunk, z_loss, smoothing, dtype):
    sums, dh, dw = _run(h, w, targets, weights, chunk, z_loss, smoothing, dtype, grad=True)
    return sums, (dh.astype(h.dtype), dw.astype(w.dtype))


def _bwd(chunk, z_loss, smoothing, dtype, res, g):
    dh, dw = res
    scale = g["loss"]
    return (scale * dh).astype(dh.dtype), (scale * dw).astype(dw.dtype), None, None


fused_cross_entropy_sums.defvjp(_fwd, _bwd)
