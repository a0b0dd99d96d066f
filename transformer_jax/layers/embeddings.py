"""Token embeddings and the four kinds of position information.

- sinusoidal: fixed sin/cos of geometric frequencies (Vaswani et al. 2017, sec. 3.5)
- learned: a trainable table indexed by position (GPT-2, BERT)
- rotary (RoPE): rotate query/key pairs by position-dependent angles (Su et al. 2021)
- T5 relative bias: a learned scalar per head and log-bucketed distance (Raffel et al. 2020)
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.layers import platform
from transformer_jax.layers.dense import matmul
from transformer_jax.parallel.partition import logical_shards


class Embed(nn.Module):
    """Token table E [vocab, embed]; `attend(x)` gives logits x . E^T for tied output layers."""
    vocab_size: int
    features: int
    init_std: float | None = None  # None: features**-0.5, so tied logits start at unit scale
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        std = self.features ** -0.5 if self.init_std is None else self.init_std
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(std), ("vocab", "embed")),
            (self.vocab_size, self.features), self.param_dtype)

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        if logical_shards("embed") > 1:
            # A table split along embed (FSDP): every device looks up all rows of the batch in
            # its own columns, and the result is resharded to its rows: activation bytes, not the
            # table gathered, and the lookup's gradient comes out whole in each device's columns
            # (no [V, D] scatter-add per device to be reduced).
            tokens_BL = nn.with_logical_constraint(tokens_BL, (None, None))
            x_BLD = jnp.take(self.embedding, tokens_BL, axis=0).astype(self.dtype)
            return nn.with_logical_constraint(x_BLD, (None, None, "embed"))
        # Otherwise gather from a table whole along embed; split on both dims, the SPMD
        # partitioner would replicate it.
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        return jnp.take(table, tokens_BL, axis=0).astype(self.dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        if jnp.dtype(self.dtype) == x_BLD.dtype:
            thin = platform.thin_table_logits(x_BLD, self.embedding)  # decoding on CPU
            if thin is not None:
                return thin
        return matmul(x_BLD, self.embedding.T, 1, self.dtype)


def sinusoidal_positions(positions_BL: jax.Array, features: int, max_timescale: float = 10000.0) -> jax.Array:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...): [B, L, features] float32."""
    inv_freq = max_timescale ** (-jnp.arange(0, features, 2, dtype=jnp.float32) / features)
    angles = positions_BL.astype(jnp.float32)[..., None] * inv_freq  # [B, L, d/2]
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # interleave sin, cos
    return pe.reshape(*positions_BL.shape, -1)[..., :features]


class LearnedPositions(nn.Module):
    max_len: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, positions_BL: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                           (self.max_len, self.features), self.param_dtype)
        # Whole along embed before the gather, as Embed does: a gather from a table split over
        # fsdp into rows split over (data, fsdp) is an "involuntary full rematerialization".
        table = nn.with_logical_constraint(table, (None, None))
        return position_lookup(table, positions_BL).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling=None) -> np.ndarray:
    """The [head_dim / 2] float32 angular frequencies theta^(-2i/d), optionally scaled
    (`scaling`: a models.config.RopeScaling, "linear" or "llama3"), as transformers computes them."""
    inv_freq = (1.0 / np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim)).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: wavelengths above original_max_len / low_freq_factor are stretched by `factor`, those below
    # original_max_len / high_freq_factor kept, the band between blended smoothly.
    wavelen = 2 * math.pi / inv_freq
    old_len, factor = scaling.original_max_len, scaling.factor
    scaled = np.where(wavelen > old_len / scaling.low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / scaling.high_freq_factor) & (wavelen <= old_len / scaling.low_freq_factor)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x_BLHD: jax.Array, positions_BL: jax.Array, theta: float = 10000.0, scaling=None) -> jax.Array:
    """Rotates the two halves of each head (the Llama/GPT-NeoX "rotate_half" layout)."""
    inv_freq = jnp.asarray(rope_frequencies(x_BLHD.shape[-1], theta, scaling))  # [D/2]
    angles = positions_BL.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, L, 1, D/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHD.dtype)


def t5_relative_bucket(rel: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
    """Bucket of key_pos - query_pos: exact for small distances, log-spaced up to max_distance."""
    bucket = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).astype(rel.dtype) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(rel.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(rel < max_exact, rel, large)


@jax.custom_vjp
def small_table_lookup(table_KH: jax.Array, buckets: jax.Array) -> jax.Array:
    """table[buckets]: [..., H] rows of a small [K, H] table (T5's relative-position buckets,
    learned positions), whose gradient is the one-hot contraction sum over positions of
    one_hot(bucket) x g instead of the gather's scatter-add.
    The SPMD partitioner runs a contraction over a split batch on each device's rows and sums
    the [K, H] partials; a scatter-add whose updates are split over an automatic axis it runs
    by all-gathering the updates and indices first: T5-base on data=4 x fsdp=4, 437 MiB per
    device per step (`transformer-jax plan --config t5_base`). The one-hot costs memory
    ([..., K] in g's dtype) where XLA does not fuse it into the contraction, as XLA:CPU does not."""
    return jnp.take(table_KH, buckets, axis=0)


def _small_table_lookup_fwd(table_KH, buckets):
    return jnp.take(table_KH, buckets, axis=0), (table_KH, buckets)


def _small_table_lookup_bwd(res, g):
    table_KH, buckets = res
    one_hot = jax.nn.one_hot(buckets, table_KH.shape[0], dtype=g.dtype)  # [..., K]
    lead = "".join(chr(ord("a") + i) for i in range(buckets.ndim))
    d_table = jnp.einsum(f"{lead}k,{lead}h->kh", one_hot, g, preferred_element_type=jnp.float32)
    return d_table.astype(table_KH.dtype), None


small_table_lookup.defvjp(_small_table_lookup_fwd, _small_table_lookup_bwd)


def position_lookup(table_KH: jax.Array, positions: jax.Array) -> jax.Array:
    """table[positions] for a table of positions or position buckets: `small_table_lookup`
    where the rows are split over an automatic axis (fsdp), a plain gather otherwise."""
    if logical_shards("batch", manual=False) > 1:
        return small_table_lookup(table_KH, positions)
    return jnp.take(table_KH, positions, axis=0)


class RelativePositionBias(nn.Module):
    """T5's learned bias [B, H, Lq, Lk] from query and key positions; shared by all layers of a stack."""
    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q_positions_BL: jax.Array, k_positions_BS: jax.Array) -> jax.Array:
        table = self.param("rel_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "heads")),
                           (self.num_buckets, self.num_heads), self.param_dtype)
        rel_BLS = k_positions_BS[:, None, :].astype(jnp.int32) - q_positions_BL[:, :, None].astype(jnp.int32)
        buckets = t5_relative_bucket(rel_BLS, self.bidirectional, self.num_buckets, self.max_distance)
        bias_BLSH = position_lookup(table, buckets)
        return jnp.transpose(bias_BLSH, (0, 3, 1, 2)).astype(self.dtype)
