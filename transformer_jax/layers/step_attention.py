"""Attention of decoding's token loop: one query per row against a KV cache and its own new key.

Split from the kernels of `dot_product.py` because it is a different computation, not another
kernel for the same one: the cache is read as it was before this step's write.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.layers import platform
from transformer_jax.layers.dot_product import _MASKED, F32


def cached_step_attention(q_B1HD, k_cache_BKSD, v_cache_BKSD, k_B1KD, v_B1KD, *, index, q_segment_ids=None,
                          kv_segment_ids=None, mask=None, bias=None, scale: float) -> jax.Array:
    """One decoding step: each row's single query against its KV cache [B, K, S, D] as it was
    before this step (slots below `index` hold keys; the rest are masked) and against its own
    new key [B, 1, K, D], one softmax over both. `kv_segment_ids` [B, S] are the cache's,
    `mask` [B|1, 1, 1, S] and `bias` [B|1, H, 1, S] cover the cache's slots (the new key sits
    at slot `index`). Output [B, 1, H, D] in q's dtype.

    Equal to attending over the cache after writing the new key at `index`, but nothing reads
    the written cache: with the write's result read by the attention too, XLA:CPU fused the
    write twice at batch 1 (a unit batch dimension makes that read a bitcast) and copied the
    whole cache about four times per layer and step."""
    dtype = q_B1HD.dtype
    b, _, h, d = q_B1HD.shape
    kh, slots = k_cache_BKSD.shape[1], k_cache_BKSD.shape[2]
    q, kc, vc, kn, vn = q_B1HD, k_cache_BKSD, v_cache_BKSD, k_B1KD, v_B1KD
    if platform.backend() == "cpu" and dtype != F32:  # as _xla: no bf16 x bf16 -> f32 DotThunk on XLA:CPU
        q, kc, vc, kn, vn = (x.astype(F32) for x in (q, kc, vc, kn, vn))
    q_BKGD = q[:, 0].reshape(b, kh, h // kh, d)
    s_BKGS = platform.einsum("bkgd,bksd->bkgs", q_BKGD, kc) * scale
    s_BKG = platform.einsum("bkgd,bkd->bkg", q_BKGD, kn[:, 0]) * scale
    if bias is not None:
        bias_BKGS = bias[:, :, 0].astype(F32).reshape(bias.shape[0], kh, h // kh, slots)
        s_BKGS = s_BKGS + bias_BKGS
        s_BKG = s_BKG + jax.lax.dynamic_index_in_dim(bias_BKGS, index, axis=3, keepdims=False)
    valid_BS = jnp.arange(slots)[None, :] < index
    if q_segment_ids is not None:
        valid_BS = valid_BS & (kv_segment_ids == q_segment_ids[:, :1])
    if mask is not None:
        valid_BS = valid_BS & mask[:, 0, 0]
    s_BKGS = jnp.where(valid_BS[:, None, None, :], s_BKGS, _MASKED)
    m_BKG = jnp.maximum(jnp.max(s_BKGS, axis=-1), s_BKG)
    p_BKGS, p_BKG = jnp.exp(s_BKGS - m_BKG[..., None]), jnp.exp(s_BKG - m_BKG)
    denom_BKG = jnp.sum(p_BKGS, axis=-1) + p_BKG
    o_BKGD = platform.einsum("bkgs,bksd->bkgd", p_BKGS.astype(vc.dtype), vc) + p_BKG[..., None] * vn[:, 0][:, :, None]
    return (o_BKGD / denom_BKG[..., None]).reshape(b, 1, h, d).astype(dtype)
