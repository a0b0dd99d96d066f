"""Pallas splash attention on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`).

    out_BLHD = splash_attention(q_BLHD, k_BSKD, v_BSKD, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                                scale=d ** -0.5)

The kernel works on one example [heads, length, head_dim] with a static mask (causal or
full) and optional segment ids; this wrapper transposes, pre-scales q (the kernel has no
scale), zero-pads head_dim to the 128-lane width (exact: zeros add nothing to q.k and the
padded output columns are dropped), vmaps over the batch and, under a mesh, runs it per
shard with `jax.shard_map` over the mesh axes that the logical rules give `batch` and
`heads` (a Pallas call is not partitioned by XLA; without this it would be replicated).

Only `dot_product.select_implementation` decides when it applies (bf16, lengths multiple of
128, no bias, no general mask, causal only for Lq == Lk). `interpret=True` runs the kernel
in Pallas' interpreter, on any backend: that is how the CPU tests check this wrapper.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LANES = 128


def block_size(length: int) -> int:
    """The largest of 512, 256, 128 dividing `length` (0 if none does)."""
    return next((b for b in (512, 256, 128) if length % b == 0), 0)


def _kernel(h: int, lq: int, lk: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    bq, bk = block_size(lq), block_size(lk)
    masks = [sa.CausalMask((lq, lk)) if causal else sa.FullMask((lq, lk)) for _ in range(h)]
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    return sa.make_splash_mha(sa.MultiHeadMask(masks), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _local(q, k, v, q_seg, kv_seg, *, causal: bool, scale: float, interpret: bool):
    """One shard: q [B, Lq, H, D], k/v [B, Lk, K, D] -> [B, Lq, H, D]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    d = q.shape[-1]
    pad = (-d) % LANES
    to_heads = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0)] * 3 + [(0, pad)])  # noqa: E731  [B, H, L, Dp]
    qh = to_heads((q * jnp.asarray(scale, q.dtype)).astype(q.dtype))
    kh, vh = to_heads(k), to_heads(v)
    kernel = _kernel(q.shape[2], q.shape[1], k.shape[1], causal, interpret)
    if q_seg is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        out = jax.vmap(lambda a, b, c, s, t: kernel(a, b, c, segment_ids=sa.SegmentIds(q=s, kv=t)))(
            qh, kh, vh, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))
    return jnp.swapaxes(out[..., :d], 1, 2).astype(q.dtype)


def _mesh_specs():
    """(mesh, batch axes, head axes) when tracing under a mesh with logical rules, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    import flax.linen as nn
    batch, heads = nn.logical_to_mesh_axes(("batch", "heads"))
    kv = nn.logical_to_mesh_axes(("kv_heads",))[0]
    if kv != heads:
        heads = None  # q and k/v heads must split alike for GQA groups to stay together
    return mesh, batch, heads


def splash_attention(q, k, v, *, causal: bool, scale: float, q_segment_ids=None, kv_segment_ids=None,
                     interpret: bool = False):
    """Attention [B, Lq, H, D] by the splash kernel; see the module docstring for what it takes."""
    f = lambda q, k, v, s, t: _local(q, k, v, s, t, causal=causal, scale=scale, interpret=interpret)  # noqa: E731
    specs = _mesh_specs()
    if specs is None:
        return f(q, k, v, q_segment_ids, kv_segment_ids)
    mesh, batch, heads = specs
    x, seg = P(batch, None, heads, None), P(batch, None)
    if q_segment_ids is None:
        return jax.shard_map(lambda q, k, v: f(q, k, v, None, None), mesh=mesh, in_specs=(x, x, x), out_specs=x,
                             check_vma=False)(q, k, v)
    return jax.shard_map(f, mesh=mesh, in_specs=(x, x, x, seg, seg), out_specs=x, check_vma=False)(
        q, k, v, q_segment_ids, kv_segment_ids)
