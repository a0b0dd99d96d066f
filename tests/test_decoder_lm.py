"""DecoderLM (GPT-2 and Llama style): shapes, causality, packing, padding, KV-cache decoding."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from model_testing import init_and_apply, jit_apply, tokens
from transformer_jax.models import DecoderLM, get_config

DECODERS = ["gpt2-tiny", "llama-tiny"]


class ShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*[(n, d) for n in DECODERS for d in ("float32", "bfloat16")])
    def test_logits_shape_and_dtype(self, name, dtype):
        cfg, model, v, (t,) = init_and_apply(name, dtype=dtype)
        logits = self.variant(model.apply)(v, t)
        chex.assert_shape(logits, (2, 16, cfg.vocab_size))
        assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("name", DECODERS)
def test_causality(name):
    _, model, v, (t,) = init_and_apply(name)
    changed = t.at[:, 9:].set(tokens(7, (2, 7)))
    a, b = jit_apply(model)(v, t), jit_apply(model)(v, changed)
    chex.assert_trees_all_close(a[:, :9], b[:, :9], atol=1e-5)
    assert not np.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("name", DECODERS)
def test_packed_documents_equal_each_alone(name):
    _, model, v, _ = init_and_apply(name)
    doc_a, doc_b = tokens(3, (1, 6)), tokens(4, (1, 10))
    packed = jnp.concatenate([doc_a, doc_b], 1)
    seg = jnp.array([[1] * 6 + [2] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    out = jit_apply(model)(v, packed, segment_ids=seg, positions=pos)
    chex.assert_trees_all_close(out[:, :6], jit_apply(model)(v, doc_a), atol=1e-5)
    chex.assert_trees_all_close(out[:, 6:], jit_apply(model)(v, doc_b), atol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_right_padding_does_not_change_real_tokens(name):
    _, model, v, _ = init_and_apply(name)
    doc = tokens(3, (1, 10))
    padded = jnp.concatenate([doc, jnp.zeros((1, 6), jnp.int32)], 1)
    seg = jnp.array([[1] * 10 + [0] * 6])
    chex.assert_trees_all_close(jit_apply(model)(v, padded, segment_ids=seg)[:, :10], jit_apply(model)(v, doc), atol=1e-5)


@pytest.mark.parametrize("name, overrides", [
    ("gpt2-tiny", {}), ("llama-tiny", {}), ("llama-tiny", dict(scan_layers=False)),
    ("gpt2-tiny", dict(position="t5_bias")), ("gpt2-tiny", dict(position="sinusoidal", num_kv_heads=1)),
])
def test_kv_cache_decoding_reproduces_full_forward(name, overrides):
    cfg, model, v, (t,) = init_and_apply(name, **overrides)
    full = jit_apply(model)(v, t)
    cache = jax.jit(model.init, static_argnames="decode")(jax.random.key(0), jnp.zeros((2, 20), jnp.int32), decode=True)["cache"]
    step = jax.jit(lambda c, x: model.apply({**v, "cache": c}, x, decode=True, mutable=["cache"]))
    logits, mut = step(cache, t[:, :7])  # prefill
    outs = [logits]
    for i in range(7, 16):  # then one token at a time
        logits, mut = step(mut["cache"], t[:, i:i + 1])
        outs.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, atol=2e-5)


def test_learned_positions_reject_too_long_inputs():
    cfg = get_config("gpt2-tiny")
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_len=64"):
        DecoderLM(cfg).init(jax.random.key(0), jnp.ones((1, 65), jnp.int32))


def test_wrong_family():
    with pytest.raises(ValueError, match="DecoderLM needs model.family='decoder'"):
        DecoderLM(get_config("bert-tiny")).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
