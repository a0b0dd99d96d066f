"""Scaled dot-product attention, softmax(q k^T * scale + bias) v, with selectable kernels.

Shapes: q [B, Lq, H, D], k/v [B, Lk, K, D] with H a multiple of K (GQA/MQA when K < H).
Masks combine: `causal` (query i sees keys j <= i + q_offset), packed `segment ids`
(a query sees only keys of its own segment), a boolean `mask` (True = attend) and an
additive `bias`, both broadcastable to [B, H, Lq, Lk].

A query with no visible key gets a uniform average instead of NaN (masked logits are
a large finite negative), so padding rows stay finite; their outputs are meant to be ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla")
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    q_offset: int | jax.Array = 0,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Attention output [B, Lq, H, D] in q's dtype."""
    _check_shapes(q, k, v, q_segment_ids, kv_segment_ids)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation={implementation!r} is unknown; choose one of {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _xla(q, k, v, causal, q_offset, q_segment_ids, kv_segment_ids, mask, bias, scale)


def _check_shapes(q, k, v, q_seg, kv_seg):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants q, k, v of rank 4 [batch, length, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"key shape {k.shape} != value shape {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads={q.shape[2]} is not a multiple of key/value heads={k.shape[2]}")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_seg is not None and (q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]):
        raise ValueError(f"segment ids {q_seg.shape}/{kv_seg.shape} must be [batch, length] of q {q.shape[:2]}/k {k.shape[:2]}")


def make_mask(lq, lk, *, causal, q_offset, q_segment_ids, kv_segment_ids, mask):
    """Boolean [B|1, 1, Lq, Lk] mask (or None) from the mask options."""
    out = None
    if causal:
        qi = jnp.arange(lq)[:, None] + q_offset
        out = (jnp.arange(lk)[None, :] <= qi)[None, None]
    if q_segment_ids is not None:
        seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        out = seg if out is None else out & seg
    if mask is not None:
        out = mask if out is None else out & mask
    return out


def _xla(q, k, v, causal, q_offset, q_seg, kv_seg, mask, bias, scale):
    """The einsum reference: materialises the [B, H, Lq, Lk] scores."""
    b, lq, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, lq, kh, h // kh, d)  # [B, Lq, K, G, D]
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    s = s.reshape(b, h, lq, k.shape[1])
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    m = make_mask(lq, k.shape[1], causal=causal, q_offset=q_offset, q_segment_ids=q_seg,
                  kv_segment_ids=kv_seg, mask=mask)
    if m is not None:
        s = jnp.where(m, s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    p = p.reshape(b, kh, h // kh, lq, k.shape[1])
    o = jnp.einsum("bkgqs,bskd->bqkgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, lq, h, d).astype(q.dtype)
