"""Decoding's one-step attention equals attention over the cache after the step's write."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.layers.dot_product import dot_product_attention
from transformer_jax.layers.step_attention import cached_step_attention


@pytest.mark.parametrize("kv_heads, with_bias, window", [(4, False, None), (2, True, None), (1, False, 5)])
def test_cached_step_equals_attention_over_the_written_cache(kv_heads, with_bias, window):
    """One query per row against the cache before its write plus its own key: the attention over
    the cache with the key written at `index` (left padding as segment 0, GQA, a bias, a window)."""
    b, h, d, slots, index = 3, 4, 16, 12, 7
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (b, 1, h, d))
    cache_k, cache_v = (jax.random.normal(k, (b, kv_heads, slots, d)) for k in ks[1:3])
    new_k, new_v = (jax.random.normal(k, (b, 1, kv_heads, d)) for k in ks[3:5])
    pad = jnp.asarray([0, 2, 4])[:, None]  # left padding of each row's prompt
    cache_seg = ((jnp.arange(slots)[None] >= pad) & (jnp.arange(slots)[None] < index)).astype(jnp.int32)
    q_seg = jnp.ones((b, 1), jnp.int32)
    bias = jax.random.normal(ks[5], (1, h, 1, slots)) if with_bias else None
    mask = (index - jnp.arange(slots) < window)[None, None, None] if window else None
    got = cached_step_attention(q, cache_k, cache_v, new_k, new_v, index=index, q_segment_ids=q_seg,
                                kv_segment_ids=cache_seg, mask=mask, bias=bias, scale=d ** -0.5)
    written = lambda c, x: jax.lax.dynamic_update_slice(c, jnp.swapaxes(x, 1, 2), (0, 0, index, 0))  # noqa: E731
    k_all, v_all = (jnp.swapaxes(written(c, x), 1, 2) for c, x in ((cache_k, new_k), (cache_v, new_v)))
    want = dot_product_attention(q, k_all, v_all, causal=True, q_offset=index, q_segment_ids=q_seg,
                                 kv_segment_ids=cache_seg.at[:, index].set(1), mask=mask, bias=bias,
                                 implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
