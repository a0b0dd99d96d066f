"""Encoder (BERT style): heads, bidirectionality, packing and padding isolation."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from model_testing import init_and_apply, jit_apply, tokens


class ShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("mlm", (2, 16, 256)), ("classify", (2, 2)), ("none", (2, 16, 32)))
    def test_head_shapes(self, head, shape):
        cfg, model, _, (t,) = init_and_apply("bert-tiny")
        v = jax.jit(model.init, static_argnames="head")(jax.random.key(0), t, head=head)
        out = self.variant(lambda v, t: jit_apply(model)(v, t, head=head))(v, t)
        chex.assert_shape(out, shape)


def test_heads_create_their_own_params():
    _, model, v_mlm, (t,) = init_and_apply("bert-tiny")
    v_cls = jax.jit(model.init, static_argnames="head")(jax.random.key(0), t, head="classify")
    assert "mlm_head" in v_mlm["params"] and "classifier" not in v_mlm["params"]
    assert "classifier" in v_cls["params"] and "mlm_head" not in v_cls["params"]
    assert v_cls["params"]["embedder"]["token_type"].value.shape == (2, 32)


def test_bidirectional():
    _, model, v, (t,) = init_and_apply("bert-tiny")
    a = jit_apply(model)(v, t, head="none")
    b = jit_apply(model)(v, t.at[:, 12:].set(tokens(7, (2, 4))), head="none")
    assert not np.allclose(a[:, :12], b[:, :12])


def test_packed_and_padded_sequences_are_isolated():
    _, model, v, _ = init_and_apply("bert-tiny", position="rope")
    doc_a, doc_b = tokens(3, (1, 6)), tokens(4, (1, 7))
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 3), jnp.int32)], 1)
    seg = jnp.array([[1] * 6 + [2] * 7 + [0] * 3])
    pos = jnp.array([list(range(6)) + list(range(7)) + [0] * 3])
    out = jit_apply(model)(v, packed, segment_ids=seg, positions=pos, head="none")
    chex.assert_trees_all_close(out[:, :6], jit_apply(model)(v, doc_a, head="none"), atol=1e-5)
    chex.assert_trees_all_close(out[:, 6:13], jit_apply(model)(v, doc_b, head="none"), atol=1e-5)


def test_classifier_pools_the_first_token():
    _, model, _, (t,) = init_and_apply("bert-tiny")
    v = jax.jit(model.init, static_argnames="head")(jax.random.key(0), t, head="classify")
    seg = jnp.ones_like(t).at[:, 10:].set(0)
    a = jit_apply(model)(v, t, segment_ids=seg, head="classify")
    b = jit_apply(model)(v, t.at[:, 10:].set(5), segment_ids=seg, head="classify")  # only padding changed
    chex.assert_trees_all_close(a, b, atol=1e-5)
