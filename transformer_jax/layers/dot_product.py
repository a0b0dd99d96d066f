"""Scaled dot-product attention, softmax(q k^T * scale + bias) v, with selectable kernels.

Shapes: q [B, Lq, H, D], k/v [B, Lk, K, D] with H a multiple of K (GQA/MQA when K < H).
Masks combine: `causal` (query i sees keys j <= i + q_offset), packed `segment ids`
(a query sees only keys of its own segment), a boolean `mask` (True = attend) and an
additive `bias`, both broadcastable to [B, H, Lq, Lk].

A query with no visible key gets a uniform average instead of NaN (masked logits are
a large finite negative), so padding rows stay finite; their outputs are meant to be ignored.
(`cudnn` folds masks into a large negative bf16/fp16 bias: such rows are finite but not uniform.)

Kernels: `xla` (einsum reference, [B, H, Lq, Lk] scores), `chunked` (blockwise online softmax
with a FlashAttention-2 backward, memory linear in length, pure JAX, any backend), `cudnn`
(`jax.nn.dot_product_attention` on CUDA GPUs, bf16/fp16), `splash` (Pallas splash attention on
TPU, layers/splash.py), `auto` (`select_implementation`).

`auto` picks for the backend it runs on, or for the platform of an enclosing
`layers.platform.target_platform` (to lower or export, e.g., a GPU program from a CPU machine).
"""
from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transformer_jax.layers import platform
from transformer_jax.layers.residuals import stash, unstash

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn")
KERNELS = IMPLEMENTATIONS + ("splash",)  # every name `implementation` accepts (splash: TPU only)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
F32 = jnp.float32
# `auto` uses `chunked` instead of `xla` once one head's [Lq, Lk] scores exceed 512 x 512.
# Measured (benchmarks/attention.py, 2-core CPU, 8 heads, d=64, f32, fwd+bwd, ms xla/chunked):
# L=512: 25/50 (batch 1), 347/374 (batch 8) -- a single 512-tile gains nothing alone (but see CPU
# below); L=1024: 326/236 causal, 195/167 not; L=2048 causal: 895/387; L=4096: 7365/1507 with 1.5 GiB vs 62 MiB temp.
# What matters is the length (tiles to skip, scores that fall out of cache), not batch x heads.
CHUNKED_MIN_SCORES = 512 * 512
# On CPU `chunked` wins from one 512 x 512 tile on (>=) inside a training step: its custom VJP saves
# q, k, v, out and the row logsumexp, where autodiff of `xla` saves [B, H, Lq, Lk] scores, probabilities
# and the broadcast mask, which a scan over layers stacks for every layer. Measured on the bench train
# step (f32, 6 scanned layers, L=512, batch 8; benchmarks/train_step.py --variants f32,f32-attn-xla):
# CPU s/step chunked/xla = 0.87 (16.9/19.4), 0.90 (18.4/20.4) and 0.99 (16.3/16.5; median wall 0.95)
# in three runs (1-2 steps each after a warm-up, interleaved, on a 2-core Xeon at load average
# 12-28), the same loss to 4 digits: a small gain, at the edge of what that machine resolves.
# Tiles of `chunked` on CPU: small tiles skip more of the causal triangle, and their [bq, bk]
# scores stay in cache. The bench train step (6 scanned layers, L=512, batch 8, causal; two
# tile sizes compiled in one process, steps interleaved, medians of 6-8; AMD EPYC, 2026-12-05):
# 512 / 128 / 64 / 32 -> bf16 4.05 / 3.81 / 3.74 / 3.94 s (a second run: 128 3.96, 64 3.74),
# f32 6.66 / 6.48 / 6.33 s (a second run: 128 6.52, 64 6.51, 32 6.58); f32 loss equal to all
# printed digits. Alone (benchmarks/attention.py, batch 1, causal f32, fwd+bwd ms at L = 512 /
# 1024 / 2048): 512-tiles 32.8 / 86.2 / 298, 64-tiles 18.2 / 63.5 / 241, with a fifth of the temp.
# q tiles of 64 against kv tiles of 128 ran 1-5% faster than 64 x 64 in three of three runs (bf16
# 3.66 / 3.68 against 3.86 / 3.73 s, f32 6.50 against 6.60 s); 128 x 64, 64 x 256, 32 x 128 and
# 32 x 32 were no better.
CPU_BLOCKS = (64, 128)
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 is safe everywhere
log = logging.getLogger(__name__)


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
    block_q: int | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """Attention output [B, Lq, H, D] in q's dtype. `block_q`/`block_kv`: tile sizes of `chunked`
    (default `chunked_blocks()`: 64 x 128 on CPU, 512 x 512 elsewhere)."""
    _check_shapes(q, k, v, q_segment_ids, kv_segment_ids)
    if implementation not in KERNELS:
        raise ValueError(f"attention implementation={implementation!r} is unknown; choose one of {KERNELS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (q, k, v, causal, q_offset, q_segment_ids, kv_segment_ids, mask, bias, scale)
    if implementation == "auto":
        general_mask = mask is not None or (causal and not _is_zero(q_offset))
        implementation, reason = select_implementation(
            platform.backend(), q.dtype, q.shape[1], k.shape[1], batch=q.shape[0], heads=q.shape[2],
            head_dim=q.shape[3], has_bias=bias is not None, dense_mask=general_mask or q_segment_ids is not None,
            general_mask=general_mask, causal=causal)
        log.info("attention implementation=%s: %s", implementation, reason)
    if implementation == "splash":
        return _splash(*args)
    if implementation == "cudnn":
        return _cudnn(*args)
    if implementation == "chunked":
        with jax.named_scope("chunked_attention"):  # `plan` finds the kernel's tile loops by this name
            default_q, default_kv = chunked_blocks()
            return _chunked(*args, block_q=block_q or default_q, block_kv=block_kv or default_kv)
    return _xla(*args)


def chunked_blocks() -> tuple[int, int]:
    """Default (block_q, block_kv) of `chunked`: CPU_BLOCKS on CPU, 512 x 512 elsewhere."""
    return CPU_BLOCKS if platform.backend() == "cpu" else (512, 512)


def select_implementation(backend: str, dtype, lq: int, lk: int, *, batch: int = 1, heads: int = 1,
                          head_dim: int = 64, has_bias: bool = False, dense_mask: bool = False,
                          general_mask: bool | None = None, causal: bool = False) -> tuple[str, str]:
    """The kernel `auto` runs for these inputs, and why. `dense_mask`: segment ids, a boolean
    mask or a nonzero q_offset, which cuDNN only takes as a materialised [B, 1, Lq, Lk] bias.
    `general_mask`: a boolean mask or a nonzero q_offset, which splash cannot take (it does
    take segment ids); None: assume `dense_mask` is one."""
    dtype = jnp.dtype(dtype)
    if lq * lk >= CHUNKED_MIN_SCORES if backend == "cpu" else lq * lk > CHUNKED_MIN_SCORES:
        fallback = "chunked", f"Lq x Lk = {lq} x {lk} {'>=' if backend == 'cpu' else '>'} 512 x 512 scores per head"
    else:
        fallback = "xla", f"Lq x Lk = {lq} x {lk} {'<' if backend == 'cpu' else '<='} 512 x 512 scores per head"
    if backend in ("gpu", "cuda"):  # "gpu" means CUDA here; pass "rocm" for AMD GPUs
        why_not = _cudnn_unsupported(dtype, lq, lk, batch, head_dim, has_bias, dense_mask)
        if why_not is None:
            return "cudnn", "GPU with a cuDNN-supported dtype, head_dim and masks"
        return fallback[0], f"cudnn not usable ({why_not}); {fallback[1]}"
    if backend == "tpu":
        general = dense_mask if general_mask is None else general_mask
        why_not = _splash_unsupported(dtype, lq, lk, has_bias, general, causal)
        if why_not is None:
            return "splash", "TPU with bf16, lengths multiple of 128 and causal/full/segment masks"
        return fallback[0], f"splash not used ({why_not}); {fallback[1]}"
    return fallback[0], f"backend {backend}; {fallback[1]}"


def _splash_unsupported(dtype, lq, lk, has_bias, general_mask, causal, prefer=True):
    """Why splash does not take these inputs (None: it does). `prefer`: also the cases where
    `auto` prefers another kernel (f32, which the reference kernels keep exact; short sequences)."""
    from transformer_jax.layers.splash import block_size
    if prefer and jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return f"dtype {jnp.dtype(dtype)} is not bfloat16"
    if prefer and lq * lk <= CHUNKED_MIN_SCORES:
        return "one 512 x 512 tile or less: XLA's fused einsum does as well"
    if not (block_size(lq) and block_size(lk)):
        return f"lengths {lq}/{lk} are not multiples of 128"
    if has_bias:
        return "an additive bias (e.g. T5 relative positions) is not supported by the kernel"
    if general_mask:
        return "a boolean mask or a nonzero q_offset is not supported by the kernel"
    if causal and lq != lk:
        return f"causal attention with Lq={lq} != Lk={lk}"
    return None


def _cudnn_unsupported(dtype, lq, lk, batch, head_dim, has_bias, dense_mask):
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {dtype} is not bfloat16/float16"
    if head_dim > CUDNN_MAX_HEAD_DIM or head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8 <= {CUDNN_MAX_HEAD_DIM}"
    if (has_bias or dense_mask) and (lq % 2 or lk % 2):
        return f"cuDNN's backward with a bias needs even lengths, got {lq}/{lk}"
    if dense_mask and batch * lq * lk * 2 > 2**28:
        return "the mask would have to be materialised as a [B, 1, Lq, Lk] bias over 256 MiB"
    return None


def _is_zero(x) -> bool:
    return isinstance(x, (int, np.integer)) and int(x) == 0


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
    dtype = q.dtype
    b, lq, h, d = q.shape
    kh = k.shape[2]
    if platform.backend() == "cpu" and q.dtype != F32:  # XLA:CPU's DotThunk has no bf16 x bf16 -> f32 (jax 0.10.2),
        q, k, v = (x.astype(F32) for x in (q, k, v))  # which a batched decode step over the KV cache hits
    qg = q.reshape(b, lq, kh, h // kh, d)  # [B, Lq, K, G, D]
    s = platform.einsum("bqkgd,bskd->bkgqs", qg, k) * scale
    s = s.reshape(b, h, lq, k.shape[1])
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    m = make_mask(lq, k.shape[1], causal=causal, q_offset=q_offset, q_segment_ids=q_seg,
                  kv_segment_ids=kv_seg, mask=mask)
    if m is not None:
        s = jnp.where(m, s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    p = p.reshape(b, kh, h // kh, lq, k.shape[1])
    o = platform.einsum("bkgqs,bskd->bqkgd", p, v)
    return o.reshape(b, lq, h, d).astype(dtype)


def _splash(q, k, v, causal, q_offset, q_seg, kv_seg, mask, bias, scale):
    """Pallas splash attention (layers/splash.py); only `select_implementation`'s cases."""
    platform_name = platform.backend()
    if platform_name != "tpu":
        raise ValueError(f"attention implementation='splash' needs a TPU; this backend is {platform_name} — use 'auto', 'xla' or 'chunked'")
    why_not = _splash_unsupported(q.dtype, q.shape[1], k.shape[1], bias is not None,
                                  mask is not None or (causal and not _is_zero(q_offset)), causal, prefer=False)
    if why_not is not None:
        raise ValueError(f"attention implementation='splash' cannot take these inputs: {why_not}; use 'auto'")
    from transformer_jax.layers.splash import splash_attention
    return splash_attention(q, k, v, causal=causal, scale=scale, q_segment_ids=q_seg, kv_segment_ids=kv_seg)


def _cudnn(q, k, v, causal, q_offset, q_seg, kv_seg, mask, bias, scale):
    """cuDNN flash attention via jax.nn; other masks than plain causal become a dense bias."""
    platform_name = platform.backend()
    if platform_name != "cuda":
        raise ValueError(f"attention implementation='cudnn' needs a CUDA GPU; this backend is {platform_name} — use 'auto', 'xla' or 'chunked'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention implementation='cudnn' needs bfloat16/float16 inputs, got {q.dtype} — cast them or use 'auto'/'chunked'")
    plain_causal = causal and _is_zero(q_offset)  # cuDNN's causal mask is top-left aligned
    m = make_mask(q.shape[1], k.shape[1], causal=causal and not plain_causal, q_offset=q_offset,
                  q_segment_ids=q_seg, kv_segment_ids=kv_seg, mask=mask)
    if m is not None:
        m = jnp.broadcast_to(m, (*m.shape[:-2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=m, scale=scale, is_causal=plain_causal,
                                        implementation="cudnn")


# ----------------------------------------------------------------------------------------
# chunked: blockwise attention with an online softmax (FlashAttention-2, Dao 2023), pure JAX.
# Internal layout: q blocks [nq, B, K, G, bq, D], k/v blocks [nk, B, K, bk, D], scores
# [B, K, G, bq, bk]. Mask and bias are reshaped to 5-D [B|1, K|1, G|1, Lq|1, Lk|1] and sliced
# per block. Padding, reshapes and transposes happen outside the custom_vjp (autodiff handles
# them); the custom_vjp saves q, k, v, out and the row logsumexp (besides the mask inputs).


class _Cfg(NamedTuple):
    causal: bool
    scale: float
    bq: int
    bk: int
    lk: int  # true key length (keys at >= lk are padding)


def _chunked(q, k, v, causal, q_offset, q_seg, kv_seg, mask, bias, scale, *, block_q, block_kv):
    b, lq, h, d = q.shape
    lk, kh = k.shape[1], k.shape[2]
    g = h // kh
    bq, bk = max(1, min(block_q, lq)), max(1, min(block_kv, lk))
    nq, nk = -(-lq // bq), -(-lk // bk)
    pq, pk = nq * bq - lq, nk * bk - lk
    cfg = _Cfg(bool(causal), float(scale), bq, bk, lk)

    def blocks(x, pad, n, blk):  # [B, L, ..., D] -> [n, B, ..., blk, D]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(x.shape[0], n, blk, *x.shape[2:])
        return jnp.moveaxis(x, (1, 2), (0, x.ndim - 2))

    q_blk = blocks(q.reshape(b, lq, kh, g, d), pq, nq, bq)
    k_blk, v_blk = blocks(k, pk, nk, bk), blocks(v, pk, nk, bk)
    if q_seg is not None:
        q_seg = jnp.pad(q_seg, [(0, 0), (0, pq)]).reshape(b, nq, bq).swapaxes(0, 1)
        kv_seg = jnp.pad(kv_seg, [(0, 0), (0, pk)]).reshape(b, nk, bk).swapaxes(0, 1)
    mask5 = None if mask is None else _to5(mask, h, kh, pq, pk)
    bias5 = None if bias is None else _to5(bias, h, kh, pq, pk)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    out = _attend(cfg, q_offset, q_blk, k_blk, v_blk, q_seg, kv_seg, mask5, bias5)
    out = jnp.moveaxis(out, (0, 4), (1, 2)).reshape(b, nq * bq, h, d)
    return out[:, :lq]


def _to5(x, h, kh, pq, pk):
    """[..., H|1, Lq|1, Lk|1] -> [B|1, K|1, G|1, Lq_pad|1, Lk_pad|1]."""
    x = jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)
    hb = x.shape[1]
    if hb not in (1, h):
        raise ValueError(f"attention mask/bias heads dim {hb} must be 1 or num_heads={h}")
    x = x.reshape(x.shape[0], *((kh, h // kh) if hb == h else (1, 1)), *x.shape[2:])
    pads = [(0, 0)] * 3 + [(0, pq if x.shape[3] > 1 else 0), (0, pk if x.shape[4] > 1 else 0)]
    return jnp.pad(x, pads)


def _block(x5, cfg, i, j):
    """Tile (q block i, kv block j) of a 5-D mask/bias, keeping broadcast dims of size 1."""
    if x5.shape[3] > 1:
        x5 = lax.dynamic_slice_in_dim(x5, i * cfg.bq, cfg.bq, axis=3)
    if x5.shape[4] > 1:
        x5 = lax.dynamic_slice_in_dim(x5, j * cfg.bk, cfg.bk, axis=4)
    return x5


def _scores_and_visible(cfg, q_offset, i, j, q_i, k_j, qseg_i, kvseg_j, mask5, bias5):
    """f32 scores [B, K, G, bq, bk] of tile (i, j) and which of them are visible."""
    s = platform.einsum("bkgqd,bksd->bkgqs", q_i, k_j) * cfg.scale
    if bias5 is not None:
        s = s + _block(bias5, cfg, i, j).astype(F32)
    kpos = j * cfg.bk + jnp.arange(cfg.bk)
    vis = kpos < cfg.lk
    if cfg.causal:
        qpos = i * cfg.bq + jnp.arange(cfg.bq) + q_offset
        vis = vis & (kpos[None, :] <= qpos[:, None])
    if qseg_i is not None:
        vis = vis & (qseg_i[:, None, None, :, None] == kvseg_j[:, None, None, None, :])
    if mask5 is not None:
        vis = vis & _block(mask5, cfg, i, j)
    return s, vis


def _kv_range(cfg, q_offset, i, nk):
    """KV blocks that q block i can see: causality skips the ones after its last query."""
    if not cfg.causal:
        return 0, nk
    return 0, jnp.clip((i * cfg.bq + cfg.bq - 1 + q_offset) // cfg.bk + 1, 0, nk)


def _q_range(cfg, q_offset, j, nq):
    """Q blocks that can see kv block j."""
    if not cfg.causal:
        return 0, nq
    first = -((q_offset + cfg.bq - 1 - j * cfg.bk) // cfg.bq)  # ceil((j*bk - q_offset - bq + 1) / bq)
    return jnp.clip(first, 0, nq), nq


def _finite_max(m):
    return jnp.where(jnp.isneginf(m), 0.0, m)


def _forward(cfg, q_offset, q_blk, k_blk, v_blk, q_seg, kv_seg, mask5, bias5):
    nk = k_blk.shape[0]
    mean_v = v_blk.astype(F32).sum((0, 3)) / cfg.lk  # [B, K, D]: what a row with no visible key gets

    def q_block(args):
        i, q_i, qseg_i = args
        shape = q_i.shape[:-1]  # [B, K, G, bq]

        def kv_step(j, carry):
            m, l, acc = carry
            s, vis = _scores_and_visible(cfg, q_offset, i, j, q_i, k_blk[j], qseg_i,
                                         None if kv_seg is None else kv_seg[j], mask5, bias5)
            m_new = jnp.maximum(m, jnp.where(vis, s, -jnp.inf).max(-1))
            m_use = _finite_max(m_new)
            p = jnp.where(vis, jnp.exp(s - m_use[..., None]), 0.0)
            alpha = jnp.exp(m - m_use)
            acc = alpha[..., None] * acc + platform.einsum("bkgqs,bksd->bkgqd", p.astype(v_blk.dtype), v_blk[j])
            return m_new, alpha * l + p.sum(-1), acc

        init = (jnp.full(shape, -jnp.inf, F32), jnp.zeros(shape, F32), jnp.zeros(q_i.shape, F32))
        m, l, acc = lax.fori_loop(*_kv_range(cfg, q_offset, i, nk), kv_step, init)
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        out = jnp.where(empty[..., None], mean_v[:, :, None, None, :], acc / l_safe[..., None])
        lse = jnp.where(empty, jnp.inf, _finite_max(m) + jnp.log(l_safe))
        return out.astype(q_i.dtype), lse

    return lax.map(q_block, (jnp.arange(q_blk.shape[0]), q_blk, q_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg, q_offset, q_blk, k_blk, v_blk, q_seg, kv_seg, mask5, bias5):
    return _forward(cfg, q_offset, q_blk, k_blk, v_blk, q_seg, kv_seg, mask5, bias5)[0]


def _attend_fwd(cfg, q_offset, q_blk, k_blk, v_blk, q_seg, kv_seg, mask5, bias5):
    out, lse = _forward(cfg, q_offset, q_blk, k_blk, v_blk, q_seg, kv_seg, mask5, bias5)
    return out, (q_offset, stash(q_blk), stash(k_blk), stash(v_blk), q_seg, kv_seg, mask5, bias5, stash(out), lse)


def _attend_bwd(cfg, res, d_out):
    """FlashAttention-2 backward (Algorithm 2): recompute P per tile from the saved logsumexp,
    dS = P * (dP - D) with D = rowsum(dO * O). One pass: a scan over kv blocks (emitting dK, dV)
    whose inner loop over the q blocks that see it adds into a carried dQ (and d bias). On a
    sequential machine this does each tile's exp and QK^T once instead of twice (two passes)."""
    q_offset, q_blk, k_blk, v_blk, q_seg, kv_seg, mask5, bias5, out, lse = res
    q_blk, k_blk, v_blk, out = unstash(q_blk), unstash(k_blk), unstash(v_blk), unstash(out)
    nq, nk = q_blk.shape[0], k_blk.shape[0]
    dd = (d_out.astype(F32) * out.astype(F32)).sum(-1)  # D [nq, B, K, G, bq]
    empty = jnp.isinf(lse)  # rows that saw no key output mean(v): their dO spreads uniformly over v
    do_empty = jnp.where(empty[..., None], d_out.astype(F32), 0.0).sum((0, 3, 4))  # [B, K, D]

    def kv_block(carry, args):
        j, k_j, v_j, kvseg_j = args

        def q_step(i, c):
            dk, dv, dq, db = c
            q_i, do_i = q_blk[i], d_out[i]
            s, vis = _scores_and_visible(cfg, q_offset, i, j, q_i, k_j, None if q_seg is None else q_seg[i], kvseg_j, mask5, bias5)
            p = jnp.where(vis, jnp.exp(s - lse[i][..., None]), 0.0)  # empty rows: lse=inf, p=0
            dp = platform.einsum("bkgqd,bksd->bkgqs", do_i, v_j)
            ds = p * (dp - dd[i][..., None])
            dv = dv + platform.einsum("bkgqs,bkgqd->bksd", p.astype(do_i.dtype), do_i)
            dsc = ds.astype(q_blk.dtype)
            dk = dk + platform.einsum("bkgqs,bkgqd->bksd", dsc, q_i)
            dq = dq.at[i].add(platform.einsum("bkgqs,bksd->bkgqd", dsc, k_j))
            if bias5 is not None:
                db = _add_bias_tile(db, ds, cfg, i, j)
            return dk, dv, dq, db

        zeros = jnp.zeros(k_j.shape, F32)
        dk, dv, dq, db = lax.fori_loop(*_q_range(cfg, q_offset, j, nq), q_step, (zeros, zeros) + carry)
        real = (j * cfg.bk + jnp.arange(cfg.bk) < cfg.lk)[:, None]
        dv = dv + jnp.where(real, do_empty[:, :, None, :] / cfg.lk, 0.0)
        return (dq, db), ((dk * cfg.scale).astype(k_blk.dtype), dv.astype(v_blk.dtype))

    db0 = None if bias5 is None else jnp.zeros(bias5.shape, F32)
    (dq, db), (dk, dv) = lax.scan(kv_block, (jnp.zeros(q_blk.shape, F32), db0), (jnp.arange(nk), k_blk, v_blk, kv_seg))
    dq = (dq * cfg.scale).astype(q_blk.dtype)
    db = None if bias5 is None else db.astype(bias5.dtype)
    return None, dq, dk, dv, None, None, None, db


def _add_bias_tile(db, ds, cfg, i, j):
    """Add a dS tile [B, K, G, bq, bk], summed over the bias's broadcast dims, into d bias."""
    axes = tuple(a for a in range(5) if db.shape[a] == 1 and ds.shape[a] > 1)
    ds = ds.sum(axes, keepdims=True)
    idx = (0, 0, 0, i * cfg.bq if db.shape[3] > 1 else 0, j * cfg.bk if db.shape[4] > 1 else 0)
    return lax.dynamic_update_slice(db, lax.dynamic_slice(db, idx, ds.shape) + ds, idx)


_attend.defvjp(_attend_fwd, _attend_bwd)
