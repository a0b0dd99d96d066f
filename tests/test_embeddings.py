"""Token embeddings and position encodings."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_jax.layers.embeddings import (Embed, LearnedPositions, RelativePositionBias, apply_rope,
                                               sinusoidal_positions, t5_relative_bucket)


def test_sinusoidal_matches_the_paper():
    pos = jnp.arange(50)[None]
    pe = np.asarray(sinusoidal_positions(pos, 16))[0]
    for p in (0, 7, 49):
        for i in range(8):
            angle = p / 10000 ** (2 * i / 16)
            np.testing.assert_allclose(pe[p, 2 * i], math.sin(angle), atol=1e-5)
            np.testing.assert_allclose(pe[p, 2 * i + 1], math.cos(angle), atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(-200, 200))
def test_rope_scores_depend_only_on_relative_position(m, n, shift):
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 32))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 32))
    def score(a, b):
        return jnp.sum(apply_rope(q, jnp.array([[a]])) * apply_rope(k, jnp.array([[b]])))
    base = shift + 300  # keep positions non-negative
    np.testing.assert_allclose(score(m, n), score(m + base, n + base), rtol=1e-4, atol=1e-4)


def test_rope_preserves_norm_and_is_identity_at_zero():
    x = jax.random.normal(jax.random.key(0), (2, 6, 3, 8))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    chex.assert_trees_all_close(jnp.linalg.norm(apply_rope(x, pos), axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    chex.assert_trees_all_close(apply_rope(x, jnp.zeros_like(pos)), x)


def _hf_bucket(rel, bidirectional, num_buckets, max_distance):
    """T5's bucketing, written from the paper's description in plain Python."""
    ret = 0
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if rel > 0 else 0
        n = abs(rel)
    else:
        n = max(-rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(large, num_buckets - 1)


def test_t5_buckets_match_reference():
    rel = np.arange(-300, 301)
    for bidi in (True, False):
        got = np.asarray(t5_relative_bucket(jnp.asarray(rel), bidi, 32, 128))
        want = [_hf_bucket(int(r), bidi, 32, 128) for r in rel]
        np.testing.assert_array_equal(got, want)


class EmbedTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_embed_and_attend(self):
        m = Embed(vocab_size=50, features=8)
        tok = jnp.array([[1, 2, 3]])
        v = m.init(jax.random.key(0), tok)
        x = self.variant(m.apply)(v, tok)
        chex.assert_shape(x, (1, 3, 8))
        table = v["params"]["embedding"].value
        chex.assert_trees_all_close(x, table[tok])
        logits = m.apply(v, x, method=m.attend)
        chex.assert_shape(logits, (1, 3, 50))
        chex.assert_trees_all_close(logits, x @ table.T, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_learned_positions_and_relative_bias_shapes(self):
        pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
        lp = LearnedPositions(max_len=16, features=8)
        v = lp.init(jax.random.key(0), pos)
        chex.assert_shape(self.variant(lp.apply)(v, pos), (2, 7, 8))
        rb = RelativePositionBias(num_heads=4, num_buckets=8, max_distance=16)
        v = rb.init(jax.random.key(0), pos, pos)
        bias = self.variant(rb.apply)(v, pos, pos)
        chex.assert_shape(bias, (2, 4, 7, 7))
        # Equal distances get equal biases (a Toeplitz matrix per head).
        chex.assert_trees_all_close(bias[0, :, 1, 0], bias[0, :, 5, 4])


def test_lookup_from_a_table_split_along_embed_runs_in_each_devices_columns():
    """FSDP (8 fake devices, rows and the table's columns split over fsdp): the lookup neither
    gathers the table nor reduces its gradient, and gives the one-device values."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P

    from transformer_jax.parallel import MeshConfig, get_rules, make_mesh
    V, D, B, L = 512, 64, 8, 16
    embed = Embed(V, D)
    table = {"params": {"embedding": jax.random.normal(jax.random.key(0), (V, D))}}
    tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V)
    cot = jax.random.normal(jax.random.key(2), (B, L, D))
    loss = lambda t, x: jnp.sum(embed.apply(t, x) * cot)  # noqa: E731
    want = jax.value_and_grad(loss)(table, tokens)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1, preset="fsdp"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules("fsdp")):
        args = (jax.device_put(table, NamedSharding(mesh, P(None, "fsdp"))),
                jax.device_put(tokens, NamedSharding(mesh, P("fsdp"))))
        step = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()
        got = step(*args)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[1]["params"]["embedding"].sharding.spec == P(None, "fsdp")
    text = step.as_text()
    for op in ("all-gather", "all-reduce", "reduce-scatter"):
        for line in text.splitlines():
            if f" {op}(" in line or f" {op}-start(" in line:
                assert f"[{V}," not in line.split("=")[1], line  # nothing table-sized moves


def test_small_table_lookup_is_take_with_the_same_gradient():
    """The relative bias's lookup under FSDP: a gather forward, a one-hot contraction backward
    (test_collectives pins what it saves)."""
    from transformer_jax.layers.embeddings import small_table_lookup
    table = jax.random.normal(jax.random.key(0), (8, 3))
    buckets = jax.random.randint(jax.random.key(1), (2, 5, 7), 0, 8)
    g = jax.random.normal(jax.random.key(2), (2, 5, 7, 3))
    ours, plain = (jax.value_and_grad(lambda t, f=f: jnp.sum(f(t, buckets) * g))(table)
                   for f in (small_table_lookup, lambda t, b: jnp.take(t, b, axis=0)))
    chex.assert_trees_all_close(ours, plain, rtol=1e-5, atol=1e-5)
