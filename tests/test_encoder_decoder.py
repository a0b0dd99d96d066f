"""EncoderDecoder (Vaswani / T5): shapes, encode/decode split, causality, packing, cached decoding."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from model_testing import init_and_apply, jit_apply, tokens

MODELS = ["t5-tiny", "transformer-tiny"]


class ShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*MODELS)
    def test_shapes(self, name):
        cfg, model, v, (inp, dec) = init_and_apply(name)
        chex.assert_shape(self.variant(model.apply)(v, inp, dec), (2, 8, cfg.vocab_size))
        enc = jit_apply(model)(v, inp, method="encode")
        chex.assert_shape(enc, (2, 16, cfg.d_model))


@pytest.mark.parametrize("name", MODELS)
def test_encode_then_decode_equals_call(name):
    _, model, v, (inp, dec) = init_and_apply(name)
    enc = jit_apply(model)(v, inp, method="encode")
    chex.assert_trees_all_close(jit_apply(model)(v, enc, dec, method="decode"), jit_apply(model)(v, inp, dec), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_decoder_is_causal_and_encoder_is_seen_everywhere(name):
    _, model, v, (inp, dec) = init_and_apply(name)
    base = jit_apply(model)(v, inp, dec)
    later = jit_apply(model)(v, inp, dec.at[:, 5:].set(tokens(9, (2, 3))))
    chex.assert_trees_all_close(base[:, :5], later[:, :5], atol=1e-5)
    other_input = jit_apply(model)(v, inp.at[:, -1].set(7), dec)
    assert not np.allclose(base[:, 0], other_input[:, 0])


@pytest.mark.parametrize("name", MODELS)
def test_packed_pairs_equal_each_alone(name):
    _, model, v, _ = init_and_apply(name)
    in_a, in_b, dec_a, dec_b = tokens(1, (1, 5)), tokens(2, (1, 9)), tokens(3, (1, 4)), tokens(4, (1, 3))
    inputs = jnp.concatenate([in_a, in_b, jnp.zeros((1, 2), jnp.int32)], 1)
    decs = jnp.concatenate([dec_a, dec_b, jnp.zeros((1, 1), jnp.int32)], 1)
    iseg = jnp.array([[1] * 5 + [2] * 9 + [0] * 2])
    ipos = jnp.array([list(range(5)) + list(range(9)) + [0, 0]])
    tseg = jnp.array([[1] * 4 + [2] * 3 + [0]])
    tpos = jnp.array([list(range(4)) + list(range(3)) + [0]])
    out = jit_apply(model)(v, inputs, decs, input_segment_ids=iseg, input_positions=ipos,
                      target_segment_ids=tseg, target_positions=tpos)
    chex.assert_trees_all_close(out[:, :4], jit_apply(model)(v, in_a, dec_a), atol=1e-5)
    chex.assert_trees_all_close(out[:, 4:7], jit_apply(model)(v, in_b, dec_b), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_reproduces_full_forward(name):
    cfg, model, v, (inp, dec) = init_and_apply(name)
    full = jit_apply(model)(v, inp, dec)
    enc = jit_apply(model)(v, inp, method="encode")
    cache = jax.jit(model.init, static_argnames="decode")(jax.random.key(0), inp, jnp.zeros((2, 12), jnp.int32), decode=True)["cache"]
    step = jax.jit(lambda c, x: model.apply({**v, "cache": c}, enc, x, decode=True, method="decode",
                                            mutable=["cache"]))
    outs = []
    for i in range(dec.shape[1]):
        logits, mut = step(cache, dec[:, i:i + 1])
        cache = mut["cache"]
        outs.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, atol=2e-5)
