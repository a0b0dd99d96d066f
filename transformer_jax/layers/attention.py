"""Multi-head attention (Vaswani et al. 2017) with grouped key/value heads (GQA, Ainslie et al.
2023; MQA when num_kv_heads=1), optional RoPE, and a KV cache for autoregressive decoding.

Self-attention when `x_kv` is None, cross-attention otherwise.

GQA on a mesh whose `kv_heads` axes (by the active logical rules) do not divide num_kv_heads,
e.g. 2 kv heads with tensor=4: the key/value kernels stay replicated over those axes and each
kv head is repeated right after its projection, up to lcm(num_kv_heads, shards) heads, which
split like the query heads (each device keeps one copy of the heads its queries use). This is
the same function (query head h still reads kv head h // (num_heads // num_kv_heads)) and its
gradient sums over the copies.

Decoding: initialise the cache with `model.init(rng, tokens_of_max_len, decode=True)` (the
cache takes the input's length), then call with `decode=True, mutable=["cache"]` on a prompt
chunk (prefill) or one token at a time. Each call writes its keys/values at the cache index
and attends causally to everything written so far; `q_segment_ids` (0 = padding) let rows of
a batch hold prompts of different lengths (left-padded). A one-token call (the token loop, with
`implementation` auto or xla) attends over the cache as it was plus the token's own key/value and
writes them after (`cached_step_attention`), so the loop updates the cache in place.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.layers.dense import Dense, LoRA, fan_in_init, matmul
from transformer_jax.layers.dot_product import dot_product_attention
from transformer_jax.layers.embeddings import apply_rope
from transformer_jax.layers.step_attention import cached_step_attention


class MultiHeadAttention(nn.Module):
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None  # None: = num_heads
    use_bias: bool = False
    rope: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Any = None  # a models.config.RopeScaling, or None
    sliding_window: int | None = None  # self-attention sees only the last `sliding_window` keys (Mistral)
    qkv_bias: bool = False  # biases on query/key/value even without use_bias (Qwen2)
    logit_scale: bool = True  # multiply scores by head_dim**-0.5
    implementation: str = "auto"
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoRA | None = None  # adapters on query/key/value/out, as its targets name them

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        x_kv_BSD: jax.Array | None = None,
        *,
        causal: bool = False,
        q_segment_ids: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
        q_positions: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv_heads}")
        self_attention = x_kv_BSD is None
        x_kv_BSD = x_BLD if self_attention else x_kv_BSD
        d_model = x_BLD.shape[-1]

        repeats = kv_repeats(self.num_heads, kv_heads)
        kv_axis = "kv_heads" if repeats == 1 else None  # repeated heads: the kernels are replicated

        def proj(heads, heads_axis, name):
            return Dense((heads, self.head_dim), ("embed", heads_axis, "head_dim"),
                         use_bias=self.use_bias or self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                         lora=self.lora, name=name)

        query, key, value = proj(self.num_heads, "heads", "query"), proj(kv_heads, kv_axis, "key"), \
            proj(kv_heads, kv_axis, "value")
        if self.decode:  # no backward pass to save an all-reduce in, and in the token loop the join
            # would copy every layer's q/k/v kernels at every step: one matmul each
            (q_BLHD,), (k_BSKD,), (v_BSKD,) = (fused_projections(x, (d,), repeats, self.dtype)
                                               for x, d in ((x_BLD, query), (x_kv_BSD, key), (x_kv_BSD, value)))
        elif self_attention:
            q_BLHD, k_BSKD, v_BSKD = fused_projections(x_BLD, (query, key, value), repeats, self.dtype)
        else:
            q_BLHD, = fused_projections(x_BLD, (query,), repeats, self.dtype)
            k_BSKD, v_BSKD = fused_projections(x_kv_BSD, (key, value), repeats, self.dtype)
        q_BLHD = nn.with_logical_constraint(q_BLHD, ("batch", "length", "heads", "head_dim"))
        k_BSKD = nn.with_logical_constraint(k_BSKD, ("batch", "length", "kv_heads", "head_dim"))
        v_BSKD = nn.with_logical_constraint(v_BSKD, ("batch", "length", "kv_heads", "head_dim"))

        b, lq = x_BLD.shape[:2]
        q_offset = 0
        caching = self.decode and self_attention
        use_cache = caching and self.has_variable("cache", "cached_key")  # False on the init call
        if caching:
            cache_index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            if q_positions is None:
                q_positions = (cache_index.value if use_cache else 0) + jnp.arange(lq)[None, :]
        if self.rope and self_attention:
            q_pos = jnp.broadcast_to(jnp.arange(lq)[None] if q_positions is None else q_positions, (b, lq))
            k_pos = q_pos if kv_positions is None else kv_positions
            q_BLHD = apply_rope(q_BLHD, q_pos, self.rope_theta, self.rope_scaling)
            k_BSKD = apply_rope(k_BSKD, jnp.broadcast_to(k_pos, k_BSKD.shape[:2]), self.rope_theta, self.rope_scaling)

        scale = self.head_dim ** -0.5 if self.logit_scale else 1.0
        if use_cache and lq == 1 and self.implementation in ("auto", "xla"):  # decoding's token loop
            out_BLHD = self._cached_step(q_BLHD, k_BSKD, v_BSKD, q_segment_ids, cache_index, mask, bias, scale)
        else:
            if caching:
                k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_offset = self._update_cache(
                    k_BSKD, v_BSKD, q_segment_ids, cache_index, use_cache)
                causal = True
            if self.sliding_window is not None and self_attention:
                mask = _window(lq, k_BSKD.shape[1], q_offset, self.sliding_window, mask)
            out_BLHD = dot_product_attention(
                q_BLHD, k_BSKD, v_BSKD, causal=causal, q_offset=q_offset, q_segment_ids=q_segment_ids,
                kv_segment_ids=kv_segment_ids, bias=bias, mask=mask, scale=scale, implementation=self.implementation)
        out_BLHD = nn.with_logical_constraint(out_BLHD, ("batch", "length", "heads", "head_dim"))
        out = Dense((d_model,), ("heads", "head_dim", "embed"), in_dims=2, use_bias=self.use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=fan_in_init(2, 3), lora=self.lora, name="out")(out_BLHD)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def _cached_step(self, q_B1HD, k_B1KD, v_B1KD, segment_ids_B1, cidx, mask, bias, scale):
        """One token per row: attend over the cache as it was and the token's own key/value
        (`cached_step_attention`), then write them. The written values carry a zero computed from
        the attention's output, so XLA orders the in-place write after the read: otherwise it
        copied every layer's whole cache each step, to keep the old one for the read."""
        cache_k, cache_v, cache_seg = (self.get_variable("cache", n) for n in ("cached_key", "cached_value",
                                                                                "segment_ids"))
        index = cidx.value
        seg = jnp.ones((q_B1HD.shape[0], 1), jnp.int32) if segment_ids_B1 is None else segment_ids_B1.astype(jnp.int32)
        if self.sliding_window is not None:
            mask = _window(1, cache_k.shape[2], index, self.sliding_window, mask)
        out_B1HD = cached_step_attention(q_B1HD, cache_k, cache_v, k_B1KD.astype(cache_k.dtype),
                                         v_B1KD.astype(cache_v.dtype), index=index, q_segment_ids=seg,
                                         kv_segment_ids=cache_seg, mask=mask, bias=bias, scale=scale)
        o = out_B1HD[:, :1, :1, :1].astype(jnp.float32)
        after = (o - o).astype(k_B1KD.dtype)  # 0 (NaN only where the output is already NaN)
        self._update_cache(k_B1KD + after, v_B1KD + after, segment_ids_B1, cidx, True)
        return out_B1HD

    def _update_cache(self, k_BLKD, v_BLKD, segment_ids_BL, cidx, use_cache):
        """Writes the new keys/values at the cache index; returns what to attend over.

        The cache is stored [batch, kv_heads, length, head_dim] (as the attention matmuls read
        it: batch and heads leading), so a decode step reads it in place instead of transposing
        the whole cache; the swapaxes below cancel against the kernels' own transposes."""
        b, l = k_BLKD.shape[:2]
        seg = jnp.ones((b, l), jnp.int32) if segment_ids_BL is None else segment_ids_BL.astype(jnp.int32)
        # On the init call the cache is created with the input's length and left empty.
        ck = self.variable("cache", "cached_key", jnp.zeros, _bkld(k_BLKD.shape), k_BLKD.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, _bkld(v_BLKD.shape), v_BLKD.dtype)
        cseg = self.variable("cache", "segment_ids", jnp.zeros, (b, l), jnp.int32)
        if not use_cache:
            return k_BLKD, v_BLKD, seg, seg, 0
        index = cidx.value
        axes = ("batch", "kv_heads", "length", "head_dim")  # on a mesh: rows on data, heads on tensor

        def write(cache, new_BLKD):
            new_BKLD = jnp.swapaxes(new_BLKD, 1, 2).astype(cache.dtype)
            return nn.with_logical_constraint(jax.lax.dynamic_update_slice(cache, new_BKLD, (0, 0, index, 0)), axes)
        ck.value, cv.value = write(ck.value, k_BLKD), write(cv.value, v_BLKD)
        cseg.value = nn.with_logical_constraint(
            jax.lax.dynamic_update_slice(cseg.value, seg, (0, index)), ("batch", "length"))
        cidx.value = index + l
        return jnp.swapaxes(ck.value, 1, 2), jnp.swapaxes(cv.value, 1, 2), seg, cseg.value, index


def fused_projections(x_BLD: jax.Array, denses: tuple[Dense, ...], repeats: int, dtype: Any) -> list[jax.Array]:
    """Head projections of one input (query/key/value, or key/value) as one matmul.

    The kernels [D, n, Dh] (n: num_heads or num_kv_heads) stay separate parameters; key/value
    kernels are repeated to K = num_kv_heads * repeats heads (as their outputs would be), the
    query kernel viewed as [D, K, num_heads / K, Dh] and all joined along that group axis, so
    the join is local to each tensor shard. One matmul means one input gradient: under tensor
    parallelism one all-reduce of dx per attention block instead of one per projection."""
    shapes = [x_BLD.shape[-1:]] * len(denses)
    ws = [d.weights(s) for d, s in zip(denses, shapes)]
    kernels = [w["kernel"] if d.name == "query" else jnp.repeat(w["kernel"], repeats, axis=1)
               for d, w in zip(denses, ws)]
    groups = min(k.shape[1] for k in kernels)
    joined = jnp.concatenate([k.reshape(k.shape[0], groups, -1, k.shape[-1]) for k in kernels], axis=2)
    joined = nn.with_logical_constraint(joined, ("embed", "heads", None, "head_dim"))
    y = matmul(x_BLD, joined, 1, dtype)  # [B, L, groups, sum of heads per group, Dh]
    per = [k.shape[1] // groups for k in kernels]
    parts = jnp.split(y, list(itertools.accumulate(per[:-1])), axis=-2)  # its gradient: one concatenate
    return [d.add_extras(part.reshape(*y.shape[:-3], k.shape[1], k.shape[-1]), x_BLD, w,
                         1 if d.name == "query" else repeats)
            for d, w, k, part in zip(denses, ws, kernels, parts)]


def kv_repeats(num_heads: int, kv_heads: int) -> int:
    """How many copies of each kv head attention uses under the active mesh and logical rules.

    1 off a mesh, or when kv_heads divides the mesh axes `kv_heads` maps to; else the factor
    that makes lcm(kv_heads, shards) heads (when num_heads allows it: it must split too)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes(("kv_heads",))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    repeats = math.lcm(kv_heads, shards) // kv_heads
    return repeats if num_heads % (kv_heads * repeats) == 0 else 1


def _bkld(shape_BLKD):
    b, l, k, d = shape_BLKD
    return b, k, l, d


def _window(lq: int, lk: int, q_offset, window: int, mask):
    """`mask` and "key slot j within `window` slots of query slot q_offset + i" ([1, 1, Lq, Lk]).
    Slots, not positions: packed rows and a left-padded cache shift both sides alike."""
    q_i = q_offset + jnp.arange(lq)[:, None]
    near = (q_i - jnp.arange(lk)[None, :] < window)[None, None]
    return near if mask is None else mask & near
