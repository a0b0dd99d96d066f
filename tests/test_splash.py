"""Pallas splash attention (TPU): when `auto` picks it, why it falls back, and the wrapper's
numerics -- run here in Pallas' interpreter on CPU (the kernel itself needs a TPU)."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from transformer_jax.layers.dot_product import KERNELS, dot_product_attention, select_implementation
from transformer_jax.layers.splash import block_size, splash_attention


@pytest.mark.parametrize("kw,want,why", [
    (dict(causal=True), "splash", "TPU"),
    (dict(causal=True, dense_mask=True, general_mask=False), "splash", "segment"),  # packed segment ids
    (dict(causal=False, lk=2048), "splash", "TPU"),  # cross-attention, full mask
    (dict(causal=True, dtype=jnp.float32), "chunked", "bfloat16"),
    (dict(causal=True, has_bias=True), "chunked", "bias"),
    (dict(causal=True, dense_mask=True, general_mask=True), "chunked", "q_offset"),
    (dict(causal=True, dense_mask=True), "chunked", "q_offset"),  # unspecified: assume a general mask
    (dict(causal=True, lq=4000, lk=4000), "chunked", "multiples of 128"),
    (dict(causal=True, lq=1024, lk=2048), "chunked", "Lq=1024 != Lk=2048"),
    (dict(causal=True, lq=256, lk=256), "xla", "512 x 512"),
])
def test_tpu_selection_and_fallback_reasons(kw, want, why):
    kw = dict(dict(dtype=jnp.bfloat16, lq=4096, lk=4096), **kw)
    name, reason = select_implementation("tpu", kw.pop("dtype"), kw.pop("lq"), kw.pop("lk"), head_dim=64, **kw)
    assert name == want and why in reason, reason
    # no other backend ever picks splash
    for backend in ("cpu", "cuda", "rocm"):
        assert select_implementation(backend, jnp.bfloat16, 4096, 4096, causal=True)[0] != "splash"


def test_block_size():
    assert [block_size(n) for n in (4096, 768, 384, 128, 1000)] == [512, 256, 128, 128, 0]


def test_splash_on_cpu_is_a_one_line_error_and_auto_avoids_it():
    q = jnp.zeros((1, 1024, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a TPU; this backend is cpu") as e:
        dot_product_attention(q, q, q, causal=True, implementation="splash")
    assert "\n" not in str(e.value) and "splash" in KERNELS
    out = dot_product_attention(q, q, q, causal=True)  # auto on CPU: chunked, runs
    chex.assert_shape(out, q.shape)


def _inputs(b, lq, lk, h, kh, d, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, lq, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, lk, kh, d)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1, 2, 3]], b, 0).repeat([lq // 3, lq // 3, lq - 2 * (lq // 3)], axis=1), jnp.int32)
    return q, k, v, seg


def _loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.cos(jnp.arange(q.shape[-1])))


def test_interpreted_kernel_matches_xla_causal_packed_gqa_padded_head_dim():
    """GQA (4 query heads on 2 kv heads), head_dim 64 (zero-padded to 128), packed segments,
    causal, pre-scaled q; outputs and gradients against the einsum reference."""
    q, k, v, seg = _inputs(1, 384, 384, 4, 2, 64)  # 3 x 3 blocks of 128: causal skipping across blocks
    scale = 0.3
    ref = lambda q, k, v: dot_product_attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,  # noqa: E731
                                                scale=scale, implementation="xla")
    got = lambda q, k, v: splash_attention(q, k, v, causal=True, scale=scale, q_segment_ids=seg,  # noqa: E731
                                           kv_segment_ids=seg, interpret=True)
    chex.assert_trees_all_close(got(q, k, v), ref(q, k, v), atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(jax.grad(_loss(got), argnums=(0, 1, 2))(q, k, v),
                                jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v), atol=5e-5, rtol=5e-5)


def test_interpreted_kernel_under_a_mesh_runs_per_shard():
    """Under jax.set_mesh + logical rules (batch->data, heads->tensor) the kernel runs inside
    shard_map on each device's batch rows and heads, and still matches the reference."""
    q, k, v, seg = _inputs(4, 128, 384, 4, 4, 128, seed=1)
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor"))
    f = jax.jit(lambda q, k, v: splash_attention(q, k, v, causal=False, scale=0.125, interpret=True))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = f(q, k, v)
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
    ref = dot_product_attention(q, k, v, scale=0.125, implementation="xla")
    chex.assert_trees_all_close(got, ref, atol=2e-5, rtol=2e-5)
