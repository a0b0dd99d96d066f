"""MultiHeadAttention: MHA/GQA/MQA, self and cross, RoPE, KV-cache decoding."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from absl.testing import parameterized
from jax.sharding import AxisType

from transformer_jax.layers.attention import MultiHeadAttention
from transformer_jax.parallel.rules import get_rules


def _x(shape, key=0):
    return jax.random.normal(jax.random.key(key), shape)


class ShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((4, None), (4, 2), (4, 1))
    def test_self_and_cross_shapes(self, heads, kv_heads):
        m = MultiHeadAttention(num_heads=heads, head_dim=8, num_kv_heads=kv_heads, rope=True)
        x, enc = _x((2, 5, 16)), _x((2, 7, 16), 1)
        v = m.init(jax.random.key(0), x)
        chex.assert_shape(self.variant(lambda v, x: m.apply(v, x, causal=True))(v, x), (2, 5, 16))
        k = v["params"]["key"]["kernel"].value
        chex.assert_shape(k, (16, kv_heads or heads, 8))
        vc = m.init(jax.random.key(0), x, enc)
        chex.assert_shape(self.variant(m.apply)(vc, x, enc), (2, 5, 16))


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with K groups is MHA whose key/value heads are repeated H/K times."""
    x = _x((2, 6, 16))
    gqa = MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2, rope=True)
    mha = MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=4, rope=True)
    v = jax.tree.map(lambda a: a, gqa.init(jax.random.key(0), x))
    p = {k: {"kernel": d["kernel"].value} for k, d in v["params"].items()}
    rep = dict(p)
    for name in ("key", "value"):
        rep[name] = {"kernel": jnp.repeat(p[name]["kernel"], 2, axis=1)}
    chex.assert_trees_all_close(gqa.apply({"params": p}, x, causal=True), mha.apply({"params": rep}, x, causal=True),
                                atol=1e-5)


def test_causal_output_ignores_the_future():
    m = MultiHeadAttention(num_heads=2, head_dim=8)
    x = _x((1, 8, 16))
    v = m.init(jax.random.key(0), x)
    y = m.apply(v, x, causal=True)
    y2 = m.apply(v, x.at[:, 5:].set(_x((1, 3, 16), 9)), causal=True)
    chex.assert_trees_all_close(y[:, :5], y2[:, :5], atol=1e-6)
    assert not np.allclose(y[:, 5:], y2[:, 5:])


@pytest.mark.parametrize("kv_heads, rope", [(4, False), (2, True), (1, True)])
def test_kv_cache_reproduces_full_forward(kv_heads, rope):
    m = MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=kv_heads, rope=rope, decode=True)
    full_m = m.clone(decode=False)
    x = _x((2, 9, 16))
    params = full_m.init(jax.random.key(0), x)["params"]
    full = full_m.apply({"params": params}, x, causal=True)
    cache = m.init(jax.random.key(0), jnp.zeros((2, 12, 16)))["cache"]
    outs = []
    for lo, hi in [(0, 4), (4, 5), (5, 6), (6, 9)]:  # a prefill, then single tokens, then a chunk
        y, mut = m.apply({"params": params, "cache": cache}, x[:, lo:hi], mutable=["cache"])
        cache = mut["cache"]
        outs.append(y)
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, atol=1e-5)
    assert int(cache["index"]) == 9


@pytest.mark.parametrize("kv_heads", [2, 3])
def test_fewer_kv_heads_than_the_tensor_axis_are_repeated_on_a_mesh(kv_heads):
    """12 query heads, tensor=4: kv heads become lcm(kv_heads, 4) copies split one group per device;
    the kv kernels stay whole (replicated); forward and cached decoding equal the off-mesh result."""
    m = MultiHeadAttention(num_heads=12, head_dim=8, num_kv_heads=kv_heads, rope=True, decode=True)
    full_m = m.clone(decode=False)
    x = _x((2, 9, 16))
    params = full_m.init(jax.random.key(0), x)["params"]
    want = full_m.apply({"params": params}, x, causal=True)
    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules("dp_tp")):
        boxed = jax.eval_shape(full_m.init, jax.random.key(0), x)["params"]
        assert boxed["key"]["kernel"].names == ("embed", None, "head_dim")
        assert boxed["query"]["kernel"].names == ("embed", "heads", "head_dim")
        chex.assert_trees_all_close(jax.jit(full_m.apply, static_argnames="causal")(
            {"params": params}, x, causal=True), want, atol=1e-5)
        cache = jax.jit(m.init)(jax.random.key(0), jnp.zeros((2, 12, 16)))["cache"]
        copies = np.lcm(kv_heads, 4)
        chex.assert_shape(cache["cached_key"], (2, copies, 12, 8))  # [batch, kv_heads, length, head_dim]
        step = jax.jit(lambda c, x: m.apply({"params": params, "cache": c}, x, mutable=["cache"]))
        outs = []
        for lo, hi in [(0, 4), (4, 5), (5, 9)]:
            y, mut = step(cache, x[:, lo:hi])
            cache = mut["cache"]
            outs.append(y)
    assert cache["cached_key"].addressable_shards[0].data.shape == (1, copies // 4, 12, 8)  # rows on data, heads on tensor
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), want, atol=1e-5)


def test_left_padded_prompts_decode_like_each_alone():
    """Row 1 holds a shorter prompt, left-padded (segment 0): its outputs equal decoding it alone."""
    m = MultiHeadAttention(num_heads=2, head_dim=8, rope=True, decode=True)
    x = _x((2, 6, 16))
    params = m.clone(decode=False).init(jax.random.key(0), x)["params"]
    seg = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    pos = jnp.array([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    cache = m.init(jax.random.key(0), jnp.zeros((2, 8, 16)))["cache"]
    y, mut = m.apply({"params": params, "cache": cache}, x, q_segment_ids=seg, q_positions=pos, mutable=["cache"])
    alone_cache = m.init(jax.random.key(0), jnp.zeros((1, 8, 16)))["cache"]
    alone, _ = m.apply({"params": params, "cache": alone_cache}, x[1:, 2:], mutable=["cache"])
    chex.assert_trees_all_close(y[1, 2:], alone[0], atol=1e-5)
    # One more token for both rows, continuing each row's own positions.
    nxt = _x((2, 1, 16), 5)
    y2, _ = m.apply({"params": params, "cache": mut["cache"]}, nxt, q_segment_ids=jnp.ones((2, 1), jnp.int32),
                    q_positions=jnp.array([[6], [4]]), mutable=["cache"])
    seq = jnp.concatenate([x[1:, 2:], nxt[1:]], 1)
    ref = m.clone(decode=False).apply({"params": params}, seq, causal=True)
    chex.assert_trees_all_close(y2[1, 0], ref[0, -1], atol=1e-5)


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=3).init(jax.random.key(0), jnp.ones((1, 2, 8)))


def test_sliding_window_sees_only_the_last_keys_and_holds_in_the_cache():
    """window=3: output t depends on inputs t-2..t only; the KV-cache decode gives the full forward."""
    m = MultiHeadAttention(num_heads=2, head_dim=8, num_kv_heads=1, rope=True, sliding_window=3)
    x = _x((1, 10, 16))
    params = m.init(jax.random.key(0), x)["params"]
    y = m.apply({"params": params}, x, causal=True)
    y2 = m.apply({"params": params}, x.at[:, 4].set(_x((1, 16), 9)), causal=True)
    changed = ~np.isclose(y, y2, atol=1e-6).all(-1)[0]
    np.testing.assert_array_equal(np.flatnonzero(changed), [4, 5, 6])
    d = m.clone(decode=True)
    cache = d.init(jax.random.key(0), jnp.zeros((1, 10, 16)))["cache"]
    outs = []
    for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 10)]:
        out, mut = d.apply({"params": params, "cache": cache}, x[:, lo:hi], mutable=["cache"])
        cache = mut["cache"]
        outs.append(out)
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), y, atol=1e-5)


@pytest.mark.parametrize("kv_heads, qkv_bias", [(4, False), (2, True)])
def test_fused_projection_gradient_joins_q_k_v_in_one_concatenate(kv_heads, qkv_bias):
    """One matmul projects q, k and v; its output is split (not sliced three times), so the
    backward pass joins their gradients with one concatenate instead of padding each and
    adding (on the bf16 bench step, XLA:CPU's pad/add chain cost 18 ms per layer: 4.18 ->
    4.02 s per step). The gradient equals that of three separate projections."""
    m = MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=kv_heads, qkv_bias=qkv_bias)
    x = _x((2, 6, 16))
    params = m.init(jax.random.key(0), x)["params"]

    def loss(params, x):
        return jnp.sum(m.apply({"params": params}, x, causal=True) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=1))(params, x))
    assert "pad[" not in jaxpr and "concatenate" in jaxpr

    def separate(params, x):  # the same attention with each projection its own einsum
        p = nn.meta.unbox(params)
        q, k, v = (jnp.einsum("bld,dhk->blhk", x, p[n]["kernel"]) + (p[n]["bias"] if qkv_bias else 0)
                   for n in ("query", "key", "value"))
        k, v = (jnp.repeat(t, 4 // kv_heads, axis=2) for t in (k, v))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
        s = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), s, -1e30)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
        return jnp.sum(jnp.einsum("bqhd,hdo->bqo", o, p["out"]["kernel"]) ** 2)
    got, want = jax.grad(loss, argnums=(0, 1))(params, x), jax.grad(separate, argnums=(0, 1))(params, x)
    chex.assert_trees_all_close(nn.meta.unbox(got), nn.meta.unbox(want), rtol=1e-4, atol=1e-5)
